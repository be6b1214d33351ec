"""Images that are not 8-bit RGB (issue 13): 1-channel 16-bit PNG and 6-band .npy in the three local
layouts with exact values, channel adaptation, statistics, bad input named, training and resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForPreTraining, MAEModel
from modeling_mae.training.data import ImageStream, first_image_cells, load_source, write_parquet_shards, write_webdataset_shards
from modeling_mae.training.model_loading import adapt_num_channels
from modeling_mae.training.pixels import (
    ArrayTrainTransform,
    PixelFormat,
    PixelFormatError,
    channel_statistics,
    decode_array,
    probe_pixel_format,
)
from modeling_mae.training.transforms import normalize_on_device

from pretrain_helpers import import_pretrain, read_sample_ids, run_pretrain, tiny_args


pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


def gray16_arrays(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth 16-bit single-channel images whose values span only part of the range, each a different
    part (a per-image min-max rescaling would change every value)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((SIZE, SIZE), Image.BILINEAR))
        low = rng.integers(0, 30000)
        out.append((low + smooth.clip(0, 1) * rng.integers(1000, 30000)).astype(np.uint16))
    return out


def band6_arrays(count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 4000, size=(SIZE // 4, SIZE // 4, 6)).repeat(4, 0).repeat(4, 1)).astype(np.uint16)
            for _ in range(count)]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # uint16 (H, W) -> mode I;16
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_layout(root: Path, layout: str, arrays: list[np.ndarray], kind: str) -> Path:
    encode, ext = (png_bytes, "png") if kind == "gray16" else (npy_bytes, "npy")
    examples = [(encode(a), i) for i, a in enumerate(arrays)]
    if layout == "folder":
        root.mkdir(parents=True)
        for data, index in examples:
            (root / f"img{index:03d}.{ext}").write_bytes(data)
    elif layout == "parquet":
        write_parquet_shards(examples, root, num_shards=2)
    else:
        write_webdataset_shards(examples, root, num_shards=2, ext=ext)
    return root


def identity_stream(root: Path, fmt: PixelFormat) -> ImageStream:
    # scale (1, 1) at the images' own size, no flip: the crop is the whole image and the resize a no-op
    transform = ArrayTrainTransform(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    return ImageStream(load_source(train_dir=str(root)), transform, batch_size=None, pixel_format=fmt)


# --------------------------------------------------------------------------------------------------
# Exact values in every local layout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "parquet", "webdataset"])
@pytest.mark.parametrize("kind", ["gray16", "band6"])
def test_non_rgb_data_streams_with_exact_values(kind, layout, tmp_path):
    arrays = gray16_arrays(6) if kind == "gray16" else band6_arrays(6)
    root = write_layout(tmp_path / layout, layout, arrays, kind)
    cells, names = first_image_cells(load_source(train_dir=str(root)), 8)
    fmt = probe_pixel_format(cells, names=names)
    channels = 1 if kind == "gray16" else 6
    assert fmt == PixelFormat(channels, "uint16", (0.0, 65535.0))
    # expected: the dataset's fixed scaling x / 65535, by hand, never the image's min/max
    expected = [torch.from_numpy(a.reshape(SIZE, SIZE, channels).astype(np.float64) / 65535.0).permute(2, 0, 1)
                for a in arrays]
    seen = [item["pixel_values"] for item in identity_stream(root, fmt)]
    assert len(seen) == len(arrays)
    for pixels in seen:
        assert pixels.dtype == torch.float32 and pixels.shape == (channels, SIZE, SIZE)
        matches = [torch.equal(pixels, e.float()) for e in expected]
        assert sum(matches) == 1


def test_rgb_photographs_keep_the_uint8_path(tmp_path):
    from pretrain_helpers import write_dataset

    root = write_dataset(tmp_path / "rgb", "parquet", count=4, num_shards=1)
    cells, _ = first_image_cells(load_source(train_dir=str(root)), 4)
    fmt = probe_pixel_format(cells)
    assert fmt.is_rgb8
    from modeling_mae.training.transforms import TrainTransform

    stream = ImageStream(load_source(train_dir=str(root)), TrainTransform(SIZE), batch_size=None, pixel_format=fmt)
    assert stream.pixel_format is None  # the photograph path, unchanged
    assert next(iter(stream))["pixel_values"].dtype == torch.uint8


def test_multiband_tiff_through_tifffile():
    import tifffile

    array = band6_arrays(1)[0]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.moveaxis(array, -1, 0), photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(decode_array(buffer.getvalue()), array)  # (C, H, W) planes -> (H, W, C)
    gray = gray16_arrays(1)[0]
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="TIFF")
    np.testing.assert_array_equal(decode_array(buffer.getvalue())[..., 0], gray)


# --------------------------------------------------------------------------------------------------
# Bad input is named
# --------------------------------------------------------------------------------------------------
def test_images_disagreeing_in_channels_or_bit_depth_are_named(tmp_path):
    gray = gray16_arrays(2)
    cells = [png_bytes(gray[0]), npy_bytes(band6_arrays(1)[0])]
    with pytest.raises(PixelFormatError, match="b.npy has 6 channel"):
        probe_pixel_format(cells, names=["a.png", "b.npy"])
    eight_bit = (gray[1] // 256).astype(np.uint8)
    with pytest.raises(PixelFormatError, match="1 channel.s. of uint16, c.png has 1 channel.s. of uint8"):
        probe_pixel_format([png_bytes(gray[0]), png_bytes(eight_bit)], names=["a.png", "c.png"])
    # an image after the probed ones: the stream stops with its name
    root = tmp_path / "mixed"
    root.mkdir()
    for i, array in enumerate(gray16_arrays(3)):
        (root / f"img{i}.png").write_bytes(png_bytes(array))
    (root / "img9.png").write_bytes(png_bytes(eight_bit))
    fmt = probe_pixel_format([png_bytes(gray[0])])
    with pytest.raises(PixelFormatError, match=r"img9.png has 1 channel\(s\) of uint8"):
        list(identity_stream(root, fmt))


def test_num_channels_and_statistics_of_the_wrong_length_are_named():
    with pytest.raises(PixelFormatError, match="`num_channels` is 3 but the dataset's images have 6"):
        probe_pixel_format([npy_bytes(band6_arrays(1)[0])], num_channels=3)
    with pytest.raises(ValueError, match="have 3 / 3 values, but the images have 6 channels"):
        normalize_on_device(torch.zeros(1, 6, 4, 4))
    with pytest.raises(ValueError, match="float32 values, which have no bit depth"):
        probe_pixel_format([npy_bytes(np.zeros((4, 4), np.float32))])
    fmt = probe_pixel_format([npy_bytes(np.zeros((4, 4), np.float32))], pixel_range=[-1000, 3000])
    assert fmt.value_range == (-1000.0, 3000.0)


# --------------------------------------------------------------------------------------------------
# Channel adaptation
# --------------------------------------------------------------------------------------------------
def _tiny(cls):
    torch.manual_seed(0)
    model = cls(MAEConfig.from_preset("mae-tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_adapting_to_one_channel_keeps_the_embedding_of_a_gray_image():
    model = _tiny(MAEModel)
    gray = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 64)
    adapted, message = adapt_num_channels(model, 1)
    assert adapted.config.num_channels == 1 and "sum over the source channels" in message
    with torch.no_grad():
        expected = model(gray.expand(-1, 3, -1, -1), noise=noise).last_hidden_state
        torch.testing.assert_close(adapted(gray, noise=noise).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_adapting_to_six_channels_repeats_and_rescales():
    model = _tiny(MAEForPreTraining)
    rgb = torch.randn(2, 3, 32, 32)
    adapted, _ = adapt_num_channels(model, 6)
    w_old = model.mae.embeddings.patch_embeddings.projection.weight
    w_new = adapted.mae.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(w_new, torch.cat([w_old, w_old], dim=1) * 0.5)  # timm: repeat, scale 3/6
    noise = torch.rand(2, 64)
    with torch.no_grad():  # the six bands holding the RGB image twice embed like the RGB image
        torch.testing.assert_close(adapted.mae(torch.cat([rgb, rgb], 1), noise=noise).last_hidden_state,
                                   model.mae(rgb, noise=noise).last_hidden_state, atol=1e-5, rtol=0)
    # pixel head: rows ordered (pixel, channel); band n predicts like RGB channel n mod 3
    old = model.decoder.decoder_pred.weight.reshape(16, 3, -1)
    new = adapted.decoder.decoder_pred.weight.reshape(16, 6, -1)
    torch.testing.assert_close(new[:, 4], old[:, 1], atol=0, rtol=0)
    gray, _ = adapt_num_channels(model, 1)
    torch.testing.assert_close(gray.decoder.decoder_pred.bias.reshape(16),
                               model.decoder.decoder_pred.bias.reshape(16, 3).mean(1))


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def test_auto_statistics_equal_numpys_over_the_same_sample():
    arrays = band6_arrays(5)
    fmt = probe_pixel_format([npy_bytes(a) for a in arrays])
    mean, std = channel_statistics([npy_bytes(a) for a in arrays], fmt, progress=False)
    stacked = np.stack(arrays).astype(np.float64) / 65535.0  # (N, H, W, C)
    np.testing.assert_allclose(mean, stacked.mean(axis=(0, 1, 2)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(std, stacked.std(axis=(0, 1, 2)), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Training: from a preset, from an RGB checkpoint (adapted), and an exact resume
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain():
    return import_pretrain()


@pytest.mark.parametrize("kind,layout", [("gray16", "folder"), ("band6", "parquet"), ("band6", "webdataset")])
def test_pretrain_on_non_rgb_data(kind, layout, pretrain, tmp_path):
    arrays = gray16_arrays(16) if kind == "gray16" else band6_arrays(16)
    root = write_layout(tmp_path / "data", layout, arrays, kind)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(root, out, max_train_steps=3, image_mean="auto", image_std="auto",
                                   reconstruction_steps=3)) == 0
    channels = 1 if kind == "gray16" else 6
    config = json.loads((out / "config.json").read_text())
    assert config["num_channels"] == channels
    processor = json.loads((out / "preprocessor_config.json").read_text())
    stacked = np.stack([a.reshape(SIZE, SIZE, channels) for a in arrays]).astype(np.float64) / 65535.0
    np.testing.assert_allclose(processor["image_mean"], stacked.mean(axis=(0, 1, 2)), atol=1e-6)
    assert processor["num_channels"] == channels and processor["rescale_factor"] == pytest.approx(1 / 65535)
    assert "input pixels" in (out / "README.md").read_text()
    assert (out / "reconstructions" / "step_3.png").is_file()


def test_pretrain_adapts_an_rgb_checkpoint_or_names_the_mismatch(pretrain, tmp_path):
    root = write_layout(tmp_path / "data", "folder", gray16_arrays(8), "gray16")
    _tiny(MAEForPreTraining).save_pretrained(tmp_path / "rgb")
    with pytest.raises(PixelFormatError, match="num_channels=3 but the data has 1 channel"):
        pretrain.main(tiny_args(root, tmp_path / "no", model_name_or_path=tmp_path / "rgb", adapt_channels="false"))
    assert pretrain.main(tiny_args(root, tmp_path / "yes", model_name_or_path=tmp_path / "rgb", max_train_steps=2)) == 0
    assert json.loads((tmp_path / "yes" / "config.json").read_text())["num_channels"] == 1
    with pytest.raises(ValueError, match="`image_mean` / `image_std` have 3 values but the data has 1 channel"):
        pretrain.main(tiny_args(root, tmp_path / "len", image_mean="0.5,0.5,0.5", image_std="0.2,0.2,0.2"))


def test_stopped_run_on_6band_data_resumes_exactly(pretrain, tmp_path):
    """In-process: 3 steps, then a second run resumes from that checkpoint to step 6 (constant lr, so the
    schedule does not depend on the planned length) = 6 steps uninterrupted, samples and weights."""
    root = write_layout(tmp_path / "data", "webdataset", band6_arrays(20), "band6")
    common = dict(checkpointing_steps=3, log_sample_ids="true", num_warmup_steps=0, min_lr=1e-3)
    assert pretrain.main(tiny_args(root, tmp_path / "ref", max_train_steps=6, **common)) == 0
    out = tmp_path / "run"
    assert pretrain.main(tiny_args(root, out, max_train_steps=3, **common)) == 0
    assert pretrain.main(tiny_args(root, out, max_train_steps=6, resume_from_checkpoint="latest", **common)) == 0
    assert read_sample_ids(out) == read_sample_ids(tmp_path / "ref")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_killed_run_on_16bit_data_resumes_exactly(tmp_path):
    root = write_layout(tmp_path / "data", "parquet", gray16_arrays(24), "gray16")
    common = dict(max_train_steps=6, checkpointing_steps=3, log_sample_ids="true", dataloader_num_workers=0)
    reference = run_pretrain(tiny_args(root, tmp_path / "ref", **common))
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "run"
    crashed = run_pretrain(tiny_args(root, out, **common), env={"MAE_CRASH_AT_STEP": "4"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = run_pretrain(tiny_args(root, out, resume_from_checkpoint="latest", **common))
    assert resumed.returncode == 0 and "step_3" in resumed.stderr, resumed.stderr[-2000:]
    assert read_sample_ids(out) == read_sample_ids(tmp_path / "ref")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------------
# Pictures for any channel count
# --------------------------------------------------------------------------------------------------
def test_reconstruction_pictures_per_channel_and_by_the_dataset_range():
    from modeling_mae.training.visualization import HEADER_LINES, LINE_HEIGHT, PAD, grid_image_size, reconstruction_grid

    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny", num_channels=6)).eval()
    # band c holds the 16-bit value 6000 * (c + 1) everywhere; dataset-scaled to [0, 1] by 65535
    values = torch.tensor([6000.0 * (c + 1) for c in range(6)]) / 65535
    images = values.view(1, 6, 1, 1).expand(2, 6, 32, 32).contiguous()
    mean, std = [0.3] * 6, [0.2] * 6
    grid = reconstruction_grid(model, normalize_on_device(images, mean, std), mean=mean, std=std, seed=0)
    width, height = grid_image_size(2, 32, 32)
    assert grid.size == (width, 6 * height)  # one grid per channel, stacked
    top = HEADER_LINES * LINE_HEIGHT + 5
    for channel in range(6):  # the original panel of each grid: the band's value on the dataset's range
        pixel = grid.getpixel((PAD + 5, channel * height + top))
        assert pixel == (round(6000 * (channel + 1) / 65535 * 255),) * 3
    composite = reconstruction_grid(model, normalize_on_device(images, mean, std), mean=mean, std=std,
                                    composite=(5, 2, 0))
    assert composite.size == (width, height)
    assert composite.getpixel((PAD + 5, top)) == tuple(round(6000 * (c + 1) / 65535 * 255) for c in (5, 2, 0))


def test_array_columns_keep_their_declared_dtype(tmp_path):
    """A Hub-style dataset with an Array3D uint16 column (rows read back as lists) streams as uint16."""
    import datasets

    arrays = band6_arrays(4)
    features = datasets.Features({"image": datasets.Array3D((SIZE, SIZE, 6), "uint16")})
    root = tmp_path / "array3d"
    root.mkdir()
    datasets.Dataset.from_dict({"image": arrays}, features=features).to_parquet(str(root / "train.parquet"))
    cells, _ = first_image_cells(load_source(train_dir=str(root)), 4)
    fmt = probe_pixel_format(cells)
    assert fmt == PixelFormat(6, "uint16", (0.0, 65535.0))
    seen = [item["pixel_values"] for item in identity_stream(root, fmt)]
    torch.testing.assert_close(seen[0], torch.from_numpy(arrays[0].astype(np.float32) / 65535).permute(2, 0, 1),
                               atol=0, rtol=0)
