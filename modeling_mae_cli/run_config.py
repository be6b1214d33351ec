"""The fields every training script shares (output, checkpoints, trackers, Hub, precision, seed, the
optimizer step, what a checkpoint cannot say), each with its help once (`RunConfig`), and those the two
classifier scripts share (`ClassifierRunConfig`); a script's config inherits them and adds its own.

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

    # ---- what a checkpoint's weights cannot say (official / timm files of other widths, a new resolution)
    num_attention_heads: Optional[int] = option(None, help="encoder heads; official widths 768/1024/1280 need none")
    decoder_num_attention_heads: Optional[int] = option(None, help="decoder heads (512-d decoder: 16)")
    image_size: Optional[int] = option(None, help="train at this resolution: position tables are interpolated")
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


@dataclass(frozen=True)
class ClassifierRunConfig(RunConfig):
    """What fine-tuning and linear probing share: the pretrained encoder, the labelled splits (a Hub
    dataset with both splits, or local folders: parquet / webdataset / images), the epochs and the lr
    rule (lr = blr x effective batch / 256 unless learning_rate is given)."""

    # ---- model -----------------------------------------------------------------------------------
    model_name_or_path: str = option(
        "", help="pretrained MAE: save_pretrained directory, Hub id or official .pth (required)", hub_or_path=True)
    # ---- data ------------------------------------------------------------------------------------
    dataset_name: Optional[str] = option(None, help="Hub dataset with both splits; or use train_dir / validation_dir")
    dataset_config_name: Optional[str] = option(None, help="configuration name of the Hub dataset")
    train_dir: Optional[str] = option(None, help="local training folder (parquet, webdataset .tar or class folders)")
    validation_dir: Optional[str] = option(None, help="local validation folder, same layouts")
    train_split: str = option("train", help="split of dataset_name to train on")
    validation_split: str = option("validation", help="split of dataset_name to evaluate on")
    image_column: Optional[str] = option(None, help="image column; detected when unset (image, jpg, ...)")
    label_column: Optional[str] = option(None, help="label column; detected when unset (label, cls, ...)")
    label_names: Optional[list[str]] = option(
        None, help="the label map (id i = label_names[i]); default: the training split's classes")
    num_labels: Optional[int] = option(None, help="classes; default: from the ClassLabel feature, else max label + 1")
    create_demo_data: bool = option(
        False, help="no data named: train on synthetic 4-class folders written once into outputs/demo_cls")
    max_train_samples: Optional[int] = option(None, help="use only N training examples, drawn at random (seed)")
    max_eval_samples: Optional[int] = option(None, help="use only N validation examples, drawn at random (seed)")
    dataloader_num_workers: int = option(8, help="DataLoader worker processes per training process")
    max_corrupt_fraction: float = option(
        0.1, help="stop when more of a split than this share cannot be decoded (the rest are skipped)")
    eval_crop_pct: float = option(224 / 256, help="evaluation: resize to size / crop_pct, then center crop")
    adapt_channels: bool = option(
        False, help="images unlike the checkpoint's (channels, bit depth): adapt the checkpoint to them, else stop")
    per_device_eval_batch_size: int = option(64, help="evaluation images per process per batch")
    # ---- schedule --------------------------------------------------------------------------------
    blr: float = option(5e-4, help="base learning rate: lr = blr x effective batch / 256")
    learning_rate: Optional[float] = option(None, help="absolute learning rate; when set, blr is not used")
    min_lr: float = option(1e-6, help="learning rate at the end of the cosine schedule")
    num_train_epochs: int = option(100, help="epochs to train (with the warm-up)")
    num_warmup_epochs: float = option(5, help="epochs of linear learning-rate warm-up")

    def __post_init__(self):
        super().__post_init__()
        for name in ("per_device_eval_batch_size", "num_train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_warmup_epochs <= self.num_train_epochs:
            raise ValueError(f"`num_warmup_epochs` must be in [0, num_train_epochs], got {self.num_warmup_epochs}")

    def check_required(self):
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required (a directory, a Hub id or an official .pth file)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (user/name)")


def script_defaults(**defaults):
    """Class decorator (under `@dataclass`): the inherited fields named get this script's defaults; their
    help, type and choices stay those of the base config (`RunConfig`, `ClassifierRunConfig`)."""

    def apply(cls):
        base = next(b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b))
        shared = {field.name: field for field in dataclasses.fields(base)}
        types = typing.get_type_hints(base)
        unknown = sorted(set(defaults) - set(shared))
        if unknown:
            raise ValueError(f"`script_defaults` names fields that {base.__name__} does not have: {unknown}")
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, value in defaults.items():
            field = shared[name]
            annotations[name] = types[name]
            setattr(cls, name, option(value, help=field.metadata["help"], choices=field.metadata.get("choices")))
        cls.__annotations__ = annotations
        return cls

    return apply
