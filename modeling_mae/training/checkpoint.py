"""Checkpoints that survive crashes, and exact resume.

Layout, inside `OUTPUT_DIR/checkpoints/`:

    step_N/                       one complete checkpoint (only complete ones carry this name)
        model.safetensors, optimizer.bin, scaler.pt, random_states_<rank>.pkl, custom_checkpoint_*.pkl
                                  <- `accelerator.save_state` (model, optimizer, grad scaler, RNG states
                                     of every process, objects registered with `register_for_checkpointing`
                                     such as the lr scheduler)
        trainer_state.json        counters (step, epoch, samples seen, skipped steps, ...)
        process_<rank>.json       per-process state: the data stream position (`StreamTracker`)
        config.yaml               the resolved run config
    .tmp-step_N/                  a checkpoint being written; renamed to step_N when complete

A save writes everything under the temporary name, waits for every process, then renames it in one
`os.replace`, and only then prunes old checkpoints (keeping the last `keep_last`). A crash during a
save therefore leaves the previous `step_M` as the latest complete checkpoint; stale temporary
directories are removed by the next save.

    manager = CheckpointManager(output_dir, keep_last=3)
    manager.save(accelerator, step, trainer_state={...}, process_state={...}, config_yaml=to_yaml(cfg))
    path = manager.resolve("latest")          # or a path; None when there is nothing to resume
    trainer_state, process_state = manager.load(accelerator, path)

For crash tests, setting the environment variable `MAE_CRASH_DURING_CHECKPOINT=N` kills the process
with SIGKILL after the state of step N is written but before it is renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


def _process_file(rank: int) -> str:
    return f"process_{rank}.json"


class CheckpointManager:
    """Atomic `step_N` checkpoints under `output_dir/checkpoints`, the last `keep_last` kept."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"`keep_last` (checkpoints_total_limit) must be >= 1 or None, got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    # ---- listing ------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_dir() and (path / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """"latest" -> newest complete checkpoint (None if there is none yet); a path -> that path."""
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not (path / TRAINER_STATE).is_file():
            raise ValueError(
                f"`resume_from_checkpoint` must be 'latest' or a complete checkpoint directory (with {TRAINER_STATE}), "
                f"got {str(path)!r}"
            )
        return path

    # ---- saving -------------------------------------------------------------------------------
    def save(
        self,
        accelerator,
        step: int,
        trainer_state: dict,
        process_state: dict | None = None,
        config_yaml: str | None = None,
    ) -> Path:
        """Write checkpoint `step_N` atomically (all processes must call this)."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

        accelerator.save_state(str(tmp))
        (tmp / _process_file(accelerator.process_index)).write_text(json.dumps(process_state or {}))
        if accelerator.is_main_process:
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml)
            # trainer_state.json is written last: its presence marks the content complete
            (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            if os.environ.get("MAE_CRASH_DURING_CHECKPOINT") == str(step):
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a half-finished save
            if final.exists():  # re-saving the same step (e.g. the final save): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------
    def load(self, accelerator, path: str | os.PathLike) -> tuple[dict, dict]:
        """Restore model, optimizer, scaler, RNG states and registered objects; return
        (trainer_state, this process's process_state)."""
        path = Path(path)
        accelerator.load_state(str(path))
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        process_file = path / _process_file(accelerator.process_index)
        if not process_file.is_file():
            raise ValueError(
                f"checkpoint {str(path)!r} has no {process_file.name}: it was written by fewer processes than the "
                f"{accelerator.num_processes} running now; resume with the same number of processes"
            )
        return trainer_state, json.loads(process_file.read_text())
