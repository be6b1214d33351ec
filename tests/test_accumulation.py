"""Gradient accumulation, accelerate's way, in the four training scripts: N micro-batches of B images make
one optimizer step equal (to float tolerance) to one batch of N x B, and `max_train_steps` / the epoch
length count optimizer steps.

Each script runs twice on the same tiny model and data: accumulation 2 x per-device batch 4, and
accumulation 1 x batch 8. The two runs see the same images in the same order (samplers and streams
are seeded per epoch / position, not per batch; augmentation per example). What would legitimately
differ between one batch of 8 and two of 4 is kept out:

- pretraining masks: drawn from the global RNG per micro-batch; on CPU `torch.rand(8, L)` is exactly
  `torch.rand(4, L)` followed by `torch.rand(4, L)` (checked first), and nothing else draws in between
  (drop path 0), so both runs mask every image alike;
- BatchNorm (the linear probe's head, UperNet's conv modules): its batch statistics over 4 images are
  not those over 8, by design. The tests run it on its running statistics (`frozen_batchnorm`);
- per-pixel / per-patch loss means: equal over two micro-batches only when both hold the same number
  of counted elements: the MAE loss averages a fixed number of masked patches per image; the
  segmentation test has no ignored pixels (`reduce_labels` off, no padding);
- fine-tuning's mixup / cutmix / label smoothing / random erasing / RandAugment / drop path are off;
- gradients that are zero in theory (the key bias: softmax ignores a shift shared by all keys) are float
  noise, different for the two summation orders, which AdamW divides by its own size into lr-sized steps:
  `adam_epsilon` 1e-6 (instead of 1e-8) keeps such noise small and leaves real gradients' steps alone.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEUperNetForSemanticSegmentation
from modeling_mae.training import runtime
from modeling_mae.training.classification_data import make_synthetic_classification
from modeling_mae.training.segmentation_data import write_synthetic_ade_folder

from pretrain_helpers import import_pretrain, read_sample_ids, tiny_args, write_dataset


REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str):
    """scripts/<name>.py as a fresh module (its `main(argv)` runs in-process)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"accumulation_{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def record_accumulation(monkeypatch, script) -> tuple[list, list]:
    """For each Accelerator `script.main` makes: its `gradient_accumulation_steps` as made (accelerate's state
    is process-wide: a later Accelerator's setting would show through an earlier one), and the step losses
    it is given for the trackers ({step: loss})."""
    made, losses = [], []

    def recording(*args, **kwargs):
        accelerator = runtime.make_accelerator(*args, **kwargs)
        made.append(accelerator.gradient_accumulation_steps)
        logged = {}
        losses.append(logged)

        def log(values, step=None, **kwargs):
            if "train/loss" in values:
                logged[step] = values["train/loss"]

        accelerator.log = log
        return accelerator

    monkeypatch.setattr(script, "make_accelerator", recording)
    return made, losses


def count_training_forwards(monkeypatch, model_class) -> list:
    """One entry per training-mode forward of `model_class` (= one micro-batch consumed)."""
    calls = []
    original = model_class.forward

    def counting(self, *args, **kwargs):
        if self.training:
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", counting)
    return calls


@pytest.fixture
def frozen_batchnorm(monkeypatch):
    """BatchNorm always in eval mode: normalised by its running statistics (here the initial 0 / 1), the same
    for a batch of 8 as for two of 4."""
    from torch.nn.modules.batchnorm import _BatchNorm

    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: torch.nn.Module.train(self, False))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Every tensor of `a` and `b` within `atol`; the message names the worst one."""
    assert a.keys() == b.keys()
    worst = max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"{worst[1]} differs by {worst[0]:.3g} (atol {atol})"


def assert_trained(before: dict, after: dict) -> None:
    """The comparison means something: the run moved the weights well beyond the tolerance."""
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before if k in after)
    assert moved > 1e-3, moved


# --------------------------------------------------------------------------------------------------
# make_accelerator
# --------------------------------------------------------------------------------------------------
def test_make_accelerator_sets_accelerates_accumulation(tmp_path):
    accelerator = runtime.make_accelerator("no", str(tmp_path), False, None, cpu=True, gradient_accumulation_steps=3)
    assert accelerator.gradient_accumulation_steps == 3
    # an optimizer step is 3 micro-batches counted by accelerate, also at the end of a prepared DataLoader
    assert accelerator.gradient_state.sync_with_dataloader is False
    flags = []
    for _ in range(6):
        with accelerator.accumulate():
            flags.append(accelerator.sync_gradients)
    assert flags == [False, False, True, False, False, True]
    loss = torch.tensor(6.0, requires_grad=True)
    accelerator.backward(loss)
    assert loss.grad.item() == pytest.approx(1 / 3)  # backward divides the loss by the steps
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` must be >= 1, got 0"):
        runtime.make_accelerator("no", str(tmp_path), False, None, cpu=True, gradient_accumulation_steps=0)


def test_optimizer_steps_per_epoch_counts_full_groups_only():
    assert runtime.optimizer_steps_per_epoch(5, 2) == 2  # the fifth micro-batch makes no step
    assert runtime.optimizer_steps_per_epoch(8, 4) == 2
    with pytest.raises(ValueError, match="3 micro-batches per process, fewer than one optimizer step of "
                                         "gradient_accumulation_steps=4"):
        runtime.optimizer_steps_per_epoch(3, 4)


@pytest.mark.parametrize("script, extra", [
    ("pretrain", {"train_dir": "unused"}),
    ("finetune", {}),
    ("linprobe", {}),
    ("segment", {"model_preset": "mae-tiny", "data_dir": "unused"}),
])
def test_every_config_refuses_accumulation_below_one(script, extra):
    config_class = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig", "linprobe": "LinprobeConfig",
                    "segment": "SegmentConfig"}[script]
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` must be >= 1, got 0"):
        getattr(load_script(script), config_class)(gradient_accumulation_steps=0, **extra)


# --------------------------------------------------------------------------------------------------
# pretrain.py
# --------------------------------------------------------------------------------------------------
def test_pretrain_accumulation_2x4_equals_batch_8(tmp_path, monkeypatch):
    # the premise: the masks of two micro-batches of 4 are those of one batch of 8
    torch.manual_seed(3)
    one = torch.rand(8, 64)
    torch.manual_seed(3)
    assert torch.equal(one, torch.cat([torch.rand(4, 64), torch.rand(4, 64)]))

    data = write_dataset(tmp_path / "data", "parquet", count=48)
    script = import_pretrain()
    made, logged = record_accumulation(monkeypatch, script)
    runs = {}
    # the third run resumes the first after its step 1 with 4 micro-batches of 2 (the same effective batch):
    # a step counted in another accumulation's micro-batches must not shift where the next step ends
    for name, batch, accumulation, resume in (("accumulated", 4, 2, None), ("batch8", 8, 1, None),
                                              ("resumed_4x2", 2, 4, "accumulated/checkpoints/step_1")):
        out = tmp_path / name
        argv = tiny_args(data, out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=4, log_sample_ids=True,
                         max_grad_norm=1.0, adam_epsilon=1e-6)
        if resume:
            argv += ["--resume_from_checkpoint", str(tmp_path / resume)]
        assert script.main(argv) == 0
        runs[name] = out
    # 4 optimizer steps of 8 images each: 8 micro-batches of 4 in the accumulated run, the same images
    ids = {name: read_sample_ids(out) for name, out in runs.items()}
    assert len(ids["accumulated"]) == 32 and ids["accumulated"] == ids["batch8"]
    assert [line.split("\t")[0] for line in ids["accumulated"]] == [str(s) for s in range(1, 5) for _ in range(8)]
    assert ids["resumed_4x2"] == ids["accumulated"][8:]  # steps 2-4: 12 micro-batches of 2, the same images
    for step in (2, 4):
        state = json.loads((runs["accumulated"] / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
        assert state["step"] == step and state["samples_seen"] == 8 * step
        a, b, c = (load_file(runs[name] / "checkpoints" / f"step_{step}" / "model.safetensors") for name in runs)
        assert_same_weights(a, b)
        assert_same_weights(c, a)
    assert_trained(load_file(runs["accumulated"] / "checkpoints" / "step_2" / "model.safetensors"), a)
    assert made == [2, 1, 4]  # accelerate's accumulation, set on the Accelerator


# --------------------------------------------------------------------------------------------------
# finetune.py and linprobe.py
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    """20 training images (5 micro-batches of 4: an odd count, the fifth makes no step; 2 batches of 8), 8
    validation images, a random tiny MAE checkpoint."""
    root = tmp_path_factory.mktemp("accumulation_cls")
    train = make_synthetic_classification(root / "train", num_per_class=5, seed=0)
    val = make_synthetic_classification(root / "validation", num_per_class=2, seed=1)
    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(root / "pretrained")
    return root, train, val


def _classifier_argv(classification, script: str, out: Path, batch: int, accumulation: int) -> list[str]:
    root, train, val = classification
    return [
        "--config", str(REPO / "configs" / script / "demo.yaml"), "--model_name_or_path", str(root / "pretrained"),
        "--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(out),
        "--dataloader_num_workers", "0", "--mixed_precision", "no",
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
        "--num_train_epochs", "2", "--num_warmup_epochs", "0",
        "--with_tracking", "true", "--report_to", "none", "--logging_steps", "1",  # every step's loss to `log`
    ]


def test_finetune_accumulation_2x4_equals_batch_8(classification, tmp_path, monkeypatch):
    script = load_script("finetune")
    made, logged = record_accumulation(monkeypatch, script)
    forwards = count_training_forwards(monkeypatch, MAEForImageClassification)
    # the demo config has RandAugment, mixup, cutmix, random erasing and drop path off; label smoothing too
    extra = ["--label_smoothing", "0.0", "--reprob", "0.0", "--mixup", "0.0", "--cutmix", "0.0",
             "--drop_path_rate", "0.0", "--learning_rate", "1e-3", "--adam_epsilon", "1e-6"]
    weights, micro_batches, epoch_losses = {}, {}, {}
    for name, batch, accumulation in (("accumulated", 4, 2), ("batch8", 8, 1)):
        out = tmp_path / name
        forwards.clear()
        assert script.main(_classifier_argv(classification, "finetune", out, batch, accumulation) + extra) == 0
        micro_batches[name] = len(forwards)
        weights[name] = load_file(out / "model.safetensors")
        epoch_losses[name] = [h["train_loss"] for h in json.loads((out / "eval_results.json").read_text())["history"]]
        # 2 epochs x 2 optimizer steps (20 images: 16 make 2 steps of 8; 4 are left over)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
        assert json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())["step"] == 4
    assert micro_batches == {"accumulated": 2 * 2 * 2, "batch8": 2 * 2}
    assert_same_weights(weights["accumulated"], weights["batch8"])
    # a step's logged loss is the mean over its micro-batches (the batch of 8's), per epoch that of its steps
    assert list(logged[0]) == [1, 2, 3, 4] and logged[0] == pytest.approx(logged[1], abs=1e-5)
    assert epoch_losses["accumulated"] == pytest.approx(epoch_losses["batch8"], abs=1e-5)
    assert made == [2, 1]  # set on the Accelerator when it is made
    initial = load_file(classification[0] / "pretrained" / "model.safetensors")
    assert_trained(initial, weights["accumulated"])


def test_linprobe_accumulation_2x4_equals_batch_8(classification, tmp_path, monkeypatch, frozen_batchnorm):
    from modeling_mae.training.linear_probe import ProbeHead

    script = load_script("linprobe")
    made, logged = record_accumulation(monkeypatch, script)
    forwards = count_training_forwards(monkeypatch, ProbeHead)
    weights, micro_batches, epoch_losses = {}, {}, {}
    for name, batch, accumulation in (("accumulated", 4, 2), ("batch8", 8, 1)):
        out = tmp_path / name
        forwards.clear()
        argv = _classifier_argv(classification, "linprobe", out, batch, accumulation) + ["--cache_features", "false"]
        assert script.main(argv) == 0
        micro_batches[name] = len(forwards)
        weights[name] = load_file(out / "model.safetensors")
        epoch_losses[name] = [h["train_loss"] for h in json.loads((out / "eval_results.json").read_text())["history"]]
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert micro_batches == {"accumulated": 2 * 2 * 2, "batch8": 2 * 2}
    assert_same_weights(weights["accumulated"], weights["batch8"])
    # a step's logged loss is the mean over its micro-batches (the batch of 8's), per epoch that of its steps
    assert list(logged[0]) == [1, 2, 3, 4] and logged[0] == pytest.approx(logged[1], abs=1e-5)
    assert epoch_losses["accumulated"] == pytest.approx(epoch_losses["batch8"], abs=1e-5)
    assert made == [2, 1]  # set on the Accelerator when it is made
    assert weights["accumulated"]["classifier.bias"].abs().max() > 1e-3  # starts at 0: the head took steps


# --------------------------------------------------------------------------------------------------
# segment.py
# --------------------------------------------------------------------------------------------------
def test_segment_accumulation_2x4_equals_batch_8_and_resumes(tmp_path, monkeypatch, frozen_batchnorm):
    """20 images: 5 micro-batches of 4 per epoch = 2 optimizer steps (the fifth is dropped), as 2 batches
    of 8. max_train_steps 3 crosses an epoch; the resume from step 1 skips 2 micro-batches."""
    script = load_script("segment")
    made, logged = record_accumulation(monkeypatch, script)
    forwards = count_training_forwards(monkeypatch, MAEUperNetForSemanticSegmentation)
    data = write_synthetic_ade_folder(tmp_path / "data", num_train=20, num_val=1, size=48, num_classes=3, seed=1)
    common = [
        "--config", str(REPO / "configs" / "segment" / "demo.yaml"), "--data_dir", str(data),
        "--reduce_labels", "false", "--num_labels", "4",  # class 0 is a class: no ignored pixel
        "--model_config", "{patch_size: 8, num_hidden_layers: 2, image_size: 32, hidden_size: 32}",
        "--out_indices", "[2]", "--crop_size", "32", "--base_scale", "[32, 32]", "--scale_range", "[1.0, 1.0]",
        "--mixed_precision", "no", "--max_train_steps", "3", "--num_warmup_steps", "1", "--logging_steps", "1",
        "--eval_steps", "100", "--eval_mode", "whole", "--checkpointing_steps", "1", "--checkpoints_total_limit", "5",
    ]
    runs, micro_batches = {}, {}
    for name, batch, accumulation, resume in (("accumulated", 4, 2, None), ("batch8", 8, 1, None),
                                              ("resumed", 4, 2, "accumulated")):
        forwards.clear()
        argv = common + ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", str(batch),
                         "--gradient_accumulation_steps", str(accumulation)]
        if resume:
            argv += ["--resume_from_checkpoint", str(tmp_path / resume / "checkpoints" / "step_1")]
        runs[name] = script.main(argv)
        micro_batches[name] = len(forwards)
    # 3 optimizer steps: 6 micro-batches of 4, 3 batches of 8; resumed after step 1: 4 micro-batches
    assert micro_batches == {"accumulated": 6, "batch8": 3, "resumed": 4}
    assert runs["accumulated"]["step"] == runs["batch8"]["step"] == 3
    # the logged loss of a step is the mean over its micro-batches: the loss of the batch of 8
    logged = {name: run["train_loss"] for name, run in runs.items()}
    assert [step for step, _ in logged["accumulated"]] == [1, 2, 3]
    assert [loss for _, loss in logged["accumulated"]] == pytest.approx([loss for _, loss in logged["batch8"]],
                                                                        abs=1e-5)
    assert logged["resumed"] == logged["accumulated"]
    final = {name: load_file(tmp_path / name / "checkpoints" / "step_3" / "model.safetensors") for name in runs}
    assert_same_weights(final["accumulated"], final["batch8"])
    assert_same_weights(final["resumed"], final["accumulated"], atol=0)  # exact resume
    assert_trained(load_file(tmp_path / "accumulated" / "checkpoints" / "step_1" / "model.safetensors"),
                   final["accumulated"])
    assert made == [2, 1, 2]
