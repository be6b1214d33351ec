"""The run's story: every logged and evaluated value by step, kept in OUTPUT_DIR/history.jsonl, and drawn
at the end as OUTPUT_DIR/training_curves.png (loss against the trivial predictor's, k-NN top-1 from step 0,
learning rate).

    history = RunHistory(output_dir)          # reads what an earlier (resumed) run wrote
    history.truncate(resumed_step)            # a resumed run drops what came after its checkpoint
    history.append(step, {"train/loss": 0.41, "train/trivial_loss": 1.0, "knn/cls_top1": 35.2})
    plot_training_curves(history.rows, "training_curves.png")

One JSON object a line, written by the main process only, flushed at once: a killed run loses nothing
that a resumed one would not write again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunHistory:
    """history.jsonl of an output folder: rows {"step": int, name: float, ...} in step order."""

    FILE = "history.jsonl"

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path = Path(output_dir) / self.FILE
        self.enabled = enabled
        self.rows: list[dict] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: what follows is written again
                    break

    def truncate(self, step: int) -> None:
        """Keep the rows up to `step` (a run resumed from the checkpoint of `step`); a fresh run: step 0
        keeps nothing but a step-0 row."""
        self.rows = [row for row in self.rows if row["step"] <= step]
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def append(self, step: int, values: dict) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in values.items() if isinstance(v, (int, float))}}
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, in step order, non-finite values left out."""
        points = [(row["step"], row[name]) for row in self.rows if name in row and math.isfinite(row[name])]
        return [s for s, _ in points], [v for _, v in points]

    def first_and_last(self, name: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        steps, values = self.series(name)
        return ((steps[0], values[0]), (steps[-1], values[-1])) if steps else None


def plot_training_curves(history: RunHistory, path: str | Path, title: str = "MAE pretraining") -> Path | None:
    """training_curves.png: (1) loss and the trivial predictor's loss, (2) k-NN top-1 (CLS and mean-pooled,
    from step 0) and the online probe when there are any, (3) learning rate; None when nothing was logged."""
    from matplotlib.figure import Figure  # no pyplot: no display needed, a notebook's own backend untouched

    loss = history.series("train/loss")
    if not loss[0]:
        return None
    knn = {name: history.series(name) for name in ("knn/cls_top1", "knn/mean_top1", "probe/top1")}
    knn = {name: s for name, s in knn.items() if s[0]}
    panels = 2 + bool(knn)
    fig = Figure(figsize=(4.2 * panels, 3.4), dpi=110)
    axes = fig.subplots(1, panels)
    ax = axes[0]
    ax.plot(*loss, label="loss", color="tab:blue")
    trivial = history.series("train/trivial_loss")
    if trivial[0]:
        ax.plot(*trivial, label="trivial predictor", color="tab:gray", linestyle="--")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    if knn:
        ax = axes[1]
        labels = {"knn/cls_top1": "k-NN top-1, CLS", "knn/mean_top1": "k-NN top-1, mean-pooled",
                  "probe/top1": "online probe top-1"}
        for name, (steps, values) in knn.items():
            ax.plot(steps, values, marker="o", markersize=3, label=labels[name])
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_title("k-NN accuracy (held-out queries)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ax.plot(*history.series("train/lr"), color="tab:green")
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
