"""Side-by-side benchmark: this project's MAE against transformers' ViTMAE, in one process and one run.

Every comparison is interleaved (ours, reference, reference, ours, ...) so that noise from a shared
machine hits both sides alike, and each figure is the median over the repetitions.

Parts (train, inference and attention once per `--dtype`, by default float32 and bfloat16 autocast):
  train      forward + backward + AdamW step of `MAEForPreTraining` vs `ViTMAEForPreTraining` (same
             config, converted weights, same batch and `noise`; the reference timed with both its sdpa
             and eager attention, the faster one reported): img/s, peak memory, MFU = counted FLOPs /
             time / matrix-multiply peak of a 2048^3 GEMM in the same dtype, timed in the same loop.
  masking    MAE vs the same model with mask tokens fed to the encoder (paper Table 2 baseline), ViT-L/16
             with 8- and 1-block decoders: measured forward+backward speed-up and its limit, the FLOP ratio.
  pipeline   img/s of one DataLoader worker: ours (`TrainTransform.from_bytes` -> uint8) vs transformers'
             run_mae.py (PIL decode + Compose RandomResizedCrop / flip / ToTensor / Normalize), on the same
             webdataset-layout tar shards of ~500x375 JPEGs generated under /tmp.
  inference  feature extraction (encoder forward, no masking) vs `ViTMAEModel` (both attention settings).
  attention  the attention core alone, explicit matmuls vs torch's SDPA, at the model's shapes: the
             measurements behind the model's default attention (`modeling_mae.prefer_eager_attention`).
  evaluation the k-NN evaluation during pretraining against the training it interrupts (ours only): a
             training step and the unmasked feature forward of the same batch, interleaved, plus the k-NN
             scoring of the queries against the bank; the cost of one evaluation every `eval_steps` as a
             share of the training time between two, for the demo (its config) and ViT-B/16 (10k bank).

The machine line says whether the CPU has AMX / AVX512-BF16 (bf16 instructions), and on CPU how the
allocator runs: by default as the training scripts set it (glibc malloc keeps freed memory,
`runtime.reuse_freed_cpu_memory`), for both sides; `--cpu_allocator system` keeps glibc's defaults.

    python scripts/benchmark.py --json /tmp/bench.json              # full, fp32 + bf16 (~15-20 min on 2 CPU cores)
    python scripts/benchmark.py --quick                             # every part at tiny sizes, seconds
    python scripts/benchmark.py --device cuda --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modeling_mae_cli import HelpFormatter, run_main


PART_NAMES = ("train", "masking", "pipeline", "inference", "attention", "evaluation")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes (seconds)")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES), help="parts to run")
    parser.add_argument("--device", default=None, help="torch device; none: cuda when available, else cpu")
    parser.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=["float32", "bfloat16"],
                        help="autocast dtype(s) (parameters stay float32; float32 = no autocast); each gets its rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; none: torch's")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per side; none: per part")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for the pipeline part")
    parser.add_argument("--data_dir", default="/tmp/mae_benchmark", help="where the JPEG shards are generated")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--cpu_allocator", choices=("reuse", "system"), default="reuse",
                        help="reuse: glibc malloc keeps freed memory, as the training scripts set it on CPU "
                        "(runtime.reuse_freed_cpu_memory), for both sides; system: glibc's defaults")
    # internal: one side's peak memory, measured in a child process of this script
    parser.add_argument("--memory-probe", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


if __name__ == "__main__":  # --help and usage errors answer before torch and transformers load
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

from modeling_mae import MAEConfig, MAEForPreTraining  # noqa: E402
from modeling_mae.conversion.architecture import transformers_config_from_mae  # noqa: E402
from modeling_mae.conversion.convert import convert_transformers_to_mae  # noqa: E402
from modeling_mae.masking import random_masking  # noqa: E402
from modeling_mae.training.runtime import cpu_flags, reuse_freed_cpu_memory  # noqa: E402
from modeling_mae.training.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, TrainTransform  # noqa: E402

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One comparison. `ratio` = ours / reference (for memory: reference / ours, higher is better)."""

    name: str
    ours: float | None
    reference: float | None
    unit: str
    ratio: float | None = None
    limit: float | None = None
    note: str = ""


def fmt(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| benchmark | ours | reference | unit | ratio | limit | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 6 if r.unit in ("loss", "abs") else 3  # parity checks need the digits
        lines.append(
            f"| {r.name} | {fmt(r.ours, digits)} | {fmt(r.reference, digits)} | {r.unit} | {fmt(r.ratio, digits)} "
            f"| {fmt(r.limit)} | {r.note} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating the order every repetition so that machine
    noise (other processes, frequency changes) hits every side alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values):
    return statistics.median(values)


def matmul_fn(n: int, device, dtype):
    """A big square GEMM (2 n^3 FLOPs), the device's practical matrix-multiply peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
# torch's flop counter knows the CUDA attention kernels but not the CPU flash kernel SDPA uses here.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Models: ours, transformers', and the weight conversion between them
# --------------------------------------------------------------------------------------------------
def reference_config(config: MAEConfig, **overrides) -> ViTMAEConfig:
    """transformers' ViTMAEConfig for the same architecture (the paper's LayerNorm eps, same loss), SDPA."""
    reference = transformers_config_from_mae(config)
    for name, value in {"_attn_implementation": "sdpa", **overrides}.items():
        setattr(reference, name, value)
    return reference


def build_pair(config: MAEConfig, device, seed: int = 0):
    """(ours, reference) MAEForPreTraining pair with identical weights: transformers' init, converted
    by the project's converter."""
    torch.manual_seed(seed)
    reference = ViTMAEForPreTraining(reference_config(config))
    _, ours = convert_transformers_to_mae(reference)
    return ours.to(device).train(), reference.to(device).train()


def build_side(side: str, config: MAEConfig) -> nn.Module:
    """One side alone, for memory measurements (the weights' values do not change memory)."""
    torch.manual_seed(0)
    return MAEForPreTraining(config) if side == "ours" else ViTMAEForPreTraining(reference_config(config))


# How the pretraining script calls our model: the decoder predicts only the removed patches (the loss's).
OURS_STEP = dict(predict_masked_only=True)


def make_optimizer(model: nn.Module, device) -> torch.optim.Optimizer:
    """The paper's AdamW; fused kernel where torch has one for the device (CPU and CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step_fn(model, optimizer, pixel_values, noise, device, dtype, **kwargs):
    def step():
        with autocast(device, dtype):
            loss = model(pixel_values=pixel_values, noise=noise, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def fwd_bwd_fn(model, pixel_values, noise, device, dtype, **kwargs):
    def step():
        with autocast(device, dtype):
            loss = model(pixel_values=pixel_values, noise=noise, **kwargs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def maybe_compile(model, enabled: bool):
    if enabled:
        model.compile()
    return model


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------
def sizes(quick: bool, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if quick:
        tiny = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                    decoder_num_attention_heads=4, decoder_intermediate_size=128)
        small = dict(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, decoder_hidden_size=64, decoder_num_attention_heads=4,
                     decoder_intermediate_size=256)
        return dict(
            train=dict(config=tiny, batch=4, reps=2, warmup=1, gemm=256),
            masking=dict(config=small, decoders=(2, 1), batch=2, reps=2, warmup=1),
            pipeline=dict(images=24, shards=2, image_wh=(160, 120), size=64, batch=8, reps=2),
            inference=dict(config=tiny, batch=4, reps=2, warmup=1),
        )
    base = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072)
    large = dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096)
    return dict(
        train=dict(config=base, batch=64 if gpu else 16, reps=20 if gpu else 9, warmup=3 if gpu else 1,
                   gemm=8192 if gpu else 2048),
        masking=dict(config=large, decoders=(8, 1), batch=64 if gpu else 8, reps=10 if gpu else 4,
                     warmup=3 if gpu else 1),
        pipeline=dict(images=512, shards=4, image_wh=(500, 375), size=224, batch=32, reps=5),
        inference=dict(config=base, batch=256 if gpu else 16, reps=20 if gpu else 5, warmup=3 if gpu else 1),
    )


def images_and_noise(config: MAEConfig, batch: int, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_hw
    pixel_values = torch.randn(batch, config.num_channels, height, width, generator=generator).to(device)
    noise = torch.rand(batch, config.num_patches, generator=generator).to(device)
    return pixel_values, noise


# --------------------------------------------------------------------------------------------------
# Part 1: the training step
# --------------------------------------------------------------------------------------------------
def with_attention(model: nn.Module, implementation: str, fn):
    """`fn` run with transformers' `implementation` set on `model` first (one model, one optimizer,
    timed at several attention settings)."""
    def call():
        if model.config._attn_implementation != implementation:
            model.set_attn_implementation(implementation)
        return fn()

    return call


REFERENCE_ATTENTION = ("sdpa", "eager")  # transformers' ViTMAE is measured at both, the faster one reported


def bench_train(args, device, dtype) -> list[Row]:
    spec = sizes(args.quick, device)["train"]
    config = MAEConfig(**spec["config"])
    ours, reference = build_pair(config, device)
    pixel_values, noise = images_and_noise(config, spec["batch"], device)

    # same weights, same batch, same noise -> same loss (checked before anything is timed)
    with torch.no_grad(), autocast(device, dtype):
        loss_ours = ours(pixel_values, noise=noise, **OURS_STEP).loss.item()
        loss_ref = reference(pixel_values=pixel_values, noise=noise).loss.item()

    flops = count_flops(fwd_bwd_fn(ours, pixel_values, noise, device, dtype, **OURS_STEP))
    flops_ref = count_flops(fwd_bwd_fn(reference, pixel_values, noise, device, dtype))
    ours, reference = maybe_compile(ours, args.compile), maybe_compile(reference, args.compile)
    reference_step = train_step_fn(reference, make_optimizer(reference, device), pixel_values, noise, device, dtype)
    fns = {
        "ours": train_step_fn(ours, make_optimizer(ours, device), pixel_values, noise, device, dtype, **OURS_STEP),
        **{f"reference {impl}": with_attention(reference, impl, reference_step) for impl in REFERENCE_ATTENTION},
        "gemm": matmul_fn(spec["gemm"], device, dtype),  # the peak of the dtype the steps run in
    }
    times = interleaved(fns, args.reps or spec["reps"], spec["warmup"], device)
    t = {k: median(v) for k, v in times.items()}
    best = min(REFERENCE_ATTENTION, key=lambda impl: t[f"reference {impl}"])
    t_ours, t_ref, t_gemm = t["ours"], t[f"reference {best}"], t["gemm"]
    peak = 2 * spec["gemm"] ** 3 / t_gemm
    batch = spec["batch"]
    name = f"train step ({describe(config)}, batch {batch}, {dtype_name(dtype)})"
    mfu = {"ours": 100 * flops / t_ours / peak, "reference": 100 * flops / t_ref / peak}  # model FLOPs (ours)
    other = next(impl for impl in REFERENCE_ATTENTION if impl != best)
    rows = [
        Row(f"{name} throughput", batch / t_ours, batch / t_ref, "img/s", t_ref / t_ours,
            note=f"reference at its faster attention, {best} ({other}: {batch / t[f'reference {other}']:.3g} img/s)"),
        Row(f"{name} MFU", mfu["ours"], mfu["reference"], f"% of {dtype_name(dtype)} matmul peak",
            mfu["ours"] / mfu["reference"],
            note=f"{flops / 1e9:.1f} GFLOP/step fwd+bwd (reference counts {flops_ref / 1e9:.1f})"),
        Row(f"matmul peak ({spec['gemm']}^3 GEMM, {dtype_name(dtype)})", peak / 1e9, None, "GFLOP/s",
            note="timed interleaved with the steps"),
        Row(f"{name} loss (parity check)", loss_ours, loss_ref, "loss", loss_ours / loss_ref,
            note="same weights, batch and noise" + ("" if dtype == torch.float32 else "; bf16 rounding")),
    ]
    reference.set_attn_implementation(best)
    rows.append(matmul_share_row(name, {"ours": fns["ours"], "reference": reference_step}, mfu, device))
    del fns, ours, reference, reference_step
    rows.append(bench_memory(args, device, dtype, name))
    return rows


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_share_row(name: str, steps: dict, mfu: dict, device) -> Row:
    """Share of a profiled step's time spent in matrix multiplies (mm / addmm / bmm / baddbmm self
    time over the step's total), one profiled step per side, sides alternated. Both times come from
    the same step, so load on the machine mostly cancels; MFU / share is then how fast the step's own
    matmuls run compared with the big-GEMM peak, i.e. the MFU this step could reach with no other work."""
    from torch.profiler import ProfilerActivity, profile

    share = {}
    for side, step in steps.items():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        averages = prof.key_averages()
        attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        matmul = sum(getattr(e, attribute) for e in averages if e.key in MATMUL_OPS)
        share[side] = 100 * matmul / max(sum(getattr(e, attribute) for e in averages), 1e-9)
    ceiling = {side: 100 * mfu[side] / share[side] for side in share}
    return Row(
        f"{name} time share of matmuls", share["ours"], share["reference"], "% of step", share["ours"] / share["reference"],
        note=f"profiled; MFU / share = matmul efficiency {ceiling['ours']:.0f}% (ours) / {ceiling['reference']:.0f}% "
        "(reference) of the matmul peak: the MFU ceiling at these shapes",
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(config: MAEConfig) -> str:
    return (
        f"{config.hidden_size}-d/{config.num_hidden_layers} blocks/p{config.patch_size}@{config.image_hw[0]} + "
        f"{config.decoder_hidden_size}-d/{config.decoder_num_hidden_layers}-block decoder"
    )


def peak_memory_of_side(side: str, args, device, dtype) -> float:
    """Bytes of peak memory of a few training steps of one side, measured in isolation.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: torch has no allocator statistics there, so the
    side runs in a fresh subprocess and reports its peak resident set size (VmHWM of /proc/self/status)
    minus its resident size before the model was built: weights + gradients + AdamW state + activations.
    (Not `getrusage` ru_maxrss: Linux carries the parent's peak over fork + exec into it.)
    """
    spec = sizes(args.quick, device)["train"]
    config = MAEConfig(**spec["config"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model = maybe_compile(build_side(side, config).to(device), args.compile)
        step = train_step_fn(model, make_optimizer(model, device), *images_and_noise(config, spec["batch"], device),
                             device, dtype, **(OURS_STEP if side == "ours" else {}))
        for _ in range(3):
            step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del model, step
        return float(peak)
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", side, "--dtype", dtype_name(dtype),
               "--cpu_allocator", args.cpu_allocator]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def memory_probe(side: str, args):
    """Runs in the subprocess started by `peak_memory_of_side` (CPU)."""
    device = torch.device("cpu")
    spec = sizes(args.quick, device)["train"]
    config = MAEConfig(**spec["config"])
    pixel_values, noise = images_and_noise(config, spec["batch"], device)
    before = current_rss_bytes()
    torch.manual_seed(0)
    model = build_side(side, config)
    step = train_step_fn(model, make_optimizer(model, device), pixel_values, noise, device, DTYPES[args.dtype[0]],
                         **(OURS_STEP if side == "ours" else {}))
    for _ in range(3):
        step()
    print(json.dumps({"peak_bytes": proc_status_bytes("VmHWM") - before}))


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def current_rss_bytes() -> int:
    return proc_status_bytes("VmRSS")


def bench_memory(args, device, dtype, name) -> Row:
    ours = peak_memory_of_side("ours", args, device, dtype)
    reference = peak_memory_of_side("reference", args, device, dtype)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "subprocess peak RSS - RSS before the model"
    return Row(f"{name} peak memory", ours / 2**20, reference / 2**20, "MiB", reference / ours, note=f"{how}; ratio = reference / ours")


# --------------------------------------------------------------------------------------------------
# Part 2: what masking buys (paper Table 2)
# --------------------------------------------------------------------------------------------------
class MaskTokensInEncoder(nn.Module):
    """Paper Table 2 baseline: the same MAE, but the encoder sees all L patches, removed ones replaced
    by a learned mask token; the decoder then gets the full, already ordered sequence."""

    def __init__(self, mae: MAEForPreTraining):
        super().__init__()
        self.model = mae
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, mae.config.hidden_size))

    def forward(self, pixel_values, noise):
        mae, decoder = self.model.mae, self.model.decoder
        x, grid, cls = mae.embed(pixel_values)  # (N, L, D) with positions
        _, mask, _, _ = random_masking(x, noise, mae.config.mask_ratio)
        pos = mae.embeddings.position_table(grid)[:, 1:].to(x.dtype)
        x = torch.where(mask.bool().unsqueeze(-1), self.encoder_mask_token.to(x.dtype) + pos, x)
        hidden, _, _ = mae.encoder(torch.cat([cls, x], dim=1))  # (N, 1 + L, D)
        x = decoder.decoder_embed(mae.layernorm(hidden)) + decoder.decoder_pos_embed.to(x.dtype)
        pred = decoder.predict(x, first_query=1)  # (N, L, p*p*C): every patch, in patch order
        return self.model.forward_loss(pixel_values, pred, mask)


def bench_masking(args, device, dtype) -> list[Row]:
    spec = sizes(args.quick, device)["masking"]
    return [
        masking_row(MAEConfig(**spec["config"], decoder_num_hidden_layers=depth), spec, args, device, dtype)
        for depth in spec["decoders"]
    ]


def masking_row(config: MAEConfig, spec: dict, args, device, dtype) -> Row:
    """Forward + backward of MAE vs the mask-token encoder (the optimizer step is the same work on both
    sides and is left out, as the FLOP ratio leaves it out)."""
    torch.manual_seed(0)
    mae = MAEForPreTraining(config).to(device)
    baseline = MaskTokensInEncoder(mae).to(device)

    def fwd_bwd(model, pixel_values, noise):
        with autocast(device, dtype):
            loss = model(pixel_values, noise=noise, **OURS_STEP).loss if model is mae else model(pixel_values, noise)
        loss.backward()
        baseline.zero_grad(set_to_none=True)  # all of the MAE's parameters too

    one = images_and_noise(config, 1, device)  # FLOPs are per image: count one, cheaply
    flop_ratio = count_flops(lambda: fwd_bwd(baseline, *one)) / count_flops(lambda: fwd_bwd(mae, *one))
    batch = images_and_noise(config, spec["batch"], device)
    times = interleaved(
        {"mae": lambda: fwd_bwd(mae, *batch), "baseline": lambda: fwd_bwd(baseline, *batch)},
        args.reps or spec["reps"], spec["warmup"], device,
    )
    speedup = median(times["baseline"]) / median(times["mae"])
    n = spec["batch"]
    return Row(
        f"masking speed-up ({config.hidden_size}-d/{config.num_hidden_layers} blocks, "
        f"{config.decoder_num_hidden_layers}-block decoder, batch {n}, {dtype_name(dtype)})",
        n / median(times["mae"]), n / median(times["baseline"]), "img/s fwd+bwd", speedup, limit=flop_ratio,
        note=f"reference = mask tokens in the encoder; limit = FLOP ratio; {100 * speedup / flop_ratio:.0f}% of limit",
    )


# --------------------------------------------------------------------------------------------------
# Part 3: the input pipeline
# --------------------------------------------------------------------------------------------------
def make_shards(directory: str, images: int, shards: int, image_wh: tuple[int, int], seed: int = 0) -> list[str]:
    """webdataset-layout tar shards (`{key}.jpg`, `{key}.cls`) of smooth random JPEGs (quality 90)."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"shard-{i:05d}.tar") for i in range(shards)]
    if all(os.path.exists(p) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    width, height = image_wh
    per_shard = -(-images // shards)
    for index, path in enumerate(paths):
        with tarfile.open(path + ".partial", "w") as tar:
            for k in range(index * per_shard, min(images, (index + 1) * per_shard)):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(image_wh, Image.BICUBIC)
                pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 24, (height, width, 3))
                buffer = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
                for suffix, payload in (("jpg", buffer.getvalue()), ("cls", str(k % 1000).encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(path + ".partial", path)
    return paths


class TarShards(torch.utils.data.IterableDataset):
    """Reads (jpeg bytes, label) samples from webdataset-layout tar shards, shards split over workers."""

    def __init__(self, paths: list[str], decode):
        self.paths, self.decode = paths, decode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        paths = self.paths if info is None else self.paths[info.id :: info.num_workers]
        for path in paths:
            with tarfile.open(path) as tar:
                sample = {}
                for member in tar:
                    key, suffix = member.name.rsplit(".", 1)
                    sample[suffix] = tar.extractfile(member).read()
                    if "jpg" in sample and "cls" in sample:
                        yield self.decode(sample["jpg"]), int(sample["cls"])
                        sample = {}


def reference_transform(size: int):
    """transformers' examples/pytorch/image-pretraining/run_mae.py training transform."""
    from torchvision.transforms import (Compose, InterpolationMode, Lambda, Normalize, RandomHorizontalFlip,
                                        RandomResizedCrop, ToTensor)

    ops = Compose([
        Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    ])
    return lambda data: ops(Image.open(io.BytesIO(data)))


def bench_pipeline(args, device, dtype) -> list[Row]:
    spec = sizes(args.quick, device)["pipeline"]
    width, height = spec["image_wh"]
    directory = os.path.join(args.data_dir, f"shards-{spec['images']}x{width}x{height}")
    paths = make_shards(directory, spec["images"], spec["shards"], spec["image_wh"])
    ours = TrainTransform(spec["size"])
    loaders = {
        name: torch.utils.data.DataLoader(
            TarShards(paths, decode), batch_size=spec["batch"], num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        for name, decode in (("ours", ours.from_bytes), ("reference", reference_transform(spec["size"])))
    }

    def epoch(loader):
        return lambda: sum(batch[0].shape[0] for batch in loader)

    times = interleaved({k: epoch(v) for k, v in loaders.items()}, args.reps or spec["reps"], 1, torch.device("cpu"))
    per_worker = max(args.workers, 1)
    t_ours, t_ref = median(times["ours"]), median(times["reference"])
    n = spec["images"]
    return [Row(
        f"input pipeline ({width}x{height} JPEG -> {spec['size']}px, {args.workers} worker(s))",
        n / t_ours / per_worker, n / t_ref / per_worker, "img/s per worker", t_ref / t_ours,
        note="ours: uint8 batch (normalised on device); reference: float32 normalised batch",
    )]


# --------------------------------------------------------------------------------------------------
# Part 4: inference (feature extraction)
# --------------------------------------------------------------------------------------------------
def bench_inference(args, device, dtype) -> list[Row]:
    spec = sizes(args.quick, device)["inference"]
    config = MAEConfig(**spec["config"])
    torch.manual_seed(0)
    reference = ViTMAEModel(reference_config(config, mask_ratio=0.0))
    _, ours = convert_transformers_to_mae(reference)  # MAEModel, CLS pooling (no extra work)
    ours, reference = ours.to(device).eval(), reference.to(device).eval()
    pixel_values, _ = images_and_noise(config, spec["batch"], device)
    # transformers' ViTMAEModel always shuffles; increasing noise keeps the patch order, as ours does
    keep_order = torch.arange(config.num_patches, device=device).float().expand(spec["batch"], -1)
    with torch.inference_mode(), autocast(device, dtype):
        diff = ours(pixel_values).last_hidden_state - reference(pixel_values, noise=keep_order).last_hidden_state
    diff = diff.abs().max().item()
    ours, reference = maybe_compile(ours, args.compile), maybe_compile(reference, args.compile)

    def run(model, **kwargs):
        def call():
            with torch.inference_mode(), autocast(device, dtype):
                return model(pixel_values, **kwargs).last_hidden_state
        return call

    fns = {"ours": run(ours), **{f"reference {impl}": with_attention(reference, impl, run(reference, noise=keep_order))
                                 for impl in REFERENCE_ATTENTION}}
    times = interleaved(fns, args.reps or spec["reps"], spec["warmup"], device)
    t = {k: median(v) for k, v in times.items()}
    best = min(REFERENCE_ATTENTION, key=lambda impl: t[f"reference {impl}"])
    other = next(impl for impl in REFERENCE_ATTENTION if impl != best)
    t_ours, t_ref = t["ours"], t[f"reference {best}"]
    batch = spec["batch"]
    name = f"inference ({config.hidden_size}-d/{config.num_hidden_layers} blocks, batch {batch}, {dtype_name(dtype)})"
    return [
        Row(name, batch / t_ours, batch / t_ref, "img/s", t_ref / t_ours,
            note=f"encoder forward, no masking; reference at its faster attention, {best} "
            f"({other}: {batch / t[f'reference {other}']:.3g} img/s)"),
        Row(f"{name} max abs feature difference (parity check)", diff, None, "abs", note="same weights and images"),
    ]


# --------------------------------------------------------------------------------------------------
# Part 5: the attention kernel (what the model's default attention chooses from)
# --------------------------------------------------------------------------------------------------
ATTENTION_SHAPES = {  # (tokens, heads, head width, queries) of ViT-B/16 MAE at mask ratio 0.75
    "encoder": (50, 12, 64, 50),
    "decoder": (197, 16, 32, 197),  # every block but the last: every token is a query
    "decoder last block": (197, 16, 32, 147),  # predict_masked_only: the removed patches' queries only
}


def bench_attention(args, device, dtype) -> list[Row]:
    """The attention core alone (q k^T, softmax, @ v; no projections), explicit batched matmuls
    (`eager_attention_forward`) vs torch's SDPA, at the model's shapes, batch 16: forward + backward
    (training) and forward only (inference). The measurements behind `prefer_eager_attention`."""
    from modeling_mae.modeling_mae import eager_attention_forward, prefer_eager_attention, sdpa_attention_forward

    batch = 2 if args.quick else 16
    reps = args.reps or (2 if args.quick else 15)
    module = nn.Module()  # the functions read only `.training`
    rows = []
    for name, (tokens, heads, width, queries) in ATTENTION_SHAPES.items():
        if args.quick:
            tokens, queries = tokens // 4, queries // 4
        for backward in (True, False):
            qkv = torch.randn(batch, tokens, 3, heads, width, device=device, dtype=dtype, requires_grad=backward)

            def call(attend):
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the model's layout: views of one qkv output
                out, _ = attend(module, q[:, :, tokens - queries:], k, v, None, scaling=width**-0.5)
                return q, k, out.reshape(batch, queries, heads * width)

            def step(attend):
                def run():
                    if backward:
                        call(attend)[2].sum().backward()
                        qkv.grad = None
                    else:
                        with torch.inference_mode():
                            call(attend)
                return run

            times = interleaved({"eager": step(eager_attention_forward), "sdpa": step(sdpa_attention_forward)},
                                reps, 2, device)
            t_eager, t_sdpa = median(times["eager"]), median(times["sdpa"])
            with torch.set_grad_enabled(backward):
                q, k, _ = call(eager_attention_forward)
                chosen = "eager" if prefer_eager_attention(q, k) else "sdpa"
            rows.append(Row(
                f"attention {'fwd+bwd' if backward else 'forward'}, {name} ({queries} queries x {tokens} keys x "
                f"{heads} heads x {width}, batch {batch}, {dtype_name(dtype)})", 1e3 * t_eager, 1e3 * t_sdpa,
                "ms eager / sdpa", t_sdpa / t_eager,
                note=f"ratio > 1: explicit matmuls faster; the model's default uses {chosen}",
            ))
    return rows


# --------------------------------------------------------------------------------------------------
def evaluation_cases() -> tuple:
    """(name, preset, batch on CPU / GPU, (bank, queries), eval_steps, examples per epoch): the demo as its
    config (configs/pretrain/demo.yaml) runs it, and ViT-B/16 with a 10k bank evaluated once an epoch."""
    import yaml

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/pretrain/demo.yaml").read_text())
    batch = demo["per_device_train_batch_size"]
    return (
        ("demo", demo["model_preset"], (batch, batch), (demo["eval_bank_size"], demo["eval_num_queries"]),
         demo["eval_steps"], 4096),
        ("ViT-B/16", "mae-vit-base-patch16", (16, 256), (10000, 2000), None, 1281167),
    )


def bench_evaluation(args, device, dtype) -> list[Row]:
    from modeling_mae.training.knn import encoder_features, knn_scores

    rows = []
    for name, preset, batches, (bank, queries), eval_steps, epoch in evaluation_cases():
        overrides = sizes(True, device)["train"]["config"] if args.quick else {}
        config = MAEConfig.from_preset(preset, **overrides) if not args.quick else MAEConfig(**overrides)
        batch = batches[device.type == "cuda"] if not args.quick else 4
        torch.manual_seed(0)
        model = maybe_compile(MAEForPreTraining(config).to(device), args.compile)
        optimizer = make_optimizer(model, device)
        pixel_values, noise = images_and_noise(config, batch, device)

        def features():
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                encoder_features(model.mae, pixel_values)
            model.train()

        fns = {"train step": train_step_fn(model, optimizer, pixel_values, noise, device, dtype),
               "features": features}
        times = {k: median(v) for k, v in interleaved(fns, args.reps or 3, 1, device).items()}
        bank_features = torch.randn(bank if not args.quick else 64, config.hidden_size, device=device)
        query_features = torch.randn(queries if not args.quick else 16, config.hidden_size, device=device)
        labels = torch.randint(0, 100, (bank_features.shape[0],), device=device)
        start = time.perf_counter()
        for _ in range(2):  # CLS and mean-pooled
            knn_scores(query_features, bank_features, labels, 100)
        synchronize(device)
        scoring = time.perf_counter() - start
        per_image_step, per_image_features = times["train step"] / batch, times["features"] / batch
        one_eval = (bank + queries) * per_image_features + scoring
        if eval_steps is not None:  # the demo: its own config (effective batch = batch)
            share = one_eval / (eval_steps * batch * per_image_step)
            rows.append(Row(f"evaluation cost, {name} (every {eval_steps} steps of {batch})", 100 * share, None, "%",
                            limit=10.0, note=f"one evaluation {one_eval:.2f} s ({bank}+{queries} images); "
                            f"{eval_steps} steps {eval_steps * times['train step']:.2f} s; {dtype_name(dtype)}"))
        else:  # the recipe: effective batch 4096, evaluated once an epoch; and the eval_steps for 10 %
            steps_per_epoch = epoch // 4096
            share = one_eval / (steps_per_epoch * 4096 * per_image_step)
            needed = math.ceil(one_eval / (0.10 * 4096 * per_image_step))
            rows.append(Row(f"evaluation cost, {name} (once an epoch, effective batch 4096)", 100 * share, None, "%",
                            limit=10.0, note=f"one evaluation {one_eval:.1f} s ({bank}+{queries} images, measured at "
                            f"batch {batch}); <= 10 % from eval_steps {needed}; {dtype_name(dtype)}"))
        del model, optimizer
    return rows


PARTS = {"train": bench_train, "masking": bench_masking, "pipeline": bench_pipeline, "inference": bench_inference,
         "evaluation": bench_evaluation,
         "attention": bench_attention}
PER_DTYPE = ("train", "inference", "attention", "evaluation")  # run once per --dtype; masking (first dtype) and pipeline once


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    info["cpus"] = os.cpu_count()
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    flags = cpu_flags()
    info["cpu_bf16"] = ("AMX (amx_bf16)" if "amx_bf16" in flags
                        else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else "no AMX, no AVX512-BF16")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allocator = "glibc defaults"
    if device.type == "cpu" and args.cpu_allocator == "reuse":
        allocator = reuse_freed_cpu_memory()  # before anything is allocated, as the training scripts do
    if args.memory_probe:  # (CPU only: a CUDA run measures its memory in this process)
        return memory_probe(args.memory_probe, args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = machine()
    if device.type == "cpu":
        info["cpu_allocator"] = allocator
    print(f"# machine: {info}", flush=True)
    rows: list[Row] = []
    for part in args.parts:
        for dtype_arg in args.dtype if part in PER_DTYPE else args.dtype[:1]:
            start = time.perf_counter()
            new = PARTS[part](args, device, DTYPES[dtype_arg])
            rows.extend(new)
            print(f"# {part} ({dtype_arg}): {time.perf_counter() - start:.1f}s, load {os.getloadavg()[0]:.2f}",
                  flush=True)
            print(markdown_table(new), flush=True)
    info["load_average_end"] = os.getloadavg()
    print("\n" + markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(run_main(main))
