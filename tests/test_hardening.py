"""Safe in a user's hands (issue 10): secrets never written or logged, demo data never written into a
user's folder, finished work never silently replaced, interrupts lose nothing, small things."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.training.checkpoint import (
    CheckpointManager,
    OutputDirInUseError,
    ResumeConfigError,
    config_differences,
)
from modeling_mae.training.classification_data import make_synthetic_classification, resolve_split_sources
from modeling_mae.training.config import to_dict, to_yaml
from modeling_mae.training.data import detect_local_format
from modeling_mae.training.demo_data import DEMO_MARKER, ensure_demo_data
from modeling_mae.training.runtime import GracefulStop, resume_command
from modeling_mae.training.secrets import MASK
from modeling_mae.training.segmentation_data import write_synthetic_ade_folder

from pretrain_helpers import REPO, import_pretrain, tiny_args, write_dataset


TOKEN = "hf_PLANTEDsecretTOKEN0123456789abcdef"  # what must never appear in a file or a log
ENV_TOKEN = "hf_ENVIRONMENTsecret9876543210fedcba"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mae_{name}_script_h", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return import_pretrain()


def files_containing(root: Path, secret: str) -> list[str]:
    """Every file under `root` (binary ones too: TensorBoard events, safetensors) holding `secret`."""
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# --------------------------------------------------------------------------------------------------
# 1. Secrets
# --------------------------------------------------------------------------------------------------
def test_saved_config_masks_every_secret_named_field(pretrain):
    cfg = pretrain.PretrainConfig(train_dir="x", hub_token=TOKEN, model_config={"api_key": "k1", "hidden_size": 8})
    saved = yaml.safe_load(to_yaml(cfg))
    assert saved["hub_token"] == MASK and saved["model_config"] == {"api_key": MASK, "hidden_size": 8}
    assert to_dict(cfg)["hub_token"] == MASK and cfg.hub_token == TOKEN  # the run itself keeps the value
    assert yaml.safe_load(to_yaml(pretrain.PretrainConfig(train_dir="x")))["hub_token"] is None  # "no token" shows


def _planted_runs(tmp_path: Path):
    """(script name, argv) of a tiny run of every training script, with the planted token and trackers."""
    common = ["--hub_token", TOKEN, "--with_tracking", "true", "--report_to", "tensorboard", "--mixed_precision", "no"]
    pre_data = write_dataset(tmp_path / "pre_data", "parquet", count=16, num_shards=2)
    yield "pretrain", tiny_args(pre_data, tmp_path / "pretrain", max_train_steps=2, checkpointing_steps=1) + common
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(pretrained)
    train = make_synthetic_classification(tmp_path / "cls" / "train", num_per_class=4, seed=0)
    val = make_synthetic_classification(tmp_path / "cls" / "validation", num_per_class=2, seed=1)
    downstream = ["--model_name_or_path", str(pretrained), "--train_dir", str(train), "--validation_dir", str(val),
                  "--num_train_epochs", "1", "--num_warmup_epochs", "0", "--per_device_train_batch_size", "8",
                  "--dataloader_num_workers", "0", "--logging_steps", "1", "--create_demo_data", "false", *common]
    yield "finetune", ["--config", str(REPO / "configs/finetune/demo.yaml"), *downstream,
                       "--output_dir", str(tmp_path / "finetune")]
    yield "linprobe", ["--config", str(REPO / "configs/linprobe/demo.yaml"), *downstream,
                       "--output_dir", str(tmp_path / "linprobe")]
    seg_data = write_synthetic_ade_folder(tmp_path / "seg_data", num_train=4, num_val=1, size=32, num_classes=3)
    yield "segment", [
        "--config", str(REPO / "configs/segment/demo.yaml"), "--data_dir", str(seg_data), "--num_labels", "3",
        "--model_config", "{patch_size: 8, num_hidden_layers: 2, image_size: 32, hidden_size: 32}",
        "--out_indices", "[2]", "--crop_size", "32", "--base_scale", "[64, 32]", "--eval_stride", "16",
        "--per_device_train_batch_size", "2", "--max_train_steps", "2", "--num_warmup_steps", "1",
        "--eval_steps", "2", "--checkpointing_steps", "1", "--output_dir", str(tmp_path / "segment"), *common,
    ]


def test_no_training_script_writes_or_logs_a_token(tmp_path, capfd, caplog, monkeypatch):
    """Every training script, a token planted in `--hub_token` and HF_TOKEN: no file under the output
    directory (model card, config.yaml, checkpoints, TensorBoard hparams, weights) and nothing printed or
    logged holds either; the saved configs show the flag masked."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    caplog.set_level("DEBUG")
    for name, argv in _planted_runs(tmp_path):
        load_script(name).main(argv)
        out = tmp_path / name
        assert (out / "README.md").is_file() and list((out / "runs").rglob("*")), name  # card and trackers written
        for secret in (TOKEN, ENV_TOKEN):
            assert files_containing(out, secret) == [], name
        saved = [yaml.safe_load(p.read_text()) for p in out.rglob("config.yaml")]
        assert saved and all(s["hub_token"] == MASK for s in saved), name
    captured = capfd.readouterr()
    for secret in (TOKEN, ENV_TOKEN):
        assert secret not in captured.out and secret not in captured.err and secret not in caplog.text
    assert "hub_token: '***'" in captured.out  # the printed config shows it masked


def test_a_resumed_run_takes_the_token_from_the_flag_or_the_environment(pretrain, tmp_path, monkeypatch):
    """The checkpoint holds only the mask; the push of a resumed run gets the real token again."""
    data = write_dataset(tmp_path / "data", "parquet", count=16, num_shards=2)
    out = tmp_path / "out"
    pushed = []
    monkeypatch.setattr(pretrain, "push_to_hub", lambda *args: pushed.append(args[-1]) or "https://hub/x")
    checked = []  # the Hub access check before training (stops at huggingface_hub) gets the real token too
    monkeypatch.setattr(pretrain, "check_hub_access", lambda repo, token=None, private=None: checked.append(token) or "me")
    hub = ["--push_to_hub", "true", "--hub_model_id", "someone/x"]
    assert pretrain.main(tiny_args(data, out, max_train_steps=2, checkpointing_steps=1) + hub + ["--hub_token", TOKEN]) == 0
    resume = tiny_args(data, out, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest") + hub
    assert pretrain.main(resume + ["--hub_token", TOKEN]) == 0
    assert pretrain.main(resume) == 0  # no flag: huggingface_hub reads HF_TOKEN itself (token=None)
    assert pushed == [TOKEN, TOKEN, None]
    assert checked == [TOKEN, TOKEN, None]
    assert files_containing(out, TOKEN) == []


# --------------------------------------------------------------------------------------------------
# 2. Demo data only into a folder made for it; a useless train_dir fails at once
# --------------------------------------------------------------------------------------------------
def _write_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("demo")


def test_demo_data_goes_only_into_a_new_or_empty_folder(tmp_path):
    new = tmp_path / "new"
    assert ensure_demo_data(new, _write_files) is True
    assert (new / DEMO_MARKER).is_file() and (new / "a.txt").read_text() == "demo"
    assert ensure_demo_data(new, lambda folder: pytest.fail("rewritten")) is False  # found, reused
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_demo_data(empty, _write_files) is True and (empty / DEMO_MARKER).is_file()
    assert not list(tmp_path.glob(".*demo-tmp"))  # the temporary folder was renamed into place


def test_demo_data_is_never_written_into_a_users_folder(pretrain, tmp_path, caplog):
    """`--config demo.yaml --train_dir my_photos`: nothing is added to the folder, the run reads it."""
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for index in range(4):
        Image.new("RGB", (40, 40), (60 * index, 10, 10)).save(photos / f"holiday_{index}.jpg")
    before = sorted(p.name for p in photos.iterdir())
    argv = tiny_args(photos, tmp_path / "out", max_train_steps=1, checkpointing_steps=0) + ["--create_demo_data", "true"]
    with caplog.at_level(logging.INFO):
        assert pretrain.main(argv) == 0
    assert sorted(p.name for p in photos.iterdir()) == before  # no parquet shards, no marker
    assert "no demo data is written" in caplog.text
    # fine-tune / linear-probe demo folders: the same rule
    assert ensure_demo_data(photos, make_synthetic_classification) is False
    assert sorted(p.name for p in photos.iterdir()) == before


@pytest.mark.parametrize("case", ["missing", "empty", "text_only", "corrupt_images"])
def test_a_train_dir_without_readable_images_fails_at_once(pretrain, tmp_path, case):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    if case == "text_only":
        (folder / "notes.txt").write_text("nothing here")
    if case == "corrupt_images":
        (folder / "a.jpg").write_bytes(b"not a jpeg at all")
    expected = {"missing": "does not exist", "empty": "is empty", "text_only": "none of them data",
                "corrupt_images": "none readable"}[case]
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=expected) as err:
        pretrain.main(tiny_args(folder, out))
    message = str(err.value)
    assert str(folder) in message and "parquet" in message and ".tar" in message and ".jpg" in message
    assert "\n" not in message
    assert not (out / "checkpoints").exists() and time.perf_counter() - start < 30
    # the downstream scripts check their folders the same way, before reading anything
    with pytest.raises(ValueError, match=expected):
        resolve_split_sources(None, str(folder), str(folder), "train", "validation")


def test_a_folder_with_a_readable_image_is_accepted(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"xx")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert detect_local_format(tmp_path)[0] == "imagefolder"


# --------------------------------------------------------------------------------------------------
# 3. Finished work is never silently replaced
# --------------------------------------------------------------------------------------------------
def test_another_runs_output_dir_is_refused_unless_overwritten_or_resumed(pretrain, tmp_path):
    """The issue's scenario: a finished run, then a shorter one into the same directory."""
    data = write_dataset(tmp_path / "data", "parquet", count=32, num_shards=2)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(data, out, max_train_steps=6, checkpointing_steps=3)) == 0
    first = load_file(out / "model.safetensors")
    second = tiny_args(data, out, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1)
    with pytest.raises(OutputDirInUseError, match=r"model\.safetensors.*checkpoints/step_6.*--overwrite_output_dir"):
        pretrain.main(second)
    torch.testing.assert_close(load_file(out / "model.safetensors"), first)  # untouched

    assert pretrain.main(second + ["--overwrite_output_dir", "true"]) == 0
    manager = CheckpointManager(out)
    latest = manager.latest()
    assert latest is not None and latest.name == "step_2"  # this run's last, not the other run's step_6
    assert (out / "checkpoints" / "step_2").is_dir()  # not pruned at once (keep_last 1 of *this* run)
    assert not (out / "checkpoints" / "step_1").exists()  # this run's older one is pruned
    run_ids = {json.loads((p / "run.json").read_text())["run_id"] for p in manager.complete_checkpoints()}
    assert len(run_ids) == 2 and json.loads((out / "run.json").read_text())["run_id"] == json.loads(
        (latest / "run.json").read_text())["run_id"]


def test_resuming_with_a_config_that_changes_the_result_is_refused(pretrain, tmp_path):
    data = write_dataset(tmp_path / "data", "parquet", count=32, num_shards=2)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(data, out, max_train_steps=4, checkpointing_steps=2)) == 0
    changed = tiny_args(data, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest",
                        seed=1, per_device_train_batch_size=2, logging_steps=3)
    with pytest.raises(ResumeConfigError) as err:
        pretrain.main(changed)
    message = str(err.value)
    assert "seed: 0 -> 1" in message and "effective batch: 4 -> 2" in message
    assert "logging_steps" not in message and "--allow_config_change_on_resume" in message
    assert pretrain.main(changed + ["--allow_config_change_on_resume", "true"]) == 0


def test_config_differences_compare_the_effective_batch_not_its_factors():
    saved = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "seed": 0, "output_dir": "a",
             "hub_token": MASK, "model_preset": "mae-tiny"}
    same = {**saved, "per_device_train_batch_size": 4, "output_dir": "b", "hub_token": None}
    assert config_differences(saved, same, saved_processes=1, current_processes=2) == []  # 8 x 1 == 4 x 2
    other = {**saved, "model_preset": "mae-vit-base-patch16"}
    assert config_differences(saved, other, 1, 2) == [
        "model_preset: 'mae-tiny' -> 'mae-vit-base-patch16'",
        "effective batch: 8 -> 16 (per-device batch x accumulation x processes)",
    ]


def test_pruning_keeps_the_most_recently_written_checkpoints_of_this_run(tmp_path):
    """A run resumed from an earlier step writes smaller step numbers later: they are the newest."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    del model
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(accelerator, step, trainer_state={})
    assert [p.name for p in manager.run_checkpoints(manager.run_id)] == ["step_20", "step_30"]
    resumed = CheckpointManager(tmp_path, keep_last=2, run_id=manager.run_id)
    resumed.save(accelerator, 25, trainer_state={})  # resumed from step_20 (step_30 abandoned)
    assert [p.name for p in resumed.run_checkpoints(resumed.run_id)] == ["step_30", "step_25"]
    assert resumed.latest().name == "step_25"


# --------------------------------------------------------------------------------------------------
# 4. Interrupts and preemption
# --------------------------------------------------------------------------------------------------
class _FakeAccelerator:
    num_processes, is_main_process = 1, True
    ended = False

    def end_training(self):
        self.ended = True


def test_first_signal_asks_to_stop_second_ctrl_c_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    accelerator = _FakeAccelerator()
    stop = GracefulStop(accelerator, "python scripts/pretrain.py --resume_from_checkpoint latest")
    with stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert not stop.requested()
        stop._handle(signal.SIGTERM, None)
        assert stop.requested() and exits == []
        stop._handle(signal.SIGTERM, None)  # schedulers resend SIGTERM: still stopping gracefully
        assert exits == []
        stop._handle(signal.SIGINT, None)  # the second Ctrl-C
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # restored after the loop
    with pytest.raises(SystemExit) as err:
        stop.exit(7)
    assert err.value.code == 128 + signal.SIGTERM and accelerator.ended


def test_resume_command_repeats_the_flags_and_resumes_latest(tmp_path):
    argv = ["--config", "configs/pretrain/demo.yaml", "--resume_from_checkpoint", "outputs/x/checkpoints/step_3",
            "--overwrite_output_dir", "--seed", "3", "--overwrite_output_dir=true", "--output_dir", "a b"]
    assert resume_command(str(REPO / "scripts" / "pretrain.py"), argv, 1).endswith(
        "pretrain.py --config configs/pretrain/demo.yaml --seed 3 --output_dir 'a b' --resume_from_checkpoint latest")
    assert resume_command("scripts/pretrain.py", [], 2).startswith("accelerate launch --num_processes 2 ")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(REPO)}


def _interrupt(cmd: list[str], sig: int, after_step: int, log: Path) -> tuple[int, str]:
    """Start `cmd` in its own process group, send `sig` to the whole group (as a terminal's Ctrl-C or
    a cluster's preemption does) once step `after_step` is logged; return (exit code, stderr)."""
    with open(log, "w") as stdout:
        process = subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=stdout, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        lines = []
        for line in process.stderr:
            lines.append(line)
            if f"step {after_step}:" in line:
                os.killpg(process.pid, sig)
                break
        lines += process.stderr.readlines()
        return process.wait(timeout=300), "".join(lines)


def _resume_line(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if "resume with: " in line]
    assert len(lines) == 1, stderr[-3000:]
    return shlex.split(lines[0].split("resume with: ", 1)[1])


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ctrl_c_checkpoints_the_step_and_the_resumed_run_matches_an_uninterrupted_one(pretrain, tmp_path, one_thread):
    """Ctrl-C (SIGINT to the process group, DataLoader worker included) at step >= 3 of 16: the step
    finishes, a checkpoint is written, one line gives the resume command, exit code 130, no traceback;
    that exact command finishes the run with the weights of an uninterrupted run."""
    data = write_dataset(tmp_path / "data", "parquet", count=32, num_shards=2)
    common = dict(max_train_steps=16, checkpointing_steps=100, dataloader_num_workers=1)
    script = str(REPO / "scripts" / "pretrain.py")
    assert pretrain.main(tiny_args(data, tmp_path / "ref", **common)) == 0  # reference, 1 thread as below

    out = tmp_path / "out"
    code, stderr = _interrupt([sys.executable, script, *tiny_args(data, out, **common)], signal.SIGINT, 3,
                              tmp_path / "stdout.txt")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    checkpoints = CheckpointManager(out).complete_checkpoints()
    assert len(checkpoints) == 1  # written on the signal (periodic ones only every 100 steps)
    stopped_at = int(checkpoints[0].name.split("_")[1])
    assert 3 <= stopped_at < 16 and f"after step {stopped_at}" in stderr

    command = _resume_line(stderr)
    assert command[0] == "python" and command[-2:] == ["--resume_from_checkpoint", "latest"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=str(REPO), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0 and f"step_{stopped_at}" in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / "ref", out)


@pytest.mark.slow
def test_sigterm_on_two_processes_checkpoints_and_resumes_exactly(tmp_path):
    """SIGTERM to the launcher and both CPU processes (a SLURM preemption): both processes stop at the
    same step and write the checkpoint; resuming on two processes ends as an uninterrupted run."""
    data = write_dataset(tmp_path / "data", "parquet", count=48, num_shards=4)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu_multi_process.yaml"), "--main_process_port", "29531"]
    script = str(REPO / "scripts" / "pretrain.py")
    common = dict(max_train_steps=30, checkpointing_steps=100, per_device_train_batch_size=2)
    reference = subprocess.run([*launcher, script, *tiny_args(data, tmp_path / "ref", **common)], cwd=str(REPO),
                               env=_env(), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "out"
    code, stderr = _interrupt([*launcher, script, *tiny_args(data, out, **common)], signal.SIGTERM, 3,
                              tmp_path / "stdout.txt")
    assert code != 0, stderr[-3000:]
    checkpoints = CheckpointManager(out).complete_checkpoints()
    assert len(checkpoints) == 1, stderr[-3000:]
    assert {p.name for p in checkpoints[0].glob("process_*.json")} == {"process_0.json", "process_1.json"}
    command = _resume_line(stderr)
    assert command[:4] == ["accelerate", "launch", "--num_processes", "2"]
    script_at = command.index("scripts/pretrain.py")
    resumed = subprocess.run([*launcher, script, *command[script_at + 1:]], cwd=str(REPO), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(tmp_path / "ref", out)


def _signal_on_call(module, monkeypatch, call: int, sig=signal.SIGTERM):
    """Make the script's `normalize_on_device` send `sig` to this process on its `call`-th use (a real
    signal, mid-step: the handler runs, the step goes on)."""
    original, calls = module.normalize_on_device, []

    def normalize(pixel_values):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return original(pixel_values)

    monkeypatch.setattr(module, "normalize_on_device", normalize)


@pytest.mark.slow
def test_finetune_and_segment_stop_on_sigterm_and_resume_exactly(tmp_path, monkeypatch, capfd):
    """SIGTERM during step 2: the step finishes, checkpoint step_2, exit 143 with the resume command;
    resuming ends with the same history (fine-tune) / losses and weights (segment) as an uninterrupted run."""
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(pretrained)
    train = make_synthetic_classification(tmp_path / "cls" / "train", num_per_class=8, seed=0)
    val = make_synthetic_classification(tmp_path / "cls" / "validation", num_per_class=2, seed=1)
    finetune = load_script("finetune")
    ft_args = ["--config", str(REPO / "configs/finetune/demo.yaml"), "--model_name_or_path", str(pretrained),
               "--train_dir", str(train), "--validation_dir", str(val), "--create_demo_data", "false",
               "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--logging_steps", "1000"]
    assert finetune.main(ft_args + ["--output_dir", str(tmp_path / "ft_ref")]) == 0
    out = tmp_path / "ft"
    with monkeypatch.context() as patch:
        _signal_on_call(finetune, patch, call=2)  # 4 steps per epoch: stops mid-epoch 1
        with pytest.raises(SystemExit) as err:
            finetune.main(ft_args + ["--output_dir", str(out)])
    assert err.value.code == 128 + signal.SIGTERM
    assert [p.name for p in CheckpointManager(out).complete_checkpoints()] == ["step_2"]
    assert "resume with: python scripts/finetune.py" in capfd.readouterr().err
    assert finetune.main(ft_args + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    history = json.loads((out / "eval_results.json").read_text())["history"]
    reference = json.loads((tmp_path / "ft_ref" / "eval_results.json").read_text())["history"]
    assert history == [pytest.approx(h, rel=1e-6) for h in reference]

    segment = load_script("segment")
    data = write_synthetic_ade_folder(tmp_path / "seg_data", num_train=8, num_val=1, size=32, num_classes=3)
    seg_args = [
        "--config", str(REPO / "configs/segment/demo.yaml"), "--data_dir", str(data), "--num_labels", "3",
        "--model_config", "{patch_size: 8, num_hidden_layers: 2, image_size: 32, hidden_size: 32}",
        "--out_indices", "[2]", "--crop_size", "32", "--base_scale", "[64, 32]", "--eval_stride", "16",
        "--per_device_train_batch_size", "2", "--max_train_steps", "6", "--num_warmup_steps", "1",
        "--logging_steps", "1", "--eval_steps", "100", "--checkpointing_steps", "100",
    ]
    straight = segment.main(seg_args + ["--output_dir", str(tmp_path / "seg_ref")])
    out = tmp_path / "seg"
    with monkeypatch.context() as patch:
        _signal_on_call(segment, patch, call=2)
        with pytest.raises(SystemExit) as err:
            segment.main(seg_args + ["--output_dir", str(out)])
    assert err.value.code == 128 + signal.SIGTERM
    assert [p.name for p in CheckpointManager(out).complete_checkpoints()] == ["step_2"]
    resumed = segment.main(seg_args + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert resumed["train_loss"] == straight["train_loss"]
    a, b = load_file(tmp_path / "seg_ref" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------------
# 8. Small things
# --------------------------------------------------------------------------------------------------
def test_configs_name_files_that_exist_and_classes_the_generator_makes():
    import re

    for config in (REPO / "configs").rglob("*.yaml"):
        for named in re.findall(r"configs/accelerate/[\w.-]+\.yaml", config.read_text()):
            assert (REPO / named).is_file(), f"{config} names {named}"
    finetune_demo = (REPO / "configs/finetune/demo.yaml").read_text()
    assert "square" not in finetune_demo and "horizontal or vertical" in finetune_demo
    readme = (REPO / "README.md").read_text()
    assert "--output_dir docs" not in readme
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme


def test_weights_get_the_same_mode_as_the_other_files(pretrain, tmp_path):
    data = write_dataset(tmp_path / "data", "parquet", count=16, num_shards=2)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert pretrain.main(tiny_args(data, out, max_train_steps=1, checkpointing_steps=1)) == 0
    finally:
        os.umask(old)
    for folder in (out, out / "checkpoints" / "step_1"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644, modes
        assert set(modes.values()) == {0o644}, modes


def test_progress_bar_shows_the_learning_rate_and_logs_go_through_tqdm(pretrain, tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    postfixes, redirected = [], []
    original = tqdm.set_postfix
    monkeypatch.setattr(tqdm, "set_postfix", lambda self, *a, **k: postfixes.append(k) or original(self, *a, **k))
    import tqdm.contrib.logging as tqdm_logging

    real = tqdm_logging.logging_redirect_tqdm

    def spy(*args, **kwargs):
        redirected.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "logging_redirect_tqdm", spy)
    data = write_dataset(tmp_path / "data", "parquet", count=16, num_shards=2)
    assert pretrain.main(tiny_args(data, tmp_path / "out", max_train_steps=2, checkpointing_steps=0)) == 0
    assert redirected == [True]
    # lr 1e-3, 1 warm-up step, 2 steps: the peak after step 1, the cosine's end (min_lr 0) after step 2
    assert [p["lr"] for p in postfixes] == ["1.00e-03", "0.00e+00"]


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_the_demo_recipe_with_a_users_train_dir_writes_no_demo_data(pretrain, tmp_path, case):
    """`--config demo.yaml --train_dir DIR` (create_demo_data on) with DIR missing or empty: DIR is the
    user's, so no demo data goes into it and the run stops at once, naming it (found by a new-user trial)."""
    folder = tmp_path / "mine"
    if case == "empty":
        folder.mkdir()
    argv = ["--config", str(REPO / "configs/pretrain/demo.yaml"), "--train_dir", str(folder),
            "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    with pytest.raises(ValueError, match=str(folder)):
        pretrain.main(argv)
    assert folder.exists() == (case == "empty")
    assert not folder.exists() or not any(folder.iterdir())  # nothing written into the user's folder


def test_the_demo_recipe_without_data_uses_the_demos_own_folder(tmp_path, monkeypatch):
    from modeling_mae.training.demo_data import demo_data_dirs
    from pretrain_helpers import import_pretrain

    module = import_pretrain()
    cfg = module.parse_config(module.PretrainConfig, ["--config", str(REPO / "configs/pretrain/demo.yaml")])
    resolved, dirs = demo_data_dirs(cfg, {"train_dir": module.DEMO_DATA_DIR})
    assert resolved.train_dir == "outputs/demo_data" and dirs == {"train_dir": "outputs/demo_data"}
    mine = module.parse_config(module.PretrainConfig, ["--config", str(REPO / "configs/pretrain/demo.yaml"),
                                                       "--train_dir", str(tmp_path)])
    assert demo_data_dirs(mine, {"train_dir": module.DEMO_DATA_DIR}) == (mine, {})
