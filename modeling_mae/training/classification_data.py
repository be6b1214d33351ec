"""The labelled data of the downstream scripts: map-style `datasets` splits (Hub or local folders),
`MapImageDataset` with per-example augmentation seeds, the train / validation DataLoaders, the class
names, and synthetic labelled images for the demo and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .runtime import worker_ignores_interrupts


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
        # a local folder without a sub-folder named like the split is that split ("train" to `datasets`)
        read_split = split if not local or (root / split).is_dir() else "train"
        source = load_source(
            dataset_name=None if local else name_or_dir,
            dataset_config_name=dataset_config_name,
            train_dir=str(root) if local else None,
            split=read_split,
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
    """Example i of a map-style `datasets.Dataset` -> (uint8 (C, H, W), label (-1 if none), i).

    Images are decoded here (in DataLoader workers) with `data.decode_image`; an undecodable image
    raises, naming its index (evaluation must not silently skip examples). With `seed`, the random
    augmentation of example i in epoch e is seeded from (seed, e, i): the same pixels whatever the
    number of workers, and after resuming mid-epoch (`set_epoch` before each epoch's iterator).
    """

    def __init__(self, source, transform, image_column: str, label_column: str | None, seed: int | None = None):
        self.source = source
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        import numpy as np

        from .data import CorruptImageError, decode_image

        example = self.source[int(index)]
        try:
            image = decode_image(example[self.image_column])
        except CorruptImageError as err:
            raise CorruptImageError(f"example {index}: {err}") from err
        label = example.get(self.label_column, -1) if self.label_column else -1
        if self.seed is None:
            pixels = self.transform(image)
        else:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
            pixels = seeded(lambda: self.transform(image), seed)
        return pixels, int(label if label is not None else -1), int(index)


def class_names(source, label_column: str | None) -> list[str] | None:
    """Class names from a `ClassLabel` feature, or None (then `id2label` gets "LABEL_i" names)."""
    import datasets

    feature = (source.features or {}).get(label_column) if label_column else None
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return None


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

    for field_name, directory in (("train_dir", train_dir), ("validation_dir", validation_dir)):
        root = Path(directory).expanduser()
        if not ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()):  # save_to_disk
            detect_local_format(root, field=field_name)  # missing / empty / no readable image: one line, now
    return (train_dir, train_split), (validation_dir, validation_split)


@dataclass
class ClassificationSplits:
    """The train and validation splits (map-style, images undecoded) and the class names."""

    train: object
    validation: object
    image_column: str
    label_column: str
    class_names: list[str]


def load_classification_splits(cfg, accelerator) -> ClassificationSplits:
    """Read `cfg`'s train / validation splits (Hub dataset or local folders) and the class names:
    the `ClassLabel` names, else "LABEL_i" for i < `cfg.num_labels` or max label + 1."""
    (train_name, train_split), (val_name, val_split) = resolve_split_sources(
        cfg.dataset_name, cfg.train_dir, cfg.validation_dir, cfg.train_split, cfg.validation_split
    )
    with accelerator.main_process_first():  # the first read may download / convert to Arrow
        train, image_col, label_col = load_map_dataset(
            train_name, train_split, cfg.dataset_config_name, cfg.image_column, cfg.label_column, cfg.hub_token
        )
        val, val_image_col, val_label_col = load_map_dataset(
            val_name, val_split, cfg.dataset_config_name, image_col, label_col, cfg.hub_token
        )
    if label_col is None or val_label_col is None:
        raise ValueError(
            f"no label column found (train: {label_col!r}, validation: {val_label_col!r}); pass `label_column`"
        )
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.select(range(min(cfg.max_eval_samples, len(val))))
    names = class_names(train, label_col)
    if names is None:
        num = cfg.num_labels or int(max(train.unique(label_col))) + 1
        names = [f"LABEL_{i}" for i in range(num)]
    elif cfg.num_labels and cfg.num_labels != len(names):
        raise ValueError(f"`num_labels` is {cfg.num_labels} but the dataset's ClassLabel has {len(names)} classes")
    return ClassificationSplits(train, val, image_col, label_col, names)


def set_train_epoch(train_loader, epoch: int) -> None:
    """New shuffle order (the prepared loader's seedable sampler) and new augmentation seeds."""
    train_loader.set_epoch(epoch)
    train_loader.dataset.set_epoch(epoch)


def build_classification_loaders(cfg, accelerator, splits: ClassificationSplits, train_transform, eval_transform,
                                 train_batch_size: int | None = None):
    """Train / validation DataLoaders (to be passed to `accelerator.prepare`).

    Train: shuffled by a seedable sampler (order = f(seed, epoch)) and augmented with per-example
    seeds (`MapImageDataset`), so resume is exact; last incomplete batch dropped; call
    `set_train_epoch(loader, epoch)` before each epoch. Validation: sharded with `even_batches`, so
    every process runs the same number of batches and `gather_for_metrics` drops the padding. Both
    yield (uint8 (B, 3, H, W), labels (B,), row ids (B,)).
    """
    workers = cfg.dataloader_num_workers
    batch_size = train_batch_size or cfg.per_device_train_batch_size
    if len(splits.train) < batch_size:
        raise ValueError(
            f"{len(splits.train)} training examples make no full batch of per_device_train_batch_size={batch_size}"
        )
    # workers are re-created every epoch (not persistent) so that they see the dataset's new epoch
    train_loader = torch.utils.data.DataLoader(
        MapImageDataset(splits.train, train_transform, splits.image_column, splits.label_column, seed=cfg.seed),
        batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        # its own generator: the DataLoader's per-iterator seed draw must not shift the global RNG
        # (random erasing, drop path), or a resumed epoch would differ from the uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=worker_ignores_interrupts,  # Ctrl-C / SIGTERM: the training process stops cleanly
    )
    eval_loader = torch.utils.data.DataLoader(
        MapImageDataset(splits.validation, eval_transform, splits.image_column, splits.label_column),
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
