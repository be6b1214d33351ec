"""Evaluation during pretraining (is it learning?): k-NN at step 0 and every eval_steps, label-free signals
at logging steps, the run's pictures and card; a run with evaluation trains exactly as one without, also
across a kill and a resume; two processes score as one."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mae.training.data import write_parquet_shards

from pretrain_helpers import import_pretrain, run_pretrain, smooth_images, tiny_args


def _labelled_data(root: Path, per_class: int = 8) -> Path:
    """4 classes of smooth colour fields (label = the colour family) as train + validation parquet shards."""
    images = smooth_images(4 * per_class + 16, seed=3)
    train = [(data, index % 4) for index, (data, _) in enumerate(images[: 4 * per_class])]
    queries = [(data, index % 4) for index, (data, _) in enumerate(images[4 * per_class:])]
    write_parquet_shards(train, root, num_shards=2)
    write_parquet_shards(queries, root, num_shards=1, split="validation")
    return root


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


EVAL = ["--eval_steps", "2", "--eval_bank_size", "32", "--eval_num_queries", "16", "--per_device_eval_batch_size", "8"]


def test_evaluation_changes_nothing_in_training_and_tells_the_story(tmp_path, one_thread):
    data = _labelled_data(tmp_path / "data")
    pretrain = import_pretrain()
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    assert pretrain.main(tiny_args(data, plain, checkpointing_steps=0)) == 0
    assert pretrain.main(tiny_args(data, evaluated, checkpointing_steps=0) + EVAL) == 0
    a, b = _weights(plain), _weights(evaluated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights

    rows = [json.loads(line) for line in (evaluated / "history.jsonl").read_text().splitlines()]
    knn_steps = [row["step"] for row in rows if "knn/cls_top1" in row]
    assert knn_steps == [0, 2, 4, 6]  # step 0 (the start), then every eval_steps
    assert all(0.0 <= row["knn/cls_top1"] <= 100.0 and "knn/mean_top1" in row for row in rows if "knn/cls_top1" in row)
    logged = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6]
    for row in logged:  # the loss as a share of the blind guess, collapse measures
        assert row["train/trivial_loss"] == pytest.approx(47 / 48, abs=0.02)  # norm_pix: (n-1)/n, n = 4*4*3
        assert 0 < row["train/loss_vs_trivial"] and row["features/spread"] > 0 and row["features/rankme"] >= 1
    assert (evaluated / "training_curves.png").is_file()
    card = (evaluated / "README.md").read_text()
    assert "## Is it learning?" in card and "| k-NN top-1, CLS token |" in card and "training_curves.png" in card
    assert "of the trivial predictor's loss" in card
    assert "No evaluation was run" in (plain / "README.md").read_text()  # no labelled data named: said so


def test_evaluation_and_resume_after_a_kill_give_the_same_weights_and_story(tmp_path):
    data = _labelled_data(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = lambda out: tiny_args(data, out, checkpointing_steps=2) + EVAL  # noqa: E731
    assert run_pretrain(args(straight)).returncode == 0
    crashed = run_pretrain(args(killed), env={"MAE_CRASH_AT_STEP": "3"})
    assert crashed.returncode != 0
    resumed = run_pretrain(args(killed) + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(straight), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda out: [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]  # noqa: E731, E741
    knn = lambda out: [(r["step"], r["knn/cls_top1"]) for r in rows(out) if "knn/cls_top1" in r]  # noqa: E731
    assert knn(killed) == knn(straight)  # the resumed story has each evaluation once, with the same values


def test_continued_pretraining_starts_from_the_checkpoints_own_knn_figure(tmp_path, one_thread):
    data = _labelled_data(tmp_path / "data")
    pretrain = import_pretrain()
    first, second = tmp_path / "first", tmp_path / "second"
    assert pretrain.main(tiny_args(data, first, checkpointing_steps=0) + EVAL) == 0
    assert pretrain.main(tiny_args(data, second, checkpointing_steps=0, model_name_or_path=first) + EVAL) == 0
    end_of_first = [json.loads(l) for l in (first / "history.jsonl").read_text().splitlines()][-1]  # noqa: E741
    start_of_second = json.loads((second / "history.jsonl").read_text().splitlines()[0])
    assert start_of_second["step"] == 0
    assert start_of_second["knn/cls_top1"] == end_of_first["knn/cls_top1"]
    assert start_of_second["knn/mean_top1"] == end_of_first["knn/mean_top1"]


def _monitor_results(out: Path) -> dict:
    from accelerate import Accelerator

    from modeling_mae import MAEConfig, MAEForPreTraining
    from modeling_mae.training.knn import load_knn_sets
    from modeling_mae.training.pretraining_evaluation import PretrainingMonitor
    from modeling_mae.training.transforms import normalize_on_device

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    bank, queries, _ = load_knn_sets((str(out / "data"), "train"), (str(out / "data"), "validation"), 32, 15, 32,
                                     rank=accelerator.process_index, world_size=accelerator.num_processes)
    monitor = PretrainingMonitor(bank, queries, normalize_on_device, device=accelerator.device, accelerator=accelerator,
                                 batch_size=4, k=5, online_probe=True)
    return {**monitor.evaluate(model.mae), "bank": len(bank), "queries": len(queries)}


def test_two_processes_score_as_one(tmp_path):
    """15 queries over 2 processes (8 + 7): every feature gathered once, the same accuracies as 1 process."""
    _labelled_data(tmp_path / "data")
    single = _monitor_results(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), __file__, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["queries"] for r in ranks] == [8, 7] and sum(r["bank"] for r in ranks) == single["bank"] == 32
    for r in ranks:
        for key in ("knn/cls_top1", "knn/mean_top1", "probe/top1"):
            assert math.isclose(r[key], single[key], abs_tol=1e-9), (key, r[key], single[key])


if __name__ == "__main__":  # one process of the 2-process test above
    out = Path(sys.argv[1])
    results = _monitor_results(out)
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
