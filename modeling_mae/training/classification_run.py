"""What fine-tuning and linear probing share around the training loop (`loop.TrainingLoop`): the trainer
state of an epoch-wise classifier run, its checkpoints, the evaluation after every epoch (top-1 / top-5 /
loss, the best model kept in `output_dir/best`) and the export at the end.

    run = ClassifierRun(accelerator, cfg, checkpoints, splits)
    run.restore(resume)
    run.train(model, optimizer, scheduler, steps_per_epoch, micro_batches, loss_of, end_of_epoch, stop)
    return run.finish(model, script="finetune.py", method="fine-tuned", image_processor=processor)
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from .classification_data import UnreadableImages, make_synthetic_classification, report_class_balance
from .config import to_yaml
from .demo_data import ensure_demo_data
from .evaluation import EpochLoss, evaluate_classifier, format_epoch_line, format_per_class, load_metric
from .loop import TrainingLoop, restore


logger = logging.getLogger(__name__)

# create_demo_data: the synthetic 4-class folders, written here once
DEMO_CLASSIFICATION_DIRS = {"train_dir": "outputs/demo_cls/train", "validation_dir": "outputs/demo_cls/validation"}


def write_demo_classification(accelerator, cfg, demo_dirs: dict) -> None:
    """The demo's synthetic 4-class folders (96 / 32 images a class), once, by the main process."""
    if demo_dirs and accelerator.is_main_process:
        for field_name, count, seed in (("train_dir", 96, 0), ("validation_dir", 32, 1)):
            ensure_demo_data(getattr(cfg, field_name), functools.partial(
                make_synthetic_classification, num_per_class=count, seed=seed), field=field_name)
    accelerator.wait_for_everyone()


class ClassifierRun:
    """The trainer state of a classifier trained for `num_train_epochs` and evaluated after each.

    `state` (saved in every checkpoint): step, epoch, best top-1 and its epoch, the per-epoch history
    and per-class counts, the unreadable training images; the epoch's running loss is kept exact
    across a resume (`EpochLoss`). `log`: the script's logger, for the epoch lines."""

    def __init__(self, accelerator, cfg, checkpoints, splits, log: logging.Logger = logger):
        self.accelerator, self.cfg, self.checkpoints, self.splits = accelerator, cfg, checkpoints, splits
        self.log = log  # the script's logger: the epoch lines are the script's
        self.names = splits.class_names
        self.balance_warnings = report_class_balance(self.names, splits.train_counts)
        self.bad_train = UnreadableImages(splits.train, splits.image_column, "training", cfg.max_corrupt_fraction)
        self.bad_val = UnreadableImages(splits.validation, splits.image_column, "validation", cfg.max_corrupt_fraction,
                                        log=accelerator.is_main_process)
        self.metric = load_metric("top_k_accuracy")
        self.epoch_loss = EpochLoss()
        self.state = {"step": 0, "epoch": 0, "best_top1": -1.0, "best_epoch": -1, "history": [],
                      "unreadable_train": [], "per_class": {}}

    def restore(self, resume: Path | None) -> None:
        restore(self.accelerator, self.checkpoints, resume, self.state)
        if resume is not None:
            self.bad_train.load_state_dict(self.state.get("unreadable_train"))
            self.epoch_loss.load_state_dict(self.state.get("epoch_loss"))

    def save(self) -> Path:
        """A checkpoint of this step (a collective: every process saves at the same steps)."""
        self.bad_train.merge(self.accelerator)
        self.state["unreadable_train"] = self.bad_train.state_dict()
        self.epoch_loss.flush(self.accelerator)
        self.state["epoch_loss"] = self.epoch_loss.state_dict()
        return self.checkpoints.save(self.accelerator, self.state["step"], trainer_state=self.state,
                                     config_yaml=to_yaml(self.cfg))

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        """A new epoch's loss starts at zero (not one resumed mid-way)."""
        if self.state["step"] <= epoch * steps_per_epoch:
            self.epoch_loss.reset()

    def train(self, model, optimizer, scheduler, steps_per_epoch: int, micro_batches, loss_of, end_of_epoch,
              stop) -> None:
        """`num_train_epochs` epochs of `steps_per_epoch` optimizer steps, a checkpoint after each epoch."""
        def log_epoch(step: int, logs: dict) -> None:
            logs["epoch"] = (step - 1) // steps_per_epoch

        TrainingLoop(
            self.accelerator, model, optimizer, scheduler, self.cfg, state=self.state,
            steps_per_epoch=steps_per_epoch, max_steps=steps_per_epoch * self.cfg.num_train_epochs,
            num_epochs=self.cfg.num_train_epochs, micro_batches=micro_batches, loss_of=loss_of, save=self.save,
            stop=stop, checkpoints=self.checkpoints, end_of_epoch=end_of_epoch, checkpoint_every_epoch=True,
            on_log=log_epoch,
        ).run(start_epoch=self.state["epoch"])

    def evaluate_epoch(self, epoch: int, logits_of, eval_loader, export_best) -> dict:
        """Top-1 / top-5 / loss on the validation split after `epoch`, logged and kept in the history;
        `export_best()` when the top-1 is the best so far."""
        results = evaluate_classifier(logits_of, eval_loader, self.accelerator, len(self.names), self.metric,
                                      unreadable=self.bad_val)
        train_loss = self.epoch_loss.mean(self.accelerator)
        state = self.state
        state["epoch"] = epoch + 1
        state["per_class"][str(epoch + 1)] = results.pop("per_class")  # [[correct, total] per class]
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, **results})
        self.log.info("%s", format_epoch_line(epoch + 1, train_loss, results, len(self.names)))
        if self.cfg.with_tracking:
            self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state["step"])
        if results["top1"] > state["best_top1"]:
            state["best_top1"], state["best_epoch"] = results["top1"], epoch + 1
            export_best()
        return results

    def finish(self, model, script: str, method: str, image_processor) -> int:
        """The last model, its card with the measured accuracy, eval_results.json, the Hub; the exit code."""
        from .classifier_export import finish_classifier_run

        state = self.state
        if state["history"]:
            last_per_class = state["per_class"][str(state["epoch"])]
            self.log.info("per-class top-1 (last epoch): %s", format_per_class(self.names, last_per_class))
        self.bad_train.merge(self.accelerator)
        state["unreadable_train"] = self.bad_train.state_dict()
        exit_code = finish_classifier_run(self.accelerator, model, self.cfg, state, script=script, method=method,
                                          splits=self.splits, image_processor=image_processor,
                                          data_warnings=self.balance_warnings)
        self.accelerator.end_training()
        return exit_code
