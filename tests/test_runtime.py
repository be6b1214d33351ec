"""The shared run-time decisions: mixed precision "auto" from the device facts, the matmul peak for MFU."""

from __future__ import annotations

import logging

import pytest
import torch

from modeling_mae.training import runtime
from modeling_mae.training.runtime import autocast_dtype, peak_flops, resolve_mixed_precision


ZEN4 = {"avx512f", "avx512_bf16", "avx512_vnni"}  # bf16 dot products at vector width, no matrix unit
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize(
    "facts, expected",
    [
        (dict(cuda_bf16=True), "bf16"),  # A100 / H100 / L4 ...
        (dict(cuda_bf16=False), "no"),  # V100 / T4: no bf16 tensor cores; fp16 is an explicit choice
        (dict(cpu=True, flags=SAPPHIRE_RAPIDS), "bf16"),  # AMX
        (dict(cpu=True, flags=ZEN4), "no"),  # AVX512-BF16 alone is not faster than fp32 matmuls
        (dict(cpu=True, flags=set()), "no"),
    ],
)
def test_auto_mixed_precision_follows_the_device(facts, expected):
    resolved, reason = resolve_mixed_precision("auto", **facts)
    assert resolved == expected
    assert reason.startswith("auto: ")


def test_auto_reads_cpu_flags_when_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    assert resolve_mixed_precision("auto")[0] == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ZEN4)
    resolved, reason = resolve_mixed_precision("auto")
    assert resolved == "no" and "AVX512-BF16 but no AMX" in reason


def test_auto_on_a_gpu_asks_torch_for_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto")[0] == "no"
    assert resolve_mixed_precision("auto", cpu=True, flags=set())[0] == "no"  # --cpu on a GPU machine


def test_explicit_choices_are_kept_and_bad_ones_named():
    for value in ("no", "bf16", "fp16", None):
        assert resolve_mixed_precision(value, cpu=True, flags=SAPPHIRE_RAPIDS)[0] == value
    with pytest.raises(ValueError, match="`mixed_precision` must be one of auto/no/bf16/fp16/fp8, got 'fp32'"):
        resolve_mixed_precision("fp32")


def test_cpu_flags_parses_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert runtime.cpu_flags() == {"fpu", "avx512_bf16", "amx_bf16"}


def test_make_accelerator_logs_the_decision(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ZEN4)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        accelerator = runtime.make_accelerator("auto", str(tmp_path), False, None, cpu=True)
    assert accelerator.mixed_precision == "no"
    assert "mixed precision: no (auto: CPU without bf16 matrix units (AVX512-BF16 but no AMX): float32)" in caplog.text


def test_autocast_dtype():
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("no") is torch.float32


def test_peak_is_measured_in_the_runs_dtype_when_unknown(monkeypatch):
    measured = []
    monkeypatch.setattr(runtime, "measure_matmul_flops", lambda device, dtype: measured.append(dtype) or 1e12)
    assert peak_flops(torch.device("cpu"), None, torch.bfloat16) == 1e12
    assert peak_flops(torch.device("cpu"), None, torch.float32) == 1e12
    assert measured == [torch.bfloat16, torch.float32]
    assert peak_flops(torch.device("cpu"), 2.5, torch.float32) == 2.5e12  # configured: not measured
    assert peak_flops(torch.device("cpu"), None, torch.float32, measure=False) is None
    assert len(measured) == 2


def test_measured_peak_is_a_gemm_rate():
    """2 n^3 FLOPs over the best time: positive and below 100 TFLOP/s on any CPU."""
    flops = runtime.measure_matmul_flops(torch.device("cpu"), torch.float32, n=256, reps=1)
    assert 1e8 < flops < 1e14


def test_measuring_the_peak_leaves_the_global_random_stream_alone():
    """Measured at the start of a run and again after a resume: it must not shift the masking noise."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    runtime.measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, reps=1)
    torch.testing.assert_close(torch.rand(3), expected)
