"""The image processor saved with every model: the evaluation transform of the training scripts.

Evaluation during fine-tuning / linear probing (and the paper's) resizes the shorter side to
size / crop_pct (bicubic, PIL) and takes the centre crop of the model's size; transformers'
`ViTImageProcessor` would stretch the whole image to the model size instead, so an exported model
would be served on other pixels than it was scored on. `MAEImageProcessor` runs the very function
the training scripts use (`resize_and_center_crop`), then rescales to [0, 1] and normalises with the
model's mean / std: the same tensors, to float rounding.

This file imports only PIL, numpy, torch and transformers: it is copied beside the weights and loads
with `trust_remote_code=True` where `modeling_mae` is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 224 / 256


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate / mirror `image` as its EXIF Orientation tag says (phones store pictures sideways with a
    tag); an image without the tag is returned unchanged (the same object). transformers'
    `load_image` (the pipelines) does the same, so training and serving see the same upright pixels."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: keep the pixels as stored
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB: palette and alpha composited on white, 16-bit / float rescaled to 8 bits."""
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
        image = Image.fromarray(((array - lo) / max(hi - lo, 1e-6) * 255.0).astype(np.uint8), mode="L")
    return image.convert("RGB")


def eval_resize_size(size: tuple[int, int], crop_pct: float) -> int:
    """The shorter side before the centre crop: round(min(height, width) / crop_pct)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(round(min(size) / crop_pct))


def resize_and_center_crop(image: Image.Image, size: tuple[int, int], crop_pct: float) -> Image.Image:
    """Shorter side -> round(min(size) / crop_pct) with PIL bicubic (antialiased), the longer side in
    proportion (truncated), then the centre crop of `size` = (height, width), offsets rounded as
    torchvision's `CenterCrop` rounds them. Returns a PIL image of `size`."""
    height, width = size
    short = eval_resize_size(size, crop_pct)
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _to_pil(image) -> Image.Image:
    """PIL image, (H, W, C) / (C, H, W) uint8 array or tensor -> PIL image."""
    if isinstance(image, Image.Image):
        return image
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:  # floats in [0, 1]
        array = (np.clip(array, 0, 1) * 255.0).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


class MAEImageProcessor(BaseImageProcessor):
    """Resize the shorter side to size / crop_pct (bicubic), centre-crop `size`, rescale to [0, 1],
    normalise: the evaluation transform of `scripts/finetune.py` / `linprobe.py`, as an image processor.

    Args:
        size: {"height": H, "width": W}, the model's input size.
        crop_pct: the centre crop's share of the resized shorter side (0.875: 224 of 256).
        image_mean / image_std: per-channel normalisation (ImageNet's by default).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: dict | None = None, crop_pct: float = DEFAULT_CROP_PCT, image_mean=None,
                 image_std=None, **kwargs):
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.crop_pct = float(crop_pct)
        eval_resize_size((self.size["height"], self.size["width"]), self.crop_pct)  # validates crop_pct
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_DEFAULT_STD)

    def crop_uint8(self, image) -> torch.Tensor:
        """One image -> uint8 (3, H, W) after EXIF orientation, RGB conversion, resize and centre crop."""
        pil = to_rgb_image(apply_exif_orientation(_to_pil(image)))
        out = resize_and_center_crop(pil, (self.size["height"], self.size["width"]), self.crop_pct)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """An image or a list of images -> {"pixel_values": (N, 3, H, W) float32}, normalised."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = torch.stack([self.crop_uint8(image) for image in images]).float()
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.image_std).view(1, -1, 1, 1) * 255.0
        pixel_values = (pixels - mean) / std  # the arithmetic of `normalize_on_device`
        if return_tensors in (None, "pt"):
            return BatchFeature({"pixel_values": pixel_values}, tensor_type=None)
        return BatchFeature({"pixel_values": pixel_values.numpy()}, tensor_type=return_tensors)
