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


# --------------------------------------------------------------------------------------------------
# Images that are not 8-bit RGB: float (C, H, W) tensors of any channel count
# --------------------------------------------------------------------------------------------------
def _geometric(kind: str, fill):
    """A tensor version of one of timm's geometric RandAugment ops, for `AugmentOp.aug_fn` (the level
    argument is timm's: degrees, shear factor, or translation as a fraction / in pixels)."""
    def op(pixels: torch.Tensor, level: float, **_):
        height, width = pixels.shape[-2:]
        affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
        if kind == "Rotate":
            affine["angle"] = level
        elif kind in ("ShearX", "ShearY"):  # PIL's shear factor -> torchvision's shear angle, about the corner
            angle = math.degrees(math.atan(level))
            affine["shear"] = [angle, 0.0] if kind == "ShearX" else [0.0, angle]
            affine["center"] = [0, 0]
        elif kind.startswith("TranslateX"):
            affine["translate"] = [round(level * width) if kind.endswith("Rel") else round(level), 0]
        else:
            affine["translate"] = [0, round(level * height) if kind.endswith("Rel") else round(level)]
        return v2.functional.affine(pixels, interpolation=InterpolationMode.BILINEAR, fill=fill, **affine)
    return op


def _brightness(pixels: torch.Tensor, factor: float, **_):
    """PIL's ImageEnhance.Brightness on floats: blend with black, x * factor (no clipping)."""
    return pixels * factor


def _contrast(pixels: torch.Tensor, factor: float, **_):
    """PIL's ImageEnhance.Contrast on floats: blend with the image's mean value, mean + factor (x - mean)."""
    mean = pixels.mean()
    return mean + factor * (pixels - mean)


def tensor_op(name: str, fill):
    """The tensor implementation of timm's RandAugment op `name`, or None for the ops that need 8-bit RGB."""
    base = name.removesuffix("Increasing")
    if base in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"):
        return _geometric(base, fill)
    return {"Brightness": _brightness, "Contrast": _contrast}.get(base)


def tensor_rand_augment(auto_augment: str, size, fill):
    """timm's RandAugment of the spec `auto_augment` for float (C, H, W) images of any channel count.

    The same policy object (ops drawn per image, probability and magnitude noise as the spec says), with
    each op's PIL function swapped for a tensor one: the geometric ops (rotate, shear, translate; the
    outside filled with `fill`, the dataset mean per channel, as timm fills with the ImageNet mean) and the
    intensity equivalents of Brightness (x * f) and Contrast (mean + f (x - mean)). The ops that only mean
    something for 8-bit RGB (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Color,
    Sharpness) are left out. Returns (transform, kept op names, left-out op names)."""
    from PIL import Image

    size = (size, size) if isinstance(size, int) else tuple(size)
    hparams = dict(translate_const=int(min(size) * 0.45), img_mean=(128, 128, 128), interpolation=Image.BILINEAR)
    policy = rand_augment_transform(auto_augment, hparams)
    kept, dropped = [], []
    for op in policy.ops:
        fn = tensor_op(op.name, list(fill))
        (kept if fn is not None else dropped).append(op)
        if fn is not None:
            op.aug_fn = fn
    if not kept:
        raise ValueError(f"`auto_augment` {auto_augment!r} has no op that applies to images other than 8-bit RGB")
    if policy.choice_weights is not None:  # weights of the kept ops, renormalised
        weights = [w for op, w in zip(policy.ops, policy.choice_weights) if op in kept]
        policy.choice_weights = [w / sum(weights) for w in weights]
    policy.ops = kept
    return policy, [op.name for op in kept], [op.name for op in dropped]


class ArrayFinetuneTrainTransform:
    """The fine-tuning augmentation of `FinetuneTrainTransform` for float (C, H, W) tensors of any channel
    count (16-bit, N bands): RandomResizedCrop(size, scale 0.08-1, bicubic, antialiased) + flip +
    `tensor_rand_augment` (RandAugment's geometric ops and intensity equivalents of its colour ops).
    `describe()` says what is used, for the log. Random erasing and Mixup / CutMix work on any channel count
    and act later, on the normalised batch, as for RGB."""

    def __init__(self, size, auto_augment: str | None = "rand-m9-mstd0.5-inc1", scale=(0.08, 1.0),
                 hflip: float = 0.5, fill=(0.5,), num_channels: int = 1, pixel_description: str = ""):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        ops = [
            v2.RandomResizedCrop(
                self.size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
        self.auto_augment, self.kept, self.dropped = auto_augment, [], []
        self.pixel_description = pixel_description or f"{num_channels} channel(s)"
        if auto_augment:
            fill = list(fill) if len(fill) == num_channels else [float(fill[0])] * num_channels
            policy, self.kept, self.dropped = tensor_rand_augment(auto_augment, self.size, fill)
            ops.append(policy)
        self.ops = v2.Compose(ops)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ops(pixels)

    def describe(self) -> str:
        if not self.auto_augment:
            return f"fine-tuning augmentation on {self.pixel_description}: RandomResizedCrop + flip, no RandAugment"
        return (f"RandAugment {self.auto_augment!r} on {self.pixel_description}: ops drawn from "
                f"{', '.join(self.kept)} (Brightness: x * f, Contrast: mean + f (x - mean), on the float pixels); "
                f"left out, as they need 8-bit RGB: {', '.join(self.dropped) or 'none'}")


def finetune_train_transform(pixel_path, size, auto_augment: str | None, scale):
    """`FinetuneTrainTransform` for 8-bit RGB (PIL RandAugment, uint8), else `ArrayFinetuneTrainTransform`
    (logged: what RandAugment does on these pixels)."""
    import logging

    if pixel_path.is_rgb8:
        return FinetuneTrainTransform(size, auto_augment, scale=scale, mean=pixel_path.mean)
    transform = ArrayFinetuneTrainTransform(size, auto_augment, scale=scale, fill=pixel_path.mean,
                                            num_channels=pixel_path.format.num_channels,
                                            pixel_description=f"{pixel_path.format.num_channels} channel(s) of "
                                                              f"{pixel_path.format.dtype}")
    logging.getLogger(__name__).info("%s", transform.describe())
    return transform


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
    official sampler (`util/crop.py`, not torchvision's) + flip. A PIL image -> uint8 (3, H, W); a float
    (C, H, W) tensor (images that are not 8-bit RGB, any channel count) -> float (C, H, W), the same draws."""

    def __init__(self, size: int, hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ops = v2.Compose([OfficialRandomResizedCrop(self.size), v2.RandomHorizontalFlip(hflip)])

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return self.ops(image)
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
