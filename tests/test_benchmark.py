"""scripts/benchmark.py keeps working: `--quick` runs every part and writes well-formed rows.

No timing thresholds here (timings belong to the benchmark's own report); the assertions are on the
structure of the rows and on the parity checks the benchmark makes before it times anything.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = out / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--threads", "1", "--json", str(path), "--data_dir", str(out / "data")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text()), result.stdout


def _rows(report, prefix):
    rows = [r for r in report["rows"] if r["name"].startswith(prefix)]
    assert rows, f"no row starting with {prefix!r}"
    return rows


def test_every_part_writes_rows_with_the_documented_fields(quick_run):
    report, stdout = quick_run
    assert set(report["machine"]) >= {"torch", "threads", "cpus", "cpu_bf16"}
    assert "AMX" in report["machine"]["cpu_bf16"]  # says whether the CPU has AMX / AVX512-BF16
    for row in report["rows"]:
        assert set(row) == {"name", "ours", "reference", "unit", "ratio", "limit", "note"}
        assert isinstance(row["name"], str) and isinstance(row["unit"], str)
        if row["ours"] is not None and row["reference"] is not None and row["unit"] not in ("loss", "abs"):
            assert row["ours"] > 0 and row["reference"] > 0 and math.isfinite(row["ratio"])
        assert row["name"] in stdout  # the Markdown table lists every row
    assert "| benchmark | ours | reference | unit | ratio | limit |" in stdout
    for prefix in ("train step", "matmul peak", "masking speed-up", "input pipeline", "inference", "attention"):
        _rows(report, prefix)
    for dtype in ("float32", "bfloat16"):  # fp32 and bf16 rows side by side, from one run
        assert any(dtype in r["name"] for r in _rows(report, "train step"))
        assert any(dtype in r["name"] for r in _rows(report, "inference"))
        assert any(dtype in r["name"] for r in _rows(report, "matmul peak"))


@pytest.mark.parametrize("dtype,loss_tol,feature_tol", [("float32", 1e-5, 1e-4), ("bfloat16", 2e-2, 0.25)])
def test_train_rows_compare_identical_models(quick_run, dtype, loss_tol, feature_tol):
    report, _ = quick_run
    train = [r for r in _rows(report, "train step") if dtype in r["name"]]
    (loss,) = [r for r in train if r["unit"] == "loss"]
    assert loss["ours"] == pytest.approx(loss["reference"], rel=loss_tol)  # converted weights, same batch + noise
    (mfu,) = [r for r in train if r["name"].endswith("MFU")]
    assert 0 < mfu["ours"] and 0 < mfu["reference"]
    assert mfu["unit"] == f"% of {dtype} matmul peak"  # divided by the peak of the dtype that ran
    (throughput,) = [r for r in train if r["name"].endswith("throughput")]
    assert "reference at its faster attention" in throughput["note"]  # sdpa and eager both timed
    (memory,) = [r for r in train if r["unit"] == "MiB"]
    assert memory["ours"] > 0 and memory["reference"] > 0
    (parity,) = [r for r in _rows(report, "inference") if r["unit"] == "abs" and dtype in r["name"]]
    assert parity["ours"] < feature_tol


def test_masking_rows_carry_the_flop_ratio_limit(quick_run):
    report, _ = quick_run
    rows = _rows(report, "masking speed-up")
    assert len(rows) == 2  # two decoder depths, in the first dtype only
    for row in rows:
        assert row["limit"] > 1.5  # removing 75% of the encoder tokens must cut FLOPs a lot
        assert row["ratio"] == pytest.approx(row["ours"] / row["reference"], rel=1e-6)


def test_flop_counter_counts_cpu_attention():
    """torch's counter misses the CPU flash-attention kernel; the benchmark adds it."""
    q = torch.randn(2, 3, 10, 8, requires_grad=True)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    # torch's formulas: forward 2 matmuls of 2*N*H*T*T*d, backward 5 (scores recomputed, as flash does)
    assert benchmark.count_flops(attention) == 7 * (2 * 2 * 3 * 10 * 10 * 8)


def test_mask_token_baseline_sees_every_token():
    config = benchmark.MAEConfig.from_preset("mae-tiny")
    model = benchmark.MAEForPreTraining(config)
    baseline = benchmark.MaskTokensInEncoder(model)
    pixel_values, noise = benchmark.images_and_noise(config, 2, "cpu")
    loss = baseline(pixel_values, noise)
    loss.backward()
    assert torch.isfinite(loss) and baseline.encoder_mask_token.grad.abs().sum() > 0

    def fwd_bwd(fn):
        return lambda: fn().backward()

    ratio = benchmark.count_flops(fwd_bwd(lambda: baseline(pixel_values, noise))) / benchmark.count_flops(
        fwd_bwd(lambda: model(pixel_values, noise=noise).loss)
    )
    assert ratio > 1.5


def test_shards_are_webdataset_layout(tmp_path):
    paths = benchmark.make_shards(str(tmp_path), images=5, shards=2, image_wh=(40, 30))
    samples = list(benchmark.TarShards(paths, decode=len))
    assert len(samples) == 5 and all(size > 100 for size, _ in samples)
    assert [label for _, label in samples] == [0, 1, 2, 3, 4]
