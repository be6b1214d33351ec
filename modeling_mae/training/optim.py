"""Optimizer, learning rate and schedule, as in the MAE recipes.

- `pretraining_param_groups`: the official pretraining groups (timm 0.3.2's `add_weight_decay` with no
  skip list): no decay on 1-D tensors and `.bias`, decay on everything else, the CLS and mask tokens
  included; frozen parameters (the fixed sin-cos tables) are left out.
- `param_groups_weight_decay`: weight decay only on tensors with dim >= 2 that the model does not list in
  `no_weight_decay()` (so no decay on biases, norms, position embeddings, CLS / mask tokens); frozen
  parameters are left out.
- `effective_batch_size` / `scaled_lr`: lr = blr * (per-device batch x processes x accumulation) / 256.
- `create_optimizer`: AdamW, fused when the parameters live on a device that has the fused kernel.
- `create_scheduler`: linear warm-up then half-cycle cosine, stepped once per optimizer step
  (transformers' `get_cosine_schedule_with_warmup`, or its `min_lr` variant).

Downstream: `layer_decay_param_groups` (fine-tuning: timm's `param_groups_layer_decay` through the model's
`group_matcher()` / `no_weight_decay()`), passed to `create_optimizer`; `LARS` / `build_lars` (the linear
probe's optimizer, the official `util/lars.py` update).
"""

from __future__ import annotations

import inspect
import math

import torch
from timm.optim import param_groups_layer_decay
from torch import nn


def pretraining_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The official pretraining groups: {"params": decayed, "weight_decay": wd}, {"params": rest, 0}.

    `main_pretrain.py` calls timm 0.3.2's `add_weight_decay(model, wd)` without a skip list, so only
    the shape and the name decide: 1-D tensors (norms, biases) and names ending in `.bias` get no
    decay; everything else is decayed, the CLS token (1, 1, D) and the mask token included (the
    model's `no_weight_decay()` list, which fine-tuning uses, is deliberately not consulted here).
    Frozen parameters (the fixed sin-cos position tables) are left out of the optimizer."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """Two groups: {"params": decayed, "weight_decay": wd} and {"params": not decayed, "weight_decay": 0}.

    Not decayed: every trainable tensor with `dim < 2` (biases, LayerNorm) and the names in
    `skip` or in `model.no_weight_decay()` when the model has one."""
    if skip is None:
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def effective_batch_size(per_device_batch_size: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    return per_device_batch_size * num_processes * gradient_accumulation_steps


def scaled_lr(base_learning_rate: float, effective_batch: int) -> float:
    """The linear scaling rule of the MAE recipes: lr = blr * effective batch / 256."""
    return base_learning_rate * effective_batch / 256


def _fused_available(params: list[torch.Tensor]) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return bool(params) and all(p.device.type in ("cuda", "xpu", "mps") for p in params)


def create_optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `groups` (each may carry its own weight_decay / lr_scale); fused when available
    (parameters on CUDA, XPU or MPS) unless `fused=False`."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = _fused_available(params)
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group.setdefault("lr", lr * group.get("lr_scale", 1.0))
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def create_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
    """Linear warm-up for `warmup_steps`, then half-cycle cosine down to `min_lr` at `total_steps`.

    Per-group `lr_scale` (layer decay) is kept since LambdaLR scales each group's initial lr."""
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if total_steps < 1:
        raise ValueError(f"the schedule needs total_steps >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if min_lr > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, num_cycles=0.5, min_lr=min_lr
        )
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps, num_cycles=0.5)


def steps_for_epochs(epochs: float, steps_per_epoch: int) -> int:
    return int(math.ceil(epochs * steps_per_epoch))


def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay, from timm's `param_groups_layer_decay`.

    Layer i (0 = embeddings, b + 1 = encoder block b, L + 1 = fc_norm / head) gets
    `lr * layer_decay ** (L + 1 - i)`, the official scale; no weight decay on biases, norms, the CLS
    token and the position table (`model.no_weight_decay()`). Each group keeps its `lr_scale`.
    """
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay
    )
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


class LARS(torch.optim.Optimizer):
    """LARS as in the official MAE linear probe (`util/lars.py`, from MoCo v3), step for step.

    For a tensor with more than one dimension (a weight matrix):
        d = g + wd * w
        d = d * trust_coefficient * ||w|| / ||d||   (factor 1 when ||w|| or ||d|| is 0)
    Tensors of one dimension or less (biases, norms): d = g, no weight decay, no scaling.
    Then for all: mu = momentum * mu + d (mu starts at 0), w = w - lr * mu.

    Written here rather than configured from timm's `Lars`: timm divides by ||g|| + wd * ||w|| + eps
    instead of ||g + wd * w||, and tests ||g|| rather than ||d|| for the zero case, so it differs from
    the official update as soon as wd != 0.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or momentum < 0 or trust_coefficient < 0:
            raise ValueError(
                f"LARS needs lr, weight_decay, momentum and trust_coefficient >= 0, got {lr}, {weight_decay}, "
                f"{momentum}, {trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:  # weight matrices: weight decay and the layer-wise trust ratio
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    ratio = torch.where((param_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))
                    update = update.mul(ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def build_lars(params: list[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
               trust_coefficient: float = 0.001) -> LARS:
    """The official linear-probe optimizer over the trainable `params`: `LARS` with trust coefficient
    0.001 (the official default, which `main_linprobe.py` keeps); wd 0 in the recipe."""
    trainable = [p for p in params if p.requires_grad]
    return LARS(trainable, lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
