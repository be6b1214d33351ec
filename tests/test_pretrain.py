"""scripts/pretrain.py end to end on tiny CPU runs over data written in both Hub layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.training.transforms import normalize_on_device

from pretrain_helpers import REPO, import_pretrain, read_sample_ids, run_pretrain, smooth_images, tiny_args, write_dataset


@pytest.fixture(scope="module")
def pretrain():
    return import_pretrain()


def _fixed_batch(count: int = 16) -> torch.Tensor:
    from modeling_mae.training.data import decode_image
    from modeling_mae.training.transforms import EvalTransform

    transform = EvalTransform(32, crop_pct=1.0)
    images = [transform(decode_image(data)) for data, _ in smooth_images(count, seed=123)]
    return normalize_on_device(torch.stack(images))


def _loss(model: MAEForPreTraining, pixel_values: torch.Tensor) -> float:
    noise = torch.rand(pixel_values.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(pixel_values, noise=noise).loss.item()


@pytest.mark.parametrize("layout", ["parquet", "webdataset"])
def test_a_few_steps_lower_the_loss(pretrain, tmp_path, layout):
    data = write_dataset(tmp_path / "data", layout, count=64)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(data, out, max_train_steps=30, checkpointing_steps=0, learning_rate=2e-3)) == 0

    torch.manual_seed(0)  # the script seeds with `seed` (0) before building the model
    initial = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    trained = MAEForPreTraining.from_pretrained(out)
    batch = _fixed_batch()
    before, after = _loss(initial, batch), _loss(trained, batch)
    assert after < 0.8 * before, (before, after)

    # the export: weights, image processor, model card with the run's numbers, reconstruction picture
    card = (out / "README.md").read_text()
    assert "| optimizer steps | 30 |" in card and "reconstruction.png" in card and "final loss" in card
    assert (out / "preprocessor_config.json").is_file() and (out / "reconstruction.png").is_file()
    assert "learning_rate: 0.002" in card  # the resolved recipe


def test_lr_is_derived_from_blr_and_effective_batch(pretrain, tmp_path, caplog):
    data = write_dataset(tmp_path / "data", "parquet", count=32)
    argv = tiny_args(data, tmp_path / "out", max_train_steps=1, checkpointing_steps=0, gradient_accumulation_steps=2)
    argv = [a for a in argv]
    i = argv.index("--learning_rate")
    del argv[i : i + 2]
    with caplog.at_level("INFO"):
        assert pretrain.main(argv + ["--blr", "1.6e-3"]) == 0
    # lr = 1.6e-3 * (4 per device x 1 process x 2 accumulation) / 256 = 5e-5
    assert "learning rate 5e-05 = blr 0.0016 x effective batch 8 / 256" in caplog.text


# The official pretraining weight-decay groups (timm 0.3.2 `add_weight_decay`, no skip list), by hand for a
# 1-block encoder / 1-block decoder: decayed = every tensor of 2+ dimensions not named `.bias`, the CLS and
# mask tokens included; the frozen position tables are in no group.
OFFICIAL_DECAYED = {
    "mae.embeddings.cls_token", "mae.embeddings.patch_embeddings.projection.weight",
    "mae.encoder.layer.0.attention.qkv.weight", "mae.encoder.layer.0.attention.proj.weight",
    "mae.encoder.layer.0.mlp.fc1.weight", "mae.encoder.layer.0.mlp.fc2.weight",
    "decoder.mask_token", "decoder.decoder_embed.weight",
    "decoder.decoder_layers.0.attention.qkv.weight", "decoder.decoder_layers.0.attention.proj.weight",
    "decoder.decoder_layers.0.mlp.fc1.weight", "decoder.decoder_layers.0.mlp.fc2.weight",
    "decoder.decoder_pred.weight",
}
OFFICIAL_NOT_DECAYED = {
    "mae.embeddings.patch_embeddings.projection.bias",
    "mae.encoder.layer.0.layernorm_before.weight", "mae.encoder.layer.0.layernorm_before.bias",
    "mae.encoder.layer.0.attention.qkv.bias", "mae.encoder.layer.0.attention.proj.bias",
    "mae.encoder.layer.0.layernorm_after.weight", "mae.encoder.layer.0.layernorm_after.bias",
    "mae.encoder.layer.0.mlp.fc1.bias", "mae.encoder.layer.0.mlp.fc2.bias",
    "mae.layernorm.weight", "mae.layernorm.bias",
    "decoder.decoder_embed.bias",
    "decoder.decoder_layers.0.layernorm_before.weight", "decoder.decoder_layers.0.layernorm_before.bias",
    "decoder.decoder_layers.0.attention.qkv.bias", "decoder.decoder_layers.0.attention.proj.bias",
    "decoder.decoder_layers.0.layernorm_after.weight", "decoder.decoder_layers.0.layernorm_after.bias",
    "decoder.decoder_layers.0.mlp.fc1.bias", "decoder.decoder_layers.0.mlp.fc2.bias",
    "decoder.decoder_norm.weight", "decoder.decoder_norm.bias", "decoder.decoder_pred.bias",
}


def _named_groups(model, groups) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in groups:
        out.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    return out


def test_pretraining_builds_the_official_weight_decay_groups(pretrain, tmp_path, monkeypatch):
    """scripts/pretrain.py hands AdamW the official groups (caught at `create_optimizer`, before training)."""
    config = MAEConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, decoder_hidden_size=8, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=16)
    model = MAEForPreTraining(config)
    from modeling_mae.training.optim import pretraining_param_groups

    groups = _named_groups(model, pretraining_param_groups(model, 0.05))
    assert groups == {0.05: OFFICIAL_DECAYED, 0.0: OFFICIAL_NOT_DECAYED}

    # the script: the tiny preset's groups, with the tokens decayed and the frozen tables left out
    seen = {}

    def capture(groups, *args, **kwargs):
        seen["groups"] = groups
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(pretrain, "create_optimizer", capture)
    data = write_dataset(tmp_path / "data", "parquet", count=8)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(tiny_args(data, tmp_path / "out", weight_decay=0.05))
    params = [p for g in seen["groups"] for p in g["params"]]
    decayed = {id(p) for g in seen["groups"] if g["weight_decay"] == 0.05 for p in g["params"]}
    by_shape = [(tuple(p.shape), id(p) in decayed) for p in params]
    assert len(params) == len({id(p) for p in params})  # each parameter once
    assert ((1, 1, 64), True) in by_shape and ((1, 1, 32), True) in by_shape  # cls token, mask token
    assert all(decayed_ == (len(shape) > 1) for shape, decayed_ in by_shape)  # the tiny preset names no 2-D bias
    assert not any(shape[1:] == (65, 64) or shape[1:] == (65, 32) for shape, _ in by_shape)  # tables left out


def test_resolved_config_is_saved_with_every_checkpoint(pretrain, tmp_path):
    data = write_dataset(tmp_path / "data", "parquet", count=32)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(data, out, max_train_steps=4, checkpointing_steps=2, seed=7)) == 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_2", "step_4"]
    for name in checkpoints:
        assert "seed: 7" in (out / "checkpoints" / name / "config.yaml").read_text()
        state = json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())
        assert state["step"] == int(name.split("_")[1]) and state["samples_seen"] == 4 * state["step"]


def test_checkpoints_keep_the_last_k(pretrain, tmp_path):
    data = write_dataset(tmp_path / "data", "parquet", count=32)
    out = tmp_path / "out"
    assert pretrain.main(tiny_args(data, out, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_5"]


def _assert_same_run(reference: Path, resumed: Path):
    assert read_sample_ids(resumed) == read_sample_ids(reference)  # neither repeated nor skipped
    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resuming_a_finished_run_keeps_its_checkpoint_and_picture(pretrain, tmp_path):
    """`--resume_from_checkpoint latest` on a run that already finished (found by a new-user trial): nothing
    is trained, the last checkpoint is not written again, the weights are unchanged and the card still
    shows the reconstruction picture."""
    data = write_dataset(tmp_path / "data", "parquet", count=16)
    out = tmp_path / "out"
    args = tiny_args(data, out, max_train_steps=4, checkpointing_steps=3)  # last checkpoint: the final step 4
    assert pretrain.main(args) == 0
    weights = (out / "model.safetensors").read_bytes()
    checkpoint_written = (out / "checkpoints" / "step_4").stat().st_mtime_ns
    assert "reconstruction.png" in (out / "README.md").read_text()
    assert pretrain.main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_4"]
    assert (out / "checkpoints" / "step_4").stat().st_mtime_ns == checkpoint_written
    assert (out / "model.safetensors").read_bytes() == weights
    card = (out / "README.md").read_text()
    assert "reconstruction.png" in card and "No reconstruction picture" not in card


def test_killed_run_resumes_exactly(pretrain, tmp_path):
    """SIGKILL after step 5 (last checkpoint: step 3), resume from `latest` -> the same samples, in the
    same order, and the same final parameters as an uninterrupted run; across an epoch boundary and
    with two DataLoader workers."""
    data = write_dataset(tmp_path / "data", "parquet", count=40)  # 10 steps per epoch
    common = dict(max_train_steps=12, checkpointing_steps=3, log_sample_ids="true", dataloader_num_workers=2)
    # the reference runs like the interrupted one (a fresh process with the same threads), so that
    # floating-point reductions agree bit for bit
    reference = run_pretrain(tiny_args(data, tmp_path / "ref", **common))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    crashed = run_pretrain(tiny_args(data, out, **common), env={"MAE_CRASH_AT_STEP": "5"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]
    resumed = run_pretrain(tiny_args(data, out, resume_from_checkpoint="latest", **common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step_3" in resumed.stderr
    _assert_same_run(tmp_path / "ref", out)


@pytest.mark.slow
def test_killed_twice_and_during_a_save_resumes_exactly(pretrain, tmp_path):
    """Killed mid-training, then while writing checkpoint 9 (resumes from step 6), then after step 11:
    the stream position keeps advancing after each resume, and the run ends as an uninterrupted one."""
    data = write_dataset(tmp_path / "data", "webdataset", count=40)
    common = dict(max_train_steps=14, checkpointing_steps=3, log_sample_ids="true", dataloader_num_workers=2)
    # the reference runs like the interrupted one (a fresh process with the same threads), so that
    # floating-point reductions agree bit for bit
    reference = run_pretrain(tiny_args(data, tmp_path / "ref", **common))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    resume = dict(resume_from_checkpoint="latest", **common)
    first = run_pretrain(tiny_args(data, out, **resume), env={"MAE_CRASH_AT_STEP": "5"})
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_pretrain(tiny_args(data, out, **resume), env={"MAE_CRASH_DURING_CHECKPOINT": "9"})
    assert second.returncode == -9, second.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step_9", "step_3", "step_6"], names  # the half-written save is not a checkpoint
    third = run_pretrain(tiny_args(data, out, **resume), env={"MAE_CRASH_AT_STEP": "11"})
    assert third.returncode == -9 and "step_6" in third.stderr, third.stderr[-2000:]
    last = run_pretrain(tiny_args(data, out, **resume))
    assert last.returncode == 0 and "step_9" in last.stderr, last.stderr[-2000:]
    _assert_same_run(tmp_path / "ref", out)


class _KilledDuringSave(BaseException):
    pass


def test_killed_while_saving_resumes_from_the_previous_checkpoint(pretrain, tmp_path, monkeypatch):
    """The checkpoint hook "kills" the process after step 4's state is written and before the rename
    (here by raising, in-process; the slow test below uses a real SIGKILL): step_2 stays the latest."""
    from modeling_mae.training import checkpoint

    def kill(pid, sig):
        raise _KilledDuringSave

    data = write_dataset(tmp_path / "data", "parquet", count=32)
    out = tmp_path / "run"
    common = dict(max_train_steps=6, checkpointing_steps=2, log_sample_ids="true")
    assert pretrain.main(tiny_args(data, tmp_path / "ref", **common)) == 0

    monkeypatch.setenv("MAE_CRASH_DURING_CHECKPOINT", "4")
    monkeypatch.setattr(checkpoint.os, "kill", kill)
    with pytest.raises(_KilledDuringSave):
        pretrain.main(tiny_args(data, out, **common))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step_4", "step_2"]
    assert checkpoint.CheckpointManager(out).latest().name == "step_2"

    monkeypatch.delenv("MAE_CRASH_DURING_CHECKPOINT")
    assert pretrain.main(tiny_args(data, out, resume_from_checkpoint="latest", **common)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]
    _assert_same_run(tmp_path / "ref", out)


@pytest.mark.slow
def test_two_processes_see_disjoint_samples_and_hold_identical_parameters(tmp_path):
    data = write_dataset(tmp_path / "data", "webdataset", count=64, num_shards=4)
    out = tmp_path / "out"
    # accelerate's `--cpu` starts several processes only through mpirun; this config uses torchrun and the
    # script runs the processes on the CPU with gloo (see configs/accelerate/cpu_multi_process.yaml)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu_multi_process.yaml"), "--main_process_port", "29517"]
    argv = tiny_args(data, out, max_train_steps=5, checkpointing_steps=5, log_sample_ids="true",
                     gradient_accumulation_steps=2)
    result = run_pretrain(argv, launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ids0 = [line.split("\t") for line in read_sample_ids(out, 0)]
    ids1 = [line.split("\t") for line in read_sample_ids(out, 1)]
    assert len(ids0) == len(ids1) == 5 * 2 * 4
    # each process reads its own shards, in every epoch (32 samples a process: steps 1-4 are epoch 0, step 5
    # epoch 1, whose file order, and so each process's shards, is drawn anew)
    for epoch_steps in ({"1", "2", "3", "4"}, {"5"}):
        mine = [{i for step, i in ids if step in epoch_steps} for ids in (ids0, ids1)]
        assert not mine[0] & mine[1]
    assert len({i for _, i in ids0[:32]}) == 32  # an epoch: every sample of the process's shards once
    assert "effective batch 16 = 4 per device x 2 processes x 2 accumulation" in result.stderr
    # every process wrote the fingerprint of the parameters it held at the final checkpoint
    checkpoint = out / "checkpoints" / "step_5"
    sums = [json.loads((checkpoint / f"process_{r}.json").read_text())["param_checksum"] for r in (0, 1)]
    assert sums[0] == sums[1]
    single = load_file(out / "model.safetensors")
    assert sums[0][0] == pytest.approx(sum(v.double().sum().item() for v in single.values()), rel=1e-9)


def test_nonfinite_guard_skips_and_stops():
    from modeling_mae.training.runtime import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(True, 1) is False
    assert guard.check(False, 2) is True and guard.check(False, 3) is True
    assert guard.check(True, 4) is False and guard.consecutive == 0 and guard.skipped == 2
    guard.check(False, 5), guard.check(False, 6)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        guard.check(False, 7)


def test_nan_steps_are_skipped_and_stop_the_run_keeping_the_checkpoint(pretrain, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", "parquet", count=32)
    out = tmp_path / "out"
    original = MAEForPreTraining.forward_loss
    calls = {"n": 0}

    def nan_after_two_steps(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(MAEForPreTraining, "forward_loss", nan_after_two_steps)
    argv = tiny_args(data, out, max_train_steps=8, checkpointing_steps=2, max_consecutive_nonfinite=3)
    assert pretrain.main(argv) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    weights = load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model.safetensors").exists()  # no export of a broken run


def test_gradient_checkpointing_gives_the_same_parameters(pretrain, tmp_path):
    """Recomputing activations in the backward pass changes nothing numerically."""
    data = write_dataset(tmp_path / "data", "parquet", count=32)
    common = dict(max_train_steps=3, checkpointing_steps=0)
    assert pretrain.main(tiny_args(data, tmp_path / "plain", **common)) == 0
    assert pretrain.main(tiny_args(data, tmp_path / "ckpt", gradient_checkpointing="true", **common)) == 0
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_trackers_log_loss_lr_speed_and_data_wait(pretrain, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_dataset(tmp_path / "data", "parquet", count=32)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=4, checkpointing_steps=0, with_tracking="true", report_to="tensorboard")
    assert pretrain.main(argv) == 0
    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    # MFU on CPU too: the peak is measured at start when no data-sheet figure is known
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction", "train/mfu"} <= tags


@pytest.mark.slow
def test_demo_config_writes_model_card_and_picture(tmp_path):
    """The README's main-job command, shortened to 2 epochs, run from another folder: the demo writes its
    own data folder (outputs/demo_data, marked) there."""
    out = tmp_path / "out"
    result = run_pretrain(
        ["--config", str(REPO / "configs" / "pretrain" / "demo.yaml"), "--output_dir", str(out), "--num_train_epochs", "2"],
        timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs" / "demo_data" / ".modeling_mae_demo_data").is_file()
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "reconstruction.png"):
        assert (out / name).is_file(), name
    losses = [float(line.split('"train/loss": ')[1].split(",")[0]) for line in result.stderr.splitlines()
              if '"train/loss": ' in line]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_an_uninterrupted_run(tmp_path):
    """Every process restores its own stream position (process_<rank>.json) and RNG state."""
    data = write_dataset(tmp_path / "data", "webdataset", count=64, num_shards=4)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu_multi_process.yaml"), "--main_process_port", "29519"]
    common = dict(max_train_steps=9, checkpointing_steps=3, log_sample_ids="true", dataloader_num_workers=2,
                  resume_from_checkpoint="latest")
    reference = run_pretrain(tiny_args(data, tmp_path / "ref", **common), launcher=launcher, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    crashed = run_pretrain(tiny_args(data, out, **common), launcher=launcher, env={"MAE_CRASH_AT_STEP": "5"})
    assert crashed.returncode != 0
    resumed = run_pretrain(tiny_args(data, out, **common), launcher=launcher, timeout=600)
    assert resumed.returncode == 0 and "step_3" in resumed.stderr, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert read_sample_ids(out, rank) == read_sample_ids(tmp_path / "ref", rank)
    _assert_same_run(tmp_path / "ref", out)


@pytest.mark.slow
def test_torch_compile_trains_and_exports_plain_parameter_names(tmp_path):
    data = write_dataset(tmp_path / "data", "parquet", count=16)
    out = tmp_path / "out"
    result = run_pretrain(tiny_args(data, out, max_train_steps=2, checkpointing_steps=2, torch_compile="true"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (out / "model.safetensors", out / "checkpoints" / "step_2" / "model.safetensors"):
        assert not any(key.startswith("_orig_mod.") for key in load_file(path)), path
