"""The shared run-time decisions: mixed precision "auto" from the device facts, the matmul peak for MFU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from modeling_mae.training import runtime
from modeling_mae.training.runtime import autocast_dtype, peak_flops, resolve_mixed_precision


ZEN4 = {"avx512f", "avx512_bf16", "avx512_vnni"}  # bf16 dot products at vector width, no matrix unit
SKYLAKE = {"avx512f", "avx512_vnni", "avx2"}  # no bf16 instructions: bf16 would be emulated
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize(
    "facts, expected",
    [
        (dict(cuda_bf16=True), "bf16"),  # A100 / H100 / L4 ...
        (dict(cuda_bf16=False), "no"),  # V100 / T4: no bf16 tensor cores; fp16 is an explicit choice
        (dict(cpu=True, flags=SAPPHIRE_RAPIDS), "bf16"),  # AMX
        (dict(cpu=True, flags=ZEN4), "bf16"),  # AVX512-BF16: bf16 GEMMs ~2.2x fp32 (measured on Zen 4)
        (dict(cpu=True, flags=SKYLAKE), "no"),
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
    assert resolved == "bf16" and "AVX512-BF16" in reason and "no AMX" in reason
    monkeypatch.setattr(runtime, "cpu_flags", lambda: SKYLAKE)
    resolved, reason = resolve_mixed_precision("auto")
    assert resolved == "no" and "no AMX, no AVX512-BF16" in reason


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
    monkeypatch.setattr(runtime, "cpu_flags", lambda: SKYLAKE)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        accelerator = runtime.make_accelerator("auto", str(tmp_path), False, None, cpu=True)
    assert accelerator.mixed_precision == "no"
    assert "mixed precision: no (auto: CPU without bf16 instructions (no AMX, no AVX512-BF16): float32)" in caplog.text


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


MMAPPED_BYTES_OF_A_BIG_TENSOR = """
import ctypes, sys, torch
from modeling_mae.training.runtime import reuse_freed_cpu_memory


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tuned":
    print(reuse_freed_cpu_memory(), file=sys.stderr)
block = torch.empty(4 << 20, dtype=torch.float32)  # 16 MiB: above glibc's initial mmap threshold (128 KiB)
print(libc.mallinfo2().hblkhd)  # bytes in blocks served by their own mmap (unmapped again on free)
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc 2.33+


GLIBC = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc malloc (2.33+, for mallinfo2)")


def _env_without_allocator_settings(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    return {**env, **extra}


@GLIBC
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_it_back_in():
    """A 16 MiB tensor: glibc's default serves it with its own mmap, unmapped on free, so every step
    page-faults it back in; after `reuse_freed_cpu_memory` it comes from the heap, which keeps freed
    pages for the next step."""
    def mmapped(variant):
        result = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_OF_A_BIG_TENSOR, variant], capture_output=True,
                                text=True, env=_env_without_allocator_settings(), check=True)
        return int(result.stdout.strip()), result.stderr

    default, _ = mmapped("default")
    tuned, said = mmapped("tuned")
    assert default >= 16 << 20
    assert tuned < 16 << 20, said
    assert "keeps freed memory (mmap threshold" in said


@GLIBC
def test_a_chosen_allocator_or_threshold_is_left_alone(monkeypatch):
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: "libjemalloc.so.2")
    assert runtime.reuse_freed_cpu_memory() == "libjemalloc.so.2 is loaded: allocator left as it is"
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert "left as it is" in runtime.reuse_freed_cpu_memory()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert "left as it is" in runtime.reuse_freed_cpu_memory()


@GLIBC
def test_unrelated_malloc_settings_and_a_preload_that_failed_do_not_count(tmp_path):
    """`LD_PRELOAD=/nonexistent/libjemalloc.so.2`: ld.so ignores it (found by a new-user trial), so glibc
    malloc runs and is tuned; the log must not claim jemalloc. `MALLOC_ARENA_MAX` (common in containers)
    is about arenas, not these thresholds."""
    code = "from modeling_mae.training.runtime import reuse_freed_cpu_memory; print(reuse_freed_cpu_memory())"
    env = _env_without_allocator_settings(LD_PRELOAD=str(tmp_path / "libjemalloc.so.2"), MALLOC_ARENA_MAX="2")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "keeps freed memory" in result.stdout


def test_the_glibc_mmap_threshold_falls_back_to_what_old_glibc_allows(monkeypatch):
    """glibc before 2.35 refuses an mmap threshold above 32 MiB: the largest allowed is used, and the
    trim threshold is set either way."""
    import ctypes

    calls = []

    def old_glibc_mallopt(option, value):
        calls.append((option, value))
        return 0 if option == runtime.M_MMAP_THRESHOLD and value > 32 << 20 else 1

    class FakeLibc:
        mallopt = staticmethod(old_glibc_mallopt)

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.31"))
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    for name in ("GLIBC_TUNABLES", *runtime.MALLOC_ENV):
        monkeypatch.delenv(name, raising=False)
    said = runtime.reuse_freed_cpu_memory()
    assert said == "glibc malloc keeps freed memory (mmap threshold 32 MiB, trim threshold 2 GiB)"
    assert calls == [(runtime.M_MMAP_THRESHOLD, 1 << 30), (runtime.M_MMAP_THRESHOLD, 32 << 20),
                     (runtime.M_TRIM_THRESHOLD, (1 << 31) - 1)]


def test_a_second_run_in_one_process_takes_its_own_mixed_precision(tmp_path):
    """A notebook runs one script's `main`, then another's: accelerate's process-wide state would refuse
    the second run's mixed precision ("restart your runtime"); each run starts from its own."""
    from accelerate.state import AcceleratorState

    first = runtime.make_accelerator("no", str(tmp_path / "a"), False, None, cpu=True)
    assert first.mixed_precision == "no"
    AcceleratorState._shared_state["marker"] = True
    runtime.make_accelerator("no", str(tmp_path / "a2"), False, None, cpu=True)
    assert AcceleratorState._shared_state.get("marker")  # the same setting: the state is left as it is
    second = runtime.make_accelerator("bf16", str(tmp_path / "b"), False, None, cpu=True)
    assert second.mixed_precision == "bf16"
    assert "marker" not in AcceleratorState._shared_state
