"""Export a trained model: `save_pretrained`, the image processor, a model card, and the Hub.

    export_model(model, output_dir, image_processor=None)          # weights, config, code, processor
    pixel_format_image_processor(model, pixel_format, mean, std)  # the processor for the data trained on
    write_model_card(output_dir, card_data=..., **template_values)  # README.md from model_card.md
    check_hub_access(hub_model_id, token=None, private=None)      # before training: login + repo
    push_to_hub(output_dir, hub_model_id, include_checkpoints=False)

The model card is rendered from the template `model_card.md` (repository root, or `template_path`)
with huggingface_hub's `ModelCard.from_template` and `ModelCardData` (license, datasets, tags, ...).

`push_to_hub` uploads an already complete local directory with `huggingface_hub.HfApi`
(`create_repo`, then `upload_folder`). It raises `HubPushError` saying why (not logged in, no
network, no permission ...) and never touches the local files, so a failed push can be retried with
`hf upload REPO_ID OUTPUT_DIR`. `check_hub_access` runs the login and repository checks before the
first training step (`HubAccessError`), so that a run meant for the Hub does not learn at the end that
it cannot get there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modeling_mae_cli import ExpectedError

from ..file_modes import give_weights_usual_mode


DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "model_card.md"
CHECKPOINT_PATTERNS = ["checkpoints/*", "checkpoints/**"]


class HubPushError(ExpectedError, RuntimeError):
    """Uploading to the Hub failed; the local output directory is complete."""


class HubAccessError(ExpectedError, RuntimeError):
    """Before training: not logged in to the Hub, or the target repository cannot be created / written."""


def check_hub_access(hub_model_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Who is logged in (`HfApi.whoami`) and that `hub_model_id` exists or can be created
    (`create_repo(exist_ok=True)`); returns the user name. Raises `HubAccessError` in one line."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except Exception as err:  # 401, offline mode, no network
        raise HubAccessError(
            f"--push_to_hub: cannot log in to the Hub ({type(err).__name__}: {_first_line(err)}); run `hf auth login` "
            f"or set HF_TOKEN (or --hub_token), or drop --push_to_hub. Nothing was trained yet."
        ) from None
    try:
        api.create_repo(hub_model_id, repo_type="model", private=private, exist_ok=True)
    except Exception as err:  # 403: not your namespace / token without write access
        raise HubAccessError(
            f"--push_to_hub: logged in as {user!r} but cannot create or write the repo {hub_model_id!r} "
            f"({type(err).__name__}: {_first_line(err)}); check --hub_model_id and the token's write access. "
            f"Nothing was trained yet."
        ) from None
    return user


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def export_model(
    model, output_dir: str | os.PathLike, image_processor=None, state_dict: dict | None = None, is_main_process: bool = True
) -> Path:
    """`model.save_pretrained(output_dir)` (safetensors, config with `auto_map`, modeling code) and
    the image processor (the model's default `MAEImageProcessor` unless one is given).

    `state_dict`: the full weights when the model is sharded (`accelerator.get_state_dict(model)`)."""
    output_dir = Path(output_dir)
    if is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        model = unsharded_model(model, state_dict)
        model.save_pretrained(output_dir, image_processor=image_processor, state_dict=state_dict, is_main_process=True)
        give_weights_usual_mode(output_dir)  # safetensors writes 0600; every other file is 0644 (umask)
    return output_dir


def pixel_format_image_processor(model, pixel_format, mean, std, crop_pct: float | None = None):
    """`MAEImageProcessor` sized to the model for the data it was trained on: the evaluation transform
    (shorter side to size / crop_pct, centre crop) on that pixel format (`pixels.PixelFormat`: channels,
    dtype, value range) with the training mean / std, so that serving decodes, scales and normalises the
    dataset's files as training did. 8-bit RGB data gives the model's default processor with `mean` / `std`."""
    from ..image_processing_mae import DEFAULT_CROP_PCT, MAEImageProcessor

    height, width = model.config.image_hw
    low, high = pixel_format.value_range
    return MAEImageProcessor(
        size={"height": height, "width": width},
        crop_pct=DEFAULT_CROP_PCT if crop_pct is None else crop_pct,
        image_mean=list(mean),
        image_std=list(std),
        num_channels=pixel_format.num_channels,
        pixel_dtype=pixel_format.dtype,
        pixel_range=[low, high],
    )


def unsharded_model(model, state_dict: dict | None):
    """The model as its own class, holding `state_dict` when it is FSDP2-sharded.

    `fully_shard` swaps a module's class for a generated `FSDP<Name>` subclass; `save_pretrained` on it
    would write that class into `auto_map` and copy torch's FSDP source files as the model's remote
    code. Rebuilt here from the config (on the meta device, then the gathered weights assigned)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    if state_dict is None:
        raise ValueError("exporting an FSDP-sharded model needs its full `state_dict` (accelerator.get_state_dict)")
    from transformers import PreTrainedModel

    own_class = next(
        c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule)
    )
    with torch.device("meta"):
        plain = own_class(model.config)
    plain.load_state_dict(state_dict, assign=True)
    return plain


def write_model_card(
    output_dir: str | os.PathLike,
    card_data: dict | None = None,
    template_path: str | os.PathLike | None = None,
    **template_values,
) -> Path:
    """Render the model card template into `output_dir/README.md`.

    Args:
        card_data: metadata for the YAML header (`ModelCardData` fields: license, datasets, tags,
            library_name, pipeline_tag, model_name, ...).
        template_values: the template's variables (steps, final_loss, config_yaml, ...).
    """
    from huggingface_hub import ModelCard, ModelCardData

    template_path = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template_path.is_file():
        raise ValueError(f"model card template not found: {str(template_path)!r}")
    data = ModelCardData(**(card_data or {}))
    card = ModelCard.from_template(data, template_path=str(template_path), **template_values)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def push_to_hub(
    output_dir: str | os.PathLike,
    hub_model_id: str,
    include_checkpoints: bool = False,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MAE pretrained with modeling_mae",
) -> str:
    """Upload `output_dir` to the model repo `hub_model_id` (created if needed); returns its URL.

    `checkpoints/` is left out unless `include_checkpoints`. Raises `HubPushError` with the reason."""
    from huggingface_hub import HfApi

    if not hub_model_id:
        raise ValueError("`hub_model_id` must name the target repository (user/name) to push to the Hub")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(hub_model_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(output_dir),
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=None if include_checkpoints else CHECKPOINT_PATTERNS,
        )
    except Exception as err:  # HfHubHTTPError, offline mode, connection errors, ...
        raise HubPushError(
            f"pushing {str(output_dir)!r} to the Hub repo {hub_model_id!r} failed ({type(err).__name__}: {err}). "
            f"The local output is complete; check `hf auth whoami` / HF_TOKEN and the network, then retry with "
            f"`hf upload {hub_model_id} {output_dir}`."
        ) from err
    return f"https://huggingface.co/{repo.repo_id}"
