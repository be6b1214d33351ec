"""The fine-tuning and linear-probing augmentations and losses (paper Tables 9 and 10), from maintained
libraries: RandomResizedCrop + flip + RandAugment (torchvision v2 + timm) as uint8 on the host, random
erasing and Mixup/CutMix (timm) on the normalised batch on the device, and the matching criterion.
The linear probe's crop is the official one (`official_crop_params`), which no library provides."""

from __future__ import annotations

import math

import torch
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from .transforms import IMAGENET_DEFAULT_MEAN, pil_to_uint8, to_rgb


def _posterize(image, bits_to_keep: int, **_):
    """Posterize that accepts 0 bits (a black image, what Pillow < 12 and TF's RandAugment give)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def allow_zero_bit_posterize(rand_augment):
    """timm's "PosterizeIncreasing" keeps 4 - int(0.4 * magnitude) bits: 0 at magnitude 10, which the
    recipe's magnitude noise (9 +- 0.5, clipped to 10) reaches; Pillow >= 12 rejects 0 bits with a
    ValueError. Swap in `_posterize` for the posterize ops of this RandAugment instance only."""
    for op in getattr(rand_augment, "ops", []):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return rand_augment


class FinetuneTrainTransform:
    """RandomResizedCrop(size, scale 0.08-1, bicubic) + flip + RandAugment -> uint8 (3, H, W).

    `auto_augment` is a timm RandAugment spec ("rand-m9-mstd0.5-inc1" = magnitude 9, std 0.5, the
    official recipe); None or "" disables it. Random erasing and Mixup/CutMix act later, on the
    normalised batch on the device.
    """

    def __init__(self, size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1", scale=(0.08, 1.0),
                 hflip: float = 0.5, mean=IMAGENET_DEFAULT_MEAN):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        ops = [
            v2.RandomResizedCrop(
                self.size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
        if auto_augment:
            from PIL import Image

            hparams = dict(
                translate_const=int(min(self.size) * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=Image.BICUBIC,
            )
            ops.append(allow_zero_bit_posterize(rand_augment_transform(auto_augment, hparams)))
        self.ops = v2.Compose(ops)

    def __call__(self, image) -> torch.Tensor:
        return pil_to_uint8(self.ops(to_rgb(image)))


def official_crop_params(height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The crop box (top, left, h, w) of the official linear probe's RandomResizedCrop (`util/crop.py`,
    after BYOL's TF code): ONE draw, no retry loop, no centre-crop fallback.

        target area = height * width * U(scale)
        aspect      = exp(U(log ratio[0], log ratio[1]))
        w = round(sqrt(area * aspect)),  h = round(sqrt(area / aspect)),  each clamped to the image
        top ~ U{0..height - h},  left ~ U{0..width - w}

    Unlike torchvision's sampler (up to 10 draws until the box fits, then a centre crop), a box that
    does not fit is clamped, so the area and aspect distributions differ (e.g. a very elongated image
    gets crops of its full short side). Randomness from torch's global generator, as torchvision's.
    (w, h are kept >= 1 so a few-pixel image does not give an empty box; the official code would fail.)
    """
    area = height * width
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w = min(max(1, round(math.sqrt(target_area * aspect))), width)
    h = min(max(1, round(math.sqrt(target_area / aspect))), height)
    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
    return top, left, h, w


class OfficialRandomResizedCrop:
    """RandomResizedCrop with the official linear-probe sampler (`official_crop_params`), then a bicubic,
    antialiased resize to `size`; takes and returns a PIL image (or a tensor (..., H, W))."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BICUBIC):
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation

    def __call__(self, image):
        height, width = v2.functional.get_size(image)
        top, left, h, w = official_crop_params(height, width, self.scale, self.ratio)
        return v2.functional.resized_crop(image, top, left, h, w, self.size, self.interpolation, antialias=True)

    def __repr__(self) -> str:
        # stable across processes and runs (no object address): the feature cache is keyed by it
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value})")


class LinprobeTrainTransform:
    """The official linear-probe augmentation: RandomResizedCrop(size, scale 0.08-1, bicubic) with the
    official sampler (`util/crop.py`, not torchvision's) + flip."""

    def __init__(self, size: int, hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ops = v2.Compose([OfficialRandomResizedCrop(self.size), v2.RandomHorizontalFlip(hflip)])

    def __call__(self, image) -> torch.Tensor:
        return pil_to_uint8(self.ops(to_rgb(image)))


def build_random_erasing(prob: float, device) -> RandomErasing | None:
    """timm RandomErasing in "pixel" mode (per-pixel normal noise), one box, applied per sample to a
    normalised (N, C, H, W) batch on `device`; None when `prob` is 0."""
    if prob <= 0:
        return None
    return RandomErasing(probability=prob, mode="pixel", max_count=1, device=str(device))


def build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int, prob: float = 1.0,
                switch_prob: float = 0.5, mode: str = "batch"):
    """timm `Mixup` (which also applies label smoothing to its soft targets); None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(mixup_active: bool, label_smoothing: float) -> nn.Module:
    """Soft-target cross-entropy after Mixup/CutMix (smoothing already in the targets), otherwise
    cross-entropy with `label_smoothing`."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def prepare_mixup_batch(mixup, images: torch.Tensor, labels: torch.Tensor):
    """Mixup/CutMix needs an even batch: drop the odd last sample of a ragged batch."""
    if mixup is None:
        return images, labels
    if images.shape[0] % 2:
        images, labels = images[:-1], labels[:-1]
    return mixup(images, labels)
