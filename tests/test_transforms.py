"""The uint8 data-path transforms: RGB conversion, the crop distribution (statistically the same as
torchvision's RandomResizedCrop, draft decoding included), flips, and device normalisation."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import InterpolationMode, v2

from modeling_mae.training.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    TrainTransform,
    draft_scale,
    normalize_on_device,
    to_rgb,
)


def encode(image: Image.Image, fmt="JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def coordinate_image(width=400, height=300) -> Image.Image:
    """Red grows with x, green with y: the pixels of a crop tell where the crop was."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def crop_statistics(out: torch.Tensor, width: int, height: int) -> tuple[float, float]:
    """(area fraction, log aspect ratio) of the crop that produced `out` from `coordinate_image`."""
    out = out.float()
    red, green = out[0], out[1]
    h, w = out.shape[-2:]
    # centre rows/columns of the output sit half an output pixel inside the crop: extrapolate to its edges
    x0, x1 = red[:, 0].mean().item(), red[:, -1].mean().item()
    x_lo, x_hi = min(x0, x1), max(x0, x1)
    y_lo, y_hi = green[0].mean().item(), green[-1].mean().item()
    crop_w = (x_hi - x_lo) * w / (w - 1) * (width - 1) / 255
    crop_h = (y_hi - y_lo) * h / (h - 1) * (height - 1) / 255
    return crop_w * crop_h / (width * height), math.log(crop_w / crop_h)


# ---- RGB conversion ---------------------------------------------------------------------------------
def test_to_rgb_converts_every_mode():
    gray = Image.new("L", (4, 3), 100)
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((1, 1)) == (255, 255, 255)
    # as transformers' load_image (every pipeline), timm's and torchvision's loaders: PIL's convert("RGB"),
    # so that a served model sees the training pixels: alpha dropped, 16-bit values clipped to 255
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (40, 50, 60, 255))
    converted = to_rgb(rgba)
    assert converted.getpixel((1, 1)) == (10, 20, 30) and converted.getpixel((0, 0)) == (40, 50, 60)
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    assert to_rgb(palette).getpixel((2, 2)) == (200, 50, 25)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((2, 2)) == (200, 50, 25)
    deep = Image.fromarray(np.array([[0, 100], [2000, 4000]], dtype=np.uint16))
    assert to_rgb(deep).getpixel((1, 0)) == (100, 100, 100) and to_rgb(deep).getpixel((1, 1)) == (255, 255, 255)
    for image in (rgba, palette, deep, cmyk, gray):
        assert to_rgb(image).tobytes() == image.convert("RGB").tobytes()
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_train_transform_reads_jpegs_of_any_mode(mode):
    image = coordinate_image(120, 90).convert(mode)
    transform = TrainTransform((32, 48))
    for out in (transform.from_bytes(encode(image)), transform(Image.open(io.BytesIO(encode(image))))):
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 48)


def test_train_transform_reads_png_with_alpha():
    image = Image.new("RGBA", (60, 50), (255, 0, 0, 0))
    out = TrainTransform(16).from_bytes(encode(image, "PNG"))
    assert out.shape == (3, 16, 16) and out[0].min() == 255 and out[1:].max() == 0  # alpha dropped, as load_image


# ---- the crop distribution -----------------------------------------------------------------------------
def test_crop_distribution_matches_torchvision_random_resized_crop():
    """Scale and aspect-ratio of the crops actually applied (read back from the pixels) are drawn from
    the same distribution as torchvision's RandomResizedCrop, for the tensor path and the draft path."""
    width, height, n = 400, 300, 600
    image = coordinate_image(width, height)
    jpeg = encode(image, quality=98)
    torch.manual_seed(0)
    reference = v2.Compose([
        v2.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.PILToTensor(),
    ])
    ours = TrainTransform(48, hflip=0.5)
    theirs = np.array([crop_statistics(reference(image), width, height) for _ in range(n)])
    # output 48 from >= 150-pixel crops: every crop is draft-decoded at 1/2 or 1/4 scale
    drafted = np.array([crop_statistics(ours.from_bytes(jpeg), width, height) for _ in range(n)])
    ours_big = TrainTransform(160)  # mostly too large for draft: the torchvision-decode path
    direct = np.array([crop_statistics(ours_big.from_bytes(jpeg), width, height) for _ in range(n)])
    for sample in (drafted, direct):
        for column in (0, 1):  # area fraction, log aspect ratio
            assert ks_2samp(sample[:, column], theirs[:, column]).pvalue > 1e-3
        assert 0.19 < sample[:, 0].min() and sample[:, 0].max() < 1.03
        assert np.abs(sample[:, 1]).max() < math.log(4 / 3) + 0.05


def test_draft_decoding_matches_full_decoding():
    image = coordinate_image(800, 600)
    jpeg = encode(image, quality=95)
    crop = (100, 150, 400, 500)  # top, left, h, w: 4x the 100-pixel output in each direction
    transform = TrainTransform(100, hflip=0.0)
    assert draft_scale((800, 600), (500, 400), (100, 100)) == 4
    drafted = transform.crop_pil(Image.open(io.BytesIO(jpeg)), crop)
    full = transform.crop_pil(Image.open(io.BytesIO(jpeg)).convert("RGB"), crop)  # loaded: no draft
    assert (drafted.float() - full.float()).abs().mean() < 2.0


def test_draft_scale_never_upsamples():
    assert draft_scale((500, 375), (400, 300), (224, 224)) == 1
    assert draft_scale((1000, 750), (500, 460), (224, 224)) == 2
    assert draft_scale((4000, 3000), (4000, 3000), (224, 224)) == 8


def test_flip_and_same_seed_same_crop():
    jpeg = encode(coordinate_image(200, 150))
    torch.manual_seed(3)
    kept = TrainTransform(40, hflip=0.0).from_bytes(jpeg)
    torch.manual_seed(3)
    flipped = TrainTransform(40, hflip=1.0).from_bytes(jpeg)
    assert torch.equal(flipped, kept.flip(-1))
    torch.manual_seed(3)
    again = TrainTransform(40, hflip=0.0).from_bytes(jpeg)
    assert torch.equal(again, kept)


# ---- eval + normalisation ------------------------------------------------------------------------------
def test_eval_transform_center_crops():
    out = EvalTransform(32, crop_pct=0.875)(coordinate_image(200, 100))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert abs(out[0].float().mean().item() - 127.5) < 3  # centred horizontally


def test_normalize_on_device():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 2, 3)
    out = normalize_on_device(images)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
    assert normalize_on_device(images, dtype=torch.bfloat16).dtype == torch.bfloat16
    # float images are already scaled to [0, 1] by the dataset's range (pixels.PixelFormat)
    torch.testing.assert_close(normalize_on_device(images.float() / 255), (images.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="uint8 or float"):
        normalize_on_device(images.int())


@pytest.mark.parametrize(
    "kwargs, field", [({"scale": (0.5, 0.2)}, "scale"), ({"ratio": (0, 1)}, "ratio"), ({"hflip": 2.0}, "hflip")]
)
def test_train_transform_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainTransform(32, **kwargs)


# --------------------------------------------------------------------------------------------------
# The linear probe's crop: the official util/crop.py sampler (one draw, clamped), against its formula
# --------------------------------------------------------------------------------------------------
def _official_draws(height, width, n, scale=(0.08, 1.0), seed=0):
    from modeling_mae.training.augmentation import official_crop_params

    torch.manual_seed(seed)
    return np.array([official_crop_params(height, width, scale) for _ in range(n)], dtype=np.float64)


def test_official_crop_draws_area_and_aspect_once_from_the_formula():
    """Where no box needs clamping (scale <= 0.5 on a square: w <= sqrt(0.5 * 4/3) * side < side), the area
    fraction is U(scale) and log(w / h) is U(log 3/4, log 4/3), up to the rounding of w and h."""
    from scipy.stats import kstest

    side, n = 1000, 4000
    top, left, h, w = _official_draws(side, side, n, scale=(0.08, 0.5)).T
    fraction = h * w / side**2
    log_aspect = np.log(w / h)
    a = math.log(4 / 3)
    assert kstest(fraction, "uniform", args=(0.08, 0.42)).pvalue > 1e-3
    assert kstest(log_aspect, "uniform", args=(-a, 2 * a)).pvalue > 1e-3
    assert abs(fraction.mean() - 0.29) < 5 * 0.42 / math.sqrt(12 * n)
    assert 0.079 < fraction.min() and fraction.max() < 0.501
    assert np.all(top <= side - h) and np.all(left <= side - w) and top.min() == 0 and left.min() == 0


def test_official_crop_clamps_instead_of_redrawing():
    """Full range (scale 0.08-1) on a square: the width is clamped to the image when s * r > 1. By hand,
    with s ~ U(0.08, 1) and log r ~ U(-a, a), a = log 4/3:
        P(s r > 1) = 1/0.92 * int_{3/4}^{1} (a + log s) / (2a) ds
                   = (a/4 - 1/4 - (3/4) log(3/4)) / (2a * 0.92) = 0.0712
    and the same for the height (s / r > 1), never both. torchvision's sampler redraws such boxes."""
    side, n = 1000, 6000
    _, _, h, w = _official_draws(side, side, n).T
    a = math.log(4 / 3)
    expected = (a / 4 - 0.25 - 0.75 * math.log(0.75)) / (2 * a * 0.92)
    assert expected == pytest.approx(0.0712, abs=1e-4)
    sigma = math.sqrt(expected * (1 - expected) / n)
    for clamped in ((w == side).mean(), (h == side).mean()):
        assert abs(clamped - expected) < 5 * sigma + 0.002  # + rounding of w to `side` just below s r = 1
    assert not np.any((w == side) & (h == side))


def test_official_crop_on_a_very_elongated_image_keeps_the_full_short_side():
    """10 x 1000 pixels (area 10^4): h = 100 sqrt(s / r) >= 100 sqrt(0.08 * 3/4) = 24.5 > 10, so h is
    always clamped to 10, while w = round(100 sqrt(s r)) in [24, 115] is not, with
    E[w] = 100 E[sqrt s] E[sqrt r] = 100 * (2/3)(1 - 0.08^1.5) / 0.92 * 2 sinh(a/2) / a = 71.07;
    the top is 0 and the left uniform in [0, 1000 - w]. (torchvision's sampler finds no box in 10 tries
    and falls back to a centre crop of aspect 4/3: 13 x 10 pixels, always in the middle.)"""
    n = 4000
    top, left, h, w = _official_draws(10, 1000, n).T
    assert np.all(h == 10) and np.all(top == 0)
    assert w.min() >= 24 and w.max() <= 115
    a = math.log(4 / 3)
    mean_w = 100 * (2 / 3) * (1 - 0.08**1.5) / 0.92 * 2 * math.sinh(a / 2) / a
    assert mean_w == pytest.approx(71.07, abs=0.01)
    assert abs(w.mean() - mean_w) < 5 * w.std() / math.sqrt(n) + 0.5  # + rounding
    # left / (1000 - w + 1) is uniform on [0, 1)
    from scipy.stats import kstest

    assert kstest(left / (1000 - w + 1), "uniform").pvalue > 1e-3


def test_linear_probe_transform_uses_the_official_crop():
    """On the elongated image the official crop lands anywhere along the width; torchvision's would
    always take the same centre 13 x 10 box. The red channel encodes the column."""
    from modeling_mae.training.augmentation import LinprobeTrainTransform

    columns = np.tile((np.arange(1000) * 255 // 999).astype(np.uint8), (10, 1))
    image = Image.fromarray(np.stack([columns, columns, columns], axis=-1))
    transform = LinprobeTrainTransform(16, hflip=0.0)
    torch.manual_seed(0)
    centres = []
    for _ in range(200):
        out = transform(image)
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
        centres.append(out[0].double().mean().item() / 255 * 999)  # mean column of the crop
    centres = np.array(centres)
    # uniform placement of a box of mean width 71: centres spread over ~[36, 964], std ~ 268
    assert centres.min() < 150 and centres.max() > 850 and centres.std() > 200
