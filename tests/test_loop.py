"""The shared training loop (`modeling_mae.training.loop.TrainingLoop`) on a tiny linear model: a run resumed
mid-epoch from a checkpoint ends with exactly the weights of the uninterrupted run, having skipped just
the micro-batches it had trained on; a NaN step is skipped (no update, no schedule step) and counted;
and the base config's shared fields keep one help text in every script's config."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from modeling_mae.training.checkpoint import CheckpointManager
from modeling_mae.training.loop import TrainingLoop, restore
from modeling_mae.training.runtime import GracefulStop, NonFiniteGuard, make_accelerator


pytestmark = pytest.mark.usefixtures("one_thread")

MICRO_BATCHES = 5  # per epoch: 2 optimizer steps of 2 micro-batches, the fifth dropped
CFG = SimpleNamespace(gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=1, checkpointing_steps=1,
                      with_tracking=False)


def batches(epoch: int) -> list:
    """The epoch's (x (3, 4), y (3, 1)) micro-batches, in an order drawn from the epoch."""
    data = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(3, 4, generator=data), torch.randn(3, 1, generator=data)) for _ in range(MICRO_BATCHES)]
    order = torch.randperm(MICRO_BATCHES, generator=torch.Generator().manual_seed(epoch))
    return [pairs[i] for i in order]


def train(tmp_path, name: str, resume=None, nan_at_step=None, guard=None):
    """Two epochs; returns (final weights, micro-batches consumed, state, lr)."""
    accelerator = make_accelerator("no", str(tmp_path / name), False, "none", cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    checkpoints = CheckpointManager(tmp_path / name, keep_last=None)
    state = {"step": 0}
    restore(accelerator, checkpoints, resume, state)
    consumed = []

    def micro_batches(epoch, skip):
        consumed.append((epoch, skip))
        return batches(epoch)[skip:]

    def loss_of(batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss * float("nan") if state["step"] + 1 == nan_at_step else loss

    TrainingLoop(
        accelerator, model, optimizer, scheduler, CFG, state=state, steps_per_epoch=2, max_steps=4,
        micro_batches=micro_batches, loss_of=loss_of, checkpoints=checkpoints, guard=guard,
        save=lambda: checkpoints.save(accelerator, state["step"], trainer_state=dict(state)),
        stop=GracefulStop(accelerator, "resume"),
    ).run(start_epoch=state["step"] // 2)
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return weights, consumed, state, optimizer.param_groups[0]["lr"]


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(tmp_path):
    straight, consumed, state, _ = train(tmp_path, "straight")
    assert consumed == [(0, 0), (1, 0)] and state["step"] == 4
    assert sorted(p.name for p in CheckpointManager(tmp_path / "straight").complete_checkpoints()) == [
        "step_1", "step_2", "step_3", "step_4"]
    resumed, consumed, state, _ = train(tmp_path, "resumed", resume=tmp_path / "straight" / "checkpoints" / "step_1")
    assert consumed == [(0, 2), (1, 0)] and state["step"] == 4  # step 1's two micro-batches are not seen again
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_nan_step_is_skipped_counted_and_not_scheduled(tmp_path):
    guard = NonFiniteGuard(max_consecutive=3)
    weights, _, state, lr = train(tmp_path, "nan", nan_at_step=2, guard=guard)
    assert guard.skipped == 1 and guard.consecutive == 0 and state["step"] == 4
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert lr == pytest.approx(0.1 / (1 + 3))  # 3 schedule steps for 4 optimizer steps, one skipped


def test_shared_fields_have_one_help_in_every_script_config():
    from modeling_mae_cli.run_config import RunConfig

    from test_accumulation import load_script

    shared = {f.name: f for f in dataclasses.fields(RunConfig)}
    configs = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig", "linprobe": "LinprobeConfig",
               "segment": "SegmentConfig"}
    for script, name in configs.items():
        cls = getattr(load_script(script), name)
        assert issubclass(cls, RunConfig), name
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for field_name, field in shared.items():
            assert fields[field_name].metadata == field.metadata, (name, field_name)
        assert fields["output_dir"].default == f"outputs/mae-{OUTPUT_NAMES[script]}"  # a script's own default


OUTPUT_NAMES = {"pretrain": "pretrain", "finetune": "finetune", "linprobe": "linprobe", "segment": "upernet-ade20k"}
