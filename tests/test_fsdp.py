"""FSDP2 for real, on 2 CPU processes with gloo (tests/fsdp_cpu_driver.py), and the refusal of an FSDP
launch config on a machine without GPUs (accelerate would silently train unsharded there)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForPreTraining

from pretrain_helpers import read_sample_ids, run_pretrain, tiny_args, write_dataset


REPO = Path(__file__).resolve().parents[1]


def test_accelerate_ignores_fsdp_on_cpu_so_the_scripts_refuse_it(monkeypatch, tmp_path):
    """What refuses: accelerate 1.x enables DistributedType.FSDP only for GPU-like process types, so with
    ACCELERATE_USE_FSDP=true (what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets)
    CPU processes run unsharded; `make_accelerator` turns that into a one-line error."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from modeling_mae.training import runtime

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    try:
        accelerator = Accelerator(cpu=True)  # the canary: drop the refusal when this becomes FSDP
        assert accelerator.distributed_type != DistributedType.FSDP
    finally:
        AcceleratorState._reset_state(True)
    monkeypatch.setattr(runtime, "_has_accelerator", lambda: False)
    with pytest.raises(ValueError, match="FSDP .* needs GPUs: accelerate runs CPU processes as MULTI_CPU"):
        runtime.make_accelerator("no", str(tmp_path), False, "none")


@pytest.mark.slow
def test_fsdp2_matches_ddp_and_resumes_from_a_sharded_checkpoint(tmp_path):
    """2 processes: DDP, FSDP2 (MAELayer units, meta-device construction off rank 0, a sharded checkpoint
    at step 2) and FSDP2 resumed from that checkpoint train the same 4 steps to the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(REPO / "tests" / "fsdp_cpu_driver.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in (0, 1)]
    report = reports[0]

    # sharded for real: each process holds half of each weight and wrote its own checkpoint file
    for r in reports:
        assert r["qkv_local_shape"] == [96, 64] and r["qkv_global_shape"] == [192, 64]
        assert r["fsdp_units"] == 2 + 1 + 1  # 2 encoder MAELayers, 1 decoder MAELayer, the root
        assert r["frozen"] == ["decoder.decoder_pos_embed", "mae.embeddings.position_embeddings"]
    checkpoint = tmp_path / "checkpoint_step_2"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # the same training: losses, then the exported full weights (DDP vs FSDP vs FSDP resumed)
    assert report["fsdp_losses"] == pytest.approx(report["ddp_losses"], rel=1e-5)
    assert report["resumed_losses"] == pytest.approx(report["fsdp_losses"][2:], rel=1e-5)
    # warm-up 1 then cosine over 4 steps: after 2 steps lr = 1e-3 * (1 + cos(pi / 3)) / 2
    assert report["resumed_lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 3)) / 2, rel=1e-12)
    ddp, fsdp, resumed = (load_file(tmp_path / f"{name}.safetensors") for name in ("ddp", "fsdp", "fsdp_resumed"))
    torch.manual_seed(0)
    initial = MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).state_dict()
    assert ddp.keys() == fsdp.keys() == resumed.keys() == initial.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(resumed[key], fsdp[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ddp["mae.encoder.layer.0.attention.qkv.weight"], initial["mae.encoder.layer.0.attention.qkv.weight"])
    # the exported weights load into the model class
    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    model.load_state_dict(fsdp)


@pytest.mark.slow
def test_pretrain_script_through_accelerates_fsdp2_matches_ddp_and_resumes(tmp_path):
    """scripts/pretrain.py with configs/accelerate/fsdp.yaml on 2 CPU processes, accelerate's FSDP2 code
    switched on by tests/fsdp_accelerate_cpu.py: sharded checkpoints (one file per process), a resume from
    the step-2 checkpoint that ends as the uninterrupted run, a full export with our own remote code, and
    the same weights as a DDP run (configs/accelerate/cpu_multi_process.yaml) of the same steps."""
    import shutil

    data = write_dataset(tmp_path / "data", "webdataset", count=64, num_shards=4)
    common = dict(max_train_steps=4, checkpointing_steps=2, reconstruction_steps=2, log_sample_ids="true")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    def launcher(config: str, port: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no",
                "--main_process_port", str(port)]

    fsdp = launcher("fsdp.yaml", 29543) + [str(REPO / "tests" / "fsdp_accelerate_cpu.py")]
    full = run_pretrain(tiny_args(data, tmp_path / "fsdp", **common), env=env, launcher=fsdp, timeout=600)
    assert full.returncode == 0, full.stderr[-4000:]
    step_2 = tmp_path / "fsdp" / "checkpoints" / "step_2"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # SHARDED_STATE_DICT: one file per process
        assert sorted(p.name for p in (step_2 / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step_2 / "model.safetensors").exists()
    out = tmp_path / "fsdp"
    assert (out / "reconstructions" / "step_2.png").is_file() and (out / "reconstruction.png").is_file()
    # the export is the model's own class and code, not the FSDP-generated subclass
    exported = json.loads((out / "config.json").read_text())
    assert exported["auto_map"]["AutoModelForPreTraining"] == "modeling_mae.MAEForPreTraining"
    assert (out / "modeling_mae.py").is_file() and not list(out.glob("_fsdp*.py"))

    # resume from the sharded step-2 checkpoint in a fresh output directory
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(step_2, resumed_dir / "checkpoints" / "step_2")
    shutil.copytree(out / "sample_ids", resumed_dir / "sample_ids")
    resumed = run_pretrain(tiny_args(data, resumed_dir, resume_from_checkpoint="latest", **common), env=env,
                           launcher=fsdp, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step_2" in resumed.stderr

    ddp = run_pretrain(tiny_args(data, tmp_path / "ddp", **common), env=env,
                       launcher=launcher("cpu_multi_process.yaml", 29545), timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("fsdp", "resumed", "ddp")}
    assert weights["fsdp"].keys() == weights["resumed"].keys() == weights["ddp"].keys()
    for key in weights["fsdp"]:
        torch.testing.assert_close(weights["resumed"][key], weights["fsdp"][key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(weights["ddp"][key], weights["fsdp"][key], rtol=1e-5, atol=1e-6, msg=key)
    for rank in (0, 1):
        assert read_sample_ids(resumed_dir, rank) == read_sample_ids(out, rank) == read_sample_ids(tmp_path / "ddp", rank)
