"""Image data for every script: Hub datasets streamed with `datasets`, or local folders; uint8 until the device.

Sources (all read with `datasets.load_dataset(..., streaming=True)`):

- a Hub dataset in either ImageNet layout: parquet with `image` / `label` (`ILSVRC/imagenet-1k`) or
  webdataset shards with `jpg` / `cls` (`timm/imagenet-1k-wds`);
- `train_dir`, a local folder of parquet files, of webdataset `.tar` shards, or of images (class
  sub-folders optional), the split's files chosen as `datasets` chooses them; the format is detected
  (`detect_local_format`).

The image and label columns are detected (`detect_columns`) or named. Images are read undecoded
(`datasets.Image(decode=False)`) and decoded in the DataLoader workers, where an undecodable or
truncated image is skipped and counted (never a crash, never a silent stop) and grayscale / CMYK /
RGBA / palette images become RGB (`transforms.to_rgb`).

    source = load_source(dataset_name="timm/imagenet-1k-wds", split="train")      # or train_dir=...
    source = split_for_process(source, rank, world_size, num_workers)              # split_dataset_by_node
    stream = ImageStream(source, TrainTransform(224), batch_size=64, shuffle_window=2000, seed=0)
    loader = make_dataloader(stream, num_workers=8)
    for batch in loader:   # {"pixel_values": uint8 (B, 3, H, W), "labels": int64 (B,), "num_skipped": int,
        ...                #  "sample_ids": [str], "stream_state": {...}}   (placeholders: {"placeholder": True})

`build_dataset(name_or_dir, split, transform, ...)` is the short form for other scripts (fine-tuning,
linear probing, evaluation): it returns an `ImageStream` of single examples (batch_size=None) or of
batches.

Exact resume. `datasets` restores a stream's position (`IterableDataset.state_dict()`), except for the
examples inside a shuffle buffer, which are lost. `ImageStream` therefore shuffles itself, in windows
of `shuffle_window` raw examples with a permutation drawn from (seed, epoch, rank, worker, window):
its position is (the `datasets` state at the start of the window, window index, offset in the window)
and is carried by every batch it yields (`stream_state`). `StreamTracker` records the positions of the
batches the training loop has actually consumed (prefetched ones do not count), and
`ImageStream.resume(tracker_state)` restarts every DataLoader worker at its own position, with
placeholder batches that restore the DataLoader's round-robin order over the workers. The random crop
of each example is seeded from its position, so a resumed run sees the same pixels.

Order. A local folder streams one shard per file (`FileShardSource`), in a file order drawn from
(seed, epoch) before the files are split over processes and workers: a class-sorted image folder is
mixed from the first batch, every epoch differs, every process agrees on the order, and a resumed
epoch draws the same order again. The shuffle window then mixes the examples each worker reads.
(`datasets`' own `shuffle` reshuffles shards too, but its example buffer is lost on resume.)

Splits. Only the files of the asked split are read, chosen by `datasets`' own file-name rules
(`split_data_files`): a Hub download with `data/{train,validation,test}-*.parquet` pretrains on its
train files only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from modeling_mae_cli import ExpectedError

from .runtime import worker_ignores_interrupts
from .transforms import apply_exif_orientation, to_rgb


logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "tif", "tiff", "npy", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target", "fine_label")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
ARRAY_EXTENSIONS = (".npy",)  # multi-band arrays (H, W) or (H, W, C); see `pixels.py`
DATA_EXTENSIONS = (".parquet", ".tar") + IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # read by `datasets`' imagefolder


class DatasetAccessError(ExpectedError, RuntimeError):
    """The dataset cannot be read (gated, private, offline, missing); the message says what to do."""


class CorruptImageError(ValueError):
    """An image could not be decoded (truncated file, not an image, ...)."""


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------
LOCAL_LAYOUTS = (
    "*.parquet shards (the Hub layout), webdataset *.tar shards, image files "
    f"({', '.join(IMAGE_EXTENSIONS)}; flat or in class sub-folders) or .npy arrays, in any sub-folder"
)




def _readable_image(paths: list[Path], tries: int = 16) -> bool:
    """Whether one of the first `tries` image files decodes (with the data path's own decoder, so 16-bit
    and multi-band TIFFs count as readable)."""
    from .pixels import decode_array

    for path in paths[:tries]:
        try:
            decode_array(str(path))
            return True
        except Exception:
            continue
    return False


def split_data_files(root: Path, split: str, field: str = "train_dir") -> list[Path]:
    """The files of `split` under `root`, chosen as `datasets` chooses them (`get_data_patterns`: the Hub
    layout `data/{split}-00000-of-00001.parquet`, `train/` / `val/` / `test/` folders, `*_validation.*`
    names, ...), absolute and sorted, hidden files and folders left out.

    A folder without split names is one split, whichever split is asked for (the folder *is* that split);
    a folder with split names but none for `split` is a one-line error naming the splits it has, and so is
    one whose data files do not all belong to a split (a class folder named `train`, `test_tube`, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    root = root.resolve()
    try:
        patterns = get_data_patterns(str(root))
    except Exception:  # datasets' EmptyDatasetError: no file it would read
        patterns = {}
    splits = [str(name) for name in patterns]
    visible = _visible_files(root)  # listed once: folders of millions of images
    if not patterns or (splits == ["train"] and list(patterns.values())[0] == ["**"]):  # no split structure
        files = visible
    elif split not in splits:
        raise ValueError(
            f"`{field}` {str(root)!r} holds the splits {splits} (named as `datasets` names them), not {split!r}: "
            f"choose one of them (or, if a class folder is named like a split, point `{field}` at the split's folder)"
        )
    else:
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(root))
        assigned = {Path(str(f).removeprefix("file://")) for name in resolved for f in resolved[name]}
        data = {p for p in visible if p.suffix.lower() in DATA_EXTENSIONS}
        if data - assigned:
            # `datasets` names splits by words in paths: a class folder "train" (CIFAR-100) or "train_station"
            # (Places365) makes a split of its own, and the other classes belong to none
            left = sorted(data - assigned)
            raise ValueError(
                f"`{field}` {str(root)!r}: `datasets`' file-name rules find the splits {splits} in its paths, but "
                f"{len(left)} of its {len(data)} data files belong to none (e.g. {str(left[0].relative_to(root))!r}): "
                f"a class folder named like a split? Point `{field}` at the split's own folder, or rename it"
            )
        files = [Path(str(f).removeprefix("file://")) for f in resolved[split]]
    visible = set(visible)
    return sorted(p for p in files if p in visible)


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def detect_local_format(train_dir: str | os.PathLike, field: str = "train_dir", split: str = "train") -> tuple[str, dict]:
    """Which reader takes `split` of `train_dir`, and its files: ("parquet" | "webdataset" | "imagefolder" |
    "arrayfolder", {"data_files": [files]}), the split's files chosen as `datasets` chooses them
    (`split_data_files`: a Hub download's validation and test files are not the train split).

    A folder that does not exist, is empty, or holds no readable image in any supported layout raises a
    one-line ValueError naming the path and the layouts looked for (`field` names the config field)."""
    root = Path(train_dir).expanduser()
    if not root.exists():
        raise ValueError(f"`{field}` {str(root)!r} does not exist (expected a folder of {LOCAL_LAYOUTS})")
    if not root.is_dir():
        raise ValueError(f"`{field}` {str(root)!r} is a file, not a folder (expected a folder of {LOCAL_LAYOUTS})")
    if not any(p.is_file() and not p.name.startswith(".") for p in root.rglob("*")):
        raise ValueError(f"`{field}` {str(root)!r} is empty (expected {LOCAL_LAYOUTS})")
    files = split_data_files(root, split, field)
    parquet = [str(p) for p in files if p.suffix == ".parquet" and p.name not in IMAGEFOLDER_METADATA]
    tars = [str(p) for p in files if p.suffix == ".tar"]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    arrays = [str(p) for p in files if p.suffix.lower() in ARRAY_EXTENSIONS]
    if parquet:
        return "parquet", {"data_files": parquet}
    if tars:
        return "webdataset", {"data_files": tars}
    if arrays and not images:
        return "arrayfolder", {"data_files": arrays}
    if images and _readable_image(images):
        metadata = [str(p) for p in files if p.name in IMAGEFOLDER_METADATA]
        return "imagefolder", {"data_files": [str(p) for p in images], "metadata_files": metadata}
    found = f"{len(images)} image file(s), none readable" if images else f"{len(files)} file(s), none of them data"
    raise ValueError(
        f"`{field}` {str(root)!r} holds no parquet files, no webdataset .tar shards and no readable images "
        f"({found} in split {split!r}); looked for {LOCAL_LAYOUTS}"
    )


def _access_error(name: str, err: Exception) -> DatasetAccessError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false")
    hint = (
        f"Cannot read dataset {name!r} ({type(err).__name__}: {err}).\n"
        f"- If it is gated (ImageNet-1k is), accept its terms at https://huggingface.co/datasets/{name} and log in "
        f"with `hf auth login` or set HF_TOKEN.\n"
        f"- Offline or no network{' (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)' if offline else ''}: "
        f"download the shards once and pass `--train_dir DIR` (parquet, webdataset .tar or image folder)."
    )
    return DatasetAccessError(hint)


def load_source(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    token: str | bool | None = None,
    streaming: bool = True,
    seed: int = 0,
):
    """A streaming source of raw examples of `split`, from the Hub or a local folder.

    Exactly one of `dataset_name` / `train_dir` must be given. A local folder, and a parquet or webdataset
    Hub repository, stream as a `FileShardSource`: one shard per file, in an order drawn from (seed, epoch).
    Any other Hub dataset is `datasets.load_dataset(..., streaming=True)`. Gated, private, missing or offline datasets raise
    `DatasetAccessError` with one message that says what to do. `streaming=False` gives a map-style
    `datasets.Dataset` of the same files (in file order)."""
    import datasets

    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            f"give exactly one of `dataset_name` / `train_dir`; got dataset_name={dataset_name!r}, train_dir={train_dir!r}"
        )
    if train_dir is not None:
        builder, kwargs = detect_local_format(train_dir, split=split)
        source = FileShardSource(builder, kwargs["data_files"], split, kwargs.get("metadata_files", ()), seed=seed)
        return source if streaming else source.map_style()
    try:
        if streaming:
            # parquet / webdataset repositories (ILSVRC/imagenet-1k, timm/imagenet-1k-wds): the split's files as
            # `datasets` resolves them, streamed in an order drawn from (seed, epoch) like a local folder
            builder = datasets.load_dataset_builder(dataset_name, dataset_config_name, token=token)
            files = (builder.config.data_files or {}).get(split)
            if builder.name in ("parquet", "webdataset", "imagefolder") and files:
                splits = builder.info.splits or {}
                known = splits[split].num_examples if split in splits and splits[split].num_examples else None
                return FileShardSource(builder.name, list(files), split, seed=seed, features=builder.info.features,
                                       token=token, remote=True, num_examples=known)
        return datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, token=token
        )
    except (FileNotFoundError, ConnectionError, OSError, PermissionError) as err:
        raise _access_error(dataset_name, err) from err
    except Exception as err:  # huggingface_hub's GatedRepoError, RepositoryNotFoundError, OfflineModeIsEnabled ...
        if type(err).__module__.startswith(("huggingface_hub", "requests", "httpx", "datasets.exceptions")):
            raise _access_error(dataset_name, err) from err
        raise


def folder_labels(files: list[str]) -> list[str] | None:
    """The class names of an image / array folder, by `datasets`' imagefolder rule: the name of each file's
    folder, when there is more than one such name and every file lies at the same depth; else None."""
    names = {Path(f).parent.name for f in files}
    depths = {len(Path(f).parts) for f in files}
    return sorted(names) if len(names) > 1 and len(depths) == 1 else None


def _folder_files(files: list[str], labels: list[str] | None):
    """Examples of an image / array folder (a generator over one shard of the file list)."""
    index = {name: i for i, name in enumerate(labels or ())}
    for path in files:
        example = {"image": {"bytes": None, "path": path}}
        if labels is not None:
            example["label"] = index[Path(path).parent.name]
        yield example


class FileShardSource:
    """The files of one split (a local folder's, or a parquet / webdataset Hub repository's), streamed with
    `datasets`, one shard per file, the shard
    order a permutation drawn from (seed, epoch): the same on every process (so `split_for_process` still
    gives each process its own files), new every epoch (epoch 0 included), and the same again on resume.

    `datasets` reads the files (parquet, webdataset; image / array folders through a generator with
    imagefolder's labels; an image folder with a metadata file through `datasets`' imagefolder itself, as
    one shard). Behaves as the `datasets.IterableDataset` it builds for the current epoch and process:
    `features`, `take`, `cast_column`, `remove_columns`, `state_dict`, iteration, ... are that dataset's;
    column changes are replayed on the dataset of every later epoch."""

    def __init__(self, builder: str, files, split: str = "train", metadata_files=(), seed: int = 0,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, steps: tuple = (), features=None, token=None,
                 remote: bool = False, num_examples: int | None = None):
        self.builder, self.files, self.split = builder, list(files), split
        self.metadata_files = list(metadata_files)
        self.features_given, self.token = features, token  # a Hub dataset's own features (class names); its token
        self.remote, self.num_examples = remote, num_examples  # Hub files (read by `datasets` only); the split's size
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), int(epoch)
        self._steps = tuple(steps)  # (method name, args) replayed on each epoch's dataset
        self._dataset = None

    # ---- what the permutation gives ------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return 1 if self.builder == "imagefolder" and (self.metadata_files or self.remote) else len(self.files)

    n_shards = num_shards

    def files_for_epoch(self, epoch: int) -> list[str]:
        """All the split's files in the order of `epoch` (before the split over processes)."""
        order = np.random.default_rng(_seed_of(self.seed, epoch, 0x5AD5)).permutation(len(self.files))
        return [self.files[i] for i in order]

    def examples_per_process(self, epoch: int, world_size: int) -> list[int] | None:
        """Examples each process reads in `epoch` (files `rank::world_size` of the epoch's order), for local
        files; None when unknown (Hub files)."""
        if self.remote or self.num_shards % world_size:
            return None
        per_file = {f: count_examples(self._with(files=[f], metadata_files=[])) for f in self.files}
        order = self.files_for_epoch(epoch)
        return [sum(per_file[f] for f in order[rank::world_size]) for rank in range(world_size)]

    def _build(self):
        import datasets

        files = self.files_for_epoch(self.epoch)
        if self.builder in ("parquet", "webdataset"):
            dataset = datasets.load_dataset(self.builder, data_files={self.split: files}, split=self.split,
                                            streaming=True, features=self.features_given, token=self.token)
        elif self.builder == "imagefolder" and (self.metadata_files or self.remote):
            # datasets' own imagefolder (Hub files, metadata files): one shard, the images in this epoch's order
            dataset = datasets.load_dataset(
                "imagefolder", data_files={self.split: files + self.metadata_files}, split=self.split, streaming=True,
                features=self.features_given, token=self.token,
            )
        else:
            labels = folder_labels(self.files)
            feature = {"image": datasets.Image()} if self.builder == "imagefolder" else {
                "image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}}
            if labels is not None:
                feature["label"] = datasets.ClassLabel(names=labels)
            dataset = datasets.IterableDataset.from_generator(
                _folder_files, features=datasets.Features(feature), gen_kwargs={"files": files, "labels": tuple(labels) if labels else None}
            )
        for name, args in self._steps:
            dataset = getattr(dataset, name)(*args)
        if self.world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        return dataset

    @property
    def dataset(self):
        """The `datasets.IterableDataset` of the current epoch and process."""
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def _with(self, **changes) -> "FileShardSource":
        values = dict(builder=self.builder, files=self.files, split=self.split, metadata_files=self.metadata_files,
                      seed=self.seed, rank=self.rank, world_size=self.world_size, epoch=self.epoch, steps=self._steps,
                      features=self.features_given, token=self.token, remote=self.remote, num_examples=self.num_examples)
        return FileShardSource(**{**values, **changes})

    # ---- the IterableDataset interface the scripts use -----------------------------------------------
    def for_process(self, rank: int, world_size: int) -> "FileShardSource":
        """This process's files (`datasets.distributed.split_dataset_by_node` of each epoch's dataset)."""
        return self._with(rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._dataset = int(epoch), None

    def cast_column(self, *args) -> "FileShardSource":
        return self._with(steps=self._steps + (("cast_column", args),))

    def remove_columns(self, *args) -> "FileShardSource":
        return self._with(steps=self._steps + (("remove_columns", args),))

    def map_style(self):
        """The same files as a map-style `datasets.Dataset`, in file order (evaluation, fine-tuning)."""
        import datasets

        if self.builder in ("parquet", "webdataset") or self.metadata_files:
            builder = "imagefolder" if self.builder == "imagefolder" else self.builder
            return datasets.load_dataset(builder, data_files={self.split: self.files + self.metadata_files},
                                         split=self.split)
        return datasets.Dataset.from_list(list(_folder_files(self.files, folder_labels(self.files))),
                                          features=self.dataset.features)

    def __iter__(self):
        return iter(self.dataset)

    def __getattr__(self, name):  # features, take, state_dict, load_state_dict, info, column_names, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self):  # DataLoader workers (spawn) get the recipe, not the built dataset
        return {**self.__dict__, "_dataset": None}

    def __repr__(self):  # never the token
        return (f"FileShardSource({self.builder}, {len(self.files)} files of split {self.split!r}, seed={self.seed}, "
                f"epoch={self.epoch}, process {self.rank} of {self.world_size})")


def detect_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str | None]:
    """Pick the image and label columns from a dataset's column names (or `features`).

    Named columns are checked; otherwise the first `datasets.Image` feature or a known name
    (`image`, `jpg`, ...) is the image, and a `ClassLabel` or a known name (`label`, `cls`, ...) the
    label (None when there is none).
    """
    import datasets

    names = list(features) if features is not None else []
    for name, wanted in (("image_column", image_column), ("label_column", label_column)):
        if wanted is not None and names and wanted not in names:
            raise ValueError(f"`{name}` is {wanted!r} but the dataset's columns are {names}")
    feats = features if isinstance(features, dict) else {}
    if image_column is None:
        typed = [n for n in names if isinstance(feats.get(n), datasets.Image)]
        known = [n for n in IMAGE_COLUMN_CANDIDATES if n in names]
        if not (typed or known):
            raise ValueError(f"cannot find an image column among {names}; pass `image_column`")
        image_column = (typed or known)[0]
    if label_column is None:
        typed = [n for n in names if isinstance(feats.get(n), datasets.ClassLabel)]
        known = [n for n in LABEL_COLUMN_CANDIDATES if n in names]
        label_column = (typed or known or [None])[0]
    return image_column, label_column


def prepare_source(source, image_column: str | None = None, label_column: str | None = None):
    """Detect the columns, keep only them, and read images undecoded (decoding happens in workers).

    Returns (source, image_column, label_column)."""
    import datasets

    features = source.features
    if features is None:  # unknown until read: look at one example
        first = next(iter(source.take(1)))
        features = {k: None for k in first}
    image_column, label_column = detect_columns(features, image_column, label_column)
    # cast first: every later step (remove_columns is a map) must already see undecoded images
    if source.features is not None and isinstance(source.features.get(image_column), datasets.Image):
        source = source.cast_column(image_column, datasets.Image(decode=False))
    keep = [c for c in (image_column, label_column, "__key__") if c is not None and c in features]
    drop = [c for c in features if c not in keep]
    if drop:
        source = source.remove_columns(drop)
    return source, image_column, label_column


def num_shards(source) -> int:
    return int(getattr(source, "num_shards", None) or getattr(source, "n_shards", 1) or 1)


def split_for_process(source, rank: int, world_size: int, num_workers: int = 0, strict: bool = False):
    """`datasets.distributed.split_dataset_by_node` + a check that the shards spread over
    processes x DataLoader workers. When they do not, `datasets` falls back to reading every example
    on every process and skipping the others' (slow), or leaves workers idle: warn (or raise with
    `strict`)."""
    from datasets.distributed import split_dataset_by_node

    shards = num_shards(source)
    workers = max(num_workers, 1)
    problem = None
    if shards % world_size:
        problem = (
            f"the dataset has {shards} shards, not a multiple of the {world_size} processes: every process reads "
            f"all examples and keeps 1 in {world_size}"
        )
    elif shards // world_size < workers:
        problem = (
            f"each of the {world_size} processes gets {shards // world_size} shard(s) for {workers} DataLoader "
            f"workers: {workers - shards // world_size} worker(s) per process get nothing"
        )
    elif (shards // world_size) % workers:
        problem = (
            f"{shards // world_size} shards per process do not divide over {workers} DataLoader workers: "
            f"workers get unequal shares"
        )
    if problem:
        message = f"{problem}. Use a shard count divisible by processes x workers (or reshard with `train_dir`)."
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    if isinstance(source, FileShardSource):
        counts = source.examples_per_process(0, world_size) if world_size > 1 and not problem else None
        if counts and max(counts) > min(counts):
            # the epoch ends for every process when the smallest share runs out (no process waits on a sync)
            warnings.warn(
                f"the files hold unequal numbers of examples: the {world_size} processes get {counts} examples this "
                f"epoch, and every epoch ends when the smallest share does ({sum(counts) - world_size * min(counts)} "
                f"examples unused per epoch, other ones each epoch). Files of equal size spread evenly.", stacklevel=2)
        return source.for_process(rank, world_size)  # every epoch's file order, then this process's files
    if world_size > 1:
        source = split_dataset_by_node(source, rank=rank, world_size=world_size)
    return source


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------
def decode_image(value: Any) -> Image.Image:
    """An image cell (`{"bytes", "path"}`, bytes, a path or a PIL image) -> RGB PIL image, turned
    upright by its EXIF orientation tag.

    Raises `CorruptImageError` for anything undecodable or truncated."""
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray)):
                data, path = value, None
            else:
                data, path = None, value
            if data is not None:
                image = Image.open(io.BytesIO(data))
            elif path:
                with open(path, "rb") as f:
                    image = Image.open(io.BytesIO(f.read()))
            else:
                raise CorruptImageError("empty image cell")
        image.load()  # truncated files fail here (PIL's LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(apply_exif_orientation(image))  # upright, as transformers' `load_image` does
    except CorruptImageError:
        raise
    except Exception as err:
        raise CorruptImageError(f"{type(err).__name__}: {err}") from err


def _encoded_bytes(value: Any) -> bytes | None:
    """The encoded file bytes of an image cell, or None when it holds a path or a decoded image."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def sample_id(example: dict, image_column: str) -> str:
    """A stable id for logs and tests: the webdataset `__key__`, else a hash of the image bytes or path."""
    if example.get("__key__") is not None:
        return str(example["__key__"])
    value = example[image_column]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(value, digest_size=8).hexdigest()
    return ""


def _cell_name(cell: Any, image_column: str) -> str:
    """The file path of an image cell when it has one, else its `sample_id`."""
    if isinstance(cell, dict) and cell.get("path"):
        return str(cell["path"])
    return sample_id({image_column: cell}, image_column) if not isinstance(cell, (list, np.ndarray)) else "(array cell)"


def _example_name(example: dict, image_column: str) -> str:
    """What a log line names an example by: its webdataset key, else its file path, else its `sample_id`."""
    if example.get("__key__") is not None:
        return str(example["__key__"])
    return _cell_name(example[image_column], image_column)


def _image_feature_dtype(source, image_column: str) -> str | None:
    from .pixels import feature_dtype

    features = getattr(source, "features", None)
    return feature_dtype(features.get(image_column)) if features is not None else None


def first_image_cells(source, count: int, image_column: str | None = None) -> tuple[list, list[str]]:
    """The undecoded image cells of the first `count` examples of a (raw) source, and their names."""
    source, image_column, _ = prepare_source(source, image_column, None)
    examples = list(source.take(count))
    dtype = _image_feature_dtype(source, image_column)
    cells = [example[image_column] for example in examples]
    if dtype is not None:  # array columns read back as lists: give them their declared element type
        cells = [np.asarray(cell, dtype=dtype) if isinstance(cell, list) else cell for cell in cells]
    names = [example.get("__key__") or _cell_name(cell, image_column) for example, cell in zip(examples, cells)]
    return cells, names


def _label(example: dict, label_column: str | None) -> int:
    if label_column is None:
        return -1
    value = example.get(label_column)
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------
def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ImageStream(torch.utils.data.IterableDataset):
    """Decoded, augmented, (optionally) batched examples of a streamed source, resumable exactly.

    Args:
        source: a `datasets.IterableDataset` (after `split_for_process`), images undecoded.
        transform: PIL RGB image -> uint8 tensor (C, H, W) (e.g. `TrainTransform`).
        batch_size: examples per yielded batch; None yields single examples.
        image_column / label_column: detected by `prepare_source` when None.
        shuffle_window: shuffle raw examples in windows of this many (0 or 1: stream order).
        seed, rank: feed the window permutations and per-example augmentation seeds.
        drop_last: drop each worker's final incomplete batch (training) or yield it (evaluation).
        pixel_format: the dataset's channels and bit depth (`pixels.probe_pixel_format`). None or 8-bit
            RGB: the uint8 photograph path (`transform` takes PIL images). Anything else: the array
            path (`_load_array`; `transform` takes float (C, H, W) tensors, e.g. `ArrayTrainTransform`),
            `pixel_values` float32 scaled by the dataset's range, every image checked against the format.

    Yields dicts: `pixel_values` uint8 (B, C, H, W) (or (C, H, W); float32 on the array path), `labels` int64 (B,) (or int),
    `sample_ids` list of str, `num_skipped` (corrupt images skipped since the previous yield) and
    `stream_state` (this worker's position after the batch). Resumed streams may first yield
    `{"placeholder": True}` items, which the consumer drops.
    """

    def __init__(
        self,
        source,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        shuffle_window: int = 0,
        seed: int = 0,
        rank: int = 0,
        drop_last: bool = True,
        pixel_format=None,
    ):
        super().__init__()
        source, self.image_column, self.label_column = prepare_source(source, image_column, label_column)
        self.pixel_format = None if pixel_format is None or pixel_format.is_rgb8 else pixel_format
        self._array_dtype = _image_feature_dtype(source, self.image_column)
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle_window = max(int(shuffle_window), 1)
        self.seed = seed
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._resume: dict | None = None

    @property
    def num_shards(self) -> int:
        return num_shards(self.source)

    def set_epoch(self, epoch: int) -> None:
        """New shard order (`datasets`) and new window permutations / crops for this epoch."""
        self.epoch = int(epoch)
        self.source.set_epoch(self.epoch)

    def resume(self, state: dict | None) -> None:
        """Start the next iteration where `StreamTracker.state_dict()` says the consumer stopped."""
        if state and state.get("workers"):
            if int(state["epoch"]) != self.epoch:
                raise ValueError(f"stream state is for epoch {state['epoch']}, but the stream is at epoch {self.epoch}")
            self._resume = state
        else:
            self._resume = None

    # ---- iteration (runs in a DataLoader worker) ----------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _raw_windows(self, worker: int, start: dict | None) -> Iterator[tuple[int, dict | None, list]]:
        """Yield (window index, `datasets` state before the window, raw examples of the window)."""
        window = 0
        if start is not None:
            window = int(start["window"])
            if start["source"] is not None:
                self.source.load_state_dict(start["source"])
        state_before = start["source"] if start is not None else None
        iterator = iter(self.source)
        while True:
            examples = []
            for example in iterator:
                examples.append(example)
                if len(examples) == self.shuffle_window:
                    break
            if not examples:
                return
            yield window, state_before, examples
            if len(examples) < self.shuffle_window:
                return
            state_before = self.source.state_dict()
            window += 1

    def _load(self, cell: Any, seed: int) -> torch.Tensor:
        """Decode + augment one image cell -> uint8 (3, H, W); CorruptImageError if undecodable.

        Encoded bytes go straight to `transform.from_bytes` when the transform has it (crop chosen from
        the header, then JPEG draft / tensor decoding: the fast path of `TrainTransform`); anything else
        is decoded to an RGB PIL image first. The augmentation is seeded from the example's position so
        a resumed run crops identically; fork_rng keeps the caller's global RNG untouched."""
        if self.pixel_format is not None:
            return self._load_array(cell, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            data = _encoded_bytes(cell)
            if data is not None and hasattr(self.transform, "from_bytes"):
                try:
                    return self.transform.from_bytes(data)
                except Exception as err:  # truncated or garbage bytes: PIL OSError, torchvision RuntimeError
                    raise CorruptImageError(f"{type(err).__name__}: {err}") from err
            return self.transform(decode_image(cell))

    def _load_array(self, cell: Any, seed: int) -> torch.Tensor:
        """Decode one image of a non-RGB dataset -> float32 (C, H, W) scaled by the dataset's range, then
        `transform`, seeded like `_load`. An image of another channel count or dtype is an error naming it."""
        from .pixels import decode_array

        try:
            array = decode_array(cell, self._array_dtype)
        except Exception as err:
            raise CorruptImageError(f"{type(err).__name__}: {err}") from err
        self.pixel_format.check(array, f"image {_cell_name(cell, self.image_column)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(self.pixel_format.to_float(array))

    def __iter__(self):
        worker, num_workers = self._worker()
        start = None
        if self._resume is not None:
            if int(self._resume["num_workers"]) != num_workers:
                raise ValueError(
                    f"resuming a stream saved with num_workers={self._resume['num_workers']} needs the same "
                    f"`preprocessing_num_workers`, got {num_workers}"
                )
            start = self._resume["workers"].get(str(worker))
            if start is not None and start.get("exhausted"):
                return
            # The DataLoader asks workers round-robin from worker 0; the consumed run stopped before
            # `next_worker`, so the workers before it hand in one dropped placeholder first.
            if worker < int(self._resume["next_worker"]):
                yield {"placeholder": True}
        batch, skipped = [], 0
        for window, state_before, examples in self._raw_windows(worker, start):
            order = np.arange(len(examples))
            if self.shuffle_window > 1:
                order = np.random.default_rng(_seed_of(self.seed, self.epoch, self.rank, worker, window)).permutation(
                    len(examples)
                )
            first = int(start["offset"]) if start is not None and int(start["window"]) == window else 0
            for offset in range(first, len(examples)):
                example = examples[order[offset]]
                position = {"source": state_before, "window": window, "offset": offset + 1}
                seed = _seed_of(self.seed, self.epoch, self.rank, worker, window, offset)
                try:
                    pixels = self._load(example[self.image_column], seed)
                except CorruptImageError as err:
                    skipped += 1
                    logger.warning("skipping undecodable image %s: %s", _example_name(example, self.image_column), err)
                    continue
                item = (pixels, _label(example, self.label_column), sample_id(example, self.image_column))
                if self.batch_size is None:
                    yield self._pack([item], skipped, worker, position, single=True)
                    skipped = 0
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._pack(batch, skipped, worker, position)
                    batch, skipped = [], 0
        if batch and not self.drop_last:
            yield self._pack(batch, skipped, worker, {"exhausted": True})

    def _pack(self, items: list, skipped: int, worker: int, position: dict, single: bool = False) -> dict:
        state = {"worker": worker, "epoch": self.epoch, **position}
        if single:
            pixels, label, sid = items[0]
            return {"pixel_values": pixels, "labels": label, "sample_ids": sid, "num_skipped": skipped, "stream_state": state}
        return {
            "pixel_values": torch.stack([p for p, _, _ in items]),
            "labels": torch.tensor([lab for _, lab, _ in items], dtype=torch.long),
            "sample_ids": [sid for _, _, sid in items],
            "num_skipped": skipped,
            "stream_state": state,
        }


@dataclass
class StreamTracker:
    """Positions of the batches the consumer has taken from an `ImageStream` DataLoader this epoch.

    `update(batch)` after each consumed (non-placeholder) batch; `state_dict()` goes into checkpoints;
    `ImageStream.resume(state)` restarts there. Prefetched batches are never counted."""

    num_workers: int
    epoch: int = 0
    batches: int = 0
    last_worker: int = -1

    def __post_init__(self):
        self.workers: dict[str, dict] = {}

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.last_worker, self.workers = int(epoch), 0, -1, {}

    def update(self, batch: dict) -> None:
        state = batch["stream_state"]
        self.workers[str(state["worker"])] = {k: v for k, v in state.items() if k not in ("worker", "epoch")}
        self.last_worker = int(state["worker"])
        self.batches += 1

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": max(self.num_workers, 1),
            "next_worker": (self.last_worker + 1) % max(self.num_workers, 1) if self.last_worker >= 0 else 0,
            "workers": self.workers,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.workers = dict(state["workers"])
        self.last_worker = (int(state["next_worker"]) - 1) % max(self.num_workers, 1) if self.workers else -1


def make_dataloader(stream: ImageStream, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = 2):
    """A DataLoader over an `ImageStream` that already batches (batch_size=None): decoding and
    augmentation run in `num_workers` worker processes; tensors stay uint8.

    The loader draws its worker seeds from a private generator, so creating an iterator does not
    advance the global torch RNG (which drives the masks): a resumed run stays on the same masks."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,  # a fresh iterator per epoch picks up set_epoch / resume
        generator=torch.Generator().manual_seed(stream.seed),
        worker_init_fn=worker_ignores_interrupts,  # Ctrl-C / SIGTERM: the training process stops cleanly
    )


def build_dataset(
    name_or_dir: str,
    split: str = "train",
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    shuffle_window: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    token: str | bool | None = None,
) -> ImageStream:
    """`ImageStream` over a Hub dataset name or a local folder (an existing directory is local).

    Examples (batch_size=None) are `{"pixel_values": uint8 (C, H, W), "labels": int, ...}`;
    evaluation uses the defaults (stream order, nothing dropped)."""
    from .transforms import EvalTransform

    local = Path(name_or_dir).expanduser().is_dir()
    source = load_source(
        dataset_name=None if local else name_or_dir,
        dataset_config_name=dataset_config_name,
        train_dir=name_or_dir if local else None,
        split=split,
        token=token,
    )
    source = split_for_process(source, rank, world_size, num_workers)
    return ImageStream(
        source,
        transform or EvalTransform(224),
        batch_size=batch_size,
        image_column=image_column,
        label_column=label_column,
        shuffle_window=shuffle_window,
        seed=seed,
        rank=rank,
        drop_last=drop_last,
    )


def count_examples(source_or_dir, split: str = "train") -> int | None:
    """Number of examples of `split` when it is known cheaply: `info.splits`, parquet metadata, tar members
    (webdataset samples = distinct keys), or image / array files, of the split's files only
    (`detect_local_format`). None when unknown."""
    if isinstance(source_or_dir, FileShardSource):
        if source_or_dir.remote:  # never open every Hub shard to count: the dataset card's split size, if any
            return source_or_dir.num_examples
        fmt, files = source_or_dir.builder, source_or_dir.files
    elif isinstance(source_or_dir, (str, os.PathLike)):
        fmt, kwargs = detect_local_format(source_or_dir, split=split)
        files = kwargs["data_files"]
    else:
        info = getattr(source_or_dir, "info", None)
        splits = getattr(info, "splits", None) or {}
        if split in splits and splits[split].num_examples:
            return int(splits[split].num_examples)
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if fmt == "webdataset":
        import tarfile

        from datasets.packaged_modules.webdataset.webdataset import base_plus_ext  # its own key rule

        total = 0
        for f in files:
            with tarfile.open(f) as tar:
                keys = {(base_plus_ext(m.name) or (m.name,))[0] for m in tar.getmembers() if m.isfile()}
            total += len(keys)
        return total
    return len(files)


# --------------------------------------------------------------------------------------------------
# Writing datasets in the two Hub layouts (demo data, tests, resharding)
# --------------------------------------------------------------------------------------------------
def encode_image(image: Image.Image, format: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    kwargs = {"quality": quality} if format.upper() == "JPEG" else {}
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def write_parquet_shards(examples: list[tuple[bytes, int]], out_dir: str | os.PathLike, num_shards: int = 1,
                         split: str = "train") -> list[str]:
    """Write (image bytes, label) pairs as parquet shards in the `ILSVRC/imagenet-1k` layout:
    column `image` = {bytes, path} with the `datasets.Image` feature, column `label` int64, files
    `{split}-0000i-of-0000n.parquet`. Example i goes to shard i % num_shards."""
    import datasets
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    paths = []
    for shard in range(num_shards):
        rows = examples[shard::num_shards]
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [int(lab) for _, lab in rows]},
            features=features,
        ).data.table  # carries the `datasets` features in its schema metadata
        path = out / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(table, str(path))
        paths.append(str(path))
    return paths


def write_webdataset_shards(
    examples: list[tuple[bytes, int]], out_dir: str | os.PathLike, num_shards: int = 1, ext: str = "jpg"
) -> list[str]:
    """Write (image bytes, label) pairs as webdataset .tar shards in the `timm/imagenet-1k-wds` layout:
    members `KEY.jpg` and `KEY.cls` (the label as text). Example i goes to shard i % num_shards."""
    import tarfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = out / f"train-{shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard, len(examples), num_shards):
                data, label = examples[index]
                for suffix, payload in ((ext, data), ("cls", str(int(label)).encode())):
                    info = tarfile.TarInfo(f"sample{index:08d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


DEMO_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry",
    "moon", "retina", "clock", "cell", "brick", "grass", "gravel", "colorwheel", "page", "text", "logo",
)


def write_demo_dataset(
    out_dir: str | os.PathLike, num_crops: int = 4096, crop_size: int = 64, num_shards: int = 4, seed: int = 0,
    num_validation_crops: int = 512,
) -> list[str]:
    """Cut scikit-image's sample photographs (shipped with the package, no download) into `num_crops`
    random square crops (side 1/8 to 1/2 of the shorter image side, resized to `crop_size`), and write
    them as JPEG parquet shards in the `ILSVRC/imagenet-1k` layout; label = index of the source
    photograph. `num_validation_crops` more crops, drawn apart, are the `validation` split (held-out
    queries of the k-NN evaluation: which photograph is this crop from?). Grayscale photographs stay
    grayscale (the data path makes them RGB); the RGBA logo stays RGBA (as PNG)."""
    import skimage.data

    photos = []
    for name in DEMO_IMAGES:
        try:
            photos.append(Image.fromarray(np.asarray(getattr(skimage.data, name)())))
        except Exception:  # a sample that needs a download (pooch) or is missing in this version
            continue
    if not photos:
        raise RuntimeError("scikit-image ships no sample images here; install scikit-image >= 0.22")

    def crops(count: int, rng) -> list[tuple[bytes, int]]:
        examples = []
        for index in range(count):
            label = index % len(photos)
            photo = photos[label]
            width, height = photo.size
            side = int(rng.integers(min(width, height) // 8, min(width, height) // 2 + 1))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((crop_size, crop_size), Image.BICUBIC)
            fmt = "PNG" if crop.mode in ("RGBA", "P", "LA") else "JPEG"
            examples.append((encode_image(crop, fmt), label))
        return examples

    paths = write_parquet_shards(crops(num_crops, np.random.default_rng(seed)), out_dir, num_shards=num_shards)
    if num_validation_crops:
        held_out = crops(num_validation_crops, np.random.default_rng([seed, 1]))
        paths += write_parquet_shards(held_out, out_dir, num_shards=1, split="validation")
    return paths
