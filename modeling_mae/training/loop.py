"""The training loop of the four training scripts (pretraining, fine-tuning, linear probing, segmentation),
written once.

Every script supplies what is its own (model, data, the loss of a micro-batch, evaluation, export) and
`TrainingLoop.run` does the rest, in this order, for every optimizer step:

    micro-batches  `gradient_accumulation_steps` of them, each under `accelerator.accumulate(model)`
                   (accelerate's accumulation: the gradients sync, the optimizer steps and zeroes only on
                   the last one); `accelerator.backward(loss)` divides the loss by their number
    clip           `max_grad_norm` (unset: none), on the synchronised gradients only
    schedule       one scheduler step per optimizer step
    guard          optional: a NaN/inf step skipped and counted (`NonFiniteGuard`; pretraining)
    observe        at logging steps only (the loop's one host sync): the mean loss of the steps since
                   the last log line over the processes, the lr, the script's own values (`on_log`),
                   tqdm, trackers
    evaluate       every `eval_steps` and at the last step (`evaluate`), or at each epoch end (`end_of_epoch`)
    persist        a checkpoint every `checkpointing_steps` (`save`), at each epoch end where the script
                   evaluates per epoch (`checkpoint_every_epoch`), after the last step (`checkpoint_at_end`)
    stop           SIGTERM / Ctrl-C: the step finishes, the checkpoint is written, the process exits with
                   the resume command (`GracefulStop`; on several processes its flag is read one step late,
                   so no step waits on the reduction)

An epoch is `steps_per_epoch` optimizer steps (an incomplete last group of micro-batches is dropped),
or, for a stream (`steps_per_epoch=None`), as long as its micro-batches last; a run resumed mid-epoch
skips the micro-batches already trained on (`micro_batches(epoch, skip)`; a stream resumes itself).

`start_run`, `restore` and `start_trackers` are the set-up around it that every script shares: logging,
the Accelerator (mixed precision, trackers, accumulation), the output directory's owner and resume
checks, the resolved config printed; then the checkpoint loaded and the trackers started.
`compile_model`: `--torch_compile`, in place.

Right on GPUs by construction: losses stay on the device until a logging step; the stop flag of several
processes travels over a CPU group, read one step late (`GracefulStop.poll`); the scripts build AdamW
after the model is on its device (fused), and copy pinned batches with `non_blocking`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


logger = logging.getLogger(__name__)


def start_run(cfg, make_accelerator, print_config: bool = True):
    """Logging, the Accelerator, the output directory's checks: (accelerator, checkpoints, resume path or None).

    `make_accelerator`: `runtime.make_accelerator` as the script names it (tests record what it makes).
    Before anything is written (the script has checked the Hub login first, `export.check_hub_access`): an
    output directory holding another run's results refused, a resumed config compared with the checkpoint's."""
    from .checkpoint import CheckpointManager
    from .config import to_yaml
    from .runtime import quiet_library_loggers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_library_loggers()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.with_tracking, cfg.report_to,
                                   gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    checkpoints = CheckpointManager(cfg.output_dir, keep_last=cfg.checkpoints_total_limit)
    resume = checkpoints.begin(accelerator, cfg)
    if print_config and accelerator.is_main_process:
        print(f"# resolved config\n{to_yaml(cfg)}", flush=True)
    return accelerator, checkpoints, resume


def restore(accelerator, checkpoints, resume: Path | None, state: dict) -> dict:
    """`state` updated from the checkpoint `resume` (model, optimizer, scheduler and RNG states restored
    with it); `state` unchanged when there is none. Returns this process's own saved state ({} if none)."""
    if resume is None:
        return {}
    trainer_state, process_state = checkpoints.load(accelerator, resume)
    accelerator.step = 0  # checkpoints end an optimizer step: count micro-batches afresh (the accumulation may differ)
    state.update(trainer_state)
    logger.info("resumed from %s at step %d", resume, state["step"])
    return process_state


def start_trackers(accelerator, cfg, project: str, **extra) -> None:
    """The trackers of `report_to` with the run's config as hyperparameters (`with_tracking` only)."""
    from .runtime import tracker_hparams

    if cfg.with_tracking:
        accelerator.init_trackers(project, config=tracker_hparams(cfg, **extra))


def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile` in place (`--torch_compile`): parameter names (checkpoints, export) stay the plain model's."""
    if enabled:
        model.compile()
    return model


class TrainingLoop:
    """Optimizer steps over micro-batches with accumulation, logging, evaluation, checkpoints and stop.

    What the script supplies:

    - `micro_batches(epoch, skip) -> Iterable`: the epoch's micro-batches (shuffled for `epoch`), the first
      `skip` left out (already trained on before a resume); called at the start of every epoch, so it
      also sets train mode and per-epoch seeds.
    - `loss_of(batch) -> Tensor`: the micro-batch's scalar loss, fp32, from the forward pass (the loop
      runs it under `accumulate` and does the backward).
    - `save() -> Path`: write a checkpoint of `state["step"]` (every process calls it).
    - `evaluate(step)` with `eval_steps`: evaluation every N optimizer steps and at the last one.
    - `end_of_epoch(epoch)`: what follows each epoch (evaluation, keeping the best model); the loop then
      checkpoints (`checkpoint_every_epoch`).
    - `on_log(step, logs)`: the script's own values at a logging step (`logs` holds `train/loss`, the
      mean over the steps since the last log line and the processes, and `train/lr`); it may add to `logs`.
    - `on_step_end(step)`: after the step's checkpoint, before the stop check (pictures, test hooks).
    - `guard` (`runtime.NonFiniteGuard`): a step whose loss or gradient norm is NaN/inf on any process is
      skipped (no update, no schedule step) and counted, the run stops after too many in a row, and no
      periodic checkpoint is written inside such a streak. Deciding a skip before the update costs one
      host sync per step (a gathered flag): only the scripts that ask for it pay it (pretraining).

    `state` is the script's trainer state (saved in checkpoints): the loop counts `state["step"]`.
    The run lasts `num_epochs` epochs when given (each ends with `end_of_epoch`), else `max_steps` steps;
    `steps_per_epoch=None`: an epoch lasts until `micro_batches` runs out (a stream). `checkpoint_at_end`:
    the last step is checkpointed too. `redirect_logs`: the context that sends log lines above the
    progress bar (default tqdm's `logging_redirect_tqdm`).
    """

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        optimizer,
        scheduler,
        cfg,
        *,
        state: dict,
        steps_per_epoch: int | None,
        max_steps: int,
        micro_batches: Callable[[int, int], Iterable],
        loss_of: Callable[[Any], torch.Tensor],
        save: Callable[[], Path],
        stop,
        checkpoints,
        num_epochs: int | None = None,
        eval_steps: int | None = None,
        evaluate: Callable[[int], None] | None = None,
        end_of_epoch: Callable[[int], None] | None = None,
        checkpoint_every_epoch: bool = False,
        checkpoint_at_end: bool = False,
        on_log: Callable[[int, dict], None] | None = None,
        on_step_end: Callable[[int], None] | None = None,
        guard=None,
        redirect_logs=None,
    ):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.accumulation = cfg.gradient_accumulation_steps
        self.max_grad_norm = cfg.max_grad_norm
        self.logging_steps = cfg.logging_steps
        self.checkpointing_steps = cfg.checkpointing_steps
        self.with_tracking = cfg.with_tracking
        self.state, self.steps_per_epoch, self.max_steps, self.num_epochs = state, steps_per_epoch, max_steps, num_epochs
        self.micro_batches, self.loss_of, self.save = micro_batches, loss_of, save
        self.stop, self.checkpoints = stop, checkpoints
        self.eval_steps, self.evaluate = eval_steps, evaluate
        self.end_of_epoch, self.checkpoint_every_epoch = end_of_epoch, checkpoint_every_epoch
        self.checkpoint_at_end = checkpoint_at_end
        self.on_log, self.on_step_end, self.guard = on_log, on_step_end, guard
        self.redirect_logs = redirect_logs
        self.window_losses: list[torch.Tensor] = []  # the step losses since the last log line (on the device)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, start_epoch: int) -> None:
        """Train from `state["step"]` (in epoch `start_epoch`) to the end; exits the process on a stop signal."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect_logs = self.redirect_logs or logging_redirect_tqdm

        self.progress = tqdm(total=self.max_steps, initial=self.state["step"],
                             disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        start_step = self.state["step"]
        try:
            # SIGTERM / Ctrl-C: finish the step, checkpoint, exit; log lines go above the progress bar
            with self.stop, redirect_logs():
                epoch = start_epoch
                while epoch < self.num_epochs if self.num_epochs is not None else self.state["step"] < self.max_steps:
                    if not self.train_epoch(epoch):
                        break  # the run's last step came before the epoch's end
                    if self.end_of_epoch is not None:
                        self.end_of_epoch(epoch)
                    if self.checkpoint_every_epoch:
                        path = self.save()
                        if self.stop.requested():  # a signal during the evaluation: the epoch's checkpoint is written
                            self.exit(path)
                    epoch += 1
        finally:
            self.progress.close()
        step = self.state["step"]
        if self.checkpoint_at_end and self.checkpointing_steps and step % self.checkpointing_steps and step != start_step:
            self.save()  # the last step's checkpoint (a resumed run that took no step has its checkpoint already)

    def train_epoch(self, epoch: int) -> bool:
        """The optimizer steps of `epoch` still to take (all of them unless resumed mid-epoch). Returns
        whether the epoch ended (its `steps_per_epoch` steps taken, or its micro-batches ran out); False
        when the run's last step came first."""
        accelerator = self.accelerator
        spe = self.steps_per_epoch  # None: an epoch lasts as long as its micro-batches (a stream)
        epoch_end = (epoch + 1) * spe if spe else None
        done_in_epoch = self.state["step"] - epoch * spe if spe else 0
        micro_losses = []  # the micro-batches' losses of the step under way
        for batch in self.micro_batches(epoch, done_in_epoch * self.accumulation):
            with accelerator.accumulate(self.model):  # no gradient sync but on the step's last micro-batch
                loss = self.loss_of(batch)
                accelerator.backward(loss)  # divided by gradient_accumulation_steps: the step's mean gradient
            micro_losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            step_loss = torch.stack(micro_losses).mean()  # the step's loss: its micro-batches' mean
            micro_losses = []
            self.window_losses.append(step_loss)
            self.optimizer_step(step_loss)
            self.state["step"] += 1
            self.progress.update(1)
            self.after_step(self.state["step"])
            if self.state["step"] == epoch_end:
                return True  # the epoch ends after steps_per_epoch optimizer steps (an incomplete group is dropped)
            if self.state["step"] >= self.max_steps:
                return False
        return True

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """Clip, skip a non-finite step (with a `guard`), step the optimizer and the schedule, zero the
        gradients. Returns whether the step was applied."""
        accelerator = self.accelerator
        finite = torch.isfinite(loss) if self.guard is not None else None
        if self.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            if finite is not None:
                finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
        if self.guard is not None:
            # every process takes the same decision; a skip must be known before the update: the one host
            # sync of a guarded step
            all_finite = accelerator.gather(finite.float().reshape(1)).min().item() > 0
            if self.guard.check(all_finite, self.state["step"] + 1):
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 grad scaler found inf: keep the schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def after_step(self, step: int) -> None:
        """Log, evaluate, checkpoint and stop, as this step calls for."""
        last = step == self.max_steps
        if step % self.logging_steps == 0 or last:
            self.log(step)
        if self.evaluate is not None and ((self.eval_steps and step % self.eval_steps == 0) or last):
            self.evaluate(step)
        saved = bool(self.checkpointing_steps) and step % self.checkpointing_steps == 0
        if saved and self.guard is not None and self.guard.consecutive:  # keep the last good checkpoint
            logger.warning("step %d: not checkpointing during a streak of non-finite steps", step)
            saved = False
        if saved:
            self.save()
        if self.on_step_end is not None:
            self.on_step_end(step)
        if self.stop.poll():  # SIGTERM / Ctrl-C (on any process): checkpoint this step, then exit
            self.exit(self.checkpoints.latest() if saved else self.save())

    def log(self, step: int) -> None:
        """The one host sync of the loop: the window's mean loss and the lr, to tqdm, the script and trackers."""
        mean_loss = self.accelerator.reduce(torch.stack(self.window_losses).mean(), "mean")  # over the processes
        logs = {"train/loss": mean_loss.item(), "train/lr": self.optimizer.param_groups[-1]["lr"]}
        self.window_losses = []
        if self.on_log is not None:
            self.on_log(step, logs)
        shown = {"loss": f"{logs['train/loss']:.4f}", "lr": f"{logs['train/lr']:.2e}"}
        if "train/images_per_s" in logs:
            shown["img_s"] = f"{logs['train/images_per_s']:.0f}"
        if "train/loss_vs_trivial" in logs:  # pretraining: the loss as a share of the blind guess's
            shown["vs_trivial"] = f"{100 * logs['train/loss_vs_trivial']:.0f}%"
        self.progress.set_postfix(**shown)
        if self.with_tracking:
            self.accelerator.log(logs, step=step)

    def exit(self, checkpoint: Path | None) -> None:
        self.progress.close()
        self.stop.exit(self.state["step"], checkpoint)
