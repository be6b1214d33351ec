"""The data path: both Hub layouts and image folders, column detection, process / worker splits,
colour modes, corrupt images, and exact stream positions."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae.training.data import (
    CorruptImageError,
    ImageStream,
    StreamTracker,
    build_dataset,
    count_examples,
    decode_image,
    detect_columns,
    detect_local_format,
    encode_image,
    load_source,
    make_dataloader,
    split_for_process,
    write_parquet_shards,
    write_webdataset_shards,
)
from modeling_mae.training.transforms import TrainTransform

from pretrain_helpers import smooth_images, write_dataset


def _labels(stream, num_workers=0):
    out = []
    for batch in make_dataloader(stream, num_workers=num_workers):
        if batch.get("placeholder"):
            continue
        labels = batch["labels"]
        out += labels.tolist() if isinstance(labels, torch.Tensor) and labels.ndim else [int(labels)]
    return out


@pytest.mark.parametrize("layout", ["parquet", "webdataset", "imagefolder"])
def test_local_formats_are_detected_and_read_as_uint8(tmp_path, layout):
    if layout == "imagefolder":
        for index, (data, label) in enumerate(smooth_images(6)):
            folder = tmp_path / f"class_{label % 2}"
            folder.mkdir(exist_ok=True)
            (folder / f"{index}.jpg").write_bytes(data)
    else:
        write_dataset(tmp_path, layout, count=12, num_shards=3)
    assert detect_local_format(tmp_path)[0] == layout
    stream = build_dataset(str(tmp_path), "train", TrainTransform(32), batch_size=3)
    batches = list(make_dataloader(stream))
    assert {b["pixel_values"].dtype for b in batches} == {torch.uint8}
    assert batches[0]["pixel_values"].shape == (3, 3, 32, 32)
    assert sum(len(b["labels"]) for b in batches) == (6 if layout == "imagefolder" else 12)
    assert count_examples(tmp_path) == (6 if layout == "imagefolder" else 12)


def test_train_dir_without_data_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no parquet files, no webdataset .tar shards and no readable images"):
        detect_local_format(tmp_path)


def test_columns_are_detected_or_named():
    import datasets

    assert detect_columns({"jpg": datasets.Image(), "cls": datasets.Value("int64"), "__key__": None}) == ("jpg", "cls")
    assert detect_columns({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}) == ("image", "label")
    assert detect_columns({"photo": datasets.Image(), "y": datasets.Value("int64")}, label_column="y") == ("photo", "y")
    with pytest.raises(ValueError, match="`image_column` is 'picture'"):
        detect_columns({"image": datasets.Image()}, image_column="picture")
    with pytest.raises(ValueError, match="cannot find an image column"):
        detect_columns({"text": datasets.Value("string")})


def test_gated_or_offline_hub_dataset_gives_one_clear_message(monkeypatch):
    from modeling_mae.training.data import DatasetAccessError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetAccessError, match="hf auth login.*\n.*--train_dir"):
        load_source(dataset_name="ILSVRC/imagenet-1k", split="train")


def _image_bytes(mode: str) -> bytes:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    if mode == "RGB":
        return encode_image(rgb)  # JPEG: TrainTransform.from_bytes decodes it with torchvision
    if mode == "L":
        return encode_image(rgb.convert("L"))
    if mode == "CMYK":
        return encode_image(rgb.convert("CMYK"))  # JPEG keeps CMYK
    if mode == "RGBA":
        return encode_image(rgb.convert("RGBA"), "PNG")
    if mode == "P":
        return encode_image(rgb.convert("P"), "PNG")
    if mode == "I;16":
        return encode_image(Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)), "PNG")
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_colour_modes_become_rgb(mode):
    data = _image_bytes(mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode_image({"bytes": data, "path": None})
    assert image.mode == "RGB" and image.size == (40, 40)


def test_truncated_and_garbage_images_raise_corrupt_image_error():
    data = _image_bytes("L")
    with pytest.raises(CorruptImageError):
        decode_image({"bytes": data[: len(data) // 2], "path": None})
    with pytest.raises(CorruptImageError):
        decode_image(b"not an image at all")


@pytest.mark.parametrize("writer", [write_parquet_shards, write_webdataset_shards])
def test_corrupt_image_in_a_shard_is_skipped_and_counted(tmp_path, writer):
    good = smooth_images(8)
    truncated = _image_bytes("L")[:200]
    truncated_rgb = _image_bytes("RGB")[:-40]  # cut inside the scan: the torchvision decoding path
    examples = (
        good[:3]
        + [(truncated, 100), (b"garbage", 101), (_image_bytes("L"), 102), (_image_bytes("CMYK"), 103)]
        + [(truncated_rgb, 104)]
        + good[3:]
    )
    writer(examples, tmp_path, num_shards=1)
    stream = ImageStream(load_source(train_dir=str(tmp_path)), TrainTransform(32), batch_size=2)
    batches = list(make_dataloader(stream, num_workers=1))
    labels = [lab for b in batches for lab in b["labels"].tolist()]
    assert sum(b["num_skipped"] for b in batches) == 3  # the two truncated and the garbage image
    assert 102 in labels and 103 in labels  # grayscale and CMYK pass
    assert 100 not in labels and 101 not in labels and 104 not in labels
    assert len(labels) == 10


def test_processes_get_disjoint_shards_and_workers_distinct_shards(tmp_path):
    write_dataset(tmp_path, "webdataset", count=32, num_shards=8)
    seen = []
    for rank in range(2):
        source = split_for_process(load_source(train_dir=str(tmp_path)), rank, 2, num_workers=2)
        stream = ImageStream(source, TrainTransform(32), batch_size=2, shuffle_window=5, seed=0, rank=rank)
        seen.append(_labels(stream, num_workers=2))
    assert len(seen[0]) == len(seen[1]) == 16
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(32))  # nothing read twice, nothing lost


def test_shards_that_do_not_spread_warn_or_raise(tmp_path):
    write_dataset(tmp_path, "parquet", count=12, num_shards=3)
    source = load_source(train_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="not a multiple of the 2 processes"):
        split_for_process(source, 0, 2, num_workers=1)
    with pytest.warns(UserWarning, match="worker\\(s\\) per process get nothing"):
        split_for_process(source, 0, 1, num_workers=4)
    with pytest.raises(ValueError, match="not a multiple"):
        split_for_process(source, 0, 2, num_workers=1, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_for_process(source, 0, 1, num_workers=3)  # 3 shards over 3 workers: fine


def test_shuffle_is_reseeded_every_epoch(tmp_path):
    write_dataset(tmp_path, "parquet", count=24, num_shards=4)
    stream = ImageStream(load_source(train_dir=str(tmp_path)), TrainTransform(32), batch_size=4, shuffle_window=8)
    stream.set_epoch(0)
    first = _labels(stream)
    stream.set_epoch(1)
    second = _labels(stream)
    stream.set_epoch(0)
    again = _labels(stream)
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first == again


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_where_the_consumer_stopped(tmp_path, num_workers):
    """Positions come from consumed batches (not prefetched ones); a new stream resumed there yields
    exactly the rest of the epoch, pixels included, in the same order."""
    write_dataset(tmp_path, "webdataset", count=40, num_shards=4)

    def make():
        stream = ImageStream(load_source(train_dir=str(tmp_path)), TrainTransform(32), batch_size=3, shuffle_window=7)
        stream.set_epoch(1)
        return stream

    full = [b for b in make_dataloader(make(), num_workers=num_workers)]
    for stop in (1, 4, 5):
        tracker = StreamTracker(num_workers=num_workers)
        tracker.start_epoch(1)
        iterator = iter(make_dataloader(make(), num_workers=num_workers))
        for _ in range(stop):
            tracker.update(next(iterator))
        del iterator
        resumed_stream = make()
        resumed_stream.resume(tracker.state_dict())
        rest = [b for b in make_dataloader(resumed_stream, num_workers=num_workers) if not b.get("placeholder")]
        assert [b["sample_ids"] for b in rest] == [b["sample_ids"] for b in full[stop:]]
        for a, b in zip(rest, full[stop:]):
            assert torch.equal(a["pixel_values"], b["pixel_values"])
