"""FSDP2 on CPU processes (gloo), driven the way accelerate's FSDP2 path (configs/accelerate/fsdp.yaml)
drives it, because accelerate itself runs CPU processes as MULTI_CPU and ignores `fsdp_config` there.

Run by tests/test_fsdp.py:  python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_driver.py OUT

Same steps as the pretraining script: `MAEForPreTraining` (mae-tiny), the official weight-decay groups
(`pretraining_param_groups`) in AdamW (`create_optimizer`), warm-up + cosine (`create_scheduler`),
the loss on the removed patches (`predict_masked_only=True`). Each process trains on its own batches
(fixed per rank and step, with fixed masking noise), so three runs can be compared:

1. DDP for STEPS steps                                            -> OUT/ddp.safetensors
2. FSDP2: rank 0 builds the model, the others on the meta device (`fsdp_cpu_ram_efficient_loading`),
   every MAELayer a unit then the root (`fsdp_transformer_layer_cls_to_wrap: MAELayer`), weights
   broadcast from rank 0; a sharded checkpoint (torch.distributed.checkpoint, one file per process,
   as `fsdp_state_dict_type: SHARDED_STATE_DICT`) after SAVE_AT steps; on to STEPS
                                                                  -> OUT/fsdp.safetensors (full export)
3. FSDP2 from scratch on the meta device everywhere, resumed from that checkpoint (model, optimizer,
   schedule), on to STEPS                                         -> OUT/fsdp_resumed.safetensors
Losses per step and the shard shapes go to OUT/report.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.modeling_mae import MAELayer
from modeling_mae.training.optim import create_optimizer, create_scheduler, pretraining_param_groups


STEPS, SAVE_AT, BATCH, LR, WD = 4, 2, 4, 1e-3, 0.05
CONFIG = MAEConfig.from_preset("mae-tiny")


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's normalised images (N, 3, 32, 32) and masking noise (N, L) for `step` (1-based)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(BATCH, 3, CONFIG.image_size, CONFIG.image_size, generator=generator)
    return images, torch.rand(BATCH, CONFIG.num_patches, generator=generator)


def optimizer_and_schedule(model):
    optimizer = create_optimizer(pretraining_param_groups(model, WD), LR, (0.9, 0.95))
    return optimizer, create_scheduler(optimizer, warmup_steps=1, total_steps=STEPS)


def train(model, optimizer, scheduler, first: int, last: int, rank: int) -> list[float]:
    """Steps first..last (1-based); returns the mean loss over the processes at each step."""
    model.train()
    losses = []
    for step in range(first, last + 1):
        images, noise = batch(rank, step)
        loss = model(pixel_values=images, noise=noise, predict_masked_only=True).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def initial_model(rank: int) -> MAEForPreTraining:
    torch.manual_seed(0)
    return MAEForPreTraining(CONFIG)


def shard(model, mesh):
    """What accelerate's `fsdp2_prepare_model` does for this config: each MAELayer a unit, then the root."""
    for module in model.modules():
        if isinstance(module, MAELayer):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0 (a collective: every process calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=options).items()}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {}

    # 1. DDP (what configs/accelerate/cpu_multi_process.yaml runs)
    ddp = DistributedDataParallel(initial_model(rank))
    optimizer, scheduler = optimizer_and_schedule(ddp.module)
    report["ddp_losses"] = train(ddp, optimizer, scheduler, 1, STEPS, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ddp.module.state_dict().items()}, out / "ddp.safetensors")

    # 2. FSDP2 with rank-0 loading: the other processes build the model on the meta device
    if rank == 0:
        model = initial_model(rank)
        full = model.state_dict()
        model = model.to("meta")
    else:
        with torch.device("meta"):
            model = MAEForPreTraining(CONFIG)
        full = {}
    shard(model, mesh)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    qkv = model.mae.encoder.layer[0].attention.qkv.weight
    report["qkv_local_shape"], report["qkv_global_shape"] = list(qkv.to_local().shape), list(qkv.shape)
    report["fsdp_units"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    report["frozen"] = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    optimizer, scheduler = optimizer_and_schedule(model)
    losses = train(model, optimizer, scheduler, 1, SAVE_AT, rank)
    checkpoint = out / f"checkpoint_step_{SAVE_AT}"
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=checkpoint)
    if rank == 0:
        torch.save(scheduler.state_dict(), checkpoint / "scheduler.pt")
    dist.barrier()
    losses += train(model, optimizer, scheduler, SAVE_AT + 1, STEPS, rank)
    report["fsdp_losses"] = losses
    weights = full_weights(model)
    if rank == 0:
        save_file(weights, out / "fsdp.safetensors")

    # 3. resume: a fresh model on the meta device on every process, everything from the checkpoint
    with torch.device("meta"):
        model = MAEForPreTraining(CONFIG)
    shard(model, mesh)
    model.to_empty(device="cpu")
    optimizer, scheduler = optimizer_and_schedule(model)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    report["resumed_lr"] = scheduler.get_last_lr()[0]
    report["resumed_losses"] = train(model, optimizer, scheduler, SAVE_AT + 1, STEPS, rank)
    weights = full_weights(model)
    if rank == 0:
        save_file(weights, out / "fsdp_resumed.safetensors")

    (out / f"report_{rank}.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
