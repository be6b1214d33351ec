"""The image processor saved with every segmentation model: the evaluation of `scripts/segment.py`.

mmsegmentation's ADE20K test pipeline (and the script's evaluation) does not stretch an image to the
crop size: it rescales it keeping the aspect ratio so that it fits the test scale (2048, 512), runs
the model on sliding 512 x 512 windows of that image (or on the whole of it), resizes the logits to
the original image's size (bilinear) and takes the argmax there. transformers' `SegformerImageProcessor`
would stretch every image to 512 x 512 instead, so an exported model would be served on other pixels
than it was scored on. The steps, and who owns each:

    processor  image -> keep-ratio rescale to fit `scale` (PIL bilinear) -> uint8 -> normalise (`__call__`);
               other pixel formats (1 channel, 16 bit, N bands: `num_channels`, `pixel_dtype`, `pixel_range`):
               image -> (C, H, W) float scaled by the dataset's range -> the same rescale with torch's
               bilinear antialiased resize -> normalise
    model      sliding-window or whole-image inference, as its config says (`MAEUperNetForSemanticSegmentation`)
    processor  logits (N, C, h, w) -> bilinear to the original size -> argmax (`post_process_semantic_segmentation`)

The script's evaluation calls these very functions (`resize_uint8` / `resize_float`, `normalize`,
`post_process_semantic_segmentation`) and the model's forward, so `pipeline("image-segmentation")`
on an exported folder reproduces the mIoU the script reports. (transformers' segmentation pipeline
converts every image to 8-bit RGB with `load_image` and takes no arrays: for other pixel formats call
the processor and the model directly, as the model card shows.) Annotations go through
`reduce_labels` (ADE20K: 0 = "other" -> ignored, class c -> c - 1), the same function the script's
dataset uses, when the processor is given `segmentation_maps`.

This file imports only PIL, numpy, torch, transformers and its sibling `image_processing_mae`: it is
copied beside the weights and loads with `trust_remote_code=True` where `modeling_mae` is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_processing_mae import (
    _to_array,
    _to_pil,
    apply_exif_orientation,
    pixel_normalisation,
    scale_by_range,
    to_rgb_image,
)


IGNORE_INDEX = 255
ADE20K_TEST_SCALE = (2048, 512)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest (h, w) with long side <= max(scale), short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_uint8(image, scale: tuple[int, int]) -> torch.Tensor:
    """One image (PIL, or a (H, W, C) / (C, H, W) uint8 array or tensor) -> uint8 (3, h, w): EXIF
    orientation, RGB, then resized with PIL bilinear (antialiased) to `rescale_size(H, W, scale)`."""
    image = to_rgb_image(apply_exif_orientation(_to_pil(image)))
    height, width = rescale_size(image.height, image.width, scale)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def resize_float(pixels: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
    """Float (C, H, W), any channel count -> (C, h, w) at `rescale_size(H, W, scale)`, torch's bilinear
    antialiased resize (the float counterpart of `resize_uint8`'s PIL bilinear)."""
    height, width = rescale_size(pixels.shape[-2], pixels.shape[-1], scale)
    if (height, width) == tuple(pixels.shape[-2:]):
        return pixels
    return F.interpolate(pixels[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def normalize_uint8(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, h, w) 0-255 on any device -> float32 (pixels - 255 mean) / (255 std); `mean` / `std` per
    channel in the [0, 1] scale. The arithmetic of training's `normalize_on_device`."""
    mean_t = torch.tensor(mean, device=pixels.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=pixels.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (pixels.float() - mean_t) / std_t


def reduce_labels(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """ADE20K's convention: 0 ("other") -> ignore_index, class c -> c - 1; ignore_index stays."""
    return np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)


def predict_label_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, num_labels, h, w) logits -> (H, W) class ids at the annotation's size (bilinear, then argmax)."""
    logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits[0].argmax(dim=0)


def _pad_stack(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """(..., h_i, w_i) tensors -> (N, ..., max h, max w), padded at the bottom / right with `value`."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])


class MAESegmentationImageProcessor(BaseImageProcessor):
    """Keep-ratio rescale to fit `scale`, normalise; argmax at the original size after the model: the
    evaluation of `scripts/segment.py` as an image processor (see the module docstring).

    Args:
        scale: (long, short) side bounds of the rescale, mmseg's test `scale` ((2048, 512) for ADE20K).
        image_mean / image_std: per-channel normalisation (ImageNet's by default for 3 channels).
        num_channels / pixel_dtype / pixel_range: the dataset's pixel format (as `MAEImageProcessor`'s;
            default 8-bit RGB). Input of another channel count or dtype is refused in one line.
        do_reduce_labels: ADE20K's labels for `segmentation_maps`: 0 -> `ignore_index`, c -> c - 1.
        ignore_index: label value that the loss and the metric skip.

    `__call__(images)` returns `pixel_values` (N, C, max h, max w), padded with 0 at the bottom / right
    when the rescaled images differ in size, and `image_sizes` (N, 2): each image's (h, w) before the
    padding, which the model and `post_process_semantic_segmentation` use to leave the padding out.
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, scale=ADE20K_TEST_SCALE, image_mean=None, image_std=None, do_reduce_labels: bool = True,
                 ignore_index: int = IGNORE_INDEX, num_channels: int = 3, pixel_dtype: str | None = None,
                 pixel_range=None, **kwargs):
        super().__init__(**kwargs)
        if len(scale) != 2 or not all(isinstance(s, int) and s > 0 for s in scale):
            raise ValueError(f"`scale` must be two positive ints (long, short side), got {scale!r}")
        self.scale = [int(s) for s in scale]
        self.num_channels = num_channels
        self.pixel_dtype, self.pixel_range, self.image_mean, self.image_std = pixel_normalisation(
            num_channels, pixel_dtype, pixel_range, image_mean, image_std)
        self.do_reduce_labels = bool(do_reduce_labels)
        self.ignore_index = int(ignore_index)

    @property
    def is_rgb8(self) -> bool:
        """The 8-bit RGB path: PIL decoding and resize, uint8 until normalised (as training's)."""
        return self.num_channels == 3 and self.pixel_dtype == "uint8" and tuple(self.pixel_range) == (0.0, 255.0)

    def resize_uint8(self, image) -> torch.Tensor:
        """One image -> uint8 (3, h, w), rescaled (keep ratio) to fit `scale`."""
        return resize_uint8(image, tuple(self.scale))

    def to_float(self, image, input_data_format: str | None = None) -> torch.Tensor:
        """One image of a non-RGB format (PIL L / I;16 / I / F, numpy (H, W) / (H, W, C), tensor (C, H, W)) ->
        (C, H, W) float32 scaled by the dataset's range. Another channel count or dtype is an error naming both."""
        array = _to_array(image, input_data_format)
        if array.shape[-1] != self.num_channels or (self.pixel_dtype and str(array.dtype) != self.pixel_dtype):
            raise ValueError(
                f"the image has {array.shape[-1]} channel(s) of {array.dtype}, but this processor expects "
                f"{self.num_channels} channel(s) of {self.pixel_dtype or 'any dtype'}"
            )
        return scale_by_range(array, tuple(self.pixel_range))

    def resize(self, image) -> torch.Tensor:
        """One image -> rescaled (keep ratio) to fit `scale`: uint8 (3, h, w) on the 8-bit RGB path, else
        float (C, h, w) scaled by the dataset's range (a float (C, H, W) tensor is taken as already scaled)."""
        if self.is_rgb8:
            return self.resize_uint8(image)
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            return resize_float(image, tuple(self.scale))
        return resize_float(self.to_float(image), tuple(self.scale))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) 0-255 or float (N, C, h, w) scaled to [0, 1], on any device -> normalised float32:
        the arithmetic of training's `normalize_on_device`."""
        if pixels.dtype == torch.uint8:
            return self.normalize_uint8(pixels)
        mean = torch.tensor(self.image_mean, device=pixels.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device, dtype=torch.float32).view(1, -1, 1, 1)
        return (pixels.float() - mean) / std

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) on any device -> normalised float32 (N, 3, h, w)."""
        return normalize_uint8(pixels, self.image_mean, self.image_std)

    def label_map(self, segmentation_map) -> torch.Tensor:
        """A class-index map (PIL mode L / P / I, array or tensor) -> int64 (H, W) at its own size, with
        `reduce_labels` when `do_reduce_labels`."""
        if isinstance(segmentation_map, Image.Image):
            if segmentation_map.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                raise ValueError(f"segmentation maps must hold one class id per pixel (mode L, P, I or I;16), "
                                 f"got mode {segmentation_map.mode!r}")
            segmentation_map = np.asarray(segmentation_map)
        elif isinstance(segmentation_map, torch.Tensor):
            segmentation_map = segmentation_map.detach().cpu().numpy()
        label = np.asarray(segmentation_map).astype(np.int64)
        if self.do_reduce_labels:
            label = reduce_labels(label, self.ignore_index)
        return torch.from_numpy(label)

    def preprocess(self, images, segmentation_maps=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Images (and optionally their class-index maps) -> {"pixel_values": (N, C, h, w) float32,
        "image_sizes": (N, 2) int64, "labels": (N, H, W) int64 at the maps' own size, padded with
        `ignore_index`}; the labels stay at full size because the metric is taken there."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = [self.normalize(self.resize(image)[None])[0] for image in images]
        data = {
            "pixel_values": _pad_stack(pixels, 0.0),
            "image_sizes": torch.tensor([list(p.shape[-2:]) for p in pixels], dtype=torch.long),
        }
        if segmentation_maps is not None:
            if not isinstance(segmentation_maps, (list, tuple)):
                segmentation_maps = [segmentation_maps]
            if len(segmentation_maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(segmentation_maps)} segmentation maps")
            data["labels"] = _pad_stack([self.label_map(m) for m in segmentation_maps], self.ignore_index)
        if return_tensors in (None, "pt"):
            return BatchFeature(data, tensor_type=None)
        return BatchFeature({k: v.numpy() for k, v in data.items()}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(self, outputs, target_sizes=None) -> list[torch.Tensor]:
        """Model outputs -> one (H, W) int64 class map per image: the logits of the image's own (h, w)
        (`outputs.image_sizes`, padding left out) resized bilinearly to `target_sizes[i]` (the original
        image's (H, W), as the pipeline passes it), then the argmax; without `target_sizes`, the argmax
        at the logits' size."""
        logits = outputs.logits
        image_sizes = getattr(outputs, "image_sizes", None)
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"got {len(logits)} images' logits but {len(target_sizes)} target_sizes")
        maps = []
        for i in range(len(logits)):
            height, width = (int(v) for v in image_sizes[i]) if image_sizes is not None else logits.shape[-2:]
            own = logits[i : i + 1, :, :height, :width]
            size = (height, width) if target_sizes is None else tuple(int(v) for v in target_sizes[i])
            maps.append(predict_label_map(own, size))
        return maps


__all__ = ["MAESegmentationImageProcessor"]
