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
