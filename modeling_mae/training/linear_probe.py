"""The linear probe's trainable head (`ProbeHead`) and its on-disk cache of frozen encoder features
(`FeatureCache`), so that epochs after the first skip the encoder."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn


logger = logging.getLogger(__name__)


def weights_digest(module: nn.Module) -> str:
    """A hash of every parameter and buffer of `module` (names, shapes, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_digest(source, image_column: str, label_column: str, lookup: dict | None) -> str:
    """A hash of what a split feeds the encoder: the dataset's fingerprint (`datasets` changes it with
    the data files and every operation), each image file's path, size and modification time (for
    images stored as paths, e.g. image folders), and every example's training label id."""
    import pyarrow.compute as pc

    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(getattr(source, "_fingerprint", "")).encode())
    column = source.data.column(image_column)
    try:
        paths = pc.struct_field(column, "path")  # reads no image bytes
    except Exception:  # not an {bytes, path} struct
        paths = None
    if paths is not None:
        indices = getattr(source, "_indices", None)
        if indices is not None:  # a `select`ed view
            paths = paths.take(indices.column(0))
        for path in paths.to_pylist():
            if path and os.path.isfile(path):
                info = os.stat(path)
                digest.update(f"{path}|{info.st_size}|{info.st_mtime_ns}\n".encode())
            else:
                digest.update(f"{path}\n".encode())
    for value in source[label_column]:
        digest.update(f"{lookup[value] if lookup is not None else value},".encode())
    return digest.hexdigest()


def feature_cache_key(encoder: nn.Module, splits, transform, processes: int, batch_size: int, seed: int,
                      dataset: str, mixed_precision: str) -> dict:
    """Everything the cached features and labels depend on: the encoder's weights, the training
    images (files, sizes, modification times) and their label ids, the transform and image size, the
    seed (the cached augmented views), the precision, and the sharding over processes."""
    ops = getattr(transform, "ops", None)
    return {
        "model": weights_digest(encoder),
        "dataset": str(dataset),
        "data": data_digest(splits.train, splits.image_column, splits.label_column, splits.train_lookup),
        "examples": len(splits.train),
        "classes": list(splits.class_names),
        "transform": f"{type(transform).__name__}(size={getattr(transform, 'size', None)}) {ops!r}",
        "seed": int(seed),
        "mixed_precision": str(mixed_precision),
        "processes": int(processes),
        "batch": int(batch_size),
    }


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
    "features" (M, D) float32 and "labels" (M,), and `rank{r}.json`, the key (`feature_cache_key`:
    what the cache was made from; a cache of other weights, images, labels or transform is rebuilt).
    """

    def __init__(self, directory: str | Path, process_index: int, key: dict):
        self.path = Path(directory) / f"rank{process_index}.pt"
        self.key = key
        self._features: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def exists(self) -> bool:
        """True when a complete cache made from this very `key` is on disk. A cache made from anything
        else (other weights, images, labels, transform, ...) is stale: it is named in the log, removed,
        and rebuilt by this run."""
        import json

        key_file = self.path.with_suffix(".json")
        if not (self.path.is_file() and key_file.is_file()):
            return False
        found = json.loads(key_file.read_text())
        if found != self.key:
            changed = sorted(k for k in set(found) | set(self.key) if found.get(k) != self.key.get(k))
            logger.warning("feature cache %s was made from other %s: rebuilding it", self.path.parent,
                           ", ".join(changed))
            key_file.unlink()
            self.path.unlink()
            return False
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
