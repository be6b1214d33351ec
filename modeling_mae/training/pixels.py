"""Images that are not 8-bit RGB: channel count and bit depth from the data, one scaling per dataset.

RGB photographs (8-bit, 3 channels) keep the uint8 path of `transforms.py` untouched. Everything else
(1-channel `L` / `I;16` PNG and TIFF, multi-band `.npy` arrays, multi-band TIFF read with the optional
`tifffile`) goes through this module:

    fmt = probe_pixel_format(cells)             # channels + dtype of the first images; all must agree
    array = decode_array(cell)                  # (H, W, C) in the file's own dtype, never rescaled
    fmt.check(array, "image 17")                # every later image: same channels and dtype, or an error
    pixels = fmt.to_float(array)                # (C, H, W) float32 = (x - low) / (high - low), the
                                                # dataset's range (bit depth or configured), not the image's
    ArrayTrainTransform(size)(pixels)           # RandomResizedCrop + flip on the float tensor
    ArrayEvalTransform(size, crop_pct)(pixels)  # evaluation: shorter side, centre crop (as EvalTransform)

Arrays are channels-last: a `.npy` holds (H, W) or (H, W, C); a TIFF's sample axis (`S` / `C` in
tifffile's axes) is moved last, and a TIFF without a named sample axis is read as (H, W, C) too.

`ChannelStats` computes the per-channel mean and standard deviation of a sample of images in one
streaming pass (float64 sums, so millions of pixels add up exactly enough), for `--image_mean auto`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# decoding a PIL image, the scaling and the evaluation geometry live beside the exported image processor,
# which runs them at serving time: one implementation for training and serving
from ..image_processing_mae import (  # noqa: F401 (SINGLE_CHANNEL_MODES, BIT_DEPTH_RANGES re-exported)
    BIT_DEPTH_RANGES,
    IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN,
    IMAGENET_DEFAULT_STD as IMAGENET_STD,
    SINGLE_CHANNEL_MODES,
    eval_resize_size,
    pil_to_array,
    resize_and_center_crop_tensor,
    scale_by_range,
)


NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

logger = logging.getLogger(__name__)


class PixelFormatError(ValueError):
    """Images of one dataset disagree in channel count or data type, or disagree with the model."""


# --------------------------------------------------------------------------------------------------
# Decoding to arrays
# --------------------------------------------------------------------------------------------------
def _cell_bytes_or_path(cell: Any):
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    if isinstance(cell, (str, os.PathLike)):
        return None, str(cell)
    return None, None


def _read_tiff(data: bytes) -> np.ndarray:
    try:
        import tifffile
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("multi-band TIFF needs tifffile: pip install 'modeling_mae[tiff]'") from err
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
    for name in ("S", "C"):  # a named sample / channel axis goes last
        if name in axes and array.ndim == 3:
            return np.moveaxis(array, axes.index(name), -1)
    return array


def feature_dtype(feature) -> str | None:
    """The element type of an array-valued `datasets` feature (Array2D/3D, nested List / Sequence of a
    Value), so that cells read back as Python lists keep it; None for image features and the unknown."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str) and dtype not in ("list", "dict") and not hasattr(feature, "decode"):
            return dtype
        feature = getattr(feature, "feature", None)
    return None


def decode_array(cell: Any, dtype: str | None = None) -> np.ndarray:
    """An image cell (encoded bytes, `{"bytes", "path"}`, a path, an array or nested lists, a PIL image) ->
    (H, W, C) array in the file's own dtype. RGB-like PIL modes (RGB, RGBA, P, CMYK, ...) become 8-bit RGB
    (`transforms.to_rgb`); `L`, `I;16`, `I`, `F` stay one channel with their values. Array cells (a Hub
    dataset's Array3D column, a webdataset `.npy`) take `dtype` (see `feature_dtype`) when given."""
    if isinstance(cell, np.ndarray) or isinstance(cell, list):
        array = check_channels_last(np.asarray(cell, dtype=dtype))
    elif isinstance(cell, Image.Image):
        array = _pil_array(cell)
    else:
        data, path = _cell_bytes_or_path(cell)
        if data is None and path:
            with open(path, "rb") as f:
                data = f.read()
        if not data:
            raise ValueError("empty image cell")
        if data[:6] == NPY_MAGIC:
            array = check_channels_last(np.load(io.BytesIO(data), allow_pickle=False), path)
        elif data[:8] == PNG_MAGIC and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6):
            # Pillow reads 16-bit colour / gray+alpha PNGs as 8 bits, dropping the low byte without a word
            raise PixelFormatError(
                f"{path or 'an image'} is a 16-bit {'RGB' if data[25] != 4 else 'gray + alpha'} PNG, which Pillow "
                f"reads as 8 bits (the low byte lost): save it as 16-bit TIFF or .npy (H, W, C), or as 8-bit PNG"
            )
        elif data[:4] in TIFF_MAGICS and _tiff_needs_tifffile(data):
            array = _read_tiff(data)
        else:
            image = Image.open(io.BytesIO(data))
            image.load()
            array = _pil_array(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image array must be (H, W) or (H, W, C), got shape {array.shape}")
    return array


def check_channels_last(array: np.ndarray, name: str | None = None) -> np.ndarray:
    """Arrays are (H, W, C): a (C, H, W) one (rasterio's `read()`, torch's layout) would silently become an
    image C pixels tall with H channels, so a small first axis before two large ones is refused in one line."""
    if array.ndim == 3 and array.shape[0] <= 16 < min(array.shape[1], array.shape[2]):
        raise PixelFormatError(
            f"{name or 'an array'} has shape {tuple(array.shape)}, which looks channels-first (C, H, W); arrays are "
            f"read as (H, W, C): save np.moveaxis(array, 0, -1)"
        )
    return array


def _tiff_needs_tifffile(data: bytes) -> bool:
    """PIL reads 1- and 3-channel TIFFs; multi-band ones (and anything PIL rejects) go to tifffile."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return False
    except Exception:
        return True


def _pil_array(image: Image.Image) -> np.ndarray:
    """`L`, `I;16`, `I`, `F` as stored, every other mode as 8-bit RGB (`image_processing_mae.pil_to_array`)."""
    return pil_to_array(image)


# --------------------------------------------------------------------------------------------------
# The dataset's pixel format
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelFormat:
    """Channels, data type and value range of every image of a dataset.

    `value_range` maps pixels to float: (x - low) / (high - low). It is the bit depth's full range
    (uint8 0-255, uint16 0-65535) unless configured (`pixel_range`; required for float and 32-bit data)."""

    num_channels: int
    dtype: str
    value_range: tuple[float, float]

    @property
    def is_rgb8(self) -> bool:
        """The photograph fast path (`transforms.TrainTransform`, uint8 until the device)."""
        return self.num_channels == 3 and self.dtype == "uint8"

    def check(self, array: np.ndarray, where: str) -> None:
        if array.shape[-1] != self.num_channels or str(array.dtype) != self.dtype:
            raise PixelFormatError(
                f"{where} has {array.shape[-1]} channel(s) of {array.dtype}, but the dataset's images have "
                f"{self.num_channels} channel(s) of {self.dtype} (from its first images)"
            )

    def to_float(self, array: np.ndarray) -> torch.Tensor:
        """(H, W, C) array -> (C, H, W) float32 scaled by the dataset's range (never by the image's)."""
        return scale_by_range(array, self.value_range)

    def describe(self) -> str:
        low, high = self.value_range
        return f"{self.num_channels} channel(s), {self.dtype}, scaled from [{low:g}, {high:g}] to [0, 1]"


class ReadableArrays:
    """Iterates (array, name) over the cells that decode (`decode_array`); an undecodable one (truncated,
    not an image) is skipped with a warning naming it, as the training stream skips it, and listed in
    `skipped`."""

    def __init__(self, cells: Iterable[Any], names: Iterable[str] | None = None, purpose: str = "images"):
        self.cells, self.names, self.purpose, self.skipped = cells, names, purpose, []

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        names = list(self.names) if self.names is not None else None
        for index, cell in enumerate(self.cells):
            name = names[index] if names else f"image {index}"
            try:
                array = decode_array(cell)
            except PixelFormatError:  # readable, but not as the data path reads it: the user must know
                raise
            except Exception as err:  # what `data.ImageStream` counts as a corrupt image
                self.skipped.append(f"{name} ({type(err).__name__}: {err})")
                logger.warning("%s: skipping undecodable image %s: %s: %s", self.purpose, name, type(err).__name__, err)
                continue
            yield array, name


def probe_pixel_format(cells: Iterable[Any], pixel_range=None, names: Iterable[str] | None = None,
                       num_channels: int | None = None) -> PixelFormat:
    """The format of a dataset from its first images (`cells`); they must all agree (channels, dtype).
    Undecodable images are skipped and named (`ReadableArrays`); none readable is a one-line error.

    8-bit photographs that mix grayscale and colour (ImageNet has both) are one RGB dataset, as is any
    8-bit dataset when `num_channels=3` is asked for (grayscale converted to RGB, as before). Any other
    `num_channels` must be what the images have."""
    readable = ReadableArrays(cells, names, "pixel format")
    found = [(array.shape[-1], str(array.dtype), name) for array, name in readable]
    if not found:
        if readable.skipped:
            raise ValueError(
                f"none of the first {len(readable.skipped)} images decodes, so the channel count and bit depth "
                f"are unknown: {'; '.join(readable.skipped[:3])}"
            )
        raise ValueError("no image to read the channel count and bit depth from")
    channels, dtype, first = found[0]
    if all(d == "uint8" and c in (1, 3) for c, d, _ in found) and (
        num_channels == 3 or (num_channels is None and any(c == 3 for c, _, _ in found))
    ):
        return PixelFormat(3, "uint8", BIT_DEPTH_RANGES["uint8"])
    for other_channels, other_dtype, name in found[1:]:
        if (other_channels, other_dtype) != (channels, dtype):
            raise PixelFormatError(
                f"the dataset's images disagree: {first} has {channels} channel(s) of {dtype}, {name} has "
                f"{other_channels} channel(s) of {other_dtype}"
            )
    if num_channels is not None and num_channels != channels:
        raise PixelFormatError(
            f"`num_channels` is {num_channels} but the dataset's images have {channels} channel(s) of {dtype} "
            f"({first}); leave `num_channels` unset to use the data's"
        )
    if pixel_range is not None:
        if len(pixel_range) != 2 or not float(pixel_range[0]) < float(pixel_range[1]):
            raise ValueError(f"`pixel_range` must be [low, high] with low < high, got {list(pixel_range)}")
        value_range = (float(pixel_range[0]), float(pixel_range[1]))
    elif dtype in BIT_DEPTH_RANGES:
        value_range = BIT_DEPTH_RANGES[dtype]
    else:
        raise ValueError(
            f"the images hold {dtype} values, which have no bit depth to scale by: set `pixel_range` [low, high] "
            f"(the same for the whole dataset)"
        )
    return PixelFormat(channels, dtype, value_range)


def load_float_pixels(cell: Any, fmt: PixelFormat, where, dtype: str | None = None) -> torch.Tensor:
    """One image cell of a non-RGB dataset -> (C, H, W) float32 scaled by the dataset's range: the pixel path
    of pretraining (`decode_array` -> `PixelFormat.check` -> `PixelFormat.to_float`). Undecodable: a
    `data.CorruptImageError` (skipped and counted by the caller); another channel count or dtype: a
    `PixelFormatError` naming `where` (a string, or a callable giving it: called only then; never skipped)."""
    from .data import CorruptImageError

    try:
        array = decode_array(cell, dtype)
    except Exception as err:  # what `data.decode_image` calls corrupt on the RGB path
        raise CorruptImageError(f"{type(err).__name__}: {err}") from err
    if array.shape[-1] != fmt.num_channels or str(array.dtype) != fmt.dtype:
        fmt.check(array, where() if callable(where) else where)
    return fmt.to_float(array)


# --------------------------------------------------------------------------------------------------
# Downstream runs (fine-tuning, linear probing, segmentation, features): the checkpoint's pixels
# --------------------------------------------------------------------------------------------------
RGB8 = PixelFormat(3, "uint8", BIT_DEPTH_RANGES["uint8"])


@dataclass(frozen=True)
class PixelPath:
    """How a downstream run reads its images: the pixel format, the normalisation, and where they came from.

    8-bit RGB keeps the photograph path of `transforms.py` (uint8 until the device, ImageNet mean / std);
    every other format is read as pretraining reads it (`load_float_pixels`, `Array*Transform`). Both are
    normalised on the device by `normalize` (= `transforms.normalize_on_device` with this run's statistics).
    `checkpoint_channels` is the model's channel count as loaded: when it differs from the format's, the
    model is adapted (`model_loading.adapt_to_pixel_path`)."""

    format: PixelFormat
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str  # where format and statistics come from, for the log
    checkpoint_channels: int

    @property
    def is_rgb8(self) -> bool:
        return self.format.is_rgb8

    @property
    def array_format(self) -> PixelFormat | None:
        """The format for the dataset classes: None on the 8-bit RGB path (PIL decoding, uint8 tensors)."""
        return None if self.is_rgb8 else self.format

    @property
    def needs_adaptation(self) -> bool:
        return self.format.num_channels != self.checkpoint_channels

    def normalize(self, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 (RGB path) or float (N, C, H, W) on any device -> normalised with this run's mean / std."""
        from .transforms import normalize_on_device

        return normalize_on_device(images, self.mean, self.std, dtype)

    def eval_transform(self, size, crop_pct: float):
        """Shorter side to size / crop_pct, centre crop: `EvalTransform` (PIL, uint8) or `ArrayEvalTransform`."""
        from .transforms import EvalTransform

        return EvalTransform(size, crop_pct) if self.is_rgb8 else ArrayEvalTransform(size, crop_pct)

    def image_processor(self, model, crop_pct: float | None = None):
        """The exported `MAEImageProcessor`, carrying this format and statistics
        (`export.pixel_format_image_processor`; for 8-bit RGB with ImageNet's statistics the model's default
        one), so that serving decodes, scales and normalises the dataset's files as the run evaluated them."""
        from .export import pixel_format_image_processor

        return pixel_format_image_processor(model, self.format, self.mean, self.std, crop_pct=crop_pct)

    def describe(self) -> str:
        return f"{self.format.describe()}; mean {list(self.mean)}, std {list(self.std)} ({self.origin})"


def saved_pixels(processor_config: dict | None) -> tuple[PixelFormat, list[float], list[float]] | None:
    """(format, mean, std) that a saved image processor (`preprocessor_config.json` of `MAEImageProcessor` or
    `MAESegmentationImageProcessor`) describes; None when there is none, or it predates the pixel format
    fields (an 8-bit RGB processor) or names no dtype."""
    from ..image_processing_mae import _pixel_format

    if not processor_config or "num_channels" not in processor_config:
        return None
    channels = int(processor_config["num_channels"])
    dtype, value_range = _pixel_format(channels, processor_config.get("pixel_dtype"), processor_config.get("pixel_range"))
    mean, std = processor_config.get("image_mean"), processor_config.get("image_std")
    if dtype is None or mean is None or std is None:
        return None
    return PixelFormat(channels, dtype, value_range), [float(v) for v in mean], [float(v) for v in std]


def resolve_pixel_path(processor_config: dict | None, model_channels: int, cells: Iterable[Any],
                       names: Iterable[str] | None = None, *, adapt_channels: bool = False,
                       checkpoint: str = "the checkpoint", data: str = "the training images",
                       stats_cells: Iterable[Any] | None = None, stats_names: Iterable[str] | None = None,
                       progress: bool = True, can_adapt: bool = True) -> PixelPath:
    """The pixel path of a downstream run, decided once before any training.

    The checkpoint's pixels come from its saved image processor (`saved_pixels`: pretraining on one's own
    images saves channels, dtype, range and statistics), else 8-bit RGB with ImageNet's statistics for a
    3-channel model (official, timm and transformers checkpoints). The data's come from its first images
    (`cells`, `probe_pixel_format`). Then:

    - they agree: the checkpoint's format and statistics (8-bit grayscale photographs count as RGB for an
      RGB checkpoint and are converted, as before);
    - they differ and `adapt_channels`: the data's format, statistics computed over `stats_cells` (as
      pretraining's `auto`), the model to be adapted to the data's channel count;
    - they differ otherwise: a `PixelFormatError` in one line naming both (and `adapt_channels` when the
      run offers it, `can_adapt`).
    A non-RGB checkpoint without a saved pixel format takes the data's format if the channel count fits."""
    cells, names = list(cells), list(names) if names is not None else None
    first = names[0] if names else "its first image"
    adapt_channels = adapt_channels and can_adapt
    hint = "; set `adapt_channels` true to adapt the checkpoint to them" if can_adapt else ""
    saved = saved_pixels(processor_config)
    if saved is None and model_channels == 3:
        saved = (RGB8, list(IMAGENET_MEAN), list(IMAGENET_STD))
    if saved is not None and saved[0].is_rgb8:
        found = probe_pixel_format(cells, None, names)
        gray_photos = found.dtype == "uint8" and found.num_channels == 1 and not adapt_channels
        if found.is_rgb8 or gray_photos:
            return PixelPath(RGB8, tuple(saved[1]), tuple(saved[2]), "8-bit RGB, the checkpoint's statistics", 3)
    else:
        found = probe_pixel_format(cells, saved[0].value_range if saved else None, names)
    if saved is not None and (found.num_channels, found.dtype) == (saved[0].num_channels, saved[0].dtype):
        return PixelPath(saved[0], tuple(saved[1]), tuple(saved[2]), "the checkpoint's image processor",
                         model_channels)
    if saved is None and found.num_channels != model_channels and not adapt_channels:
        raise PixelFormatError(
            f"{checkpoint} has num_channels={model_channels} but {data} have {found.num_channels} channel(s) of "
            f"{found.dtype} ({first}){hint}"
        )
    if saved is not None and not adapt_channels:
        raise PixelFormatError(
            f"{checkpoint} was trained on {saved[0].num_channels} channel(s) of {saved[0].dtype} but {data} have "
            f"{found.num_channels} channel(s) of {found.dtype} ({first}); give images like the checkpoint's"
            + (", or set `adapt_channels` true to adapt the checkpoint to these" if can_adapt else "")
        )
    if saved is not None and found.dtype != saved[0].dtype:  # the checkpoint's range is not the data's
        found = probe_pixel_format(cells, None, names)
    if stats_cells is None:
        stats_cells, stats_names = cells, names
    stats_cells, skipped = list(stats_cells), []
    mean, std = channel_statistics(stats_cells, found, total=len(stats_cells), progress=progress, names=stats_names,
                                   skipped=skipped)
    why = ("the checkpoint saved no pixel format" if saved is None and found.num_channels == model_channels
           else "the data's pixels, the checkpoint adapted to them")
    return PixelPath(found, tuple(mean), tuple(std),
                     f"statistics computed over {len(stats_cells) - len(skipped)} of {data}; {why}", model_channels)


# --------------------------------------------------------------------------------------------------
# Augmentation on float tensors
# --------------------------------------------------------------------------------------------------
class ArrayTrainTransform:
    """RandomResizedCrop + horizontal flip of a float (C, H, W) tensor, any channel count: the same
    random decisions, drawn in the same order, as `transforms.TrainTransform`."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        from .transforms import TrainTransform

        self._sampler = TrainTransform(size, scale=scale, ratio=ratio, hflip=hflip)  # validates the arguments
        self.size = self._sampler.size

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        crop = self._sampler.sample_crop(width, height)
        out = TF.resized_crop(pixels, *crop, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        return out.flip(-1) if self._sampler.sample_flip() else out

    def __repr__(self):
        s = self._sampler
        return f"ArrayTrainTransform(size={s.size}, scale={s.scale}, ratio={s.ratio}, hflip={s.hflip})"


class ArrayEvalTransform:
    """Shorter side -> round(min(size) / crop_pct) (bicubic, antialiased), the longer one in proportion,
    centre crop of `size`: the geometry of `transforms.EvalTransform` on a float (C, H, W) tensor, any
    channel count. The exported image processor runs the same function (`resize_and_center_crop_tensor`)."""

    def __init__(self, size, crop_pct: float = 224 / 256):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (height, width)
        self.crop_pct = float(crop_pct)
        eval_resize_size(self.size, self.crop_pct)  # validates crop_pct

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float (C, H, W) scaled by the dataset's range (`PixelFormat.to_float`) -> float (C, *size)."""
        return resize_and_center_crop_tensor(pixels, self.size, self.crop_pct)

    def __repr__(self):
        return f"ArrayEvalTransform(size={self.size}, crop_pct={self.crop_pct})"


# --------------------------------------------------------------------------------------------------
# Per-channel statistics
# --------------------------------------------------------------------------------------------------
class ChannelStats:
    """Streaming per-channel mean and (population) standard deviation of float (C, H, W) images."""

    def __init__(self):
        self.count = 0
        self.total = None
        self.total_sq = None

    def update(self, pixels: torch.Tensor) -> None:
        flat = pixels.detach().reshape(pixels.shape[0], -1).double()
        if self.total is None:
            self.total = torch.zeros(flat.shape[0], dtype=torch.float64)
            self.total_sq = torch.zeros(flat.shape[0], dtype=torch.float64)
        elif flat.shape[0] != self.total.shape[0]:
            raise PixelFormatError(f"an image has {flat.shape[0]} channels, the earlier ones {self.total.shape[0]}")
        self.total += flat.sum(dim=1)
        self.total_sq += flat.square().sum(dim=1)
        self.count += flat.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count:
            raise ValueError("no pixels seen: cannot compute image_mean / image_std")
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.square()).clamp_min(0)
        std = var.sqrt().clamp_min(1e-6)
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def channel_statistics(cells: Iterable[Any], fmt: PixelFormat, total: int | None = None,
                       progress: bool = True, names: Iterable[str] | None = None,
                       skipped: list | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean / std over `cells` (whole images, scaled by `fmt`), with a progress bar; undecodable
    images are skipped and named, as the training stream skips them (and appended to `skipped`)."""
    from tqdm.auto import tqdm

    stats = ChannelStats()
    cells = tqdm(cells, total=total, desc="image statistics", unit="img", disable=not progress)
    readable = ReadableArrays(cells, names, "image statistics")
    for array, name in readable:
        if fmt.is_rgb8 and array.shape[-1] == 1:  # a grayscale photograph among colour ones, as the stream sees it
            array = np.repeat(array, 3, axis=-1)
        fmt.check(array, name)
        stats.update(fmt.to_float(array))
    if readable.skipped:
        logger.warning("image statistics: %d undecodable image(s) skipped", len(readable.skipped))
        if skipped is not None:
            skipped.extend(readable.skipped)
    if not stats.count:
        raise ValueError(f"none of the {len(readable.skipped)} images read for the statistics decodes: "
                         f"{'; '.join(readable.skipped[:3])}")
    return stats.result()


# --------------------------------------------------------------------------------------------------
# Demo data (no download): 16-bit single-channel images and 6-band arrays
# --------------------------------------------------------------------------------------------------
DEMO_PIXEL_KINDS = ("gray16", "bands6")


def demo_pixel_arrays(kind: str, count: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    """Smooth random scenes a tiny MAE can learn: `gray16` = (H, W) uint16 with a per-image brightness
    level anywhere in 0-65535 (the absolute level matters, as in X-ray or CT); `bands6` = (H, W, 6) uint16
    "spectra": each pixel mixes two of three random material maps with band-specific responses."""
    if kind not in DEMO_PIXEL_KINDS:
        raise ValueError(f"`kind` must be one of {DEMO_PIXEL_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    responses = rng.uniform(2000, 20000, size=(3, 6))  # material x band
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 1, size=(3, 5, 5)).astype(np.float32)
        maps = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.BICUBIC)) for c in coarse])
        maps = maps.clip(0, 1)
        if kind == "gray16":
            level, contrast = rng.uniform(2000, 50000), rng.uniform(2000, 12000)
            out.append((level + contrast * maps[0]).clip(0, 65535).astype(np.uint16))
        else:
            weights = maps / maps.sum(axis=0, keepdims=True).clip(1e-3)
            out.append(np.einsum("khw,kb->hwb", weights, responses).clip(0, 65535).astype(np.uint16))
    return out


def write_demo_pixel_dataset(out_dir, kind: str, count: int = 2048, size: int = 48, seed: int = 0) -> int:
    """Write `demo_pixel_arrays` into a folder: 16-bit PNGs (`gray16`) or `.npy` arrays (`bands6`)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(demo_pixel_arrays(kind, count, size, seed)):
        if kind == "gray16":
            Image.fromarray(array).save(out / f"{index:05d}.png")
        else:
            np.save(out / f"{index:05d}.npy", array)
    return count
