"""Image transforms for the data path. Images stay uint8 until they reach the device.

- `to_rgb`: grayscale, CMYK, RGBA, palette, 16-bit ... -> RGB PIL image.
- `TrainTransform`: RandomResizedCrop(scale 0.2-1.0, bicubic) + horizontal flip -> uint8 (3, H, W).
- `EvalTransform`: resize shorter side to size / crop_pct, center crop -> uint8 (3, H, W).
- `normalize_on_device`: uint8 (N, 3, H, W) -> float, ImageNet mean/std, on the accelerator.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB. Palette and alpha images are composited on white first so transparent
    pixels do not turn black; 16-bit / float images are rescaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / max(hi - lo, 1e-6) * 255.0
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), sharing no memory with PIL."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class TrainTransform:
    """MAE pretraining augmentation: RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip.

    Returns a uint8 tensor (3, H, W); normalisation happens on the device (`normalize_on_device`).
    """

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.crop = v2.RandomResizedCrop(
            self.size, scale=self.scale, ratio=self.ratio, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        self.flip = v2.RandomHorizontalFlip(hflip)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.flip(self.crop(to_rgb(image)))
        return pil_to_uint8(image)

    def __repr__(self):
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class EvalTransform:
    """Resize the shorter side to size / crop_pct (bicubic), center crop -> uint8 (3, H, W)."""

    def __init__(self, size, crop_pct: float = 224 / 256):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        resize = int(round(min(self.size) / crop_pct))
        self.ops = v2.Compose(
            [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(self.size)]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(self.ops(to_rgb(image)))


def normalize_on_device(
    images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, dtype=torch.float32
) -> torch.Tensor:
    """uint8 (N, C, H, W) on any device -> normalised float (N, C, H, W) of `dtype`."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_on_device expects uint8 images, got {images.dtype}")
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return ((images.float() - mean_t) / std_t).to(dtype)
