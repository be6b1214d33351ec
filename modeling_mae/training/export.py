"""Export a trained model: `save_pretrained`, the image processor, a model card, and the Hub.

    export_model(model, output_dir, image_processor=None)          # weights, config, code, processor
    pixel_format_image_processor(model, pixel_format, mean, std)  # the processor for the data trained on
    write_model_card(output_dir, card_data=..., **template_values)  # README.md from model_card.md
    check_hub_access(hub_model_id, token=None, private=None)      # before training: login + repo
    push_to_hub(output_dir, hub_model_id, include_checkpoints=False)
    write_space_files(output_dir, examples=None)                   # + a Gradio Space: app.py, requirements ...

The model card is rendered from the template `model_card.md` (repository root, or `template_path`)
with huggingface_hub's `ModelCard.from_template` and `ModelCardData` (license, datasets, tags, ...).

`push_to_hub` uploads an already complete local directory with `huggingface_hub.HfApi`
(`create_repo`, then `upload_folder`). It raises `HubPushError` saying why (not logged in, no
network, no permission ...) and never touches the local files, so a failed push can be retried with
`hf upload REPO_ID OUTPUT_DIR`. `check_hub_access` runs the login and repository checks before the
first training step (`HubAccessError`), so that a run meant for the Hub does not learn at the end that
it cannot get there.

`write_space_files` makes the same directory a Gradio Space as well (the reconstruction page,
`modeling_mae_app`): the repository's `app.py`, a copy of the project's code in `app_code/` (the project
is not on PyPI, and a Space installs only `requirements.txt`, before its files are there), the packages
that code imports in `requirements.txt`, a few of the run's own images in `examples/`, and the Space
fields (`sdk: gradio`, `app_file`, ...) added to the model card's YAML header. Uploaded as a Space
(`hf upload USER/NAME OUTPUT_DIR . --repo-type space --exclude "checkpoints/*" "runs/*"`), the page
shows this model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from modeling_mae_cli import ExpectedError

from ..file_modes import give_weights_usual_mode


REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPOSITORY_ROOT / "model_card.md"
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


# --------------------------------------------------------------------------------------------------
# A Gradio Space of the exported model
# --------------------------------------------------------------------------------------------------
SPACE_CODE_DIR = "app_code"
SPACE_PACKAGES = ("modeling_mae", "modeling_mae_cli", "modeling_mae_app")
# what the page's code imports (`modeling_mae_app`, `modeling_mae`, `modeling_mae.training` model loading,
# masking, pixels, visualization; the command line's YAML), with this project's version floors
SPACE_REQUIREMENTS = ("torch", "torchvision", "transformers", "safetensors", "huggingface_hub", "pillow", "numpy",
                      "pyyaml")
SPACE_EXTRA_REQUIREMENTS = ("tifffile",)  # multi-band TIFF uploads
TESTED_GRADIO_VERSION = "6.31.0"  # the Space's sdk_version when Gradio is not installed here
NUM_SPACE_EXAMPLES = 4


def space_requirements() -> list[str]:
    """`requirements.txt` lines: the packages of SPACE_REQUIREMENTS with the floors this project's setup.py
    gives them (from the installed distribution's metadata), plus SPACE_EXTRA_REQUIREMENTS. Gradio itself
    comes with the Space's SDK (`sdk_version`)."""
    from importlib import metadata

    try:
        declared = {_requirement_name(r): r.split(";")[0].strip() for r in metadata.requires("modeling-mae") or []}
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        declared = {}
    return [declared.get(name, name) for name in SPACE_REQUIREMENTS] + list(SPACE_EXTRA_REQUIREMENTS)


def _requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "<>=!~[ ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("-", "_")


def gradio_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        return TESTED_GRADIO_VERSION


def write_space_files(output_dir: str | os.PathLike, examples: torch.Tensor | None = None, title: str | None = None,
                      app_file: str | os.PathLike | None = None) -> list[Path]:
    """Make the exported model directory `output_dir` a Gradio Space of the reconstruction page as well.

    Writes `app.py` (the repository's, or `app_file`), `app_code/` (the .py files of SPACE_PACKAGES, which
    `app.py` imports ahead of any installed copy), `requirements.txt` (`space_requirements`),
    `examples/` (up to NUM_SPACE_EXAMPLES of `examples`: (N, C, H, W) uint8 images -> PNG, or float images
    in [0, 1] of the model's pixel range -> `.npy` in that range, as the page reads them), and the Space
    fields in the YAML header of `README.md` (the model card's other fields stay). Returns the paths written."""
    from huggingface_hub.repocard import metadata_load, metadata_save

    output_dir = Path(output_dir)
    if not (output_dir / "config.json").is_file():
        raise ValueError(f"write_space_files: {str(output_dir)!r} holds no exported model (config.json); export first")
    app_file = Path(app_file) if app_file else REPOSITORY_ROOT / "app.py"
    if not app_file.is_file():
        raise ValueError(
            f"write_space_files: the page's app.py is not at {str(app_file)!r}; install this project from its "
            f"repository (pip install -e .) so that its app.py is there"
        )
    written = [output_dir / "app.py"]
    shutil.copyfile(app_file, written[0])
    code = output_dir / SPACE_CODE_DIR
    shutil.rmtree(code, ignore_errors=True)
    for package in SPACE_PACKAGES:
        source = REPOSITORY_ROOT / package
        shutil.copytree(source, code / package, ignore=lambda folder, names: [
            n for n in names if not (n.endswith(".py") or (Path(folder) / n).is_dir()) or n == "__pycache__"])
    written.append(code)
    requirements = output_dir / "requirements.txt"
    requirements.write_text(
        "# the reconstruction page (app.py); Gradio comes with the Space (README.md: sdk_version)\n"
        "# a CPU-only Space installs less with the CPU builds of torch: add as the first line\n"
        "#   --extra-index-url https://download.pytorch.org/whl/cpu\n" + "\n".join(space_requirements()) + "\n"
    )
    written.append(requirements)
    if examples is not None and len(examples):
        written += _write_examples(output_dir / "examples", examples[:NUM_SPACE_EXAMPLES], output_dir)
    readme = output_dir / "README.md"
    if not readme.is_file():
        readme.write_text(f"# {title or output_dir.name}\n\nMasked-autoencoder reconstructions (modeling_mae).\n")
    metadata = metadata_load(readme) or {}
    metadata.update({
        "title": title or metadata.get("model_name") or output_dir.name,
        "emoji": "🧩",
        "colorFrom": "indigo",
        "colorTo": "gray",
        "sdk": "gradio",
        "sdk_version": gradio_version(),
        "app_file": "app.py",
        "pinned": False,
    })
    metadata_save(readme, metadata)
    written.append(readme)
    return written


def _write_examples(folder: Path, images: torch.Tensor, output_dir: Path) -> list[Path]:
    """uint8 images as PNG; float images (the dataset's [0, 1] scale) as `.npy` in the model's pixel range."""
    import json

    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    low, high = 0.0, 1.0
    processor = output_dir / "preprocessor_config.json"
    if processor.is_file():
        config = json.loads(processor.read_text())
        low, high = config.get("pixel_range") or (0.0, 1.0 / float(config.get("rescale_factor", 1 / 255)))
    paths = []
    for index, image in enumerate(images.detach().cpu()):
        array = image.permute(1, 2, 0).numpy()  # (H, W, C)
        if image.dtype == torch.uint8 and array.shape[-1] in (1, 3):
            path = folder / f"example_{index}.png"
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
        else:
            path = folder / f"example_{index}.npy"
            np.save(path, (array.astype(np.float32) * (float(high) - float(low)) + float(low)).astype(np.float32))
        paths.append(path)
    return paths
