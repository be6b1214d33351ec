"""Image transforms for the data path. Images stay uint8 until they reach the device.

- `to_rgb`: grayscale, CMYK, RGBA, palette, 16-bit ... -> RGB PIL image.
- `TrainTransform`: RandomResizedCrop(scale 0.2-1.0, bicubic) + horizontal flip -> uint8 (3, H, W).
  `TrainTransform.from_bytes(encoded)` is the fast path for undecoded files (JPEG draft decoding,
  crop before resize, one copy); calling it on a PIL image works for any image.
- `EvalTransform`: resize shorter side to size / crop_pct, center crop -> uint8 (3, H, W).
- `normalize_on_device`: uint8 (N, 3, H, W) -> float, ImageNet mean/std, on the accelerator.

Why it is fast (scripts/benchmark.py measures it against transformers' run_mae.py pipeline):
the crop box is sampled from the file header before anything is decoded; a JPEG whose crop is at
least twice the output size is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (`Image.draft`), so
fewer pixels are decoded at all; the crop and the bicubic antialiased resize are one operation on
the decoded uint8 pixels (no intermediate crop copy); and no float image or normalisation is made
on the CPU - that happens on the device, on the whole batch.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _TorchvisionRandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from ..image_processing_mae import apply_exif_orientation, eval_resize_size, resize_and_center_crop, to_rgb_image  # noqa: F401
from ..modeling_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: F401 (re-exported)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, as the exported processor and transformers' pipelines convert it
    (`image_processing_mae.to_rgb_image`: PIL's `convert("RGB")`)."""
    return to_rgb_image(image)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W): one copy out of PIL, returned as a channels-first view."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def draft_scale(image_size: tuple[int, int], crop_size: tuple[int, int], out_size: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps the crop at least `out_size` pixels:
    decoding at 1/scale then never upsamples what the full-size decode would have downsampled.

    Sizes are (width, height). Returns 1 when no reduction is allowed.
    """
    limit = min(crop_size[0] / out_size[0], crop_size[1] / out_size[1])
    scale = 1
    while scale < 8 and scale * 2 <= limit and image_size[0] // (scale * 2) > 0 and image_size[1] // (scale * 2) > 0:
        scale *= 2
    return scale


class TrainTransform:
    """MAE pretraining augmentation: RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip.

    The crop box is drawn by torchvision's `RandomResizedCrop.get_params` (the same distribution as
    torchvision and the official code) from the image size alone, before decoding.

    Call it on a PIL image (best: a lazily opened one, `Image.open(file)` without `.load()` or
    `.convert()`, so a large JPEG can be draft-decoded), or use `from_bytes` on the encoded file.
    Returns a uint8 tensor (3, H, W); normalisation happens on the device (`normalize_on_device`).
    """

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (height, width)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"`scale` must be (min, max) with 0 < min <= max <= 1, got {scale!r}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"`ratio` must be (min, max) with 0 < min <= max, got {ratio!r}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"`hflip` must be a probability in [0, 1], got {hflip!r}")

    # ---- the two random decisions --------------------------------------------------------------
    def sample_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Crop box (top, left, crop_height, crop_width) for an image of `width` x `height`, drawn by
        torchvision's sampler (it only reads the size: an empty (0, H, W) tensor stands in)."""
        return _TorchvisionRandomResizedCrop.get_params(torch.empty(0, height, width), list(self.scale), list(self.ratio))

    def sample_flip(self) -> bool:
        return self.hflip > 0 and torch.rand(()).item() < self.hflip

    # ---- entry points ----------------------------------------------------------------------------
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (lazily opened or loaded, any mode) -> uint8 (3, H, W)."""
        return self.crop_pil(image, self.sample_crop(*image.size))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Encoded image file (JPEG, PNG, ...) -> uint8 (3, H, W).

        An RGB JPEG whose crop is too small for draft decoding is decoded by torchvision
        (libjpeg-turbo) straight into a tensor, then cropped + resized there (bicubic, antialiased);
        every other file goes through PIL (`crop_pil`), with draft decoding where it is allowed. A
        file with an EXIF orientation is turned upright first (decoded in full, no draft), so the crop
        is drawn on the picture as it is seen.
        """
        image = Image.open(io.BytesIO(data))  # reads the header only
        upright = apply_exif_orientation(image)
        if upright is not image:  # stored sideways: the crop box must be drawn on the upright size
            return self(upright)
        crop = self.sample_crop(*image.size)
        if image.format != "JPEG" or image.mode != "RGB":
            return self.crop_pil(image, crop)
        if draft_scale(image.size, (crop[3], crop[2]), self.size[::-1]) > 1:
            return self.crop_pil(image, crop)
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        out = TF.resized_crop(pixels, *crop, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        return out.flip(-1) if self.sample_flip() else out

    # ---- the work ----------------------------------------------------------------------------------
    def crop_pil(self, image: Image.Image, crop: tuple[int, int, int, int]) -> torch.Tensor:
        """Crop box (top, left, h, w) in full-size pixels -> resized, maybe flipped, uint8 (3, H, W).

        A JPEG that is not decoded yet is decoded at the largest reduction `draft_scale` allows, and
        the box is scaled by the factor libjpeg actually used.
        """
        top, left, crop_h, crop_w = crop
        box = (left, top, left + crop_w, top + crop_h)
        if image.format == "JPEG" and getattr(image, "tile", None):  # tile is emptied by decoding
            scale = draft_scale(image.size, (crop_w, crop_h), self.size[::-1])
            if scale > 1:
                full_w, full_h = image.size
                image.draft(image.mode if image.mode in ("RGB", "L") else None, (full_w // scale, full_h // scale))
                sx, sy = image.size[0] / full_w, image.size[1] / full_h
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = to_rgb(image).resize(self.size[::-1], Image.BICUBIC, box=box)  # crop + antialiased resize
        if self.sample_flip():
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_uint8(out)

    def __repr__(self):
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class EvalTransform:
    """Resize the shorter side to size / crop_pct (bicubic), center crop -> uint8 (3, H, W).

    The exported image processor (`MAEImageProcessor`) runs the same `resize_and_center_crop`, so a
    served model sees the pixels it was scored on."""

    def __init__(self, size, crop_pct: float = 224 / 256):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.crop_pct = float(crop_pct)
        eval_resize_size(self.size, self.crop_pct)  # validates crop_pct

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(resize_and_center_crop(to_rgb(image), self.size, self.crop_pct))


def normalize_on_device(
    images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, dtype=torch.float32
) -> torch.Tensor:
    """uint8 (N, C, H, W) 0-255, or float (N, C, H, W) already scaled to [0, 1] by the dataset's range
    (`pixels.PixelFormat`), on any device -> normalised float (N, C, H, W) of `dtype`. `mean` / `std` are
    per channel, in the [0, 1] scale (ImageNet's by default)."""
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"normalize_on_device expects uint8 or float images, got {images.dtype}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"image_mean / image_std have {len(mean)} / {len(std)} values, but the images have {images.shape[1]} channels"
        )
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * scale
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * scale
    return ((images.float() - mean_t) / std_t).to(dtype)
