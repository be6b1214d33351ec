"""What every training script sets up around its loop: the Accelerator, trackers, progress, speed.

- `resolve_mixed_precision(requested)`: "auto" (every script's default) -> "bf16" where the device runs
  bf16 matmuls natively and faster than fp32 (CUDA with bf16 support; CPUs with AMX or AVX512-BF16),
  "no" elsewhere.
- `reuse_freed_cpu_memory()`: on CPU runs, glibc malloc keeps freed memory for the next step (no page
  faults on every step's activations), logged.
- `make_accelerator(...)`: mixed precision (resolved as above, logged), trackers, gradient accumulation
  (accelerate's, `accumulation_plugin`; `optimizer_steps_per_epoch`: full groups only), and an explicit
  `DataLoaderConfiguration(dispatch_batches=False, split_batches=False)`: every process reads its own
  part of the stream (`split_dataset_by_node`), nothing is re-dispatched from rank 0; prepared loaders
  copy batches with `non_blocking`.
- `resolve_trackers(report_to)`: "all" / "tensorboard" / "wandb" / "none", dropping (with a warning)
  trackers whose package is not installed.
- `SpeedMeter`: images / s, fraction of time waiting for data, and MFU from `flops_per_image`.
- `flops_per_image(config, mask_ratio)`: training FLOPs of one MAE image (3 x forward matmuls).
- `peak_flops(device, override_tflops, dtype)`: dense peak per device: the configured value, the bf16
  table of known accelerators, else measured once (`measure_matmul_flops`: a 2048^3 GEMM in the run's dtype).
- `NonFiniteGuard`: counts skipped NaN/inf steps and stops the run after N in a row.
- `GracefulStop`: SIGTERM (preemption) / SIGINT (Ctrl-C) -> the loop finishes its optimizer step, every
  process writes the checkpoint, one line gives the resume command, exit code 128 + signal; a second
  Ctrl-C exits at once. `poll()`: the same answer without a wait on the hot path (one step late on
  several processes). `worker_ignores_interrupts` keeps DataLoader workers out of it.
- `tracker_hparams(cfg)`: the config for trackers, secrets masked.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from modeling_mae_cli import ExpectedError


logger = logging.getLogger(__name__)


class NonFiniteLossError(ExpectedError, RuntimeError):
    """Too many consecutive optimizer steps had a NaN/inf loss or gradient."""


def resolve_trackers(report_to: str | list[str] | None) -> list[str]:
    """Tracker names for `Accelerator(log_with=...)`; missing packages are dropped with a warning."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}
    if report_to in (None, "none", "", []):
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return [n for n, pkg in packages.items() if importlib.util.find_spec(pkg) is not None]
    kept = []
    for name in names:
        if name not in packages:
            raise ValueError(f"`report_to` entries must be one of {sorted(packages)} or 'all'/'none', got {name!r}")
        if importlib.util.find_spec(packages[name]) is None:
            warnings.warn(f"tracker {name!r} is not installed (pip install {packages[name]}); not logging to it")
            continue
        kept.append(name)
    return kept


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16", "fp8")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def resolve_mixed_precision(
    requested: str | None, cpu: bool = False, cuda_bf16: bool | None = None, flags: set[str] | None = None
) -> tuple[str | None, str]:
    """(`mixed_precision` for the Accelerator, the reason, for the log).

    "auto": "bf16" where the device computes bf16 matmuls natively, so that bf16 autocast is faster than
    fp32: CUDA devices with bf16 support; CPUs with AMX (flag `amx_bf16`) or AVX512-BF16 (`avx512_bf16`:
    bf16 dot-product instructions, twice the fp32 lanes). "no" elsewhere: a CPU without either (bf16
    would be emulated, slower than fp32) or a GPU without bf16 (fp16 with loss scaling is then an
    explicit choice). Measured on a 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX), torch 2.14: 2048^3
    GEMM 414 GFLOP/s bf16 vs 186 fp32; ViT-B/16 MAE train step (batch 16) 1.89x faster in bf16 autocast,
    the tiny demo model (batch 64, 1 thread) 1.36x. Any other value is kept as given; None keeps the
    launcher's (`accelerate launch --mixed_precision` / accelerate config). `cuda_bf16` and `flags` are
    the device facts, read from torch and /proc/cpuinfo when not given (tests pass them)."""
    if requested not in (None, *MIXED_PRECISION_CHOICES):
        raise ValueError(f"`mixed_precision` must be one of {'/'.join(MIXED_PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested, "as configured" if requested is not None else "the launcher's setting"
    on_gpu = not cpu and (torch.cuda.is_available() if cuda_bf16 is None else True)
    if on_gpu:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return "bf16", "auto: CUDA device with bf16 support"
        return "no", "auto: CUDA device without bf16 support (fp16 is an explicit choice)"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "bf16", "auto: CPU with AMX bf16 matrix units (amx_bf16)"
    if "avx512_bf16" in flags:
        return "bf16", "auto: CPU with AVX512-BF16 bf16 dot products (avx512_bf16), no AMX"
    return "no", "auto: CPU without bf16 instructions (no AMX, no AVX512-BF16): float32"


# glibc malloc's mallopt parameters (malloc.h). glibc before 2.35 refuses an mmap threshold above
# 32 MiB (HEAP_MAX_SIZE / 2): there the largest allowed is used.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = (1 << 31) - 1  # the largest C int: never give the heap top back
# environment settings of the same thresholds: the user's choice stands
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_max",
                   "glibc.malloc.top_pad")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def loaded_allocator() -> str | None:
    """The file name of a jemalloc / tcmalloc / mimalloc mapped into this process (LD_PRELOAD that
    worked, or linked in), from /proc/self/maps; None where there is none or no /proc."""
    try:
        with open("/proc/self/maps") as f:
            names = sorted({os.path.basename(line.split()[-1]) for line in f if "/" in line})
    except OSError:
        return None
    return next((name for name in names if any(allocator in name for allocator in OTHER_ALLOCATORS)), None)


def reuse_freed_cpu_memory() -> str:
    """Make glibc malloc keep freed memory for reuse (the process's own heap) instead of returning it to
    the kernel; returns what was done, for the log.

    By default glibc serves a large block (above a threshold that adapts up to 32 MiB) with a fresh
    mmap and unmaps it on free, and trims the heap top: every training step then page-faults its
    activations, attention scores and gradients back in, and the kernel zeroes each page first. The
    scripts raise the mmap threshold to 1 GiB and the trim threshold to 2 GiB, so a step reuses the
    previous step's pages: the resident size stays at the peak, which a training run reaches every
    step anyway. Measured on a 2-core AMD EPYC, ViT-B/16 MAE bf16 step (batch 16, ours and
    transformers' in one process, two rounds): page faults 2.35M -> 0.78M over the run, ours 5.08 / 5.33
    -> 5.43 / 5.46 img/s, peak RSS unchanged. The same advice as PyTorch's CPU tuning guide (jemalloc /
    tcmalloc): left alone where one of those is loaded (not merely named in LD_PRELOAD) or the
    environment sets these thresholds. The setting lasts for the process (a notebook keeps up to its
    peak of freed memory)."""
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator left as it is"
    loaded = loaded_allocator()
    if loaded:
        return f"{loaded} is loaded: allocator left as it is"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in tunables for name in MALLOC_TUNABLES) or any(name in os.environ for name in MALLOC_ENV):
        return "glibc malloc thresholds set by the environment: left as it is"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt: allocator left as it is"
    mmap = next((value for value in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, value) == 1), None)
    trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if mmap is None and not trim:
        return "glibc mallopt refused: allocator left as it is"
    done = [f"mmap threshold {f'{mmap >> 30} GiB' if mmap >= 1 << 30 else f'{mmap >> 20} MiB'}"] if mmap else []
    if trim:
        done.append("trim threshold 2 GiB")
    return f"glibc malloc keeps freed memory ({', '.join(done)})"


def forget_other_mixed_precision(mixed_precision: str | None) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses another mixed precision in the
    same process ("restart your runtime"): a notebook running one script's `main` in bf16, then another
    in fp32. Such a run starts from a fresh AcceleratorState instead (the process group, PartialState,
    is kept; Accelerators of the earlier run share the state and see the new setting). Not under FSDP,
    DeepSpeed or Megatron-LM, whose plugins live only in the state being reset: accelerate's own error
    stands there."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state or mixed_precision is None:
        return
    current = str(AcceleratorState._shared_state.get("_mixed_precision", mixed_precision))
    if current == str(mixed_precision):
        return
    plugins = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if PartialState._shared_state and PartialState().distributed_type in plugins:
        return
    AcceleratorState._reset_state(reset_partial_state=False)


def refuse_fsdp_without_gpu(cpu: bool) -> None:
    """An FSDP launch (`ACCELERATE_USE_FSDP=true`) on CPU processes is an error: accelerate enables FSDP
    only for GPU-like process types and would silently train unsharded (MULTI_CPU), replicating the
    whole model and optimizer in every process."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (cpu or not _has_accelerator()):
        raise ValueError(
            "distributed_type FSDP (configs/accelerate/fsdp.yaml) needs GPUs: accelerate runs CPU processes as "
            "MULTI_CPU and ignores fsdp_config there; on this machine launch with "
            "configs/accelerate/cpu_multi_process.yaml"
        )


def accumulation_plugin(gradient_accumulation_steps: int):
    """accelerate's gradient accumulation as every training loop here uses it: the loop runs each
    micro-batch inside `accelerator.accumulate(model)` (no gradient sync but on the step's last
    micro-batch; the prepared optimizer steps and zeroes only there, `accelerator.sync_gradients`) and
    calls `accelerator.backward(loss)`, which divides the loss by the number of steps.

    One optimizer step is always `gradient_accumulation_steps` micro-batches, counted by accelerate
    alone: `sync_with_dataloader=False`, so the end of a prepared DataLoader does not force a short
    step (with it, prepared loaders would end an epoch differently from pretraining's stream or the
    linear probe's feature cache, which are not prepared, and a short step's loss would still be
    divided by the full count); the loops drop an epoch's incomplete last group themselves
    (steps per epoch = micro-batches // steps). `adjust_scheduler=False`: no schedule goes through
    `prepare`, each loop steps its own once per optimizer step."""
    from accelerate.utils import GradientAccumulationPlugin

    if gradient_accumulation_steps < 1:
        raise ValueError(f"`gradient_accumulation_steps` must be >= 1, got {gradient_accumulation_steps}")
    return GradientAccumulationPlugin(
        num_steps=gradient_accumulation_steps, sync_with_dataloader=False, adjust_scheduler=False
    )


def optimizer_steps_per_epoch(micro_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `micro_batches` (per process): full groups of
    `gradient_accumulation_steps` only; the loop drops an incomplete last group (`accumulation_plugin`)."""
    steps = micro_batches // gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"an epoch has {micro_batches} micro-batches per process, fewer than one optimizer step of "
            f"gradient_accumulation_steps={gradient_accumulation_steps}: lower it or the per-device batch size"
        )
    return steps


def make_accelerator(mixed_precision: str | None, output_dir: str, with_tracking: bool, report_to, cpu: bool = False,
                     gradient_accumulation_steps: int = 1):
    """An Accelerator for an explicit loop whose processes each read their own shard of a stream.

    `mixed_precision`: "auto" decides by the device (`resolve_mixed_precision`, logged); None takes the
    launcher's setting (`accelerate launch --mixed_precision` / config file).
    `gradient_accumulation_steps`: micro-batches per optimizer step, accelerate's way (`accumulation_plugin`).
    Several processes started by torchrun (`accelerate launch --multi_gpu`) on a machine without GPUs
    become CPU processes: accelerate's own `--cpu` launcher starts several processes only through mpirun."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accumulation = accumulation_plugin(gradient_accumulation_steps)
    trackers = resolve_trackers(report_to) if with_tracking else []
    refuse_fsdp_without_gpu(cpu)
    if not cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: run as CPU processes (gloo)
        cpu = True
    on_cpu = cpu or not _has_accelerator()
    resolved, reason = resolve_mixed_precision(mixed_precision, cpu=on_cpu)
    allocator = reuse_freed_cpu_memory() if on_cpu else None
    forget_other_mixed_precision(resolved)
    accelerator = Accelerator(
        mixed_precision=resolved,
        cpu=cpu,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=f"{output_dir}/runs"),
        # prepared loaders copy their (pinned, on GPUs) batches to the device without waiting for the copy
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False, even_batches=False,
                                                  non_blocking=True),
        gradient_accumulation_plugin=accumulation,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step itself
    )
    if accelerator.is_main_process:
        logger.info("mixed precision: %s (%s)", accelerator.mixed_precision, reason)
        if allocator:
            logger.info("CPU memory: %s", allocator)
    return accelerator


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The compute dtype of an Accelerator's `mixed_precision` ("no" -> float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision), torch.float32)


# --------------------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------------------
def _vit_flops(tokens: int, dim: int, mlp_dim: int, layers: int) -> float:
    """Forward FLOPs (2 per multiply-add) of `layers` pre-norm ViT blocks on `tokens` tokens."""
    matmuls = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim)  # qkv + proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return layers * (matmuls + attention)


def flops_per_image(config, mask_ratio: float | None = None) -> float:
    """Training FLOPs of one image through `MAEForPreTraining` (forward x 3 for forward + backward)."""
    ratio = config.mask_ratio if mask_ratio is None else mask_ratio
    length = config.num_patches
    keep = int(length * (1 - ratio))
    patch_dim = config.patch_size**2 * config.num_channels
    dim, dec = config.hidden_size, config.decoder_hidden_size
    forward = (
        2 * keep * patch_dim * dim  # patch projection of the visible patches
        + _vit_flops(1 + keep, dim, config.intermediate_size, config.num_hidden_layers)
        + 2 * (1 + keep) * dim * dec  # decoder_embed
        + _vit_flops(1 + length, dec, config.decoder_intermediate_size, config.decoder_num_hidden_layers)
        + 2 * length * dec * patch_dim  # decoder_pred
    )
    return 3.0 * forward


# Dense bf16 tensor-core peak (FLOP/s) of common accelerators, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16
    "T4": 65e12,  # fp16
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of an n^3 GEMM in `dtype` on `device` (best of `reps` after one warm-up): the practical
    matrix-multiply peak, where no data-sheet figure is known (CPUs, unknown GPUs)."""
    # a private generator: the run's random streams (masking noise, resumed RNG state) stay untouched
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(
    device: torch.device, override_tflops: float | None = None, dtype: torch.dtype = torch.bfloat16, measure: bool = True
) -> float | None:
    """Peak FLOP/s of one device in the run's compute `dtype`: the configured `peak_tflops`; for
    bf16/fp16 on CUDA, the table entry whose name the device name contains; else measured once with
    `measure_matmul_flops` (None when `measure` is False: no MFU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type == "cuda" and torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():  # most specific names first
            if key in name:
                return value
    if not measure:
        return None
    peak = measure_matmul_flops(device, dtype)
    logger.info("peak %s matmul FLOP/s measured on %s: %.3g TFLOP/s (2048^3 GEMM)", str(dtype).split(".")[-1],
                device, peak / 1e12)
    return peak


class SpeedMeter:
    """Images / s, data-wait fraction and MFU over the steps since the last `read()`."""

    def __init__(self, flops_per_image: float, peak_flops_total: float | None):
        self.flops_per_image = flops_per_image
        self.peak = peak_flops_total
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_s = self.images / elapsed
        out = {"images_per_s": images_per_s, "data_wait_fraction": min(self.data_wait / elapsed, 1.0)}
        if self.peak:
            out["mfu"] = images_per_s * self.flops_per_image / self.peak
        return out


class NonFiniteGuard:
    """Decides whether an optimizer step is skipped for a NaN/inf loss (or gradient norm).

    `check(finite)` returns True when the step must be skipped, counts it, and raises
    `NonFiniteLossError` after `max_consecutive` skipped steps in a row (0 disables the stop)."""

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, finite: bool, step: int) -> bool:
        if finite:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        logger.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step, self.consecutive)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimizer steps in a row had a NaN/inf loss or gradient (last at step {step}); "
                f"stopping. The last complete checkpoint is intact: lower the learning rate (`blr`), enable "
                f"`max_grad_norm`, or use bf16 instead of fp16, then resume with `--resume_from_checkpoint latest`."
            )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def tracker_hparams(cfg, **extra) -> dict:
    """The run config as flat tracker hyperparameters (TensorBoard hparams, W&B config), secrets masked."""
    from .config import to_dict

    values = {**to_dict(cfg), **extra}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}



# --------------------------------------------------------------------------------------------------
# Interrupts and preemption
# --------------------------------------------------------------------------------------------------
def worker_ignores_interrupts(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group and clusters signal every
    process; the workers leave the decision to the training process (which stops them when it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resume_command(script: str, argv: list[str] | None, num_processes: int) -> str:
    """The command line that continues this run: the same script and flags, `--resume_from_checkpoint
    latest` instead of any resume / overwrite flag, under `accelerate launch` when several processes ran."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        name = arg.split("=", 1)[0]
        if name in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    path = Path(script).resolve()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    launcher = ["accelerate", "launch", "--num_processes", str(num_processes)] if num_processes > 1 else ["python"]
    return shlex.join([*launcher, str(path), *kept, "--resume_from_checkpoint", "latest"])


class GracefulStop:
    """Turns SIGTERM and SIGINT into a request to stop after the current optimizer step.

        with GracefulStop(accelerator, resume_command(__file__, argv, n)) as stop:
            for ...:
                ...optimizer step...
                if stop.requested():            # a collective: call it on every process, every step
                    save_checkpoint()
                    stop.exit(step)             # one line with the resume command; SystemExit(128 + signal)

    Every process must take the same decision at the same step (the checkpoint is a collective), so
    `requested()` combines the flags of all processes (max over a gather). A second SIGINT while stopping
    exits at once (`os._exit`), without saving; a repeated SIGTERM is ignored (schedulers resend it).
    The handlers are installed only while the context is open, and only in the main thread."""

    def __init__(self, accelerator, resume_command: str):
        self.accelerator = accelerator
        self.command = resume_command
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if signum == signal.SIGINT:
                os.write(2, f"\nsecond {name}: exiting now, without a checkpoint\n".encode())
                os._exit(128 + signum)
            return
        self.signum = signum
        if self.accelerator.is_main_process:
            os.write(2, f"\n{name} received: finishing the current step, then saving a checkpoint "
                        f"(Ctrl-C again to exit at once)\n".encode())

    def requested(self) -> bool:
        """Whether any process received a signal (the same answer on every process)."""
        import torch

        if self.accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=self.accelerator.device)
        received = int(self.accelerator.gather(flag).max().item())
        if received and self.signum is None:
            self.signum = received
        return received != 0

    def poll(self) -> bool:
        """`requested()` without a wait on the hot path: on several processes the flags are combined by
        an all-reduce over a CPU (gloo) group started at this call and read at the next one, so the
        answer comes one step late, the same on every process, and never waits on the device. The first
        call starts the group (a collective). One process: the flag itself."""
        if self.accelerator.num_processes == 1:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        if getattr(self, "_group", None) is None:
            self._group, self._pending = dist.new_group(backend="gloo"), None
        received = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            received = int(flag[0])
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        if received and self.signum is None:
            self.signum = received
        return received != 0

    def exit(self, step: int, checkpoint: str | os.PathLike | None = None) -> None:
        """After the checkpoint is written: one line, trackers closed, exit 128 + signal number."""
        signum = self.signum or signal.SIGTERM
        if self.accelerator.is_main_process:
            where = f" (saved {checkpoint})" if checkpoint else ""
            print(f"stopped by {signal.Signals(signum).name} after step {step}{where}; resume with: {self.command}",
                  file=sys.stderr, flush=True)
        self.accelerator.end_training()
        raise SystemExit(128 + signum)


def quiet_library_loggers(level: int = logging.WARNING) -> None:
    """Keep library chatter (accelerate's "Saving current state to ...", one line per saved file) at
    `level`, so that the script's own lines (one per epoch) stay readable."""
    for name in ("accelerate", "datasets", "transformers", "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(level)
