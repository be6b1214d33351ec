"""The linear probe's trainable head (`ProbeHead`) and its on-disk cache of frozen encoder features
(`FeatureCache`), so that epochs after the first skip the encoder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


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
