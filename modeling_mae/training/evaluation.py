"""Classifier evaluation through the project's offline `evaluate` modules (`metrics/`), gathered over
processes with `gather_for_metrics` so that every example counts exactly once."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


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
def evaluate_classifier(logits_fn, loader, accelerator, num_labels: int, metric=None, unreadable=None) -> dict:
    """Top-1 / top-5 accuracy, per-class top-1 and mean cross-entropy over a prepared evaluation DataLoader.

    Args:
        logits_fn: uint8 batch (N, C, H, W) on the device -> logits (N, num_labels).
        loader: yields (pixel_values uint8, labels, index used, index asked) (`MapImageDataset`),
            prepared with `even_batches=True`, so every process runs the same number of batches;
            `gather_for_metrics` then drops the padded duplicates of the last batch, and every
            example is counted exactly once. Unreadable images come as placeholders (index used
            -1): they are dropped after the gather, and counted.
        unreadable: an `UnreadableImages` of the split (logs each skipped file, stops past its share).
    Returns:
        {"top1": %, "top5": %, "loss": mean cross-entropy, "num_examples": n (readable),
        "num_unreadable": m, "per_class": [[correct, total] per class]}. top-5 becomes top-k with
        k = num_labels when there are fewer than 5 classes.
    """
    metric = metric or load_metric("top_k_accuracy")
    top5 = min(5, num_labels)
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    per_class = torch.zeros(num_labels, 2, dtype=torch.long)
    count, skipped = 0, 0
    for pixel_values, labels, used, asked in loader:
        logits = logits_fn(pixel_values).float()
        logits, labels, used, asked = accelerator.gather_for_metrics((logits, labels, used, asked))
        if unreadable is not None:
            unreadable.record(used.cpu(), asked.cpu())
        keep = used >= 0
        skipped += int((~keep).sum())
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            continue
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
        correct = (logits.argmax(-1) == labels).long().cpu()
        per_class[:, 0] += torch.bincount(labels.cpu(), weights=correct, minlength=num_labels).long()
        per_class[:, 1] += torch.bincount(labels.cpu(), minlength=num_labels)
        count += labels.shape[0]
    if count == 0:
        raise ValueError("no validation image could be decoded: nothing to evaluate")
    scores = metric.compute(k=sorted({1, top5}))
    return {
        "top1": 100.0 * scores["top1_accuracy"],
        "top5": 100.0 * scores[f"top{top5}_accuracy"],
        "loss": float(total_loss) / max(count, 1),
        "num_examples": count,
        "num_unreadable": skipped,
        "per_class": per_class.tolist(),
    }


def format_epoch_line(epoch: int, train_loss: float | None, results: dict, num_labels: int) -> str:
    """One log line per epoch: training loss, validation top-1 (top-5 only with more than 5 classes), loss."""
    parts = [f"epoch {epoch}"]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f}")
    parts.append(f"top-1 {results['top1']:.2f}%")
    if num_labels > 5:
        parts.append(f"top-5 {results['top5']:.2f}%")
    parts.append(f"val loss {results['loss']:.4f} ({results['num_examples']} images")
    if results.get("num_unreadable"):
        parts[-1] += f", {results['num_unreadable']} unreadable skipped"
    parts[-1] += ")"
    return ", ".join(parts)


def format_per_class(names: list[str], per_class: list) -> str:
    """"cat 18/20 (90.0%), coffee ...": the per-class top-1 of the last evaluation."""
    return ", ".join(f"{name} {c}/{t} ({100.0 * c / t:.1f}%)" if t else f"{name} -/0"
                     for name, (c, t) in zip(names, per_class))


class EpochLoss:
    """The mean training loss of the current epoch over every process, exact across a resume.

    `add(loss)` per micro-batch (no synchronisation); `flush(accelerator)` (a collective) folds the
    processes' sums into the carried total, which checkpoints keep (`state_dict`), so that an epoch
    resumed mid-way reports the mean of all its batches, as the uninterrupted run does."""

    def __init__(self):
        self.local_sum, self.local_count = 0.0, 0
        self.carried = [0.0, 0]

    def reset(self) -> None:
        self.local_sum, self.local_count, self.carried = 0.0, 0, [0.0, 0]

    def add(self, loss: torch.Tensor) -> None:
        self.local_sum = self.local_sum + loss.detach().float()
        self.local_count += 1

    def flush(self, accelerator) -> None:
        local = torch.stack([torch.as_tensor(self.local_sum, dtype=torch.float64, device=accelerator.device),
                             torch.tensor(float(self.local_count), dtype=torch.float64, device=accelerator.device)])
        total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        self.carried = [self.carried[0] + float(total[0]), self.carried[1] + int(total[1])]
        self.local_sum, self.local_count = 0.0, 0

    def mean(self, accelerator) -> float | None:
        self.flush(accelerator)
        return self.carried[0] / self.carried[1] if self.carried[1] else None

    def state_dict(self) -> list:
        return list(self.carried)

    def load_state_dict(self, state) -> None:
        self.carried = list(state) if state else [0.0, 0]
