"""The reconstruction page's logic, without its UI: any MAE, one image, five panels.

    loaded = load_model("outputs/mae-demo")        # our export, a transformers ViTMAE folder, an official .pth
    pixel_values = loaded.prepare(decode_array("photo.png"))      # (1, C, H, W), normalised, the model's size
    result = reconstruct_image(loaded, pixel_values, mask_ratio=0.75, mask_strategy="random", seed=0)
    result.panels["error"]                          # (H', W', 3) uint8, like every panel

The steps are the project's own: `load_pretrained` (the one loader of every script), the image
processor's evaluation crop (`EvalTransform`; `pixels.ArrayEvalTransform` for 16-bit and multi-band
arrays), `visualization.reconstruct` (the mask from `masking.make_noise`, the model's forward pass,
`unpatchify`, norm_pix predictions un-normalised with each ORIGINAL patch's mean and variance, as the
official demo does) and `to_uint8_image`. What this module adds is how the panels are shown:

- pixels: the model's own scaling (`preprocessor_config.json`: mean / std, and the range that maps the
  file's values to [0, 1], `pixel_range` or `1 / rescale_factor`), undone for display;
- a display window: "dataset range" shows [0, 1] of that range as black..white; "image" stretches the
  0.5th..99.5th percentile of the original image (jointly over the channels of a gray or RGB image,
  per band for a band composite), and every panel of the image is shown through the same window;
- multi-band images (not 1 or 3 channels) are shown as a chosen band triple as red, green, blue;
- the error map: each patch's MSE in the loss's space (`MAEForPreTraining.patch_loss`: normalised
  pixels for norm_pix_loss models), coloured from 0 to the largest error among the removed patches;
  visible patches (not in the loss) are gray.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_mae.image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from modeling_mae.training.pixels import BIT_DEPTH_RANGES, ArrayEvalTransform, PixelFormat
from modeling_mae.training.transforms import EvalTransform, normalize_on_device
from modeling_mae.training.visualization import caption, reconstruct, to_uint8_image, upscale_factor


MASK_STRATEGIES = ("random", "block", "grid")
WINDOWS = ("image", "dataset range")
WINDOW_PERCENTILES = (0.5, 99.5)
PANELS = ("original", "masked", "reconstruction", "pasted", "error")
VISIBLE_GRAY = (128, 128, 128)  # visible patches in the error map: not part of the loss
# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's table), interpolated linearly
COLOUR_MAP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The model and its pixels
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """An `MAEForPreTraining` in eval mode with the pixel scaling it was trained on.

    mean / std: per channel, in the [0, 1] scale; value_range: the file values that map to 0 and 1;
    notes: what loading said that a user should read (newly initialised weights, assumed statistics)."""

    model: torch.nn.Module
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float]
    crop_pct: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return int(self.model.config.num_channels)

    @property
    def is_rgb8(self) -> bool:
        """The photograph path: 3 channels scaled from 0-255 (the image processor's uint8 crop)."""
        return self.num_channels == 3 and tuple(self.value_range) == BIT_DEPTH_RANGES["uint8"]

    def describe(self) -> str:
        c = self.model.config
        height, width = c.image_hw
        low, high = self.value_range
        target = "normalised pixels (norm_pix_loss)" if c.norm_pix_loss else "pixels"
        return (
            f"{self.name}: ViT {c.hidden_size}-d x {c.num_hidden_layers}, decoder {c.decoder_hidden_size}-d x "
            f"{c.decoder_num_hidden_layers}, {height}x{width} px, patch {c.patch_size}, {self.num_channels} channel(s) "
            f"scaled from [{low:g}, {high:g}], trained on {target}, mask ratio {c.mask_ratio:g} ({c.mask_strategy})"
        )

    def prepare(self, array: np.ndarray) -> torch.Tensor:
        """(H, W, C) image in its file's dtype (`pixels.decode_array`) -> (1, C, H, W) normalised float32 at
        the model's size: the evaluation crop (shorter side to size / crop_pct, centre crop)."""
        array = self.match_channels(array)
        if self.is_rgb8 and array.dtype == np.uint8:
            crop = EvalTransform(self.model.config.image_hw, crop_pct=self.crop_pct)(Image.fromarray(array))
            return normalize_on_device(crop.unsqueeze(0), self.mean, self.std)
        pixels = PixelFormat(self.num_channels, str(array.dtype), self.value_range).to_float(array)
        pixels = ArrayEvalTransform(self.model.config.image_hw, crop_pct=self.crop_pct)(pixels)
        return normalize_on_device(pixels.unsqueeze(0), self.mean, self.std)

    def match_channels(self, array: np.ndarray) -> np.ndarray:
        """The image with the model's channel count: 8-bit gray <-> RGB are converted (as the training
        data path makes a grayscale photograph RGB); any other mismatch is an error."""
        channels = array.shape[-1]
        if channels == self.num_channels:
            return array
        if array.dtype == np.uint8 and channels == 1 and self.num_channels == 3:
            return np.repeat(array, 3, axis=-1)
        if array.dtype == np.uint8 and channels in (3, 4) and self.num_channels == 1:
            return np.asarray(Image.fromarray(array[..., :3]).convert("L"))[..., None]
        raise ValueError(
            f"the model takes images of {self.num_channels} channel(s), got an image of {channels} channel(s) "
            f"of {array.dtype} (shape {array.shape})"
        )

    def scale_note(self, array: np.ndarray) -> str | None:
        """A sentence when the image's bit depth is not the range the model's pixels are scaled from."""
        depth = BIT_DEPTH_RANGES.get(str(array.dtype))
        if depth is not None and tuple(self.value_range) != depth:
            low, high = self.value_range
            return (f"the image is {array.dtype} ({depth[0]:g}-{depth[1]:g}) but the model's pixels are scaled from "
                    f"[{low:g}, {high:g}]: it sees this image {'darker' if high > depth[1] else 'brighter'} than a "
                    f"training image of the same look")
        return None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(" ".join(record.getMessage().replace("!", "").split()))


def load_model(model_name_or_path: str, crop_pct: float = 1.0, **checkpoint_options) -> LoadedModel:
    """Any MAE the scripts accept, as `MAEForPreTraining` through `model_loading.load_pretrained`, with the
    pixel scaling of its `preprocessor_config.json` (ImageNet's for an official `.pth`).

    Loader warnings (e.g. an encoder-only checkpoint whose decoder is NEWLY INITIALISED, so that its
    reconstructions are noise) are kept in `notes` for the page to show."""
    from modeling_mae import MAEForPreTraining
    from modeling_mae.training.model_loading import load_pretrained

    collect = _Collect()
    package_logger = logging.getLogger("modeling_mae")
    package_logger.addHandler(collect)
    try:
        model = load_pretrained(MAEForPreTraining, str(model_name_or_path), **checkpoint_options).eval()
    finally:
        package_logger.removeHandler(collect)
    mean, std, value_range, note = pixel_settings(str(model_name_or_path), int(model.config.num_channels))
    notes = collect.messages + ([note] if note else [])
    return LoadedModel(model, model_name(str(model_name_or_path)), mean, std, value_range, crop_pct, notes)


def model_name(model_name_or_path: str) -> str:
    """The name the page shows: a directory's model card `model_name` (a Space's folder is called `app`), else
    the last part of the path or Hub id."""
    readme = Path(model_name_or_path) / "README.md"
    if readme.is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            name = (metadata_load(readme) or {}).get("model_name")
        except Exception:  # a README without a readable YAML header: the path's name
            name = None
        if name:
            return str(name)
    return Path(model_name_or_path.rstrip("/")).name or model_name_or_path


def pixel_settings(model_name_or_path: str, num_channels: int):
    """(mean, std, value_range, note) from the model's `preprocessor_config.json` (a local directory, or a Hub
    repository's), ImageNet's 8-bit RGB settings when there is none (official `.pth` files have none)."""
    config = _preprocessor_config(model_name_or_path)
    note = None
    if config is None:
        if num_channels != 3:
            raise ValueError(
                f"{model_name_or_path}: a {num_channels}-channel model without preprocessor_config.json: its image "
                f"mean / std and pixel range are unknown (our export writes them)"
            )
        config = {}
        if not Path(model_name_or_path).is_file():
            note = "no preprocessor_config.json: ImageNet's mean / std and 8-bit pixels assumed"
    mean = tuple(float(v) for v in config.get("image_mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in config.get("image_std", IMAGENET_DEFAULT_STD))
    if len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(
            f"{model_name_or_path}: preprocessor_config.json has {len(mean)} mean / {len(std)} std values, but the "
            f"model has {num_channels} channel(s)"
        )
    if config.get("pixel_range") is not None:
        value_range = (float(config["pixel_range"][0]), float(config["pixel_range"][1]))
    else:
        value_range = (0.0, round(1.0 / float(config.get("rescale_factor", 1 / 255)), 6))
    return mean, std, value_range, note


def _preprocessor_config(model_name_or_path: str) -> dict | None:
    path = Path(model_name_or_path).expanduser()
    if path.is_file():
        return None
    if path.is_dir():
        file = path / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_name_or_path, "preprocessor_config.json")).read_text())
    except Exception:  # the repository has none, or offline: the defaults (and a note) apply
        return None


# --------------------------------------------------------------------------------------------------
# One reconstruction, shown
# --------------------------------------------------------------------------------------------------
@dataclass
class Reconstruction:
    """The five panels (H', W', 3) uint8 and the numbers behind them."""

    panels: dict[str, np.ndarray]
    loss: float  # the model's loss: mean per-patch error over the removed patches
    error_max: float  # the top of the error map's colour scale
    num_removed: int
    num_patches: int
    window: str  # what the display window was, in words
    caption: str  # the masking and, for norm_pix models, how predicted patches were un-normalised


def reconstruct_image(
    loaded: LoadedModel,
    pixel_values: torch.Tensor,
    mask_ratio: float = 0.75,
    mask_strategy: str = "random",
    seed: int = 0,
    bands: tuple[int, int, int] | None = None,
    window: str = "image",
) -> Reconstruction:
    """Mask `pixel_values` (1, C, H, W), reconstruct it, and render the five panels.

    Args:
        mask_ratio: fraction of patches removed, in [0, 1); mask_strategy: random, block or grid; seed: of the mask.
        bands: for other than 1 or 3 channels, the 3 channels shown as red, green, blue (default 0, 1, 2).
        window: "image" (percentiles of the original) or "dataset range" (see the module docstring).
    """
    if mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"mask strategy must be one of {MASK_STRATEGIES}, got {mask_strategy!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values must be one image (1, C, H, W), got {tuple(pixel_values.shape)}")
    model = loaded.model
    out = reconstruct(model, pixel_values, float(mask_ratio), mask_strategy, int(seed))
    channels = shown_channels(loaded.num_channels, bands)
    mean = np.array([loaded.mean[c] for c in channels])
    std = np.array([loaded.std[c] for c in channels])
    original = out["original"][0, list(channels)]  # (c, H, W) normalised
    low, high, window_text = display_window(original, mean, std, window, per_channel=loaded.num_channels not in (1, 3))
    # the window folded into the normalisation: (x * std + mean - low) / (high - low), via to_uint8_image
    shown_mean, shown_std = (mean - low) / (high - low), std / (high - low)
    scale = upscale_factor(*original.shape[-2:])
    panels = {}
    for key in PANELS[:4]:
        rgb = to_uint8_image(out[key][0, list(channels)], tuple(shown_mean), tuple(shown_std))
        panels[key] = _upscale(rgb, scale)
    p = model.config.patch_size
    grid = (original.shape[-2] // p, original.shape[-1] // p)
    removed = out["mask"][0, 0, ::p, ::p].bool()[: grid[0], : grid[1]]  # (h, w), 1 = removed
    patch_loss = out["patch_loss"][0].reshape(grid)
    error_max = float(patch_loss[removed].max()) if removed.any() else 0.0
    panels["error"] = _upscale(error_map(patch_loss, removed, error_max), p * scale)
    num_removed = int(removed.sum())
    loss = float(patch_loss[removed].mean()) if num_removed else 0.0
    text = caption(model, mask_ratio, mask_strategy, seed, None)
    return Reconstruction(panels, loss, error_max, num_removed, grid[0] * grid[1], window_text, text)


def shown_channels(num_channels: int, bands) -> tuple[int, ...]:
    """Which channels the panels show: all of a gray or RGB image, else a band triple (default 0, 1, 2)."""
    if num_channels in (1, 3) and bands is None:
        return tuple(range(num_channels))
    bands = (0, 1, 2) if bands is None else tuple(int(b) for b in bands)
    if len(bands) != 3 or not all(0 <= b < num_channels for b in bands):
        raise ValueError(f"bands must be 3 channel numbers in 0..{num_channels - 1}, got {bands}")
    return bands


def display_window(original: torch.Tensor, mean, std, window: str, per_channel: bool):
    """(low, high, description): the pixel values (in the [0, 1] scale of the model's range) shown as black
    and white, per shown channel (arrays of the channel count)."""
    channels = original.shape[0]
    if window == "dataset range":
        return np.zeros(channels), np.ones(channels), "dataset range: [0, 1] of the model's pixel range"
    pixels = original.double().numpy() * std[:, None, None] + mean[:, None, None]  # (c, H, W) in [0, 1] scale
    lo_q, hi_q = WINDOW_PERCENTILES
    if per_channel:
        low = np.percentile(pixels.reshape(channels, -1), lo_q, axis=1)
        high = np.percentile(pixels.reshape(channels, -1), hi_q, axis=1)
    else:
        low = np.full(channels, np.percentile(pixels, lo_q))
        high = np.full(channels, np.percentile(pixels, hi_q))
    high = np.maximum(high, low + 1e-6)  # a flat image: any window shows it
    where = "per band" if per_channel else "over all channels"
    pairs = zip(low, high) if per_channel else [(low[0], high[0])]
    values = ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in pairs)
    return low, high, f"image window ({lo_q:g}-{hi_q:g} percentile of the original, {where}): {values}"


def error_map(patch_loss: torch.Tensor, removed: torch.Tensor, error_max: float) -> np.ndarray:
    """(h, w) per-patch errors -> (h, w, 3) uint8: removed patches coloured (viridis) from 0 to `error_max`,
    visible patches gray."""
    t = (patch_loss.double().numpy() / error_max) if error_max > 0 else np.zeros(tuple(patch_loss.shape))
    position = np.clip(t, 0, 1) * (len(COLOUR_MAP) - 1)
    index = np.minimum(position.astype(int), len(COLOUR_MAP) - 2)
    frac = (position - index)[..., None]
    colours = COLOUR_MAP[index] * (1 - frac) + COLOUR_MAP[index + 1] * frac
    colours[~removed.numpy()] = VISIBLE_GRAY
    return colours.round().astype(np.uint8)


def _upscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


# --------------------------------------------------------------------------------------------------
# Example images
# --------------------------------------------------------------------------------------------------
EXAMPLE_PHOTOGRAPHS = ("astronaut", "coffee", "chelsea")


def example_images(loaded: LoadedModel, model_dir: str | None, folder: str | Path) -> list[str]:
    """Files for the page's examples: a model directory's own `examples/` folder, else (for 8-bit gray or RGB
    models) scikit-image's sample photographs, written once as PNG into `folder`; [] when neither exists."""
    if model_dir and (Path(model_dir) / "examples").is_dir():
        return sorted(str(p) for p in (Path(model_dir) / "examples").iterdir() if p.is_file())
    if loaded.num_channels in (1, 3) and tuple(loaded.value_range) == BIT_DEPTH_RANGES["uint8"]:
        return write_example_photographs(folder)
    return []


def write_example_photographs(folder: str | Path, names=EXAMPLE_PHOTOGRAPHS, fmt: str = "png") -> list[str]:
    """scikit-image's sample photographs (shipped with it, no download) as files in `folder`; [] without
    scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in names:
        path = folder / f"{name}.{fmt}"
        if not path.is_file():
            Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(path)
        files.append(str(path))
    return files
