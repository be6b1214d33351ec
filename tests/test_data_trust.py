"""Data results a user can trust (issue: silently wrong results): a corrupt image among the first samples
is skipped by the pixel-format probe and the statistics pass as by the stream; an image folder or parquet
shards stream mixed, in a new order every epoch, the same on every process and on resume; only the
asked split's files are read, as `datasets` splits them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae.training.data import (
    ImageStream,
    StreamTracker,
    count_examples,
    detect_local_format,
    first_image_cells,
    load_source,
    make_dataloader,
    split_for_process,
    write_parquet_shards,
    write_webdataset_shards,
)
from modeling_mae.training.pixels import PixelFormat, channel_statistics, probe_pixel_format
from modeling_mae.training.transforms import TrainTransform

from pretrain_helpers import import_pretrain, smooth_images, tiny_args


def _labels(stream, num_workers=0) -> list[int]:
    out = []
    for batch in make_dataloader(stream, num_workers=num_workers):
        if not batch.get("placeholder"):
            out += batch["labels"].tolist()
    return out


def _truncated_jpeg() -> bytes:
    data = smooth_images(1, seed=7)[0][0]
    return data[: len(data) // 2]


def _png16(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- 1. a corrupt image among the first samples ------------------------------------------------------
def test_pixel_format_probe_skips_and_names_an_undecodable_image(caplog):
    cells = [data for data, _ in smooth_images(3)] + [_truncated_jpeg()] + [data for data, _ in smooth_images(2)]
    with caplog.at_level("WARNING"):
        fmt = probe_pixel_format(cells, names=["a", "b", "c", "broken.jpg", "e", "f"])
    assert fmt == PixelFormat(3, "uint8", (0.0, 255.0))
    assert any("broken.jpg" in r.getMessage() and "skipping undecodable image" in r.getMessage() for r in caplog.records)


def test_pixel_format_probe_fails_in_one_line_when_nothing_decodes():
    with pytest.raises(ValueError, match=r"none of the first 2 images decodes.*broken\.jpg") as info:
        probe_pixel_format([_truncated_jpeg(), b"not an image"], names=["broken.jpg", "garbage.jpg"])
    assert "\n" not in str(info.value)


def test_statistics_pass_skips_an_undecodable_image_and_counts_it(caplog):
    # two 16-bit images, values 0.25 and 0.75 of the range: mean 0.5, std 0.25 (by hand); a truncated one between
    low, high = np.full((4, 4), 16384), np.full((4, 4), 49151)
    good = [_png16(low), _png16(high)]
    cells = [good[0], _png16(high)[:30], good[1]]
    fmt = PixelFormat(1, "uint16", (0.0, 65535.0))
    with caplog.at_level("WARNING"):
        mean, std = channel_statistics(cells, fmt, progress=False, names=["a.png", "cut.png", "b.png"])
    assert mean == pytest.approx([(16384 + 49151) / 2 / 65535], abs=1e-6)
    assert std == pytest.approx([(49151 - 16384) / 2 / 65535], abs=1e-6)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "cut.png" in messages and "1 undecodable image(s) skipped" in messages


def test_pretraining_starts_on_shards_whose_fourth_sample_is_corrupt(tmp_path, one_thread):
    """The reviewer's case: webdataset shards, the 4th sample a truncated JPEG -> the run trains, skipping it."""
    examples = smooth_images(24)
    examples[3] = (_truncated_jpeg(), 3)
    write_webdataset_shards(examples, tmp_path / "wds", num_shards=2)
    pretrain = import_pretrain()
    out = tmp_path / "out"
    pretrain.main(tiny_args(tmp_path / "wds", out, max_train_steps=2, checkpointing_steps=0) + ["--image_mean", "auto", "--image_std", "auto"])
    assert (out / "model.safetensors").is_file()


# ---- 2. file order: mixed, new every epoch, the same on every process, resumable ------------------------
def _sorted_image_folder(root: Path, classes: int = 4, per_class: int = 16) -> Path:
    images = smooth_images(classes * per_class)
    for index, (data, _) in enumerate(images):
        folder = root / f"class_{index // per_class}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:04d}.jpg").write_bytes(data)
    return root


def test_class_sorted_image_folder_streams_mixed_and_in_a_new_order_every_epoch(tmp_path):
    root = _sorted_image_folder(tmp_path / "folder")
    stream = ImageStream(load_source(train_dir=str(root), seed=0), TrainTransform(32), batch_size=16, shuffle_window=16)
    epochs = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        labels = _labels(stream)
        assert sorted(labels) == sorted([c for c in range(4) for _ in range(16)])  # every image once
        for start in range(0, len(labels), 16):
            assert len(set(labels[start:start + 16])) >= 3, (epoch, labels)  # today: one class per batch
        epochs.append(labels)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    stream.set_epoch(1)
    assert _labels(stream) == epochs[1]  # the same (seed, epoch), the same order


def test_file_order_depends_on_seed_and_epoch_and_is_the_same_on_every_process(tmp_path):
    write_parquet_shards(smooth_images(32), tmp_path / "pq", num_shards=8)
    source = load_source(train_dir=str(tmp_path / "pq"), seed=3)
    names = [Path(f).name for f in source.files]
    orders = [[Path(f).name for f in source.files_for_epoch(e)] for e in range(3)]
    assert orders[0] != sorted(names)  # epoch 0 is shuffled too (today: file order)
    assert len({tuple(o) for o in orders}) == 3
    assert orders[1] == [Path(f).name for f in load_source(train_dir=str(tmp_path / "pq"), seed=3).files_for_epoch(1)]
    assert orders[1] != [Path(f).name for f in load_source(train_dir=str(tmp_path / "pq"), seed=4).files_for_epoch(1)]
    # two processes, two workers each: every example exactly once per epoch, disjoint between processes
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            stream = ImageStream(split_for_process(source, rank, 2, num_workers=2), TrainTransform(32), batch_size=2,
                                 shuffle_window=4, seed=3, rank=rank)
            stream.set_epoch(epoch)
            seen.append(_labels(stream, num_workers=2))
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(32))


def test_parquet_epoch_zero_does_not_stream_in_file_order(tmp_path):
    """Parquet shards of a sorted dataset (examples 8s..8s+7 in part s): epoch 0 reads the shards in the
    order the seed draws, not part0 first for every seed (today: file order, whatever the seed)."""
    examples = smooth_images(32)
    for shard in range(4):
        write_parquet_shards(examples[shard * 8:(shard + 1) * 8], tmp_path / "pq" / f"part{shard}", num_shards=1)
    first_shards = []
    for seed in range(6):
        source = load_source(train_dir=str(tmp_path / "pq"), seed=seed)
        stream = ImageStream(source, TrainTransform(32), batch_size=8, shuffle_window=1, seed=seed)
        stream.set_epoch(0)
        labels = _labels(stream)
        shard_order = [int(Path(f).parent.name.removeprefix("part")) for f in source.files_for_epoch(0)]
        assert [label // 8 for label in labels[::8]] == shard_order  # the stream follows the drawn order
        first_shards.append(shard_order[0])
    assert len(set(first_shards)) > 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_in_the_epochs_file_order(tmp_path, num_workers):
    root = _sorted_image_folder(tmp_path / "folder", classes=4, per_class=8)

    def make():
        stream = ImageStream(load_source(train_dir=str(root), seed=5), TrainTransform(32), batch_size=3, shuffle_window=5, seed=5)
        stream.set_epoch(2)
        return stream

    full = [b for b in make_dataloader(make(), num_workers=num_workers) if not b.get("placeholder")]
    tracker = StreamTracker(num_workers=num_workers)
    tracker.start_epoch(2)
    iterator = iter(make_dataloader(make(), num_workers=num_workers))
    for _ in range(3):
        tracker.update(next(iterator))
    del iterator
    resumed = make()
    resumed.resume(tracker.state_dict())
    rest = [b for b in make_dataloader(resumed, num_workers=num_workers) if not b.get("placeholder")]
    assert [b["sample_ids"] for b in rest] == [b["sample_ids"] for b in full[3:]]
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_image_folder_labels_follow_datasets_imagefolder(tmp_path):
    import datasets

    root = _sorted_image_folder(tmp_path / "folder", classes=3, per_class=2)
    ours = load_source(train_dir=str(root))
    theirs = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", streaming=True)
    assert ours.features["label"].names == theirs.features["label"].names == ["class_0", "class_1", "class_2"]
    by_name = lambda rows: sorted((Path(r["image"]["path"] if isinstance(r["image"], dict) else r["image"].filename).name, r["label"]) for r in rows)  # noqa: E731
    theirs_rows = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", streaming=True).cast_column(
        "image", datasets.Image(decode=False))
    assert by_name(ours.cast_column("image", datasets.Image(decode=False))) == by_name(theirs_rows)


# ---- 3. splits ------------------------------------------------------------------------------------------
def _hub_layout(root: Path) -> Path:
    """A Hub download: data/{train,validation,test}-0000N-of-0000M.parquet with 6 / 4 / 2 examples."""
    import datasets
    import pyarrow.parquet as pq

    examples = smooth_images(12)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    (root / "data").mkdir(parents=True)
    for split, rows, shards in (("train", examples[:6], 2), ("validation", examples[6:10], 1), ("test", examples[10:], 1)):
        for shard in range(shards):
            part = rows[shard::shards]
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b, _ in part], "label": [lab for _, lab in part]},
                features=features).data.table
            pq.write_table(table, str(root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    return root


def test_hub_layout_pretrains_on_the_train_split_only(tmp_path):
    import datasets

    root = _hub_layout(tmp_path / "download")
    expected = {name: ds.num_rows for name, ds in datasets.load_dataset(str(root)).items()}
    assert expected == {"train": 6, "validation": 4, "test": 2}  # what datasets itself infers
    for split, rows in expected.items():
        stream = ImageStream(load_source(train_dir=str(root), split=split), TrainTransform(32), batch_size=None)
        labels = [int(b["labels"]) for b in make_dataloader(stream)]
        assert len(labels) == rows, split
        assert count_examples(str(root), split) == rows
    assert sorted(int(b["labels"]) for b in make_dataloader(
        ImageStream(load_source(train_dir=str(root)), TrainTransform(32), batch_size=None))) == list(range(6))


@pytest.mark.parametrize("layout", ["webdataset", "imagefolder", "arrays"])
def test_split_folders_and_names_are_honoured_in_every_layout(tmp_path, layout):
    examples = smooth_images(10)
    splits = {"train": examples[:6], "val": examples[6:9], "test": examples[9:]}
    for split, rows in splits.items():
        folder = tmp_path / split
        if layout == "webdataset":
            write_webdataset_shards(rows, folder, num_shards=1)
        for data, label in rows:
            target = folder / f"class_{label % 2}"
            if layout == "imagefolder":
                target.mkdir(parents=True, exist_ok=True)
                (target / f"{label}.jpg").write_bytes(data)
            elif layout == "arrays":
                target.mkdir(parents=True, exist_ok=True)
                np.save(target / f"{label}.npy", np.full((8, 8, 4), label, dtype=np.uint16))
    assert count_examples(str(tmp_path), "train") == 6
    assert count_examples(str(tmp_path), "validation") == 3  # val/ is the validation split, as in datasets
    assert count_examples(str(tmp_path), "test") == 1
    cells, _ = first_image_cells(load_source(train_dir=str(tmp_path), split="validation"), 10)
    assert len(cells) == 3


def test_a_missing_split_is_one_line_naming_the_splits_there(tmp_path):
    root = _hub_layout(tmp_path / "download")
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'validation', 'test'\].*not 'unlabeled'") as info:
        detect_local_format(root, split="unlabeled")
    assert "\n" not in str(info.value)


def test_a_folder_without_split_names_is_the_split_asked_for(tmp_path):
    for path in write_parquet_shards(smooth_images(5), tmp_path / "mine", num_shards=1):
        Path(path).rename(Path(path).with_name("shard-a.parquet"))  # a name without a split word
    assert count_examples(str(tmp_path / "mine"), "validation") == 5
    assert count_examples(str(tmp_path / "mine"), "train") == 5


def test_a_parquet_dataset_repository_streams_its_split_in_a_seeded_file_order(tmp_path):
    """`dataset_name` takes the code path of a Hub repository (`load_dataset_builder` resolves the split's
    files); a local repository folder stands in for the Hub here."""
    from modeling_mae.training.data import FileShardSource

    root = _hub_layout(tmp_path / "repo")
    for split, rows in (("train", 6), ("validation", 4), ("test", 2)):
        source = load_source(dataset_name=str(root), split=split, seed=1)
        assert isinstance(source, FileShardSource) and source.builder == "parquet"
        assert len([int(b["labels"]) for b in make_dataloader(ImageStream(source, TrainTransform(32)))]) == rows
    source = load_source(dataset_name=str(root), split="train", seed=1)
    orders = {tuple(Path(f).name for f in source.files_for_epoch(epoch)) for epoch in range(6)}
    assert len(orders) == 2  # two shards: both orders are drawn over six epochs


# ---- what a reviewer found after the first fixes -------------------------------------------------------
def test_a_class_folder_named_like_a_split_is_refused_not_read_as_the_split(tmp_path):
    """CIFAR-100 has a class "train", Places365 "train_station": `datasets`' rules make it a split of its own,
    and the other classes would silently be dropped."""
    for cls in ("ant", "bee", "train", "cat"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "1.jpg").write_bytes(smooth_images(1)[0][0])
    with pytest.raises(ValueError, match=r"3 of its 4 data files belong to none .*class folder named like a split") as info:
        detect_local_format(tmp_path)
    assert "\n" not in str(info.value)


def test_hub_image_folder_repository_streams_in_a_new_file_order_every_epoch(tmp_path):
    from modeling_mae.training.data import FileShardSource

    root = _sorted_image_folder(tmp_path / "repo" / "train", classes=3, per_class=8).parent
    source = load_source(dataset_name=str(root), split="train", seed=0)
    assert isinstance(source, FileShardSource) and source.builder == "imagefolder"
    stream = ImageStream(source, TrainTransform(32), batch_size=8, shuffle_window=1)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        labels = _labels(stream)
        assert sorted(labels) == sorted([c for c in range(3) for _ in range(8)])
        assert len(set(labels[:8])) >= 2  # today: class 0 first, every epoch
        orders.append(labels)
    assert orders[0] != orders[1]


def test_a_16_bit_colour_png_is_refused_not_read_as_8_bits(tmp_path):
    from modeling_mae.training.pixels import PixelFormatError, decode_array

    import zlib, struct  # noqa: E401  a 2x1 16-bit RGB PNG written by hand (Pillow cannot write one)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    raw = b"\x00" + struct.pack(">6H", 1000, 1200, 65000, 3, 4, 5)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "deep.png").write_bytes(png)
    with pytest.raises(PixelFormatError, match="16-bit RGB PNG, which Pillow reads as 8 bits"):
        decode_array(str(tmp_path / "deep.png"))
    with pytest.raises(PixelFormatError):
        probe_pixel_format([png])  # not skipped as corrupt: the user must know


def test_a_channels_first_array_is_refused(tmp_path):
    from modeling_mae.training.pixels import PixelFormatError, decode_array

    np.save(tmp_path / "bands.npy", np.zeros((4, 48, 48), np.uint16))  # rasterio's read(): (C, H, W)
    with pytest.raises(PixelFormatError, match=r"\(4, 48, 48\), which looks channels-first"):
        decode_array(str(tmp_path / "bands.npy"))
    assert decode_array(np.zeros((48, 48, 4), np.uint16)).shape == (48, 48, 4)


def test_webdataset_examples_are_counted_as_datasets_groups_them(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "train-0000.tar", "w") as tar:
        for key in ("a.b/one", "a.b/two", "./three"):
            for ext, payload in (("jpg", smooth_images(1)[0][0]), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    streamed = len(list(make_dataloader(ImageStream(load_source(train_dir=str(tmp_path)), TrainTransform(32)))))
    assert count_examples(str(tmp_path)) == streamed == 3


def test_an_image_folder_with_metadata_parquet_is_an_image_folder(tmp_path):
    _sorted_image_folder(tmp_path, classes=2, per_class=2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg"))
    pq.write_table(pa.table({"file_name": files, "caption": ["x"] * len(files)}), str(tmp_path / "metadata.parquet"))
    assert detect_local_format(tmp_path)[0] == "imagefolder"


def test_max_eval_samples_of_a_class_sorted_folder_keeps_every_class(tmp_path):
    from types import SimpleNamespace

    from accelerate import PartialState

    from modeling_mae.training.classification_data import load_classification_splits

    _sorted_image_folder(tmp_path / "train", classes=4, per_class=10)
    _sorted_image_folder(tmp_path / "val", classes=4, per_class=10)
    cfg = SimpleNamespace(dataset_name=None, dataset_config_name=None, train_dir=str(tmp_path / "train"),
                          validation_dir=str(tmp_path / "val"), train_split="train", validation_split="validation",
                          image_column=None, label_column=None, hub_token=None, max_train_samples=12,
                          max_eval_samples=10, seed=0, label_names=None, num_labels=None)
    splits = load_classification_splits(cfg, PartialState())
    assert len(splits.validation) == 10 and len(splits.train) == 12
    assert len(set(splits.validation["label"])) >= 3  # today: the first 10 = class 0 only
    assert len(set(splits.train["label"])) >= 3


def test_files_of_unequal_size_over_processes_are_said_in_a_warning(tmp_path):
    examples = smooth_images(24)
    for index, (start, stop) in enumerate(((0, 3), (3, 6), (6, 9), (9, 24))):
        write_parquet_shards(examples[start:stop], tmp_path / f"part{index}", num_shards=1)
    source = load_source(train_dir=str(tmp_path))
    counts = source.examples_per_process(0, 2)
    assert sum(counts) == 24 and max(counts) > min(counts)  # the 15-example file makes one share larger
    with pytest.warns(UserWarning, match=r"unequal numbers of examples: the 2 processes get \[\d+, \d+\]"):
        split_for_process(source, 0, 2, num_workers=1)
