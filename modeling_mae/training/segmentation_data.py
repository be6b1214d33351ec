"""Semantic segmentation data and inference for `scripts/segment.py` (the paper's ADE20K setup).

Sources (map-style `datasets`, images decoded lazily):
- `dataset_name`: a Hub dataset in the `scene_parse_150` layout (`image`, `annotation` columns), a local
  directory that `datasets.load_dataset` reads (parquet, arrow, ...), or a `save_to_disk` directory;
- `data_dir`: the ADEChallengeData2016 folder layout, `images/<split>/*.jpg` with
  `annotations/<split>/*.png` of the same stem (`training` / `validation`, or `train` / `validation`).

Labels. ADE20K's annotations use 0 for "other" (not one of the 150 classes) and 1..150 for the classes;
the dataset card and the benchmark ignore 0. `reduce_labels=True` maps 0 -> 255 (ignored by the loss
and the metric) and c -> c - 1, giving classes 0..149 (`reduce_labels`).

Augmentation (mmseg / BEiT ADE20K pipeline), on PIL images, uint8 until the device:
    random scale   resize so the image fits (2048, 512) x r, r ~ U(0.5, 2.0), keeping the aspect ratio
    random crop    512 x 512, retried (up to 10 times) so that no class covers more than 75% of it
    flip           horizontal, p = 0.5
    photometric    brightness / contrast / saturation / hue jitter (torchvision ColorJitter)
    pad            to 512 x 512: image 0, label 255
Images that are not 8-bit RGB (1 channel, 16 bit, N bands; `pixels.PixelPath`) are read as pretraining reads
them (float (C, H, W) scaled by the dataset's range) and take the same steps on the float tensor (bilinear,
antialiased); of the photometric distortion only brightness and contrast mean something there
(`intensity_jitter`: the same ranges, on the float pixels); saturation and hue need colour and are left out.
Evaluation resizes the image to fit (2048, 512) and predicts on 512 x 512 sliding windows (stride 341)
or on the whole image; the logits are resized to the original annotation before the argmax. Those steps
live with the exported model (`MAESegmentationImageProcessor`, `MAEUperNetForSemanticSegmentation`'s
forward) and are imported here, so the exported pipeline scores what the script reports.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# The evaluation steps the exported model and image processor run too: one implementation, re-exported here.
from ..image_processing_mae_segmentation import (  # noqa: F401
    ADE20K_TEST_SCALE,
    IGNORE_INDEX,
    predict_label_map,
    reduce_labels,
    rescale_size,
    resize_float,
    resize_uint8,
)
from ..modeling_mae_backbone import slide_inference, whole_inference  # noqa: F401
from .data import CorruptImageError
from .transforms import pil_to_uint8, to_rgb


logger = logging.getLogger(__name__)


ADE_SPLIT_DIRS = {"train": ("training", "train"), "validation": ("validation", "val")}


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------
def annotation_to_array(annotation: Image.Image) -> np.ndarray:
    """A class-index PNG (mode L, P, I or I;16) -> (H, W) int64 array of class ids."""
    if annotation.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(
            f"annotation images must hold one class id per pixel (mode L, P, I or I;16), got mode {annotation.mode!r}"
        )
    return np.asarray(annotation).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------
def _ade_split_dir(root: Path, kind: str, split: str) -> Path:
    for name in ADE_SPLIT_DIRS.get(split, (split,)):
        if (root / kind / name).is_dir():
            return root / kind / name
    raise ValueError(
        f"`data_dir` {str(root)!r} has no {kind}/<split> folder for split {split!r} "
        f"(looked for {', '.join(kind + '/' + n for n in ADE_SPLIT_DIRS.get(split, (split,)))})"
    )


def load_ade_folder(data_dir: str | os.PathLike, split: str):
    """ADEChallengeData2016 layout -> `datasets.Dataset` with `image` and `annotation` Image columns."""
    import datasets

    root = Path(data_dir).expanduser()
    images = {p.stem: p for p in sorted(_ade_split_dir(root, "images", split).iterdir()) if not p.name.startswith(".")}
    annotation_dir = _ade_split_dir(root, "annotations", split)
    annotations = {p.stem: p for p in sorted(annotation_dir.iterdir()) if p.suffix == ".png"}
    missing = sorted(set(images) - set(annotations))
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {root}/images have no annotation PNG, e.g. {missing[:3]}")
    stems = sorted(images)
    data = {"image": [str(images[s]) for s in stems], "annotation": [str(annotations[s]) for s in stems]}
    # multi-band .npy arrays are no `datasets` Image: their paths, decoded by `pixels.decode_array`
    arrays = any(p.suffix.lower() == ".npy" for p in images.values())
    features = datasets.Features({"image": datasets.Value("string") if arrays else datasets.Image(),
                                  "annotation": datasets.Image()})
    return datasets.Dataset.from_dict(data, features=features)


def load_segmentation_split(
    split: str,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | None = None,
    token: str | bool | None = None,
):
    """One split as a map-style `datasets.Dataset` (see the module docstring for the sources)."""
    import datasets

    if (dataset_name is None) == (data_dir is None):
        raise ValueError(
            f"give exactly one of `dataset_name` / `data_dir`; got dataset_name={dataset_name!r}, data_dir={data_dir!r}"
        )
    if data_dir is not None:
        return load_ade_folder(data_dir, split)
    path = Path(dataset_name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(dataset_name, dataset_config_name, split=split, token=token)
    except Exception as err:
        from .data import _access_error

        if isinstance(err, (FileNotFoundError, ConnectionError, PermissionError)) or type(err).__module__.startswith(
            ("huggingface_hub", "requests", "httpx", "datasets.exceptions")
        ):
            raise _access_error(dataset_name, err) from err
        raise


def check_columns(dataset, image_column: str, label_column: str) -> None:
    names = list(dataset.column_names)
    for field, name in (("image_column_name", image_column), ("label_column_name", label_column)):
        if name not in names:
            raise ValueError(f"`{field}` is {name!r} but the dataset's columns are {names}")


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------
def crop_window(label: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int, tries: int = 10, rng=random):
    """Top-left corner of a random crop x crop window in which no class covers more than `cat_max_ratio`
    of the labelled pixels (mmseg's RandomCrop); the last try is kept if none qualifies."""
    height, width = label.shape
    for _ in range(tries):
        top = rng.randint(0, max(height - crop, 0))
        left = rng.randint(0, max(width - crop, 0))
        if cat_max_ratio >= 1.0:
            break
        window = label[top : top + crop, left : left + crop]
        counts = np.bincount(window[window != ignore_index].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


def intensity_jitter(pixels: torch.Tensor, brightness: float, contrast: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The photometric distortion of images that are not 8-bit RGB (float (C, H, W), any channel count):
    ColorJitter's brightness (x * b, b ~ U(1 - brightness, 1 + brightness)) and contrast (blend with the
    image's mean, m + c (x - m), c ~ U(1 - contrast, 1 + contrast)) in random order, as ColorJitter draws
    them; no clipping (the float pixels keep values beyond the range)."""
    factors = {"brightness": 1 + brightness * (2 * torch.rand((), generator=generator).item() - 1),
               "contrast": 1 + contrast * (2 * torch.rand((), generator=generator).item() - 1)}
    order = [("brightness", "contrast"), ("contrast", "brightness")][int(torch.randint(2, (), generator=generator))]
    for name in order:
        if name == "brightness":
            pixels = pixels * factors[name]
        else:
            mean = pixels.mean()
            pixels = mean + factors[name] * (pixels - mean)
    return pixels


class SegTrainTransform:
    """(PIL image, (H, W) int64 label) -> uint8 (3, S, S), int64 (S, S); a float (C, H, W) image (not
    8-bit RGB) -> float (C, S, S), with `intensity_jitter` for the photometric step; see the module docstring."""

    def __init__(
        self,
        crop_size: int = 512,
        base_scale: tuple[int, int] = (2048, 512),
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.crop_size = crop_size
        self.base_scale = tuple(base_scale)
        self.scale_range = tuple(scale_range)
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.ignore_index = ignore_index
        # mmseg's PhotoMetricDistortion: brightness +-32/255, contrast and saturation 0.5-1.5, hue +-18 deg
        self.photometric = (
            v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05) if photometric else None
        )

    def __call__(
        self, image: Image.Image, label: np.ndarray, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`seed` fixes every random choice of this example (exact resume); None draws from the global RNGs."""
        rng = random.Random(seed) if seed is not None else random
        floats = isinstance(image, torch.Tensor)
        image = image if floats else to_rgb(image)
        height, width = image.shape[-2:] if floats else (image.height, image.width)
        # random scale
        ratio = rng.uniform(*self.scale_range)
        scale = (int(self.base_scale[0] * ratio), int(self.base_scale[1] * ratio))
        size = rescale_size(height, width, scale)
        image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        label_t = torch.from_numpy(label)[None]
        label_t = TF.resize(label_t, list(size), interpolation=InterpolationMode.NEAREST)[0]
        # random crop that no single class dominates
        top, left = crop_window(label_t.numpy(), self.crop_size, self.cat_max_ratio, self.ignore_index, rng=rng)
        pixels = (image if floats else pil_to_uint8(image))[:, top : top + self.crop_size, left : left + self.crop_size]
        label_t = label_t[top : top + self.crop_size, left : left + self.crop_size]
        # flip, photometric distortion (image only)
        if rng.random() < self.hflip:
            pixels, label_t = pixels.flip(-1), label_t.flip(-1)
        if self.photometric is not None and floats:
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
            pixels = intensity_jitter(pixels, self.photometric.brightness[1] - 1, self.photometric.contrast[1] - 1,
                                      generator)
        elif self.photometric is not None:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
                torch.manual_seed(rng.getrandbits(63))
                pixels = self.photometric(pixels)
        # pad to the crop size: image 0, label ignored
        pad_h, pad_w = self.crop_size - pixels.shape[1], self.crop_size - pixels.shape[2]
        if pad_h > 0 or pad_w > 0:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0)
            label_t = F.pad(label_t, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return pixels.contiguous(), label_t.long().contiguous()


class SegEvalTransform:
    """PIL image -> uint8 (3, h, w) resized (keep ratio) to fit `scale`; the label stays at full size.
    The exported image processor's own resize (`resize_uint8`), so the two cannot drift. A float (C, H, W)
    image (not 8-bit RGB) -> float (C, h, w) by the processor's `resize_float`."""

    def __init__(self, scale: tuple[int, int] = ADE20K_TEST_SCALE):
        self.scale = tuple(scale)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return resize_float(image, self.scale)
        return resize_uint8(image, self.scale)


class SegmentationDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` split -> {"pixel_values": uint8 image, "labels": int64 label map}.

    Training augmentation is seeded from (seed, epoch, index): a resumed run sees the same pixels
    whatever the DataLoader workers or prefetching did before (`set_epoch` before each epoch)."""

    def __init__(self, source, transform, image_column="image", label_column="annotation", reduce_labels=True,
                 train=True, ignore_index=IGNORE_INDEX, seed: int = 0, num_labels: int | None = None,
                 pixel_format=None):
        check_columns(source, image_column, label_column)
        self.pixel_format = pixel_format  # not 8-bit RGB: images read as float (`pixels.load_float_pixels`)
        self.source, self.transform, self.train = source, transform, train
        self.image_column, self.label_column = image_column, label_column
        self.reduce_labels, self.ignore_index = reduce_labels, ignore_index
        self.num_labels = num_labels  # None: class ids are not checked
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> dict | None:
        """The decoded example, or None when its image or annotation file cannot be decoded."""
        try:
            example = self.source[int(index)]  # `datasets` decodes the image and the annotation here
            for column in (self.image_column, self.label_column):
                if isinstance(example[column], Image.Image):
                    example[column].load()
            if self.pixel_format is not None:
                from .pixels import load_float_pixels

                example[self.image_column] = load_float_pixels(
                    example[self.image_column], self.pixel_format, lambda: self.file_name(index, self.image_column))
            return example
        except (OSError, SyntaxError, CorruptImageError) as err:  # unidentified, truncated or broken files
            logger.warning("skipped an unreadable %s example %d: %s: %s", "training" if self.train else "evaluation",
                           index, type(err).__name__, err)
            return None

    def file_name(self, index: int, column: str) -> str:
        """The file an example's image or annotation came from, for error messages (else "example i")."""
        try:
            import datasets

            raw = self.source[int(index)][column] if isinstance(self.source.features[column], datasets.Value) else (
                self.source.cast_column(column, datasets.Image(decode=False))[int(index)][column])
            if isinstance(raw, str):
                return raw
            if raw.get("path"):
                return str(raw["path"])
        except Exception:  # not a `datasets` Image column: name the example instead
            pass
        return f"example {index} of the {'training' if self.train else 'evaluation'} split"

    def check_annotation(self, index: int, image, raw: np.ndarray) -> None:
        """An annotation must cover its image pixel for pixel (one class id per image pixel)."""
        if isinstance(image, Image.Image):
            width, height = image.size
        elif isinstance(image, torch.Tensor):  # float (C, H, W)
            height, width = image.shape[-2:]
        else:
            height, width = raw.shape
        if raw.shape != (height, width):
            raise ValueError(
                f"annotation {self.file_name(index, self.label_column)} is {raw.shape[1]}x{raw.shape[0]} (width x "
                f"height) but its image {self.file_name(index, self.image_column)} is {width}x{height}"
            )

    def check_class_ids(self, index: int, raw: np.ndarray, label: np.ndarray) -> None:
        """Every class id (after `reduce_labels`) is in 0..num_labels-1 or the ignore index."""
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_labels))
        if bad.any():
            expected = (f"0 ('other'), 1..{self.num_labels} or {self.ignore_index} (reduce_labels=True)"
                        if self.reduce_labels else f"0..{self.num_labels - 1} or {self.ignore_index}")
            raise ValueError(
                f"annotation {self.file_name(index, self.label_column)} holds class id {int(raw[bad].max())}; "
                f"expected {expected} for num_labels={self.num_labels}"
            )

    def __getitem__(self, index: int) -> dict:
        """{"pixel_values", "labels", "skipped": [unreadable indices passed over]}. An unreadable
        training example is replaced by the next readable one (batches keep their size, resume stays
        exact); an unreadable evaluation example comes back as {"skipped": [index]} only."""
        index = int(index)
        tries = len(self.source) if self.train else 1
        skipped = []
        for offset in range(tries):
            used = (index + offset) % len(self.source)
            example = self._read(used)
            if example is not None:
                break
            skipped.append(used)
        else:
            if self.train:
                raise ValueError(f"none of the {len(self.source)} training examples can be decoded")
            return {"skipped": skipped}
        raw = annotation_to_array(example[self.label_column])
        self.check_annotation(used, example[self.image_column], raw)
        label = reduce_labels(raw, self.ignore_index) if self.reduce_labels else raw
        if self.num_labels is not None:
            self.check_class_ids(used, raw, label)
        if self.train:
            pixels, label_t = self.transform(example[self.image_column], label, seed=self.sample_seed(used))
        else:
            pixels, label_t = self.transform(example[self.image_column]), torch.from_numpy(label)
        return {"pixel_values": pixels, "labels": label_t, "skipped": skipped}


def segmentation_pixel_path(model_name_or_path: str | None, model_channels: int, split, image_column: str = "image",
                            token=None, progress: bool = True, adapt_channels: bool = False, probe_images: int = 8,
                            stats_images: int = 256):
    """The run's `pixels.PixelPath`: the checkpoint's pixel format and statistics (its saved image processor;
    8-bit RGB for an RGB checkpoint or preset without one), checked against the training split's first
    images; a mismatch is one line naming both unless `adapt_channels` (`pixels.resolve_pixel_path`)."""
    import datasets

    from .model_loading import read_image_processor_config
    from .pixels import resolve_pixel_path

    raw = split if isinstance(split.features[image_column], datasets.Value) else split.cast_column(
        image_column, datasets.Image(decode=False))

    def cells(count):
        values = [raw[i][image_column] for i in range(min(count, len(raw)))]
        names = [v if isinstance(v, str) else (v or {}).get("path") or f"example {i}" for i, v in enumerate(values)]
        return values, names

    probe, probe_names = cells(probe_images)
    stats, stats_names = cells(stats_images)
    config = read_image_processor_config(model_name_or_path, token=token) if model_name_or_path else None
    return resolve_pixel_path(config, model_channels, probe, probe_names,
                              checkpoint=f"the checkpoint {model_name_or_path}" if model_name_or_path else "the model",
                              data="the training images", stats_cells=stats, stats_names=stats_names,
                              progress=progress, adapt_channels=adapt_channels)


def collate_train(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]),
        "num_skipped": torch.tensor(sum(len(e["skipped"]) for e in examples)),
    }


def collate_eval(examples: list[dict]) -> dict:
    """Evaluation images keep their own sizes: lists, not stacked tensors; unreadable ones are left
    out and counted."""
    readable = [e for e in examples if "pixel_values" in e]
    return {"pixel_values": [e["pixel_values"] for e in readable], "labels": [e["labels"] for e in readable],
            "num_skipped": sum(len(e["skipped"]) for e in examples)}


# --------------------------------------------------------------------------------------------------
# A generated dataset in the ADE20K layout (tests, CPU demo)
# --------------------------------------------------------------------------------------------------
def synthetic_example(rng: np.random.Generator, size: int, num_classes: int) -> tuple[Image.Image, Image.Image]:
    """A noisy image of coloured rectangles and its annotation: 0 ("other") in the background, class
    c in [1, num_classes] for a rectangle of colour c, as in ADE20K's raw annotations."""
    palette = np.array([[90, 90, 90]] + [[(70 * c) % 256, (150 * c + 60) % 256, (40 * c + 200) % 256]
                                          for c in range(1, num_classes + 1)], dtype=np.float32)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(3):
        cls = int(rng.integers(1, num_classes + 1))
        h, w = rng.integers(size // 4, size // 2 + 1, size=2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        label[top : top + h, left : left + w] = cls
    image = palette[label] + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    return image, Image.fromarray(label, mode="L")


def write_synthetic_ade_folder(root: str | os.PathLike, num_train: int = 32, num_val: int = 8, size: int = 64,
                               num_classes: int = 4, seed: int = 0) -> Path:
    """Write `images/{training,validation}/*.jpg` + `annotations/{training,validation}/*.png`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, annotation = synthetic_example(rng, size, num_classes)
            image.save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            annotation.save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a generated segmentation dataset in the ADE20K folder layout")
    parser.add_argument("output_dir")
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--num_val", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from .demo_data import ensure_demo_data

    written = ensure_demo_data(args.output_dir, lambda folder: write_synthetic_ade_folder(
        folder, args.num_train, args.num_val, args.size, args.num_classes, args.seed), field="output_dir")
    print(f"{'wrote' if written else 'already there:'} {args.output_dir}")
