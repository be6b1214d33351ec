"""The labelled data of the downstream scripts: map-style `datasets` splits (Hub or local folders),
`MapImageDataset` with per-example augmentation seeds, the train / validation DataLoaders, the class
names, and synthetic labelled images for the demo and the tests."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .runtime import worker_ignores_interrupts


logger = logging.getLogger(__name__)


def label_maps(names: list[str]) -> dict:
    """`id2label` / `label2id` config fields for class `names` (index order)."""
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}



def load_map_dataset(name_or_dir: str, split: str, dataset_config_name: str | None = None,
                     image_column: str | None = None, label_column: str | None = None, token=None):
    """A map-style (non-streaming) `datasets.Dataset` from a Hub name or a local folder (parquet,
    webdataset or images, as `data.load_source` reads them); also a directory written by
    `save_to_disk`. Returns (dataset, image_column, label_column) with images left undecoded.

    Map-style, because `accelerator.prepare` can then shard it evenly and `gather_for_metrics` can drop
    the padded duplicates of the last batch: every example counted exactly once.
    """
    import datasets

    from .data import load_source, prepare_source

    root = Path(name_or_dir).expanduser()
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        source = datasets.load_from_disk(str(root))
        if isinstance(source, datasets.DatasetDict):
            if split not in source:
                raise ValueError(f"split {split!r} not in {str(root)!r}; it has {list(source)}")
            source = source[split]
    else:
        local = root.is_dir()
        # a local folder: its sub-folder named like the split when there is one (data/val for split "val"),
        # else the split's files as `datasets` names them (data/validation-*.parquet), else the whole folder
        if local and (root / split).is_dir():
            root = root / split
        source = load_source(
            dataset_name=None if local else name_or_dir,
            dataset_config_name=dataset_config_name,
            train_dir=str(root) if local else None,
            split=split,
            token=token,
            streaming=False,
        )
    return prepare_source(source, image_column, label_column)


def seeded(fn, seed: int):
    """`fn()` with torch, `random` and numpy seeded from `seed`; the callers' RNG states are restored
    (timm's RandAugment draws from `random` and numpy, torchvision from torch)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return fn()
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class MapImageDataset(torch.utils.data.Dataset):
    """Example i of a map-style `datasets.Dataset` -> (uint8 (C, H, W), label, index used, index asked).

    Images are decoded here (in DataLoader workers) with `data.decode_image` (EXIF orientation
    applied) into an RGB PIL image for `transform`; with a `pixel_format` (a dataset that is not 8-bit
    RGB, `pixels.PixelPath.array_format`) as pretraining reads them instead (`pixels.load_float_pixels`:
    float32 (C, H, W) scaled by the dataset's range, every image checked against the format). Labels go
    through `label_lookup` (the split's raw label -> the training id, so that every split is numbered by
    class *name*; None: the raw integer), -1 when there is none.

    An undecodable image never stops the loader: with `substitute_unreadable` (training) the next
    readable example in dataset order stands in for it, so batches keep their size (Mixup needs even
    batches, DDP equal ones) and resume stays exact; without it (evaluation, features) a placeholder of
    zeros with `index used` = -1 comes back, which the caller drops after `gather_for_metrics`. Either
    way `index used != index asked` says which examples were skipped (`UnreadableImages` logs their
    file names). With `seed`, the random augmentation of example i in epoch e is seeded from
    (seed, e, i): the same pixels whatever the number of workers, and after resuming mid-epoch
    (`set_epoch` before each epoch's iterator).
    """

    def __init__(self, source, transform, image_column: str, label_column: str | None, seed: int | None = None,
                 label_lookup: dict | None = None, substitute_unreadable: bool = False, pixel_format=None):
        self.source = source
        self.pixel_format = pixel_format
        if pixel_format is not None:
            from .pixels import feature_dtype

            self._array_dtype = feature_dtype((source.features or {}).get(image_column))
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = seed
        self.label_lookup = label_lookup
        self.substitute_unreadable = substitute_unreadable
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def label_of(self, example: dict) -> int:
        raw = example.get(self.label_column) if self.label_column else None
        if raw is None:
            return -1
        return int(self.label_lookup[raw]) if self.label_lookup is not None else int(raw)

    def _pixels(self, image, index: int):
        import numpy as np

        if self.seed is None:
            return self.transform(image)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        return seeded(lambda: self.transform(image), seed)

    def __getitem__(self, index: int):
        from .data import CorruptImageError

        index = int(index)
        tries = len(self.source) if self.substitute_unreadable else 1
        for offset in range(tries):
            used = (index + offset) % len(self.source)
            example = self.source[used]
            try:
                image = self._decode(example[self.image_column], used)
            except CorruptImageError:
                continue
            # augmentation seeded by the slot asked for: a stand-in differs from its own turn's view
            return self._pixels(image, index), self.label_of(example), used, index
        if self.substitute_unreadable:
            raise CorruptImageError(f"no image of the {len(self.source)} examples can be decoded")
        height, width = getattr(self.transform, "size", (1, 1))
        if self.pixel_format is not None:
            return torch.zeros(self.pixel_format.num_channels, height, width), -1, -1, index
        return torch.zeros(3, height, width, dtype=torch.uint8), -1, -1, index

    def _decode(self, cell, index: int):
        """RGB PIL image, or float (C, H, W) on the array path; `CorruptImageError` when undecodable."""
        from .data import decode_image

        if self.pixel_format is None:
            return decode_image(cell)
        from .pixels import load_float_pixels

        name = functools.partial(describe_example, self.source, index, self.image_column)  # read only on a mismatch
        return load_float_pixels(cell, self.pixel_format, name, self._array_dtype)


def describe_example(source, index: int, image_column: str) -> str:
    """The file an example came from (its path), else "example <index>"."""
    value = source[int(index)][image_column]
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"{path} (example {index})" if path else f"example {index}"


def skipped_indices(used, asked, size: int) -> list[int]:
    """The examples a batch skipped: asked..used-1 (mod size) where a substitute stood in, asked
    itself where a placeholder (used = -1) did."""
    skipped = []
    for u, a in zip(used.tolist(), asked.tolist()):
        if u < 0:
            skipped.append(a)
        elif u != a:
            skipped.extend((a + k) % size for k in range((u - a) % size))
    return skipped


class UnreadableImages:
    """The undecodable examples of one split: each one logged once with its file name, the count for
    the log and the model card, and a stop when more than `max_fraction` of the split is unreadable.

    `record(used, asked)` after every batch (the `MapImageDataset` indices); in training every
    process records its own batches and `merge(accelerator)` (a collective: call it on every
    process, e.g. before each checkpoint) unites them; evaluation records the gathered batches."""

    def __init__(self, source, image_column: str, split: str, max_fraction: float, log: bool = True):
        self.source, self.image_column, self.split = source, image_column, split
        self.max_fraction = max_fraction
        self.log = log
        self.indices: set[int] = set()

    def record(self, used, asked) -> None:
        for index in skipped_indices(used, asked, len(self.source)):
            if index in self.indices:
                continue
            self.indices.add(index)
            if self.log:
                logger.warning("skipped an unreadable %s image: %s", self.split,
                               describe_example(self.source, index, self.image_column))
        self.check()

    def check(self) -> None:
        if len(self.indices) > self.max_fraction * len(self.source):
            raise ValueError(
                f"{len(self.indices)} of the {len(self.source)} {self.split} images cannot be decoded, more than "
                f"max_corrupt_fraction={self.max_fraction}; first ones: "
                + ", ".join(describe_example(self.source, i, self.image_column) for i in sorted(self.indices)[:5])
            )

    def merge(self, accelerator) -> None:
        from accelerate.utils import gather_object

        if accelerator.num_processes > 1:
            for part in gather_object([sorted(self.indices)]):
                self.indices.update(part)
        self.check()

    def state_dict(self) -> list[int]:
        return sorted(self.indices)

    def load_state_dict(self, indices) -> None:
        self.indices = set(int(i) for i in indices or [])


def resolve_split_sources(dataset_name, train_dir, validation_dir, train_split, validation_split):
    """(train name_or_dir, train split), (validation name_or_dir, validation split).

    A Hub dataset gives both splits (`train_split` / `validation_split`); local folders are
    `train_dir` and `validation_dir` (each read as its own split, named like the split arguments)."""
    if bool(dataset_name) == bool(train_dir):
        raise ValueError(
            f"give exactly one of `dataset_name` / `train_dir`; got dataset_name={dataset_name!r}, "
            f"train_dir={train_dir!r}"
        )
    if dataset_name:
        return (dataset_name, train_split), (validation_dir or dataset_name, validation_split)
    if not validation_dir:
        raise ValueError("`validation_dir` is required with `train_dir` (evaluation runs every epoch)")
    from .data import detect_local_format

    for field_name, directory, split in (("train_dir", train_dir, train_split), ("validation_dir", validation_dir, validation_split)):
        root = Path(directory).expanduser()
        if not ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()):  # save_to_disk
            if root.is_dir() and (root / split).is_dir():  # the split's own sub-folder, as `load_map_dataset` reads it
                root = root / split
            detect_local_format(root, field=field_name, split=split)  # missing / empty / unreadable: one line, now
    return (train_dir, train_split), (validation_dir, validation_split)


def split_label_names(source, label_column: str) -> list[str] | None:
    """The class names a split carries: its `ClassLabel` names, or the sorted distinct values of a
    string label column; None for plain integer labels."""
    import datasets

    feature = (source.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return sorted(str(v) for v in source.unique(label_column))
    return None


def label_lookup(source, label_column: str, names: list[str], split: str, reference: str) -> dict | None:
    """The raw label -> training id table of one split, matched by class NAME (a folder's classes are
    numbered in its own sorted order, so "coffee" is 1 in one folder and 0 in another); None for
    integer labels, which must then lie in [0, len(names)).

    A class of this split that `names` lacks is an error naming it; a class of `names` this split
    lacks is a warning (its accuracy is not measured there)."""
    import datasets

    own = split_label_names(source, label_column)
    if own is None:
        values = [int(v) for v in source.unique(label_column) if v is not None]
        outside = sorted(v for v in values if not 0 <= v < len(names))
        if outside:
            raise ValueError(f"the {split} labels {outside[:10]} are outside the {len(names)} classes of {reference} "
                             f"(0..{len(names) - 1})")
        return None
    unknown = [n for n in own if n not in names]
    if unknown:
        raise ValueError(f"{split} class(es) {unknown} are not among the {len(names)} classes of {reference}: "
                         f"{names}")
    missing = [n for n in names if n not in own]
    if missing:
        logger.warning("the %s split has no class %s: its accuracy is not measured there", split,
                       ", ".join(repr(n) for n in missing))
    feature = (source.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return {i: names.index(n) for i, n in enumerate(own)}
    return {n: names.index(n) for n in own}


def class_counts(source, label_column: str, lookup: dict | None, num_classes: int) -> list[int]:
    """Examples per training id (after `lookup`)."""
    import numpy as np

    ids = [lookup[v] if lookup is not None else int(v) for v in source[label_column] if v is not None]
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=num_classes).tolist()


def report_class_balance(names: list[str], counts: list[int], small_ratio: float = 0.25) -> list[str]:
    """Log the training set's class counts; warn about classes with fewer than `small_ratio` x the
    largest class's images (and about classes with none). Returns the warnings."""
    total = sum(counts)
    if len(names) <= 20:
        logger.info("training set: %d images in %d classes: %s", total, len(names),
                    ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
    else:
        ordered = sorted(counts)
        logger.info("training set: %d images in %d classes: %d to %d per class (median %d)", total, len(names),
                    ordered[0], ordered[-1], ordered[len(ordered) // 2])
    largest = max(counts) if counts else 0
    messages = []
    for name, count in zip(names, counts):
        if count == 0:
            messages.append(f"class {name!r} has no training images")
        elif count < small_ratio * largest:
            messages.append(f"class {name!r} has {count} training images against {largest} in the largest class: "
                            f"an imbalanced training set (more images of it, or class weights, would help)")
    for message in messages:
        logger.warning("%s", message)
    return messages


def check_image_folder_has_classes(directory: str) -> None:
    """An image folder is labelled by its sub-folders: refuse one whose images all lie at the top."""
    from .data import IMAGE_EXTENSIONS, detect_local_format

    root = Path(directory).expanduser()
    if not root.is_dir() or (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return
    if detect_local_format(root)[0] != "imagefolder":
        return
    images = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if images and all(p.parent == root for p in images):
        raise ValueError(
            f"{str(root)!r} holds its {len(images)} images directly, with no class sub-folders: an image folder "
            f"needs one sub-folder per class ({root}/cat/1.jpg, {root}/dog/2.jpg, ...), or use parquet / "
            f"webdataset files with a label column"
        )


@dataclass
class ClassificationSplits:
    """The train and validation splits (map-style, images undecoded), the class names (the label
    map: training id i is `class_names[i]`), each split's raw label -> id table, and the training
    set's examples per class."""

    train: object
    validation: object
    image_column: str
    label_column: str
    class_names: list[str]
    train_lookup: dict | None = None
    validation_lookup: dict | None = None
    train_counts: list[int] | None = None


def load_classification_splits(cfg, accelerator) -> ClassificationSplits:
    """Read `cfg`'s train / validation splits (Hub dataset or local folders) and build ONE label map:
    `cfg.label_names` when given, else the training split's class names (`ClassLabel` names, the
    sorted values of a string column) or "LABEL_i" for integer labels (i < `cfg.num_labels` or max
    label + 1). Every split is mapped onto it by name (`label_lookup`), before any training."""
    (train_name, train_split), (val_name, val_split) = resolve_split_sources(
        cfg.dataset_name, cfg.train_dir, cfg.validation_dir, cfg.train_split, cfg.validation_split
    )
    for name in (cfg.train_dir, cfg.validation_dir):
        if name:
            check_image_folder_has_classes(name)
    with accelerator.main_process_first():  # the first read may download / convert to Arrow
        train, image_col, label_col = load_map_dataset(
            train_name, train_split, cfg.dataset_config_name, cfg.image_column, cfg.label_column, cfg.hub_token
        )
        val, val_image_col, val_label_col = load_map_dataset(
            val_name, val_split, cfg.dataset_config_name, image_col, label_col, cfg.hub_token
        )
    if label_col is None or val_label_col is None:
        raise ValueError(
            f"no label column found (train: {label_col!r}, validation: {val_label_col!r}); pass `label_column` "
            f"(image folders: one sub-folder per class)"
        )
    # a random subset (seeded), never the first n: an image folder is listed class by class
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(val):
        val = val.shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
    given = list(getattr(cfg, "label_names", None) or [])
    names = given or split_label_names(train, label_col)
    if names is None:
        num = cfg.num_labels or int(max(train.unique(label_col))) + 1
        names = [f"LABEL_{i}" for i in range(num)]
    elif cfg.num_labels and cfg.num_labels != len(names):
        raise ValueError(f"`num_labels` is {cfg.num_labels} but the dataset has {len(names)} classes: {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"`label_names` must be distinct, got {names}")
    reference = "`label_names`" if given else "the training split"
    train_lookup = label_lookup(train, label_col, names, "training", reference)
    val_lookup = label_lookup(val, label_col, names, "validation", reference)
    counts = class_counts(train, label_col, train_lookup, len(names))
    return ClassificationSplits(train, val, image_col, label_col, names, train_lookup, val_lookup, counts)


PROBE_IMAGES = 8  # images read for the data's channel count and bit depth (as pretraining reads)
STATS_IMAGES = 256  # images read for the statistics of data the checkpoint was not trained on


def image_cells(source, image_column: str, count: int) -> tuple[list, list[str]]:
    """The first `count` image cells of a map-style split (undecoded) and their file names."""
    indices = range(min(count, len(source)))
    return [source[i][image_column] for i in indices], [describe_example(source, i, image_column) for i in indices]


def classification_pixel_path(cfg, model_channels: int, splits: ClassificationSplits, progress: bool = True):
    """The run's `pixels.PixelPath`: the checkpoint's pixel format and statistics (its saved image processor;
    8-bit RGB for an RGB checkpoint without one), checked against the training split's first images; with
    `cfg.adapt_channels` the data's own when they differ (see `pixels.resolve_pixel_path`)."""
    from .model_loading import read_image_processor_config
    from .pixels import resolve_pixel_path

    cells, names = image_cells(splits.train, splits.image_column, PROBE_IMAGES)
    stats_cells, stats_names = image_cells(splits.train, splits.image_column, STATS_IMAGES)
    return resolve_pixel_path(
        read_image_processor_config(cfg.model_name_or_path, token=getattr(cfg, "hub_token", None)), model_channels,
        cells, names, adapt_channels=getattr(cfg, "adapt_channels", False),
        checkpoint=f"the checkpoint {cfg.model_name_or_path}", data="the training images",
        stats_cells=stats_cells, stats_names=stats_names, progress=progress,
    )


def set_train_epoch(train_loader, epoch: int) -> None:
    """New shuffle order (the prepared loader's seedable sampler) and new augmentation seeds."""
    train_loader.set_epoch(epoch)
    train_loader.dataset.set_epoch(epoch)


def build_classification_loaders(cfg, accelerator, splits: ClassificationSplits, train_transform, eval_transform,
                                 train_batch_size: int | None = None, pixel_format=None):
    """Train / validation DataLoaders (to be passed to `accelerator.prepare`).

    Train: shuffled by a seedable sampler (order = f(seed, epoch)) and augmented with per-example
    seeds (`MapImageDataset`), so resume is exact; last incomplete batch dropped; call
    `set_train_epoch(loader, epoch)` before each epoch. Validation: sharded with `even_batches`, so
    every process runs the same number of batches and `gather_for_metrics` drops the padding. Both
    yield (uint8 (B, 3, H, W), labels (B,), index used (B,), index asked (B,)) (`MapImageDataset`);
    with a `pixel_format` (not 8-bit RGB) float32 (B, C, H, W) scaled by the dataset's range instead.
    """
    workers = cfg.dataloader_num_workers
    batch_size = train_batch_size or cfg.per_device_train_batch_size
    if len(splits.train) < batch_size:
        raise ValueError(
            f"{len(splits.train)} training examples make no full batch of per_device_train_batch_size={batch_size}"
        )
    # workers are re-created every epoch (not persistent) so that they see the dataset's new epoch
    train_loader = torch.utils.data.DataLoader(
        MapImageDataset(splits.train, train_transform, splits.image_column, splits.label_column, seed=cfg.seed,
                        label_lookup=splits.train_lookup, substitute_unreadable=True, pixel_format=pixel_format),
        batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        # its own generator: the DataLoader's per-iterator seed draw must not shift the global RNG
        # (random erasing, drop path), or a resumed epoch would differ from the uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=worker_ignores_interrupts,  # Ctrl-C / SIGTERM: the training process stops cleanly
    )
    eval_loader = torch.utils.data.DataLoader(
        MapImageDataset(splits.validation, eval_transform, splits.image_column, splits.label_column,
                        label_lookup=splits.validation_lookup, pixel_format=pixel_format),
        batch_size=cfg.per_device_eval_batch_size, shuffle=False, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda", worker_init_fn=worker_ignores_interrupts,
    )
    accelerator.dataloader_config.use_seedable_sampler = True
    accelerator.even_batches = True
    return train_loader, eval_loader


# --------------------------------------------------------------------------------------------------
# Synthetic labelled images (tests and the CPU demo)
# --------------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("red_horizontal", "red_vertical", "blue_horizontal", "blue_vertical")


def make_synthetic_classification(out_dir, num_per_class: int, size: int = 32, seed: int = 0) -> Path:
    """An image folder `out_dir/<class>/<i>.png` of 4 classes: a red or blue bar, horizontal or
    vertical, of random length, width and position on a noisy gray background (chance: 25%; colour
    alone gives 50%, orientation the rest)."""
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for name in SYNTHETIC_CLASSES:
        colour, orientation = name.split("_")
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(num_per_class):
            image = rng.normal(128, 25, (size, size, 3))
            length = int(rng.uniform(0.55, 0.9) * size)
            width = int(rng.uniform(0.15, 0.25) * size)
            top = int(rng.integers(0, size - width + 1))
            left = int(rng.integers(0, size - length + 1))
            rows, cols = (slice(top, top + width), slice(left, left + length))
            if orientation == "vertical":
                rows, cols = cols, rows
            tint = np.array([210, 40, 40]) if colour == "red" else np.array([40, 60, 210])
            image[rows, cols] = tint + rng.normal(0, 15, image[rows, cols].shape)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out / name / f"{i:04d}.png")
    return out
