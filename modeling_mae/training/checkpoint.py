"""Checkpoints that survive crashes, and exact resume.

Layout, inside `OUTPUT_DIR/checkpoints/`:

    step_N/                       one complete checkpoint (only complete ones carry this name)
        model.safetensors, optimizer.bin, scaler.pt, random_states_<rank>.pkl, custom_checkpoint_*.pkl
                                  <- `accelerator.save_state` (model, optimizer, grad scaler, RNG states
                                     of every process, objects registered with `register_for_checkpointing`
                                     such as the lr scheduler)
        trainer_state.json        counters (step, epoch, samples seen, skipped steps, ...)
        process_<rank>.json       per-process state: the data stream position (`StreamTracker`)
        config.yaml               the resolved run config (secrets masked)
        run.json                  the run that wrote it: run id, save time, number of processes
    .tmp-step_N/                  a checkpoint being written; renamed to step_N when complete
OUTPUT_DIR/run.json               the run that owns OUTPUT_DIR (its id)

A save writes everything under the temporary name, waits for every process, then renames it in one
`os.replace`, and only then prunes this run's old checkpoints (keeping its `keep_last` most recently
written ones; other runs' checkpoints are not this run's to delete). A crash during a save therefore
leaves the previous `step_M` as the latest complete checkpoint; stale temporary directories are
removed by the next save.

Runs. Every run has an id (new for a fresh start, the checkpoint's own when it resumes), so two runs
sharing an output directory never mix: `latest` means the newest checkpoint *of the run that owns
OUTPUT_DIR*, by time of writing (not by step number: a run resumed from an earlier step, or a shorter
run after a longer one, writes smaller step numbers later). `begin` runs before anything is written
and applies the rules transformers' Trainer users know:

- an output directory holding another run's results is refused (the message says what is there)
  unless `overwrite_output_dir` is set or the run resumes;
- resuming with a config that changes the result (model, data, seed, effective batch, lr ...;
  everything but `NON_RESULT_KEYS`, which include the run's length) is refused naming the keys, unless
  `allow_config_change_on_resume` is set.

    manager = CheckpointManager(output_dir, keep_last=3)
    resume_path = manager.begin(accelerator, cfg)   # None: start from step 0
    manager.save(accelerator, step, trainer_state={...}, process_state={...}, config_yaml=to_yaml(cfg))
    trainer_state, process_state = manager.load(accelerator, resume_path)

For crash tests, setting the environment variable `MAE_CRASH_DURING_CHECKPOINT=N` kills the process
with SIGKILL after the state of step N is written but before it is renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path

from ..file_modes import give_weights_usual_mode


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"

# Config keys that do not change what a run computes: where it writes and what it reports, how fast it
# runs, how it resumes. Every other key is compared on resume (secret-named keys are never compared).
# The per-device batch and accumulation are compared as the effective batch (x number of processes).
NON_RESULT_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_config_change_on_resume",
    "checkpointing_steps", "checkpoints_total_limit", "with_tracking", "report_to", "logging_steps",
    "reconstruction_steps", "num_reconstruction_images", "peak_tflops", "log_sample_ids", "push_to_hub",
    "hub_model_id", "hub_private_repo", "hub_include_checkpoints", "num_threads", "torch_compile",
    "gradient_checkpointing", "per_device_eval_batch_size", "preprocessing_num_workers", "mean_iou_path",
    "feature_cache_dir", "create_demo_data", "max_consecutive_nonfinite", "debug",
    "per_device_train_batch_size", "gradient_accumulation_steps",
    # the run's length: extending a run (resume with more steps / epochs) is a deliberate, common change
    "max_train_steps", "num_train_epochs",
})
# Entries of an output directory that a run writes before its first result (a run that never got
# further may be started again without `--overwrite_output_dir`).
BOOKKEEPING_ENTRIES = frozenset({"config.yaml", RUN_FILE, "runs", "sample_ids", "feature_cache"})


class OutputDirInUseError(ValueError):
    """The output directory holds another run's results; pass --overwrite_output_dir or resume."""


class ResumeConfigError(ValueError):
    """The config of a resumed run differs from the checkpoint's in keys that change the result."""


def _process_file(rank: int) -> str:
    return f"process_{rank}.json"


class CheckpointManager:
    """Atomic `step_N` checkpoints under `output_dir/checkpoints`, the last `keep_last` kept."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = 3, run_id: str | None = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"`keep_last` (checkpoints_total_limit) must be >= 1 or None, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.keep_last = keep_last
        self.run_id = run_id  # set by `begin` (or the first save)

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

    def run_checkpoints(self, run_id: str | None) -> list[Path]:
        """Complete checkpoints written by run `run_id` (all of them when None), oldest written first."""
        found = []
        for path in self.complete_checkpoints():
            info = read_run_info(path)
            if run_id is None or info.get("run_id") == run_id:
                step = int(CHECKPOINT_PATTERN.match(path.name).group(1))
                found.append((float(info.get("saved_at", 0.0)), step, path))
        return [p for *_, p in sorted(found)]

    def owner_run_id(self) -> str | None:
        """The id of the run that owns the output directory (OUTPUT_DIR/run.json), None if none does."""
        return read_run_info(self.output_dir).get("run_id")

    def latest(self) -> Path | None:
        """The newest checkpoint (by time of writing) of the run that owns the output directory."""
        done = self.run_checkpoints(self.run_id or self.owner_run_id())
        return done[-1] if done else None

    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """"latest" -> this run's newest complete checkpoint (None if there is none yet); a path -> that path."""
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

    # ---- starting a run -----------------------------------------------------------------------
    def results_in_output_dir(self) -> list[str]:
        """What in the output directory is another run's result, most telling first (empty: free to use)."""
        if not self.output_dir.is_dir():
            return []
        known = {"model.safetensors": "a saved model (model.safetensors)", "README.md": "a model card (README.md)",
                 "eval_results.json": "evaluation results (eval_results.json)"}
        found, others = [], []
        for name, description in known.items():
            if (self.output_dir / name).exists():
                found.append(description)
        done = self.complete_checkpoints()
        if done:
            found.append(f"{len(done)} checkpoint(s) up to {done[-1].relative_to(self.output_dir)}")
        for entry in sorted(self.output_dir.iterdir()):
            if entry.name in BOOKKEEPING_ENTRIES or entry.name in known or entry == self.root:
                continue
            others.append(entry.name + ("/" if entry.is_dir() else ""))
        if len(others) > 3:
            others = others[:3] + [f"{len(others) - 3} more"]
        return found + others

    def begin(self, accelerator, cfg) -> Path | None:
        """Before the run writes anything (every process calls it): refuse an output directory holding
        another run's results, resolve `cfg.resume_from_checkpoint`, refuse a resume whose config changes
        the result, and fix this run's id (written to OUTPUT_DIR/run.json). Returns the checkpoint to
        resume from, or None to start from step 0.

        `cfg` needs `resume_from_checkpoint`, `overwrite_output_dir`, `allow_config_change_on_resume`,
        `per_device_train_batch_size` and `gradient_accumulation_steps`."""
        from .config import to_dict

        resume_path = self.resolve(cfg.resume_from_checkpoint)
        if resume_path is None and not getattr(cfg, "overwrite_output_dir", False):
            results = self.results_in_output_dir()
            if results:
                shown = ", ".join(results)
                raise OutputDirInUseError(
                    f"`output_dir` {str(self.output_dir)!r} holds another run's results ({shown}): pass "
                    f"--overwrite_output_dir to replace them, --resume_from_checkpoint latest to continue that run, "
                    f"or choose another --output_dir"
                )
        if resume_path is not None and not getattr(cfg, "allow_config_change_on_resume", False):
            differences = config_differences(
                saved=read_checkpoint_config(resume_path),
                current=to_dict(cfg),
                saved_processes=read_run_info(resume_path).get("num_processes"),
                current_processes=accelerator.num_processes,
            )
            if differences:
                raise ResumeConfigError(
                    f"resuming {str(resume_path)!r} with a config that changes the result: "
                    + "; ".join(differences)
                    + ". Use the checkpoint's values, or pass --allow_config_change_on_resume to resume anyway"
                )
        accelerator.wait_for_everyone()  # every process has looked at the directory before it changes
        if accelerator.is_main_process:
            run_id = read_run_info(resume_path).get("run_id") if resume_path is not None else None
            run_id = run_id or new_run_id()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output_dir / RUN_FILE, {"run_id": run_id, "started_at": time.time()})
        accelerator.wait_for_everyone()
        self.run_id = self.owner_run_id()
        return resume_path

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
        give_weights_usual_mode(tmp)  # safetensors writes 0600; every other file is 0644 (umask)
        (tmp / _process_file(accelerator.process_index)).write_text(json.dumps(process_state or {}))
        if accelerator.is_main_process:
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml)
            self.run_id = self.run_id or new_run_id()
            run_info = {"run_id": self.run_id, "saved_at": time.time(), "num_processes": accelerator.num_processes}
            (tmp / RUN_FILE).write_text(json.dumps(run_info, indent=2))
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
        """Delete this run's checkpoints but its `keep_last` most recently written ones."""
        if self.keep_last is None:
            return
        for old in self.run_checkpoints(self.run_id)[: -self.keep_last]:
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


# --------------------------------------------------------------------------------------------------
# Run ids and resume checks
# --------------------------------------------------------------------------------------------------
def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def read_run_info(directory: str | os.PathLike | None) -> dict:
    """`run.json` of an output directory or a checkpoint ({} when absent: written before run ids)."""
    if directory is None:
        return {}
    path = Path(directory) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json_atomic(path: Path, values: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    os.replace(tmp, path)


def read_checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The config saved with a checkpoint (None when it has none)."""
    import yaml

    file = Path(path) / CONFIG_FILE
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def config_differences(saved: dict | None, current: dict, saved_processes: int | None, current_processes: int) -> list[str]:
    """`key: checkpoint value -> current value` for every key that changes the result (not in
    NON_RESULT_KEYS, not secret-named), plus the effective batch (per-device batch x accumulation x
    processes). A checkpoint without a saved config is not compared."""
    from .secrets import is_secret_name

    if saved is None:
        return []
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in NON_RESULT_KEYS or is_secret_name(key):
            continue
        if key not in saved or key not in current:  # a field added or removed by another version of the script
            continue
        if saved[key] != current[key]:
            differences.append(f"{key}: {saved[key]!r} -> {current[key]!r}")

    def effective(values: dict, processes: int | None):
        if processes is None or "per_device_train_batch_size" not in values:
            return None
        return values["per_device_train_batch_size"] * values.get("gradient_accumulation_steps", 1) * processes

    before, after = effective(saved, saved_processes), effective(current, current_processes)
    if before is not None and after is not None and before != after:
        differences.append(f"effective batch: {before} -> {after} (per-device batch x accumulation x processes)")
    return differences
