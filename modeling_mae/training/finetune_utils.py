"""Pieces of the official fine-tuning and linear-probing recipes, from maintained libraries.

Fine-tuning (paper Table 9)            | here
---------------------------------------|---------------------------------------------------------------
layer-wise lr decay 0.65 / 0.75        | `layer_decay_param_groups` (timm `param_groups_layer_decay`,
                                       |  which asks the model's `group_matcher()` / `no_weight_decay()`)
RandomResizedCrop + flip + RandAugment | `FinetuneTrainTransform` (torchvision v2 + timm `rand_augment_transform`)
(9, 0.5), uint8 on the host            |
random erasing 0.25 ("pixel" mode)     | `build_random_erasing` (timm `RandomErasing`, on the normalised
                                       |  batch, on the device)
mixup 0.8, cutmix 1.0, smoothing 0.1   | `build_mixup` (timm `Mixup`) + `build_criterion` (timm
                                       |  `SoftTargetCrossEntropy` or cross-entropy with label smoothing)

Linear probing (paper Table 10): `build_lars` (timm `Lars` set up as the official LARS: trust ratio
||w|| / ||g|| on weight matrices, none on biases, no weight decay), `ProbeHead` (the trainable
BatchNorm + Linear) and `FeatureCache` (encoder features written to disk in the first epoch so that
later epochs skip the encoder).

Shared by both scripts: `load_classifier` (`MAEForImageClassification` from a directory, a Hub id or
an official checkpoint through `modeling_mae.conversion`), map-style data (`load_map_dataset`,
`MapImageDataset` with per-example augmentation seeds, `build_classification_loaders`),
`evaluate_classifier` (top-1 / top-5 / loss through the `evaluate` module in `metrics/`, gathered
with `gather_for_metrics`), and `finish_classifier_run` (export with `id2label`, a model card of the
measured accuracy, `push_to_hub`). `make_synthetic_classification` writes the demo / test data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .transforms import IMAGENET_DEFAULT_MEAN, pil_to_uint8, to_rgb


logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def is_official_checkpoint(path: str) -> bool:
    """A single `.pth` / `.pt` file (the official repository's format), not a transformers directory."""
    return os.path.isfile(path) and str(path).endswith(OFFICIAL_CHECKPOINT_SUFFIXES)


def load_pretrained(model_cls, model_name_or_path: str, **config_overrides):
    """`model_cls` (e.g. `MAEForImageClassification`, `MAEForPreTraining`, `MAEModel`) from a pretrained MAE.

    Args:
        model_name_or_path: a directory written by `save_pretrained`, a Hub id, or an official
            checkpoint file (`mae_pretrain_vit_base.pth`, ...), converted by `modeling_mae.conversion`
            (widths of no official model need `num_attention_heads=` / `decoder_num_attention_heads=`).
        config_overrides: `MAEConfig` fields (num_labels, id2label, label2id, drop_path_rate, pooling,
            linear_probe_head, ...).
    Returns:
        the model. Loading a pretraining checkpoint into a classifier drops the decoder and
        initialises the head (fc_norm / head_norm / classifier) as the official code does.
    """
    if is_official_checkpoint(model_name_or_path):
        return _from_official_checkpoint(model_cls, model_name_or_path, **config_overrides)
    model, info = model_cls.from_pretrained(model_name_or_path, output_loading_info=True, **config_overrides)
    if info["missing_keys"]:
        logger.info("loaded %s; newly initialised: %s", model_name_or_path, sorted(info["missing_keys"]))
    return model


def load_classifier(model_name_or_path: str, **config_overrides):
    """`MAEForImageClassification` initialised from a pretrained MAE (see `load_pretrained`)."""
    from modeling_mae import MAEForImageClassification

    return load_pretrained(MAEForImageClassification, model_name_or_path, **config_overrides)


def _from_official_checkpoint(model_cls, path: str, **config_overrides):
    """Official facebookresearch/mae `.pth` -> `model_cls`, through `modeling_mae.conversion`.

    Checkpoint parts the target has no place for (the decoder, the final norm of a mean-pooling
    classifier) are dropped, as the official fine-tuning code's non-strict load does; parts the
    checkpoint lacks (a new head) are initialised and warned about by the converter."""
    from modeling_mae.conversion import convert_official_to_mae, load_checkpoint

    checkpoint = load_checkpoint(path)
    _, model = convert_official_to_mae(
        checkpoint.state_dict,
        model_class=model_cls.__name__,
        checkpoint_args=checkpoint.args,
        allow_unexpected=True,
        **config_overrides,
    )
    return model


def label_maps(names: list[str]) -> dict:
    """`id2label` / `label2id` config fields for class `names` (index order)."""
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------
def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay, from timm's `param_groups_layer_decay`.

    Layer i (0 = embeddings, b + 1 = encoder block b, L + 1 = fc_norm / head) gets
    `lr * layer_decay ** (L + 1 - i)`, the official scale; no weight decay on biases, norms, the CLS
    token and the position table (`model.no_weight_decay()`). Each group keeps its `lr_scale`.
    """
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay
    )
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def build_lars(params: list[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Lars:
    """timm `Lars` configured as the official MAE linear-probe LARS.

    Weight matrices: update scaled by the trust ratio ||w|| / (||g|| + wd * ||w||) (trust coefficient
    1, adapted even without weight decay; with the recipe's wd = 0 this is the official ||w|| / ||g||).
    Biases and other 1-d tensors: plain SGD with momentum and no weight decay.
    """
    matrices = [p for p in params if p.requires_grad and p.ndim > 1]
    vectors = [p for p in params if p.requires_grad and p.ndim <= 1]
    groups = [
        dict(params=matrices, weight_decay=weight_decay, always_adapt=True),
        dict(params=vectors, weight_decay=0.0, always_adapt=False),
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=1.0, eps=0.0)


# --------------------------------------------------------------------------------------------------
# Augmentation and loss
# --------------------------------------------------------------------------------------------------
def _posterize(image, bits_to_keep: int, **_):
    """Posterize that accepts 0 bits (a black image, what Pillow < 12 and TF's RandAugment give)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def allow_zero_bit_posterize(rand_augment):
    """timm's "PosterizeIncreasing" keeps 4 - int(0.4 * magnitude) bits: 0 at magnitude 10, which the
    recipe's magnitude noise (9 +- 0.5, clipped to 10) reaches; Pillow >= 12 rejects 0 bits with a
    ValueError. Swap in `_posterize` for the posterize ops of this RandAugment instance only."""
    for op in getattr(rand_augment, "ops", []):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return rand_augment


class FinetuneTrainTransform:
    """RandomResizedCrop(size, scale 0.08-1, bicubic) + flip + RandAugment -> uint8 (3, H, W).

    `auto_augment` is a timm RandAugment spec ("rand-m9-mstd0.5-inc1" = magnitude 9, std 0.5, the
    official recipe); None or "" disables it. Random erasing and Mixup/CutMix act later, on the
    normalised batch on the device.
    """

    def __init__(self, size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1", scale=(0.08, 1.0),
                 hflip: float = 0.5, mean=IMAGENET_DEFAULT_MEAN):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        ops = [
            v2.RandomResizedCrop(
                self.size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
        if auto_augment:
            from PIL import Image

            hparams = dict(
                translate_const=int(min(self.size) * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=Image.BICUBIC,
            )
            ops.append(allow_zero_bit_posterize(rand_augment_transform(auto_augment, hparams)))
        self.ops = v2.Compose(ops)

    def __call__(self, image) -> torch.Tensor:
        return pil_to_uint8(self.ops(to_rgb(image)))


class LinprobeTrainTransform:
    """The official linear-probe augmentation: RandomResizedCrop(size, scale 0.08-1, bicubic) + flip."""

    def __init__(self, size: int, hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ops = v2.Compose([
            v2.RandomResizedCrop(self.size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(hflip),
        ])

    def __call__(self, image) -> torch.Tensor:
        return pil_to_uint8(self.ops(to_rgb(image)))


def build_random_erasing(prob: float, device) -> RandomErasing | None:
    """timm RandomErasing in "pixel" mode (per-pixel normal noise), one box, applied per sample to a
    normalised (N, C, H, W) batch on `device`; None when `prob` is 0."""
    if prob <= 0:
        return None
    return RandomErasing(probability=prob, mode="pixel", max_count=1, device=str(device))


def build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int, prob: float = 1.0,
                switch_prob: float = 0.5, mode: str = "batch"):
    """timm `Mixup` (which also applies label smoothing to its soft targets); None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(mixup_active: bool, label_smoothing: float) -> nn.Module:
    """Soft-target cross-entropy after Mixup/CutMix (smoothing already in the targets), otherwise
    cross-entropy with `label_smoothing`."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def prepare_mixup_batch(mixup, images: torch.Tensor, labels: torch.Tensor):
    """Mixup/CutMix needs an even batch: drop the odd last sample of a ragged batch."""
    if mixup is None:
        return images, labels
    if images.shape[0] % 2:
        images, labels = images[:-1], labels[:-1]
    return mixup(images, labels)


# --------------------------------------------------------------------------------------------------
# Linear probe: feature cache
# --------------------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """The trainable part of a linear probe: `head_norm` (BatchNorm1d, affine=False) + `classifier`,
    the very modules of the `MAEForImageClassification` it is built from (shared, not copied), so
    that only they go through `accelerator.prepare` / DDP while the frozen encoder stays outside."""

    def __init__(self, model):
        super().__init__()
        if model.head_norm is None:
            raise ValueError("the linear probe needs `linear_probe_head=True` (BatchNorm1d before the classifier)")
        self.head_norm = model.head_norm
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) frozen features -> (N, num_labels) logits."""
        return self.classifier(self.head_norm(features))


class FeatureCache:
    """Encoder features of this process's training samples, kept on disk after the first full epoch.

    The encoder is frozen, so its features only change with the augmentation: with the cache on,
    each sample keeps the augmented view it had in the cached epoch (later epochs reshuffle, but
    re-use those views) - the price of skipping the encoder. Files: `{directory}/rank{r}.pt` with
    "features" (M, D) float32 and "labels" (M,), and `rank{r}.json`, the key (what the cache was made
    from; a cache of another model, dataset or process count is refused).
    """

    def __init__(self, directory: str | Path, process_index: int, key: dict):
        self.path = Path(directory) / f"rank{process_index}.pt"
        self.key = key
        self._features: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def exists(self) -> bool:
        import json

        key_file = self.path.with_suffix(".json")
        if not (self.path.is_file() and key_file.is_file()):
            return False
        found = json.loads(key_file.read_text())
        if found != self.key:
            raise ValueError(f"feature cache {self.path} was made for {found}, not {self.key}; delete it or "
                             f"set another `feature_cache_dir`")
        return True

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._features.append(features.detach().float().cpu())
        self._labels.append(labels.detach().cpu())

    def discard(self) -> None:
        self._features, self._labels = [], []

    def save(self) -> None:
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"features": torch.cat(self._features), "labels": torch.cat(self._labels)}, tmp)
        os.replace(tmp, self.path)  # a crash never leaves a half-written cache under the real name
        self.path.with_suffix(".json").write_text(json.dumps(self.key))  # written last: marks it complete
        self.discard()

    def dataloader(self, batch_size: int, seed: int, epoch: int) -> torch.utils.data.DataLoader:
        """Shuffled (features, labels) batches of the cached epoch, a fresh order per epoch; the last
        incomplete batch is dropped, so every process runs as many steps as over the images."""
        data = torch.load(self.path, weights_only=True)
        dataset = torch.utils.data.TensorDataset(data["features"], data["labels"])
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                           generator=generator)


# --------------------------------------------------------------------------------------------------
# Map-style data for evaluation and feature extraction
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Evaluation through `evaluate`
# --------------------------------------------------------------------------------------------------
METRICS_DIR = Path(__file__).resolve().parents[2] / "metrics"


def load_metric(name: str = "top_k_accuracy"):
    """One of the project's `evaluate` modules (`metrics/<name>/<name>.py`), loaded offline by path.

    `keep_in_memory=True`: every process keeps its own copy (no shared cache files to lock); the
    loop adds the *gathered* predictions, so every process computes the same value."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"metric module {name!r} not found at {path} (the repository's metrics/ folder)")
    return evaluate.load(str(path), keep_in_memory=True)


@torch.no_grad()
def evaluate_classifier(logits_fn, loader, accelerator, num_labels: int, metric=None) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy over a prepared evaluation DataLoader.

    Args:
        logits_fn: uint8 batch (N, C, H, W) on the device -> logits (N, num_labels).
        loader: yields (pixel_values uint8, labels, ids), prepared with `even_batches=True`, so every
            process runs the same number of batches; `gather_for_metrics` then drops the padded
            duplicates of the last batch, and every example is counted exactly once.
    Returns:
        {"top1": %, "top5": %, "loss": mean cross-entropy, "num_examples": n}. top-5 becomes top-k with
        k = num_labels when there are fewer than 5 classes.
    """
    metric = metric or load_metric("top_k_accuracy")
    top5 = min(5, num_labels)
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for pixel_values, labels, _ in loader:
        logits = logits_fn(pixel_values).float()
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        logits, labels, losses = accelerator.gather_for_metrics((logits, labels, losses))
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
        total_loss += losses.double().sum()
        count += labels.shape[0]
    scores = metric.compute(k=sorted({1, top5}))
    return {
        "top1": 100.0 * scores["top1_accuracy"],
        "top5": 100.0 * scores[f"top{top5}_accuracy"],
        "loss": float(total_loss) / max(count, 1),
        "num_examples": count,
    }


# --------------------------------------------------------------------------------------------------
# Model card with the measured accuracy
# --------------------------------------------------------------------------------------------------
CLASSIFIER_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

`MAEForImageClassification` ({{ method }}) from the MAE encoder `{{ base_model }}`, trained with
`scripts/{{ script }}` of modeling_mae on **{{ dataset_name }}**.

## Results (measured by the training run)

| split | examples | top-1 | top-5 | loss |
|---|---|---|---|---|
| {{ eval_split }} | {{ num_examples }} | {{ top1 }} | {{ top5 }} | {{ loss }} |

Best top-1 at epoch {{ best_epoch }} of {{ epochs }}; {{ kept }}.

## Use

```python
import modeling_mae  # or pass trust_remote_code=True
from transformers import pipeline

classifier = pipeline("image-classification", model="{{ repo_id }}", trust_remote_code=True)
classifier("cat.jpg")
```

## Training config

```yaml
{{ config_yaml }}```
"""


def write_classifier_card(output_dir, *, repo_id: str, base_model: str, dataset_name: str, eval_split: str,
                          results: dict, best_epoch: int, epochs: int, script: str, method: str,
                          config_yaml: str, kept: str) -> Path:
    """README.md with the measured top-1 / top-5 (also as `model-index` eval results)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = [("accuracy", "top-1 accuracy", results["top1"]), ("top_5_accuracy", "top-5 accuracy", results["top5"])]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["mae", "vision", "image-classification", "modeling_mae"],
        datasets=[dataset_name] if dataset_name and not Path(dataset_name).exists() else None,
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        model_name=repo_id,
        eval_results=[
            EvalResult(task_type="image-classification", dataset_type=dataset_name, dataset_name=dataset_name,
                       dataset_split=eval_split, metric_type=kind, metric_name=name, metric_value=round(value, 3))
            for kind, name, value in metrics
        ],
    )
    card = ModelCard.from_template(
        data, template_str=CLASSIFIER_CARD_TEMPLATE, model_name=repo_id, base_model=base_model,
        dataset_name=dataset_name, eval_split=eval_split, num_examples=results["num_examples"],
        top1=f"{results['top1']:.2f}%", top5=f"{results['top5']:.2f}%", loss=f"{results['loss']:.4f}",
        best_epoch=best_epoch, epochs=epochs, repo_id=repo_id, script=script, method=method,
        config_yaml=config_yaml, kept=kept,
    )
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


# --------------------------------------------------------------------------------------------------
# The data both downstream scripts read
# --------------------------------------------------------------------------------------------------
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
    )
    eval_loader = torch.utils.data.DataLoader(
        MapImageDataset(splits.validation, eval_transform, splits.image_column, splits.label_column),
        batch_size=cfg.per_device_eval_batch_size, shuffle=False, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
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


def finish_classifier_run(accelerator, model, cfg, state: dict, script: str, method: str) -> int:
    """After training: the last model in `output_dir` (best one already in `output_dir/best`), both
    with `id2label` and a model card of their measured accuracy, `eval_results.json`, and the Hub push.
    Returns the exit code (1 when the push failed; the local output is complete either way)."""
    import json

    from .config import to_yaml
    from .export import HubPushError, export_model, push_to_hub

    full_state_dict = accelerator.get_state_dict(model)  # a collective: every process
    accelerator.wait_for_everyone()
    exit_code = 0
    if accelerator.is_main_process:
        last = state["history"][-1]
        best = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
        output = export_model(accelerator.unwrap_model(model), cfg.output_dir, state_dict=full_state_dict)
        summary = {"last": last, "best": best, "history": state["history"]}
        (output / "eval_results.json").write_text(json.dumps(summary, indent=2))
        card = dict(
            repo_id=cfg.hub_model_id or Path(cfg.output_dir).name, base_model=cfg.model_name_or_path,
            dataset_name=cfg.dataset_name or cfg.train_dir, eval_split=cfg.validation_split,
            best_epoch=state["best_epoch"], epochs=cfg.num_train_epochs, script=script, method=method,
            config_yaml=to_yaml(cfg),
        )
        write_classifier_card(output, results=last, kept="this directory holds the last epoch's model, the best "
                              "one is in `best/`", **card)
        if (output / "best").is_dir():
            write_classifier_card(output / "best", results=best, kept="this directory holds the best epoch's "
                                  "model", **card)
        logger.info("last epoch: top-1 %.2f%%, best: top-1 %.2f%% (epoch %d); exported to %s",
                    last["top1"], best["top1"], state["best_epoch"], output)
        if cfg.push_to_hub:
            try:
                url = push_to_hub(output, cfg.hub_model_id, cfg.hub_include_checkpoints, cfg.hub_private_repo,
                                  cfg.hub_token, commit_message=f"MAE {method}: top-1 {last['top1']:.2f}%")
                logger.info("pushed to %s", url)
            except HubPushError as err:
                logger.error("%s", err)
                exit_code = 1
    accelerator.wait_for_everyone()
    return exit_code
