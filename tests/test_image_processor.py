"""The exported image processor reproduces training's evaluation transform for every pixel format
(1 / N channels, 8 / 16-bit, float arrays), follows transformers' processor conventions (size=,
do_resize=, do_normalize=, return_tensors=), and round-trips its pixel format through save / load.

Training's evaluation transform of a non-RGB image, the reference here:
    decode_array -> PixelFormat.to_float -> ArrayEvalTransform -> normalize_on_device(mean, std)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae import MAEConfig, MAEForPreTraining, MAEImageProcessor
from modeling_mae.training.pixels import ArrayEvalTransform, PixelFormat, channel_statistics, decode_array
from modeling_mae.training.transforms import EvalTransform, normalize_on_device

from pretrain_helpers import import_pretrain, tiny_args


pytestmark = pytest.mark.usefixtures("one_thread")
SIZE32 = {"height": 32, "width": 32}  # the model's input (mae-tiny); `size=32` works too, tested on its own


def training_eval(cell, fmt: PixelFormat, mean, std, size=32, crop_pct=224 / 256) -> torch.Tensor:
    """Training's evaluation pixels of one image cell: (1, C, size, size)."""
    array = decode_array(cell)
    fmt.check(array, "the image")
    return normalize_on_device(ArrayEvalTransform(size, crop_pct)(fmt.to_float(array))[None], mean, std)


def smooth(shape, low, high, seed=0, dtype=np.uint16) -> np.ndarray:
    """A smooth random (H, W, C) field in [low, high) of `dtype` (bicubic upsampling of a coarse grid)."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    coarse = rng.uniform(0, 1, size=(channels, 5, 5)).astype(np.float32)
    maps = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC)) for c in coarse], -1)
    return (low + maps.clip(0, 1) * (high - low)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# 1. ArrayEvalTransform: EvalTransform's geometry on float tensors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,height,width", [(1, 45, 71), (4, 60, 37), (6, 36, 36)])
def test_array_eval_transform_is_torchvisions_resize_and_center_crop(channels, height, width):
    """Shorter side to round(32 / 0.875) = 37, bicubic antialiased, centre crop 32: torchvision's
    functions on the same float tensor, to the bit (a channels-last view, as `to_float` makes it)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    array = smooth((height, width, channels), 0, 60000, seed=channels)
    pixels = PixelFormat(channels, "uint16", (0.0, 65535.0)).to_float(array)
    out = ArrayEvalTransform(32, 0.875)(pixels)
    reference = TF.center_crop(TF.resize(pixels, 37, interpolation=InterpolationMode.BICUBIC, antialias=True), 32)
    assert out.shape == (channels, 32, 32)
    assert torch.equal(out, reference)


def test_array_eval_transform_crops_as_computed_by_hand():
    """crop_pct 1, a (2, 20, 40) tensor, size 20: no resize, the centre columns 10..29; a (20, 30) crop of a
    20 x 20 image: left offset round(-5.0) = -5, zeros outside, as PIL's crop of a mode-F image."""
    pixels = torch.arange(2 * 20 * 40, dtype=torch.float32).reshape(2, 20, 40)
    assert torch.equal(ArrayEvalTransform(20, 1.0)(pixels), pixels[:, :, 10:30])
    square = torch.arange(400, dtype=torch.float32).reshape(1, 20, 20) + 1
    wide = ArrayEvalTransform((20, 30), 1.0)(square)
    assert wide.shape == (1, 20, 30)
    assert torch.equal(wide[:, :, :5], torch.zeros(1, 20, 5)) and torch.equal(wide[:, :, 25:], torch.zeros(1, 20, 5))
    assert torch.equal(wide[:, :, 5:25], square)
    pil = Image.fromarray(square[0].numpy(), mode="F").crop((-5, 0, 25, 20))
    assert torch.equal(wide[0], torch.from_numpy(np.array(pil)))
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\], got 1.5"):
        ArrayEvalTransform(32, 1.5)


# --------------------------------------------------------------------------------------------------
# 2. The processor on every pixel format = training's evaluation transform
# --------------------------------------------------------------------------------------------------
def test_rgb8_is_bit_identical_to_the_training_evaluation():
    """The default processor (3 channels, uint8): EvalTransform + normalize_on_device, to the bit."""
    processor = MAEImageProcessor(size={"height": 32, "width": 32})
    assert processor.is_rgb8 and processor.pixel_range == [0.0, 255.0] and processor.pixel_dtype == "uint8"
    rng = np.random.default_rng(3)
    for image in (Image.fromarray(rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8))):  # grayscale -> RGB
        ours = normalize_on_device(EvalTransform(32)(image)[None])
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], ours)


def test_three_band_uint16_at_30_percent_of_range_normalises_to_zero():
    """The issue's case: a constant 3-band uint16 array at 30 % of the range, mean 0.3, std 0.1. By hand:
    (19661 / 65535 - 0.3) / 0.1 = 7.63e-5 (19661 is the nearest integer to 0.3 * 65535), i.e. 0.0, not
    the 7.0 of an 8-bit processor; 20 % (13107 = 0.2 * 65535 exactly) with mean 0.2 gives 0.0."""
    processor = MAEImageProcessor(size=SIZE32, num_channels=3, pixel_dtype="uint16", image_mean=[0.3] * 3, image_std=[0.1] * 3)
    out = processor(np.full((40, 48, 3), 19661, np.uint16), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, (19661 / 65535 - 0.3) / 0.1), atol=1e-6, rtol=0)
    processor.image_mean = [0.2] * 3
    out = processor(np.full((40, 48, 3), 13107, np.uint16), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)


def test_float_bands_scale_by_the_configured_range():
    """4 float32 bands, pixel_range [-1, 3]: 1.0 -> (1 - -1) / 4 = 0.5 -> (0.5 - 0.25) / 0.5 = 0.5; 3.0 -> 1.5.
    The image's own min / max never enter (a constant image would divide by zero)."""
    processor = MAEImageProcessor(size=SIZE32, num_channels=4, pixel_dtype="float32", pixel_range=[-1, 3],
                                  image_mean=0.25, image_std=0.5)
    assert processor.rescale_factor == 0.25
    array = np.ones((36, 36, 4), np.float32)
    array[..., 3] = 3.0
    out = processor(array, return_tensors="pt")["pixel_values"]
    expected = torch.tensor([0.5, 0.5, 0.5, 1.5]).view(1, 4, 1, 1).expand(1, 4, 32, 32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`pixel_range` \\[low, high\\] is required for pixel_dtype 'float32'"):
        MAEImageProcessor(num_channels=4, pixel_dtype="float32", image_mean=[0] * 4, image_std=[1] * 4)


FORMATS = {
    # name: (the image as a user holds it, the training format)
    "gray16 PIL I;16": (lambda: Image.fromarray(smooth((45, 71, 1), 3000, 41000)[..., 0]),
                        PixelFormat(1, "uint16", (0.0, 65535.0))),
    "gray8 PIL L": (lambda: Image.fromarray(smooth((50, 40, 1), 10, 200, dtype=np.uint8)[..., 0]),
                    PixelFormat(1, "uint8", (0.0, 255.0))),
    "float PIL F": (lambda: Image.fromarray(smooth((40, 52, 1), -2, 5, dtype=np.float32)[..., 0], mode="F"),
                    PixelFormat(1, "float32", (-3.0, 6.0))),
    "int32 PIL I": (lambda: Image.fromarray(smooth((40, 52, 1), 0, 1 << 20, dtype=np.int32)[..., 0], mode="I"),
                    PixelFormat(1, "int32", (0.0, float(1 << 20)))),
    "4 bands uint16 array": (lambda: smooth((60, 37, 4), 100, 52000), PixelFormat(4, "uint16", (0.0, 65535.0))),
    "3 bands uint16 array": (lambda: smooth((33, 33, 3), 100, 52000), PixelFormat(3, "uint16", (0.0, 65535.0))),
    "6 bands float32 array": (lambda: smooth((48, 64, 6), 0, 1000, dtype=np.float32), PixelFormat(6, "float32", (0.0, 1000.0))),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_processor_equals_training_evaluation_on_every_format(name):
    make, fmt = FORMATS[name]
    image = make()
    mean = [0.2 + 0.1 * c for c in range(fmt.num_channels)]
    std = [0.05 + 0.02 * c for c in range(fmt.num_channels)]
    processor = MAEImageProcessor(size=SIZE32, num_channels=fmt.num_channels, pixel_dtype=fmt.dtype,
                                  pixel_range=list(fmt.value_range), image_mean=mean, image_std=std)
    served = processor(image, return_tensors="pt")["pixel_values"]
    assert served.shape == (1, fmt.num_channels, 32, 32) and served.dtype == torch.float32
    torch.testing.assert_close(served, training_eval(image, fmt, mean, std), atol=1e-6, rtol=0)
    assert served.std() > 0.1  # a real picture, not a constant


def test_one_image_in_every_container_gives_the_same_pixels():
    """A 16-bit image as PIL I;16, numpy (H, W), numpy (H, W, 1), tensor (1, H, W), and a channels-first
    array with input_data_format: the same pixel_values."""
    array = smooth((45, 71, 1), 3000, 41000)[..., 0]
    processor = MAEImageProcessor(size=SIZE32, num_channels=1, pixel_dtype="uint16", image_mean=[0.3], image_std=[0.1])
    reference = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
    tensor = torch.from_numpy(array.astype(np.int32)).to(torch.uint16)[None]  # (1, H, W) uint16
    for image, data_format in ((array, None), (array[..., None], None), (tensor, None), (array[None], "channels_first")):
        out = processor(image, return_tensors="pt", input_data_format=data_format)["pixel_values"]
        assert torch.equal(out, reference), (type(image), image.shape)
    batch = processor(np.stack([array, array])[..., None], return_tensors="pt")["pixel_values"]  # (N, H, W, C)
    assert torch.equal(batch, torch.cat([reference, reference]))


def test_wrong_channels_or_dtype_is_one_line_naming_both():
    processor = MAEImageProcessor(size=SIZE32, num_channels=1, pixel_dtype="uint16", image_mean=[0.3], image_std=[0.1])
    rgb = Image.new("RGB", (40, 40))
    with pytest.raises(ValueError, match=r"^the image has 3 channel\(s\) of uint8, but this processor expects 1 "
                                         r"channel\(s\) of uint16 \(transformers' pipelines convert"):
        processor(rgb)
    with pytest.raises(ValueError, match=r"^the image has 1 channel\(s\) of uint8, but this processor expects "
                                         r"1 channel\(s\) of uint16$"):
        processor(np.zeros((40, 40), np.uint8))
    with pytest.raises(ValueError, match=r"`image_mean` has 3 values but num_channels is 1"):
        MAEImageProcessor(num_channels=1, image_mean=[0.5] * 3, image_std=[0.2])
    with pytest.raises(ValueError, match=r"`image_mean` and `image_std` are required for num_channels=4"):
        MAEImageProcessor(num_channels=4, pixel_dtype="uint16")


# --------------------------------------------------------------------------------------------------
# 3. transformers' conventions: keywords of preprocess, return_tensors, save / load
# --------------------------------------------------------------------------------------------------
def test_return_tensors_none_returns_what_vit_image_processor_returns():
    """transformers 5's ViTImageProcessor (torchvision backend, what AutoImageProcessor gives) returns a
    list of (C, H, W) float tensors for return_tensors=None; "np" one (N, C, H, W) array, "pt" a tensor."""
    from transformers import ViTImageProcessor

    images = [Image.new("RGB", (50, 40), (10, 200, 30)), Image.new("RGB", (40, 64), (90, 0, 250))]
    vit = ViTImageProcessor(size={"height": 32, "width": 32})(images, return_tensors=None)["pixel_values"]
    ours = MAEImageProcessor(size=SIZE32)(images, return_tensors=None)["pixel_values"]
    assert type(ours) is type(vit) is list and len(ours) == 2
    assert all(type(o) is type(v) is torch.Tensor and o.shape == v.shape == (3, 32, 32) and o.dtype == v.dtype
               for o, v in zip(ours, vit))
    stacked = MAEImageProcessor(size=SIZE32)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(stacked, torch.stack(ours))
    as_np = MAEImageProcessor(size=SIZE32)(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.shape == (2, 3, 32, 32) and np.array_equal(as_np, stacked.numpy())


@pytest.mark.parametrize("rgb", [True, False], ids=["rgb8", "gray16"])
def test_preprocess_keywords_are_honoured(rgb):
    """size=, crop_pct=, do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False,
    image_mean= / image_std=: each checked against a processor built with it or by hand."""
    if rgb:
        array = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
        image, kwargs, scale = Image.fromarray(array), {}, 255.0
    else:
        array = smooth((40, 52, 1), 3000, 41000)
        image, kwargs, scale = array, dict(num_channels=1, pixel_dtype="uint16", image_mean=[0.3], image_std=[0.1]), 65535.0
    processor = MAEImageProcessor(size=32, **kwargs)

    def call(**kw):
        return processor(image, return_tensors="pt", **kw)["pixel_values"]

    assert torch.equal(call(size=16), MAEImageProcessor(size=16, **kwargs)(image, return_tensors="pt")["pixel_values"])
    assert call(size=(16, 24)).shape[-2:] == (16, 24) and call(size={"height": 8, "width": 8}).shape[-2:] == (8, 8)
    uncropped = MAEImageProcessor(size=32, crop_pct=1.0, **kwargs)(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(call(crop_pct=1.0), uncropped)
    mean, std = torch.tensor(processor.image_mean).view(1, -1, 1, 1), torch.tensor(processor.image_std).view(1, -1, 1, 1)
    # no resize: the centre 32 x 32 of the 40 x 52 image (rows 4..35, columns 10..41), rescaled by hand
    raw = torch.from_numpy(array[4:36, 10:42].astype(np.float32)).permute(2, 0, 1)[None]
    torch.testing.assert_close(call(do_resize=False, do_normalize=False), raw / scale, atol=1e-6, rtol=0)
    torch.testing.assert_close(call(do_resize=False), (raw / scale - mean) / std, atol=1e-5, rtol=0)
    assert torch.equal(call(do_resize=False, do_rescale=False, do_normalize=False), raw)
    # no crop: the shorter side 37, the longer in proportion (int(37 * 52 / 40) = 48)
    assert call(do_center_crop=False).shape[-2:] == (37, 48)
    unnormalised = call(do_normalize=False)
    torch.testing.assert_close(call(), (unnormalised - mean) / std, atol=1e-5, rtol=0)
    torch.testing.assert_close(call(image_mean=0.0, image_std=1.0), unnormalised, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not take 'resample'"):
        call(resample=2)
    with pytest.raises(ValueError, match=r"`size` must be an int, \(height, width\) or"):
        call(size={"shortest_edge": 32})
    with pytest.raises(ValueError, match="`rescale_factor` 0.5 disagrees with pixel_range"):
        call(rescale_factor=0.5)


def test_save_load_round_trips_the_pixel_format_and_old_configs_are_rgb8(tmp_path):
    from transformers import AutoImageProcessor

    processor = MAEImageProcessor(size=SIZE32, crop_pct=0.9, num_channels=4, pixel_dtype="float32", pixel_range=[-1, 3],
                                  image_mean=[0.1, 0.2, 0.3, 0.4], image_std=[1, 2, 3, 4])
    processor.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "preprocessor_config.json").read_text())
    written = (saved["num_channels"], saved["pixel_dtype"], saved["pixel_range"], saved["rescale_factor"])
    assert written == (4, "float32", [-1.0, 3.0], 0.25)
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "p")
    assert type(loaded) is MAEImageProcessor and loaded.to_dict() == processor.to_dict()
    array = smooth((40, 40, 4), -1, 3, dtype=np.float32)
    assert torch.equal(loaded(array, return_tensors="pt")["pixel_values"], processor(array, return_tensors="pt")["pixel_values"])

    # a config from before the pixel format: 8-bit RGB, as it was
    old = {"size": {"height": 32, "width": 32}, "crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406],
           "image_std": [0.229, 0.224, 0.225], "image_processor_type": "MAEImageProcessor"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(old))
    loaded = MAEImageProcessor.from_pretrained(tmp_path / "old")
    assert (loaded.num_channels, loaded.pixel_dtype, loaded.pixel_range, loaded.is_rgb8) == (3, "uint8", [0.0, 255.0], True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 71, 3), dtype=np.uint8))
    assert torch.equal(loaded(image, return_tensors="pt")["pixel_values"], normalize_on_device(EvalTransform(32)(image)[None]))

    # a config the earlier pretrain.py wrote for 16-bit gray data (no pixel_dtype): the bit depth of its range
    gray = {**old, "image_mean": [0.3], "image_std": [0.1], "num_channels": 1, "pixel_range": [0.0, 65535.0],
            "rescale_factor": 1 / 65535}
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(gray))
    loaded = MAEImageProcessor.from_pretrained(tmp_path / "old")
    assert (loaded.num_channels, loaded.pixel_dtype) == (1, "uint16")
    out = loaded(np.full((40, 40), 13107, np.uint16), return_tensors="pt")["pixel_values"]  # 0.2 -> (0.2 - 0.3) / 0.1
    assert out.shape == (1, 1, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, -1.0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# 4. pretrain.py exports the format it trained on; the exported processor serves the same pixels
# --------------------------------------------------------------------------------------------------
PRETRAIN_DATA = {
    # name: (file suffix, how to write one array, the arrays, extra command-line flags)
    "gray16 png": (".png", lambda p, a: Image.fromarray(a[..., 0]).save(p),
                   lambda: [smooth((40 + i % 3 * 4, 36, 1), 2000 + 1000 * i, 30000 + 1000 * i, seed=i) for i in range(8)], []),
    "bands4 uint16 npy": (".npy", np.save,
                          lambda: [smooth((36, 44, 4), 500, 20000 + 3000 * i, seed=i) for i in range(8)], []),
    "bands3 float32 npy": (".npy", np.save,
                           lambda: [smooth((44, 36, 3), -5, 20 + i, seed=i, dtype=np.float32) for i in range(8)],
                           ["--pixel_range=-10,40"]),  # "=": argparse reads a lone "-10,40" as a flag
}


@pytest.mark.parametrize("name", list(PRETRAIN_DATA))
def test_pretrained_export_serves_the_training_evaluation(name, tmp_path):
    import modeling_mae  # noqa: F401  (registers the Auto classes)
    from transformers import AutoImageProcessor, AutoModel

    suffix, write, make, flags = PRETRAIN_DATA[name]
    arrays = make()
    data = tmp_path / "data"
    data.mkdir()
    files = []
    for index, array in enumerate(arrays):
        files.append(data / f"{index:03d}{suffix}")
        write(files[-1], array)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=1, checkpointing_steps=0, image_mean="auto", image_std="auto") + flags
    assert import_pretrain().main(argv) == 0
    channels, dtype = arrays[0].shape[-1], str(arrays[0].dtype)
    value_range = (-10.0, 40.0) if flags else (0.0, 65535.0)
    fmt = PixelFormat(channels, dtype, value_range)
    mean, std = channel_statistics([str(f) for f in files], fmt, progress=False)  # what the run normalised with

    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor) is MAEImageProcessor
    assert (processor.num_channels, processor.pixel_dtype, processor.pixel_range) == (channels, dtype, list(value_range))
    np.testing.assert_allclose(processor.image_mean, mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(processor.image_std, std, atol=1e-6, rtol=0)
    encoder = AutoModel.from_pretrained(out).eval()
    for path in files[:3]:
        image = Image.open(path) if suffix == ".png" else np.load(path)
        served = processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(served, training_eval(str(path), fmt, mean, std), atol=1e-6, rtol=0)
        with torch.no_grad():
            assert encoder(served).last_hidden_state.shape == (1, 65, 64)


def test_pipelines_take_16bit_images_as_arrays_and_refuse_them_as_8bit_rgb(tmp_path):
    """transformers' pipelines run `load_image` on PIL images: `convert("RGB")` clips 16-bit values at 255.
    The 16-bit processor refuses that RGB image in one line; image-classification passes numpy arrays
    through untouched, and then gives the model the processor's pixels."""
    from transformers import pipeline

    from modeling_mae import MAEForImageClassification

    config = MAEConfig.from_preset("mae-tiny", num_channels=1, num_labels=2)
    model = MAEForImageClassification(config).eval()
    processor = MAEImageProcessor(size=SIZE32, num_channels=1, pixel_dtype="uint16", image_mean=[0.3], image_std=[0.1])
    array = smooth((45, 71, 1), 3000, 41000)[..., 0]
    classify = pipeline("image-classification", model=model, image_processor=processor)
    with pytest.raises(ValueError, match=r"the image has 3 channel\(s\) of uint8, but this processor expects 1 "
                                         r"channel\(s\) of uint16"):
        classify(Image.fromarray(array))
    with torch.no_grad():
        logits = model(processor(array, return_tensors="pt")["pixel_values"]).logits[0]
    scores = {r["label"]: r["score"] for r in classify(array)}
    expected = logits.softmax(-1)
    assert scores == pytest.approx({model.config.id2label[i]: float(expected[i]) for i in range(2)}, abs=1e-6)
    features = pipeline("image-feature-extraction", model=MAEForPreTraining(config).mae, image_processor=processor)
    with pytest.raises(ValueError, match=r"the image has 3 channel\(s\) of uint8"):
        features(Image.fromarray(array))


def test_remote_code_processor_serves_16bit_without_modeling_mae(tmp_path):
    """The processor file copied beside the weights (trust_remote_code, modeling_mae not importable) gives
    a 16-bit gray image the same pixel_values as the installed class."""
    import subprocess
    import sys
    import textwrap

    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny", num_channels=1))
    processor = MAEImageProcessor(size=SIZE32, num_channels=1, pixel_dtype="uint16", image_mean=[0.3], image_std=[0.1])
    model.save_pretrained(tmp_path / "m", image_processor=processor)
    assert (tmp_path / "m" / "image_processing_mae.py").is_file()
    array = smooth((45, 71, 1), 3000, 41000)[..., 0]
    np.save(tmp_path / "x.npy", array)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_mae"] = None  # the package is installed editable here: hide it
        import numpy as np, torch
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True)
        assert type(processor).__module__ != "modeling_mae.image_processing_mae", type(processor).__module__
        torch.save(processor(np.load({str(tmp_path / "x.npy")!r}), return_tensors="pt")["pixel_values"], {str(tmp_path / "out.pt")!r})
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
             "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = torch.load(tmp_path / "out.pt")
    assert served.shape == (1, 1, 32, 32)
    assert torch.equal(served, processor(array, return_tensors="pt")["pixel_values"])
