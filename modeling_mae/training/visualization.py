"""Reconstruction pictures: original | masked | reconstruction | reconstruction with visible patches.

    image = reconstruction_grid(model, pixel_values, mask_ratio=0.75, mask_strategy="random", seed=0)
    save_reconstruction_png(model, pixel_values, "recon.png")

One row per image; RGB for 3 channels, gray for 1, and for any other channel count one grid per
channel stacked top to bottom (or a chosen 3-channel composite, `composite=(r, g, b)`). Pixels are
shown in the dataset's own scale: un-normalised with the training mean / std back to [0, 1] of the
dataset's fixed range (16-bit data: its bit depth or `pixel_range`), never stretched per image.
The steps are the paper's: mask the image (`make_noise` -> `random_masking`
inside the model), predict every patch with the decoder, `unpatchify`. Models trained with
`norm_pix_loss` predict each patch normalised by its own mean and variance; they are shown with each
predicted patch un-normalised by the statistics of the original patch
(`MAEForPreTraining.unnormalize_predictions`) — information the model did not have for removed
patches — and the caption strip above the grid says so.

Layout (pixels): every panel is `panel` x `panel` wide (the image upscaled by an integer factor to at
least `MIN_PANEL`), `PAD` between panels, a header of `HEADER_LINES` text lines of `LINE_HEIGHT`:

    width  = 4 * panel_w + 5 * PAD
    height = HEADER_LINES * LINE_HEIGHT + N * (panel_h + PAD) + PAD
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..masking import make_noise
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_on_device


COLUMNS = ("original", "masked", "reconstruction", "recon. + visible")
MIN_PANEL = 128  # small images (e.g. the 32 px demo model) are upscaled (nearest) to at least this
PAD = 4
LINE_HEIGHT = 16
CAPTION_LINES = 3  # caption text lines (wrapped, then cut) above the column titles
HEADER_LINES = CAPTION_LINES + 1
MASK_GRAY = 0.5  # removed patches are drawn in this gray (pixel space, 0..1)
BACKGROUND = (255, 255, 255)


def upscale_factor(height: int, width: int) -> int:
    """Integer factor that makes the smaller image side at least `MIN_PANEL` pixels."""
    return max(1, math.ceil(MIN_PANEL / max(1, min(height, width))))


def grid_image_size(num_images: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid for `num_images` images of `height` x `width`."""
    scale = upscale_factor(height, width)
    panel_h, panel_w = height * scale, width * scale
    return (
        len(COLUMNS) * panel_w + (len(COLUMNS) + 1) * PAD,
        HEADER_LINES * LINE_HEIGHT + num_images * (panel_h + PAD) + PAD,
    )


def _unwrap(model):
    """Accept a model wrapped by DDP / `accelerator.prepare` (`.module`) or `torch.compile` (`._orig_mod`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@torch.no_grad()
def reconstruct(model, pixel_values: torch.Tensor, mask_ratio=None, mask_strategy=None, seed: int = 0, noise=None):
    """Run the masked autoencoder once and return the four panels in normalised pixel space.

    Args:
        model: `MAEForPreTraining` (possibly wrapped; switched to eval for the call, then restored).
        pixel_values: (N, C, H, W) normalised images (float) on any device.
        mask_ratio / mask_strategy: default to the model config's.
        seed: seeds the masking noise (ignored when `noise` is given).
        noise: (N, L) masking scores, lowest kept; overrides `mask_strategy` and `seed`.
    Returns:
        dict of (N, C, H, W) float tensors on the CPU: "original", "masked" (removed patches NaN),
        "reconstruction" (every patch predicted), "pasted" (visible patches from the input), and
        "mask" (N, 1, H, W), 1 = removed, and "patch_loss" (N, L), each patch's MSE in the loss's space
        (`MAEForPreTraining.patch_loss`; the model's loss is its mean over the removed patches).
    """
    model = _unwrap(model)
    config = model.config
    ratio = config.mask_ratio if mask_ratio is None else float(mask_ratio)
    strategy = config.mask_strategy if mask_strategy is None else mask_strategy
    height, width = pixel_values.shape[-2:]
    p = config.patch_size
    grid = (height // p, width // p)
    if noise is None:
        generator = torch.Generator().manual_seed(seed)
        noise = make_noise(strategy, pixel_values.shape[0], grid, ratio, generator=generator)

    device = next(model.parameters()).device
    x = pixel_values.to(device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        out = model(
            x,
            noise=noise.to(device),
            mask_ratio=ratio,
            interpolate_pos_encoding=(height, width) != tuple(config.image_hw),
            return_dict=True,
        )
    finally:
        model.train(was_training)

    # norm_pix models: un-normalise each predicted patch with the original patch's own mean/variance
    patches = model.unnormalize_predictions(out.logits.float(), x)  # (N, L, p*p*C)
    reconstruction = model.unpatchify(patches, (height, width)).float()
    # mask (N, L) -> (N, 1, H, W), 1 = removed
    mask = out.mask.float().unsqueeze(-1).expand(-1, -1, p * p * config.num_channels)
    mask = model.unpatchify(mask, (height, width))[:, :1]
    masked = torch.where(mask.bool(), torch.full_like(x, float("nan")), x)
    pasted = x * (1 - mask) + reconstruction * mask
    return {
        "original": x.cpu(),
        "masked": masked.cpu(),
        "reconstruction": reconstruction.cpu(),
        "pasted": pasted.cpu(),
        "mask": mask.cpu(),
        "patch_loss": model.patch_loss(x, out.logits).cpu(),
    }


def to_uint8_image(image: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> np.ndarray:
    """(C, H, W) normalised float (NaN = removed patch) -> (H, W, 3) uint8; removed patches gray."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = image.float() * std_t + mean_t
    pixels = torch.nan_to_num(pixels, nan=MASK_GRAY).clamp(0, 1)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    if pixels.shape[0] != 3:
        raise ValueError(f"to_uint8_image shows 1 or 3 channels, got {pixels.shape[0]}: pick channels first")
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def caption(model, mask_ratio, mask_strategy, seed, noise) -> str:
    """What the picture shows: the masking and, for norm_pix models, how patches were un-normalised."""
    config = _unwrap(model).config
    ratio = config.mask_ratio if mask_ratio is None else float(mask_ratio)
    masking = "given noise" if noise is not None else f"{mask_strategy or config.mask_strategy}, seed {seed}"
    text = f"MAE reconstruction, mask ratio {ratio:g} ({masking})."
    if config.norm_pix_loss:
        text += (
            " norm_pix_loss model: each predicted patch is un-normalised with the mean/std of the"
            " original patch (not available to the model)."
        )
    return text


def reconstruction_grid(
    model,
    pixel_values: torch.Tensor,
    mask_ratio: float | None = None,
    mask_strategy: str | None = None,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    composite: tuple[int, int, int] | None = None,
) -> Image.Image:
    """One row per image: original | masked | reconstruction | reconstruction with visible patches.

    Args:
        model: `MAEForPreTraining` (or a wrapped one, e.g. after `accelerator.prepare`).
        pixel_values: (N, C, H, W) normalised with `mean`/`std`, or uint8 images (normalised here).
        mask_ratio / mask_strategy: default to the model config's; seed: masking seed.
        noise: (N, L) explicit masking scores (overrides strategy and seed).
        mean / std: the normalisation of `pixel_values` (one value per channel), undone for display.
        composite: for other than 1 or 3 channels, the 3 channels shown as red, green, blue; default: one
            grid per channel, stacked (each `grid_image_size(N, H, W)`).
    Returns:
        RGB `PIL.Image` of size `grid_image_size(N, H, W)` (times the channel count, stacked) with caption strips.
    """
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.unsqueeze(0)
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must have shape (N, C, H, W), got {tuple(pixel_values.shape)}")
    if pixel_values.dtype == torch.uint8:
        pixel_values = normalize_on_device(pixel_values, mean, std)
    panels = reconstruct(model, pixel_values, mask_ratio, mask_strategy, seed, noise)
    text = caption(model, mask_ratio, mask_strategy, seed, noise)
    channels = panels["original"].shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean / std have {len(mean)} / {len(std)} values but the images have {channels} channels")
    if channels in (1, 3):
        return _render(panels, mean, std, text)
    pick = lambda idx: {k: v[:, idx] for k, v in panels.items() if k not in ("mask", "patch_loss")}  # noqa: E731
    if composite is not None:
        idx = list(composite)
        if len(idx) != 3 or not all(0 <= i < channels for i in idx):
            raise ValueError(f"composite must name 3 of the {channels} channels, got {composite}")
        return _render(pick(idx), [mean[i] for i in idx], [std[i] for i in idx],
                       f"Channels {idx[0]}, {idx[1]}, {idx[2]} as red, green, blue. " + text)
    grids = [_render(pick([c]), [mean[c]], [std[c]], f"Channel {c} of {channels}. " + text) for c in range(channels)]
    canvas = Image.new("RGB", (grids[0].width, sum(g.height for g in grids)), BACKGROUND)
    for index, grid in enumerate(grids):
        canvas.paste(grid, (0, index * grids[0].height))
    return canvas


def _render(panels: dict, mean, std, text: str) -> Image.Image:
    """The grid of 1- or 3-channel panels (see `reconstruction_grid`)."""
    num, _, height, width = panels["original"].shape
    scale = upscale_factor(height, width)
    panel_h, panel_w = height * scale, width * scale
    canvas = Image.new("RGB", grid_image_size(num, height, width), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)

    # caption strip, wrapped to the canvas width and cut to CAPTION_LINES lines
    chars_per_line = max(20, int(canvas.width / 6.5))
    lines = textwrap.wrap(text, chars_per_line)
    for i, line in enumerate(lines[:CAPTION_LINES]):
        draw.text((PAD, i * LINE_HEIGHT + 2), line, fill=(0, 0, 0), font=font)
    top = CAPTION_LINES * LINE_HEIGHT
    for col, title in enumerate(COLUMNS):
        draw.text((PAD + col * (panel_w + PAD), top + 2), title, fill=(0, 0, 0), font=font)

    top = HEADER_LINES * LINE_HEIGHT
    for row in range(num):
        for col, key in enumerate(("original", "masked", "reconstruction", "pasted")):
            tile = Image.fromarray(to_uint8_image(panels[key][row], mean, std))
            tile = tile.resize((panel_w, panel_h), Image.NEAREST)
            canvas.paste(tile, (PAD + col * (panel_w + PAD), top + row * (panel_h + PAD)))
    return canvas


def save_reconstruction_png(model, pixel_values: torch.Tensor, path: str | Path, **kwargs) -> Path:
    """`reconstruction_grid(model, pixel_values, **kwargs)` written to `path` as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(model, pixel_values, **kwargs).save(path, format="PNG")
    return path


def reconstructions_over_time(grids: list[tuple[int, Path]], image_hw: tuple[int, int], path: str | Path,
                              rows: int = 4) -> Path | None:
    """One picture of the run's reconstructions: the originals, then the "reconstruction + visible patches"
    panel of the first `rows` images of each grid PNG `(step, path)` (as `reconstruction_grid` lays them
    out for images of `image_hw`), one column per step, in step order. None without grids."""
    grids = sorted(grids)
    if not grids:
        return None
    height, width = image_hw
    scale = upscale_factor(height, width)
    panel_h, panel_w = height * scale, width * scale
    top = HEADER_LINES * LINE_HEIGHT

    def panel(image: Image.Image, row: int, col: int) -> Image.Image:
        x, y = PAD + col * (panel_w + PAD), top + row * (panel_h + PAD)
        return image.crop((x, y, x + panel_w, y + panel_h))

    first = Image.open(grids[0][1]).convert("RGB")
    rows = min(rows, (first.height - top) // (panel_h + PAD))
    canvas = Image.new("RGB", ((len(grids) + 1) * (panel_w + PAD) + PAD, LINE_HEIGHT + rows * (panel_h + PAD) + PAD),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((PAD, 2), "original", fill=(0, 0, 0), font=font)
    for row in range(rows):
        canvas.paste(panel(first, row, 0), (PAD, LINE_HEIGHT + row * (panel_h + PAD)))
    for index, (step, grid_path) in enumerate(grids, start=1):
        grid = Image.open(grid_path).convert("RGB")
        x = PAD + index * (panel_w + PAD)
        draw.text((x, 2), f"step {step}", fill=(0, 0, 0), font=font)
        for row in range(rows):
            canvas.paste(panel(grid, row, 3), (x, LINE_HEIGHT + row * (panel_h + PAD)))
    path = Path(path)
    canvas.save(path, format="PNG")
    return path
