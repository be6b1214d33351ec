"""The fields every training script shares (output, checkpoints, trackers, Hub, precision, seed, the
optimizer step), each with its help once; a script's config inherits them and adds its own.

    @dataclass(frozen=True)
    @script_defaults(output_dir="outputs/mae-finetune", logging_steps=50)   # this script's defaults
    class FinetuneConfig(RunConfig):
        blr: float = option(5e-4, help="base learning rate: lr = blr x effective batch / 256")

`script_defaults` changes a shared field's default and keeps its help, type and choices (`--help` shows
the script's default). The flag names are those of transformers' `*_no_trainer` examples.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

from .choices import MIXED_PRECISION, MIXED_PRECISION_HELP, REPORT_TO
from .config import option


@dataclass(frozen=True)
class RunConfig:
    """What every training script reads: the run's output and checkpoints, what it reports, the Hub,
    precision and seed, and the shape of one optimizer step."""

    # ---- the optimizer step ----------------------------------------------------------------------
    per_device_train_batch_size: int = option(64, help="images per process per micro-batch")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    max_grad_norm: Optional[float] = option(None, help="clip the gradient norm to this; unset: no clipping")
    mixed_precision: Optional[str] = option("auto", help=MIXED_PRECISION_HELP, choices=MIXED_PRECISION)
    torch_compile: bool = option(False, help="torch.compile the model (in place: parameter names stay the plain model's)")
    seed: int = option(0, help="seed of the initialisation, the augmentation, the masks and the data order")
    # ---- checkpoints and output ------------------------------------------------------------------
    output_dir: str = option("outputs/mae", help="where the model, checkpoints and logs go")
    checkpointing_steps: Optional[int] = option(
        None, help="save a checkpoint every N optimizer steps; 0/none: never (per-epoch runs: also at each epoch end)")
    checkpoints_total_limit: Optional[int] = option(2, help="keep only the last N checkpoints; none: keep all")
    resume_from_checkpoint: Optional[str] = option(None, help="'latest' or a checkpoint directory to resume from")
    overwrite_output_dir: bool = option(False, help="start afresh in an output_dir that holds another run's results")
    allow_config_change_on_resume: bool = option(
        False, help="resume even if model / data / seed / effective batch / lr differ from the checkpoint's")
    # ---- what the user sees ----------------------------------------------------------------------
    with_tracking: bool = option(False, help="log metrics to the trackers of report_to")
    report_to: str = option("tensorboard", help="trackers for with_tracking", choices=REPORT_TO)
    logging_steps: int = option(50, help="log loss and lr every N optimizer steps")
    # ---- Hub -------------------------------------------------------------------------------------
    push_to_hub: bool = option(False, help="upload the output directory to hub_model_id at the end")
    hub_model_id: Optional[str] = option(None, help="Hub repository to push to (user/name)")
    hub_token: Optional[str] = option(None, help="Hub token; default: HF_TOKEN or the `hf auth login` one")
    hub_private_repo: Optional[bool] = option(None, help="create the Hub repository private")
    hub_include_checkpoints: bool = option(False, help="upload checkpoints/ too")

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.resume_from_checkpoint == "":
            raise ValueError("`resume_from_checkpoint` must be 'latest' or a path, got ''")


def script_defaults(**defaults):
    """Class decorator (under `@dataclass`): the shared `RunConfig` fields named get this script's
    defaults; their help, type and choices stay those of `RunConfig`."""
    shared = {field.name: field for field in dataclasses.fields(RunConfig)}
    types = typing.get_type_hints(RunConfig)
    unknown = sorted(set(defaults) - set(shared))
    if unknown:
        raise ValueError(f"`script_defaults` names fields that RunConfig does not have: {unknown}")

    def apply(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, value in defaults.items():
            field = shared[name]
            annotations[name] = types[name]
            setattr(cls, name, option(value, help=field.metadata["help"], choices=field.metadata.get("choices")))
        cls.__annotations__ = annotations
        return cls

    return apply
