"""The image processor saved with every model: the evaluation transform of the training scripts.

Evaluation during fine-tuning / linear probing (and the paper's) resizes the shorter side to
size / crop_pct (bicubic) and takes the centre crop of the model's size; transformers'
`ViTImageProcessor` would stretch the whole image to the model size instead, so an exported model
would be served on other pixels than it was scored on. `MAEImageProcessor` runs the very functions
the training code uses, then normalises with the model's mean / std: the same tensors, to float rounding.

Two pixel paths, chosen by the dataset's pixel format (`num_channels`, `pixel_dtype`, `pixel_range`):

    8-bit RGB (the default):  any PIL image / uint8 array -> EXIF upright, RGB -> PIL bicubic resize
        (`resize_and_center_crop`, = `training.transforms.EvalTransform`) -> uint8 (3, H, W)
        -> (x - 255 mean) / (255 std)                    (= `training.transforms.normalize_on_device`)
    every other format:       PIL L / I;16 / I / F, numpy (H, W) / (H, W, C), tensor (C, H, W)
        -> (H, W, C) in its own dtype (`pil_to_array`)  -> channels and dtype checked
        -> (C, H, W) float32 (x - low) / (high - low), the DATASET's range (`scale_by_range`,
           = `training.pixels.PixelFormat.to_float`)
        -> bicubic antialiased resize + centre crop on the float tensor (`resize_and_center_crop_tensor`,
           = `training.pixels.ArrayEvalTransform`) -> (x - mean) / std

This file imports only PIL, numpy, torch and transformers: it is copied beside the weights and loads
with `trust_remote_code=True` where `modeling_mae` is not installed. The training code imports these
functions from here, so there is one implementation of each step.

transformers' pipelines call `transformers.image_utils.load_image`, which converts every PIL image to
8-bit RGB (`Image.convert("RGB")` clips 16-bit and float values at 255). A processor for another pixel
format then refuses the RGB image (wrong channel count / dtype, one line saying so). Pass arrays instead:
`pipeline("image-classification")` hands numpy arrays and tensors to the processor untouched;
`pipeline("image-feature-extraction")` accepts only PIL images and paths, so call the processor and the
model directly there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 224 / 256
# the value range of a bit depth (`pixel_range` must be given for every other dtype)
BIT_DEPTH_RANGES = {"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0)}
# PIL modes read as they are (one channel, the file's integer / float type)
SINGLE_CHANNEL_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16,
                        "I;16N": np.uint16, "I": np.int32, "F": np.float32}


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
    """Any PIL image -> RGB with PIL's `convert("RGB")`: what transformers' `load_image` (every pipeline),
    timm's and torchvision's image loaders do, so a model is trained and served on the same pixels
    (alpha dropped, palette colours, 16-bit / float values clipped to 0-255)."""
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Geometry: shorter side to size / crop_pct, centre crop of size (PIL for 8-bit RGB, torch for the rest)
# --------------------------------------------------------------------------------------------------
def eval_resize_size(size: tuple[int, int], crop_pct: float) -> int:
    """The shorter side before the centre crop: round(min(height, width) / crop_pct)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(round(min(size) / crop_pct))


def shorter_side_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side `short` and the longer one in proportion (truncated)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_offsets(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop of `size` = (height, width), rounded as torchvision's `CenterCrop`
    rounds them; negative when the crop is larger than the image (the outside is zero)."""
    return int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))


def resize_and_center_crop(image: Image.Image, size: tuple[int, int], crop_pct: float) -> Image.Image:
    """Shorter side -> round(min(size) / crop_pct) with PIL bicubic (antialiased), the longer side in
    proportion (truncated), then the centre crop of `size` = (height, width), offsets rounded as
    torchvision's `CenterCrop` rounds them. Returns a PIL image of `size`."""
    return center_crop(resize_shorter_side(image, eval_resize_size(size, crop_pct)), size)


def resize_shorter_side(image: Image.Image, short: int) -> Image.Image:
    """PIL image -> the shorter side `short` (bicubic, antialiased), the longer one in proportion."""
    w, h = image.size
    new_h, new_w = shorter_side_shape(h, w, short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    return image


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL image -> its centre crop of `size` = (height, width) (zeros outside a smaller image)."""
    top, left = center_crop_offsets(image.size[1], image.size[0], size)
    return image.crop((left, top, left + size[1], top + size[0]))


def resize_and_center_crop_tensor(pixels: torch.Tensor, size: tuple[int, int], crop_pct: float) -> torch.Tensor:
    """Float (C, H, W), any channel count -> (C, *size): the geometry of `resize_and_center_crop` with
    torch's bicubic antialiased resize (what torchvision's `resize` runs on float tensors, as
    `training.pixels.ArrayTrainTransform` resizes)."""
    return center_crop_tensor(resize_shorter_side_tensor(pixels, eval_resize_size(size, crop_pct)), size)


def resize_shorter_side_tensor(pixels: torch.Tensor, short: int) -> torch.Tensor:
    """Float (C, H, W) -> (C, H', W') with the shorter side `short` (bicubic, antialiased, no clamping).

    The call is torchvision's `v2.functional.resize` on a float tensor, step for step: the same
    interpolation kernel on the same memory layout, so the values are the same to the bit."""
    if not pixels.is_floating_point():
        raise ValueError(f"resize_shorter_side_tensor expects a float (C, H, W) tensor, got {pixels.dtype}")
    channels, height, width = pixels.shape
    new_h, new_w = shorter_side_shape(height, width, short)
    if (new_h, new_w) == (height, width):
        return pixels
    batch = pixels.reshape(1, channels, height, width)
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.numel() != batch.stride()[0]:
        # a channels-last view (an (H, W, C) array permuted): give the batch axis its full stride so
        # interpolate keeps channels-last, as torchvision does (pytorch/pytorch#68430)
        strides = list(batch.stride())
        strides[0] = batch.numel()
        batch = batch.as_strided(batch.shape, strides)
    out = F.interpolate(batch, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(channels, new_h, new_w)


def center_crop_tensor(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> its centre crop (C, *size), offsets as `center_crop_offsets`, zeros outside (as PIL's crop)."""
    height, width = pixels.shape[-2:]
    top, left = center_crop_offsets(height, width, size)
    pad = (max(-left, 0), max(left + size[1] - width, 0), max(-top, 0), max(top + size[0] - height, 0))
    if any(pad):
        pixels = F.pad(pixels, pad)
        top, left = top + pad[2], left + pad[0]
    return pixels[..., top:top + size[0], left:left + size[1]]


# --------------------------------------------------------------------------------------------------
# Pixel formats other than 8-bit RGB: decode as stored, scale by the dataset's range
# --------------------------------------------------------------------------------------------------
def pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, C) array: `L`, `I;16`, `I`, `F` stay one channel in their own dtype; every
    other mode (RGB, RGBA, P, CMYK, ...) becomes 8-bit RGB (`to_rgb_image`)."""
    if image.mode in SINGLE_CHANNEL_MODES:
        array = np.asarray(image, dtype=SINGLE_CHANNEL_MODES[image.mode])
    else:
        array = np.asarray(to_rgb_image(image), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def scale_by_range(array: np.ndarray, value_range: tuple[float, float]) -> torch.Tensor:
    """(H, W, C) array in its own dtype -> (C, H, W) float32 (x - low) / (high - low), with the dataset's
    range (the bit depth's or configured), never the image's own min / max."""
    low, high = value_range
    return (float32_channels_first(array) - low) / (high - low)


def float32_channels_first(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) float32 view of a fresh copy (PIL hands out read-only buffers, which
    torch warns about)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C")).permute(2, 0, 1)


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


def _to_array(image, input_data_format: str | None) -> np.ndarray:
    """PIL image, numpy array ((H, W) / (H, W, C), as `.npy` files hold them) or torch tensor
    ((H, W) / (C, H, W)) -> (H, W, C) array in its own dtype; `input_data_format` overrides the layout."""
    if isinstance(image, Image.Image):
        return pil_to_array(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        layout = input_data_format or "channels_first"
    elif isinstance(image, np.ndarray):
        array = image
        layout = input_data_format or "channels_last"
    else:
        raise ValueError(
            f"an image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__} "
            f"(open files first: PIL.Image.open / numpy.load)"
        )
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image array must be (H, W) or (H, W, C) (tensors (C, H, W)), got shape {array.shape}")
    return np.moveaxis(array, 0, -1) if layout == "channels_first" else array


def _size_dict(size) -> dict:
    """int, (height, width) or {"height", "width"} -> {"height": H, "width": W}."""
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(
        f"`size` must be an int, (height, width) or {{'height': H, 'width': W}} (the centre crop), got {size!r}"
    )


def _per_channel(values, name: str, num_channels: int) -> list[float]:
    values = [float(values)] * num_channels if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != num_channels:
        raise ValueError(f"`{name}` has {len(values)} values but num_channels is {num_channels}")
    return values


def _pixel_format(num_channels, pixel_dtype, pixel_range) -> tuple[str | None, tuple[float, float]]:
    """(dtype, (low, high)): the bit depth's range unless `pixel_range` is given (required for other
    dtypes). A config without `pixel_dtype` (saved before it existed) takes the bit depth whose full range
    `pixel_range` is, and otherwise checks no dtype."""
    if not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"`num_channels` must be a positive int, got {num_channels!r}")
    if pixel_dtype is not None:
        try:
            canonical = str(np.dtype(pixel_dtype))
        except TypeError:
            canonical = None
        if canonical != pixel_dtype:
            raise ValueError(f"`pixel_dtype` must be a numpy dtype name (uint8, uint16, float32, ...), "
                             f"got {pixel_dtype!r}")
    if pixel_range is None:
        dtype = pixel_dtype or "uint8"
        if dtype not in BIT_DEPTH_RANGES:
            raise ValueError(f"`pixel_range` [low, high] is required for pixel_dtype {dtype!r} (only uint8 / uint16 "
                             f"have a bit depth to scale by)")
        return dtype, BIT_DEPTH_RANGES[dtype]
    if len(pixel_range) != 2 or not float(pixel_range[0]) < float(pixel_range[1]):
        raise ValueError(f"`pixel_range` must be [low, high] with low < high, got {list(pixel_range)}")
    value_range = (float(pixel_range[0]), float(pixel_range[1]))
    if pixel_dtype is None:
        pixel_dtype = next((d for d, r in BIT_DEPTH_RANGES.items() if r == value_range), None)
    return pixel_dtype, value_range


class MAEImageProcessorKwargs(ImagesKwargs, total=False):
    """transformers' image-processor keywords plus the evaluation crop and the dataset's pixel format."""

    crop_pct: float | None
    num_channels: int | None
    pixel_dtype: str | None
    pixel_range: list[float] | None


# preprocess() keywords it honours; every other one (resample, do_pad, crop_size, ...) is refused unless None
PREPROCESS_OPTIONS = ("size", "crop_pct", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
                      "do_normalize", "image_mean", "image_std", "input_data_format", "data_format")


def pixel_normalisation(num_channels: int, pixel_dtype, pixel_range, image_mean, image_std) -> tuple:
    """(dtype, [low, high], mean, std) of a processor's pixels: the bit depth's range unless given, ImageNet's
    statistics for 3 channels unless given (required otherwise), one value per channel."""
    dtype, (low, high) = _pixel_format(num_channels, pixel_dtype, pixel_range)
    if image_mean is None and image_std is None and num_channels == 3:
        image_mean, image_std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if image_mean is None or image_std is None:
        raise ValueError(f"`image_mean` and `image_std` are required for num_channels={num_channels} "
                         f"(ImageNet's have 3 values)")
    return (dtype, [low, high], _per_channel(image_mean, "image_mean", num_channels),
            _per_channel(image_std, "image_std", num_channels))


class MAEImageProcessor(BaseImageProcessor):
    """Resize the shorter side to size / crop_pct (bicubic), centre-crop `size`, rescale to [0, 1],
    normalise: the evaluation transform of the training scripts, as an image processor.

    Args:
        size: {"height": H, "width": W}, the model's input size (the centre crop).
        crop_pct: the centre crop's share of the resized shorter side (0.875: 224 of 256).
        image_mean / image_std: per-channel normalisation, `num_channels` values (ImageNet's by default,
            for 3 channels).
        num_channels: channels of the dataset's images (3: RGB).
        pixel_dtype: their data type as stored (uint8, uint16, float32, ...); input of another dtype is
            refused, as training refuses it.
        pixel_range: [low, high] of the dataset's values, mapped to [0, 1] (default: the bit depth's,
            uint8 0-255, uint16 0-65535; required for other dtypes).
        do_resize / do_center_crop / do_rescale / do_normalize: the four steps (all on by default).

    The defaults (3 channels, uint8, 0-255) are the 8-bit RGB path; `rescale_factor` is written for
    transformers' readers as 1 / (high - low) and is not a setting of its own.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = MAEImageProcessorKwargs

    def __init__(self, size: dict | None = None, crop_pct: float = DEFAULT_CROP_PCT, image_mean=None,
                 image_std=None, num_channels: int = 3, pixel_dtype: str | None = None, pixel_range=None,
                 do_resize: bool = True, do_center_crop: bool = True, do_rescale: bool = True,
                 do_normalize: bool = True, rescale_factor: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.size = _size_dict(size) if size is not None else {"height": 224, "width": 224}
        self.crop_pct = float(crop_pct)
        eval_resize_size((self.size["height"], self.size["width"]), self.crop_pct)  # validates crop_pct
        self.num_channels = num_channels
        self.pixel_dtype, self.pixel_range, self.image_mean, self.image_std = pixel_normalisation(
            num_channels, pixel_dtype, pixel_range, image_mean, image_std)
        self.rescale_factor = self._rescale_factor(rescale_factor)
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)

    @property
    def is_rgb8(self) -> bool:
        """The 8-bit RGB path: PIL decoding and resize, uint8 until normalised (as training's)."""
        return self.num_channels == 3 and self.pixel_dtype == "uint8" and tuple(self.pixel_range) == (0.0, 255.0)

    def _rescale_factor(self, given: float | None) -> float:
        """1 / (high - low); a given factor must agree (it cannot express anything else)."""
        low, high = self.pixel_range
        factor = 1.0 / (high - low)
        if given is not None and not np.isclose(float(given), factor, rtol=1e-9, atol=0):
            raise ValueError(f"`rescale_factor` {given} disagrees with pixel_range [{low:g}, {high:g}] "
                             f"(1 / (high - low) = {factor}); set `pixel_range` instead")
        return factor

    # ---- one image ---------------------------------------------------------------------------------
    def crop_uint8(self, image, size=None, crop_pct=None, do_resize=True, do_center_crop=True) -> torch.Tensor:
        """One image -> uint8 (3, H, W) after EXIF orientation, RGB conversion, resize and centre crop
        (the 8-bit RGB path: `training.transforms.EvalTransform`)."""
        size = size or (self.size["height"], self.size["width"])
        pil = to_rgb_image(apply_exif_orientation(_to_pil(image)))
        if do_resize:
            pil = resize_shorter_side(pil, eval_resize_size(size, crop_pct or self.crop_pct))
        if do_center_crop:
            pil = center_crop(pil, size)
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)

    def to_float(self, image, input_data_format: str | None = None, do_rescale: bool = True) -> torch.Tensor:
        """One image of a non-RGB format -> (C, H, W) float32 scaled by the dataset's range (the pixel
        path of training: `decode_array` -> `PixelFormat.to_float`). Another channel count or dtype is an
        error naming both."""
        array = _to_array(image, input_data_format)
        if array.shape[-1] != self.num_channels or (self.pixel_dtype and str(array.dtype) != self.pixel_dtype):
            hint = (" (transformers' pipelines convert PIL images to 8-bit RGB: pass a numpy array)"
                    if array.shape[-1] == 3 and array.dtype == np.uint8 else "")
            raise ValueError(
                f"the image has {array.shape[-1]} channel(s) of {array.dtype}, but this processor expects "
                f"{self.num_channels} channel(s) of {self.pixel_dtype or 'any dtype'}{hint}"
            )
        if do_rescale:
            return scale_by_range(array, tuple(self.pixel_range))
        return float32_channels_first(array)

    # ---- the batch ---------------------------------------------------------------------------------
    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """An image, a list of images or a 4-D batch -> {"pixel_values": ...}, normalised float32 (C, H, W)
        per image: a list of tensors for `return_tensors=None` (as transformers' `ViTImageProcessor`), one
        (N, C, H, W) tensor for "pt", an array for "np".

        Keywords (default: the processor's own): size, crop_pct, do_resize, do_center_crop, do_rescale,
        do_normalize, image_mean, image_std, input_data_format ("channels_first" / "channels_last", for
        arrays); any other is refused."""
        opts = self._options(kwargs)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:  # a batch: (N, H, W, C) / (N, C, H, W)
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values = [self._process(image, opts) for image in images]
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _options(self, kwargs: dict) -> dict:
        """The processor's settings overridden by the call's keywords; unsupported ones refused."""
        refused = sorted(k for k, v in kwargs.items() if k not in PREPROCESS_OPTIONS and v is not None)
        if refused:
            raise ValueError(f"MAEImageProcessor.preprocess does not take {', '.join(map(repr, refused))} (its "
                             f"evaluation transform is fixed); it takes {', '.join(PREPROCESS_OPTIONS)}")
        opts = {k: getattr(self, k) for k in ("size", "crop_pct", "do_resize", "do_center_crop", "do_rescale",
                                              "do_normalize", "image_mean", "image_std")}
        opts.update({k: v for k, v in kwargs.items() if v is not None})
        size = _size_dict(opts["size"])
        opts["size"] = (size["height"], size["width"])
        eval_resize_size(opts["size"], float(opts["crop_pct"]))  # validates crop_pct
        opts["image_mean"] = _per_channel(opts["image_mean"], "image_mean", self.num_channels)
        opts["image_std"] = _per_channel(opts["image_std"], "image_std", self.num_channels)
        if kwargs.get("rescale_factor") is not None:
            self._rescale_factor(kwargs["rescale_factor"])
        if opts.get("input_data_format") not in (None, "channels_first", "channels_last"):
            raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', "
                             f"got {opts['input_data_format']!r}")
        if opts.get("data_format") not in (None, "channels_first"):
            raise ValueError(f"`data_format` must be 'channels_first' (pixel_values are (C, H, W)), "
                             f"got {opts['data_format']!r}")
        return opts

    def _process(self, image, opts: dict) -> torch.Tensor:
        """One image -> float32 (C, H, W): decode, scale, resize, crop, normalise as `opts` say."""
        if self.is_rgb8:
            pixels = self.crop_uint8(image, opts["size"], opts["crop_pct"], opts["do_resize"], opts["do_center_crop"])
            scale = 255.0 if opts["do_rescale"] else 1.0
        else:
            pixels = self.to_float(image, opts.get("input_data_format"), opts["do_rescale"])
            if opts["do_resize"]:
                pixels = resize_shorter_side_tensor(pixels, eval_resize_size(opts["size"], opts["crop_pct"]))
            if opts["do_center_crop"]:
                pixels = center_crop_tensor(pixels, opts["size"])
            scale = 1.0
        pixels = pixels.float()
        if not opts["do_normalize"]:
            return pixels / scale if scale != 1.0 else pixels
        # the arithmetic of `normalize_on_device`: mean and std in the pixels' scale, one subtraction, one division
        mean = torch.tensor(opts["image_mean"], dtype=torch.float32).view(-1, 1, 1) * scale
        std = torch.tensor(opts["image_std"], dtype=torch.float32).view(-1, 1, 1) * scale
        return (pixels - mean) / std
