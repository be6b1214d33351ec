"""Fine-tuning and linear probing: layer decay, LARS, pretrain -> fine-tune, the frozen linear probe."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from modeling_mae.training.classification_data import make_synthetic_classification
from modeling_mae.training.optim import build_lars, layer_decay_param_groups
from modeling_mae.training.transforms import normalize_on_device


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import finetune  # noqa: E402
import linprobe  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay and LARS against their formulas
# --------------------------------------------------------------------------------------------------
def official_layer_id(name: str, num_blocks: int) -> int:
    """The official MAE rule: embeddings (cls token, positions, patch projection) 0, block i -> i + 1,
    everything else (fc_norm, head) num_blocks + 1."""
    if name.startswith("mae.embeddings."):
        return 0
    if name.startswith("mae.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return num_blocks + 1


def test_layer_decay_groups_carry_the_official_scales_for_12_blocks():
    config = MAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                       intermediate_size=32, num_labels=5)
    model = MAEForImageClassification(config)
    lr, decay = 1e-3, 0.65
    groups = layer_decay_param_groups(model, lr=lr, weight_decay=0.05, layer_decay=decay)

    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in groups:
        for param in group["params"]:
            seen[names[id(param)]] = (group["lr"], group["lr_scale"], group["weight_decay"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable  # every trainable parameter exactly once

    for name, (group_lr, scale, wd) in seen.items():
        layer = official_layer_id(name, 12)
        assert scale == pytest.approx(decay ** (12 + 1 - layer), rel=1e-12), name
        assert group_lr == pytest.approx(lr * decay ** (12 + 1 - layer), rel=1e-12), name
        param = dict(model.named_parameters())[name]
        no_decay = param.ndim < 2 or name.endswith(("cls_token", "position_embeddings"))
        assert wd == (0.0 if no_decay else 0.05), name
    # spot checks of the table: patch embedding 0.65^13, first block 0.65^12, last block 0.65, head 1
    assert seen["mae.embeddings.patch_embeddings.projection.weight"][1] == pytest.approx(0.65**13)
    assert seen["mae.encoder.layer.0.attention.qkv.weight"][1] == pytest.approx(0.65**12)
    assert seen["mae.encoder.layer.11.mlp.fc2.weight"][1] == pytest.approx(0.65)
    assert seen["mae.fc_norm.weight"][1] == 1.0 and seen["classifier.weight"][1] == 1.0


def test_lars_step_is_the_official_update():
    """The official util/lars.py update, computed by hand for two momentum steps (lr 0.5, momentum 0.9,
    wd 0.1, trust coefficient 0.001):
    weight (ndim 2): d = g + wd * w;  d *= 0.001 * ||w|| / ||d||;  mu = 0.9 * mu + d;  w -= lr * mu
    bias (ndim 1):   d = g (no decay, no scaling);               mu = 0.9 * mu + d;  b -= lr * mu

    Numbers chosen so the norms are exact: w0 = [[3, 4]] (||w0|| = 5), g = [[-1.5, 8]] -> d = [[-1.2, 8.4]],
    ||d|| = sqrt(1.44 + 70.56) = sqrt(72) = 6 sqrt(2)."""
    lr, momentum, wd, tc = 0.5, 0.9, 0.1, 0.001
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = build_lars([weight, bias], lr=lr, momentum=momentum, weight_decay=wd)

    # step 1
    weight.grad = torch.tensor([[-1.5, 8.0]], dtype=torch.float64)
    bias.grad = torch.tensor([0.4, -0.2], dtype=torch.float64)
    optimizer.step()
    d1 = [-1.2 * tc * 5 / 72**0.5, 8.4 * tc * 5 / 72**0.5]  # trust ratio 0.005 / sqrt(72)
    w1 = [3.0 - lr * d1[0], 4.0 - lr * d1[1]]
    b1 = [1.0 - lr * 0.4, -2.0 - lr * -0.2]  # = [0.8, -1.9]
    torch.testing.assert_close(weight.detach(), torch.tensor([w1], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bias.detach(), torch.tensor(b1, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # the 1000x defect of trust coefficient 1: the first weight update has norm lr * 0.001 * ||w0|| = 0.0025
    assert (weight.detach() - torch.tensor([[3.0, 4.0]], dtype=torch.float64)).norm().item() == pytest.approx(0.0025)

    # step 2: a new gradient, the momentum buffer carries 0.9 * d1
    weight.grad = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    bias.grad = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    optimizer.step()
    e = [2.0 + wd * w1[0], wd * w1[1]]
    norm_w1, norm_e = (w1[0] ** 2 + w1[1] ** 2) ** 0.5, (e[0] ** 2 + e[1] ** 2) ** 0.5
    d2 = [x * tc * norm_w1 / norm_e for x in e]
    mu2 = [momentum * d1[0] + d2[0], momentum * d1[1] + d2[1]]
    w2 = [w1[0] - lr * mu2[0], w1[1] - lr * mu2[1]]
    mu2_bias = [momentum * 0.4 - 1.0, momentum * -0.2 + 0.5]  # = [-0.64, 0.32]
    b2 = [b1[0] - lr * mu2_bias[0], b1[1] - lr * mu2_bias[1]]  # = [1.12, -2.06]
    torch.testing.assert_close(weight.detach(), torch.tensor([w2], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.12, -2.06], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bias.detach(), torch.tensor(b2, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_lars_trust_ratio_is_one_for_a_zero_weight_or_update():
    """A zero weight matrix (||w|| = 0) takes the plain step d = g; so does a zero update (nothing moves)."""
    weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = build_lars([weight], lr=0.5, momentum=0.9)
    weight.grad = torch.tensor([[1.0, -2.0], [0.0, 4.0]], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([[-0.5, 1.0], [0.0, -2.0]], dtype=torch.float64))


def test_finetune_augmentation_survives_magnitude_10_posterize():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which Pillow >= 12 rejects; our
    transform maps it to a black image (the old Pillow / TF behaviour) instead of crashing."""
    import numpy as np
    from PIL import Image

    from modeling_mae.training.augmentation import FinetuneTrainTransform, _posterize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert np.asarray(_posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize(image, 2)), np.asarray(image) & 0b11000000)
    transform = FinetuneTrainTransform(32, "rand-m10-n3-mstd0-inc1")  # magnitude exactly 10, 3 ops per image
    for _ in range(100):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


# --------------------------------------------------------------------------------------------------
# Synthetic data and a tiny pretrained MAE (shared by the end-to-end tests)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    train = make_synthetic_classification(root / "train", num_per_class=48, seed=0)
    val = make_synthetic_classification(root / "validation", num_per_class=16, seed=1)
    return root, train, val


def _load_images(folder: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])


@pytest.fixture(scope="module")
def pretrained(synthetic):
    """A tiny MAE pretrained for a few steps on the training images (the pretraining objective)."""
    root, train, _ = synthetic
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    images = _load_images(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for step in range(15):
        batch = images[torch.randint(0, len(images), (32,))]
        loss = model(normalize_on_device(batch)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])  # the pretraining loss went down
    path = root / "pretrained"
    model.save_pretrained(path)
    return path


def _common_args(synthetic, out: Path) -> list[str]:
    root, train, val = synthetic
    return ["--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(out),
            "--dataloader_num_workers", "0", "--mixed_precision", "no", "--logging_steps", "1000"]


# --------------------------------------------------------------------------------------------------
# pretrain -> fine-tune
# --------------------------------------------------------------------------------------------------
def _finetune(pretrained, synthetic, out, epochs, extra=()):
    argv = ["--config", str(SCRIPTS.parent / "configs/finetune/demo.yaml"), "--model_name_or_path", str(pretrained),
            "--num_train_epochs", str(epochs), *_common_args(synthetic, out), *extra]
    assert finetune.main(argv) == 0
    return json.loads((out / "eval_results.json").read_text())


def test_pretrain_then_finetune_beats_chance(pretrained, synthetic, tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []  # the Hub calls stop here: record what would be pushed

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        uploads.append({**kwargs, "card": (Path(kwargs["folder_path"]) / "README.md").read_text()})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "ft"
    results = _finetune(pretrained, synthetic, out, epochs=6,
                        extra=["--push_to_hub", "--hub_model_id", "someone/mae-tiny-bars"])
    history = results["history"]
    # 4 balanced classes: chance is 25%
    assert results["best"]["top1"] >= 45.0, history
    assert history[-1]["loss"] < history[0]["loss"] or history[0]["top1"] >= 45.0
    assert history[-1]["num_examples"] == 64  # every validation image counted once
    # the exported classifier: labels, best and last models, a card with the measured accuracy
    model = MAEForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "blue_horizontal", 1: "blue_vertical", 2: "red_horizontal",
                                     3: "red_vertical"}
    assert (out / "best" / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f"{history[-1]['top1']:.2f}%" in card and "model-index" in card
    # pushed once: the output directory with that card, without checkpoints, the accuracy in the message
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "someone/mae-tiny-bars"
    assert uploads[0]["folder_path"] == str(out) and uploads[0]["card"] == card
    assert "checkpoints/*" in uploads[0]["ignore_patterns"]
    assert f"top-1 {history[-1]['top1']:.2f}%" in uploads[0]["commit_message"]
    # the exported model gives the accuracy the run reported
    images = _load_images(synthetic[2])
    labels = torch.arange(4).repeat_interleave(16)
    with torch.no_grad():
        logits = model.eval()(normalize_on_device(images)).logits
    assert 100.0 * (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(history[-1]["top1"])


@pytest.mark.slow
def test_pretrain_then_finetune_learns_colour_and_orientation(pretrained, synthetic, tmp_path):
    """Longer: the model must learn orientation too (colour alone gives 50%)."""
    results = _finetune(pretrained, synthetic, tmp_path / "ft", epochs=40)
    assert results["best"]["top1"] >= 75.0, results["history"]


def test_finetune_with_the_full_augmentation_resumes_exactly(pretrained, synthetic, tmp_path):
    """The official augmentation (RandAugment, random erasing, Mixup/CutMix, drop path) runs, and resuming
    from a mid-epoch or an epoch-end checkpoint reproduces the uninterrupted run exactly."""
    recipe = ["--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
              "--drop_path_rate", "0.1", "--checkpointing_steps", "3", "--checkpoints_total_limit", "10"]
    full = _finetune(pretrained, synthetic, tmp_path / "full", epochs=2, extra=recipe)
    # 192 images / batch 32 = 6 steps per epoch: step_3 is mid-epoch 1, step_6 its end
    for step in (3, 6):
        checkpoint = tmp_path / "full" / "checkpoints" / f"step_{step}"
        resumed = _finetune(pretrained, synthetic, tmp_path / f"resumed{step}", epochs=2,
                            extra=[*recipe, "--resume_from_checkpoint", str(checkpoint)])
        assert [h["epoch"] for h in resumed["history"]] == [1, 2]
        assert resumed["history"] == [pytest.approx(h, rel=1e-6) for h in full["history"]], step


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------
def test_linear_probe_keeps_the_encoder_bit_identical_and_trains_the_head(pretrained, synthetic, tmp_path,
                                                                         monkeypatch):
    # count encoder forward passes and the mode the encoder was in
    calls = []
    original_forward = MAEModel.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(self.training)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(MAEModel, "forward", counting_forward)
    out = tmp_path / "lp"
    argv = ["--config", str(SCRIPTS.parent / "configs/linprobe/demo.yaml"), "--model_name_or_path", str(pretrained),
            "--num_train_epochs", "3", "--num_warmup_epochs", "1", "--per_device_train_batch_size", "32",
            *_common_args(synthetic, out)]
    assert linprobe.main(argv) == 0

    # 192 training images / 32 = 6 batches in the first epoch only (then the cache), 64 validation
    # images / 64 = 1 batch per epoch
    assert len(calls) == 6 + 3 * 1
    assert not any(calls), "the encoder must stay in eval mode"

    before = load_file(pretrained / "model.safetensors")
    after = load_file(out / "model.safetensors")
    encoder_keys = [k for k in after if k.startswith("mae.")]
    assert len(encoder_keys) == len([k for k in before if k.startswith("mae.")])
    for key in encoder_keys:
        assert torch.equal(after[key], before[key]), key  # bit-identical
    # the head trained: BatchNorm statistics moved away from their initial (0, 1), classifier learned
    assert after["head_norm.num_batches_tracked"].item() == 3 * 6
    assert after["head_norm.running_mean"].abs().max() > 1e-3
    assert not torch.allclose(after["head_norm.running_var"], torch.ones_like(after["head_norm.running_var"]))
    model = MAEForImageClassification.from_pretrained(out)
    assert model.config.pooling == "cls" and model.config.linear_probe_head
    assert torch.count_nonzero(after["classifier.bias"]) > 0  # initialised at 0: the head took steps
    # (no accuracy bar: with the official LARS, trust coefficient 0.001, 18 steps barely move the weights)
    results = json.loads((out / "eval_results.json").read_text())
    losses = [epoch["loss"] for epoch in results["history"]]
    assert len(losses) == 3 and len(set(losses)) == 3 and all(math.isfinite(x) for x in losses)


# --------------------------------------------------------------------------------------------------
# The official recipes as configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, blr, layer_decay, drop_path, epochs",
    [("vit_base", 5e-4, 0.65, 0.1, 100), ("vit_large", 1e-3, 0.75, 0.2, 50), ("vit_huge", 1e-3, 0.75, 0.3, 50)],
)
def test_finetune_configs_hold_the_paper_recipe(name, blr, layer_decay, drop_path, epochs):
    from modeling_mae.training.config import parse_config

    cfg = parse_config(finetune.FinetuneConfig, ["--config", str(SCRIPTS.parent / f"configs/finetune/{name}.yaml")])
    recipe = (cfg.blr, cfg.layer_decay, cfg.drop_path_rate, cfg.num_train_epochs)
    assert recipe == (blr, layer_decay, drop_path, epochs)
    assert cfg.per_device_train_batch_size * 8 * cfg.gradient_accumulation_steps == 1024  # on 8 processes
    assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.num_warmup_epochs == 5
    assert (cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2) == (0.05, 0.9, 0.999)


@pytest.mark.parametrize("name, epochs", [("vit_base", 90), ("vit_large", 50), ("vit_huge", 50)])
def test_linprobe_configs_hold_the_paper_recipe(name, epochs):
    from modeling_mae.training.config import parse_config

    cfg = parse_config(linprobe.LinprobeConfig, ["--config", str(SCRIPTS.parent / f"configs/linprobe/{name}.yaml")])
    assert cfg.per_device_train_batch_size * 8 * cfg.gradient_accumulation_steps == 16384
    assert (cfg.blr, cfg.momentum, cfg.weight_decay, cfg.num_warmup_epochs) == (0.1, 0.9, 0.0, 10)
    assert cfg.num_train_epochs == epochs


@pytest.mark.slow
def test_finetune_on_two_processes_counts_every_validation_image_once(pretrained, synthetic, tmp_path):
    """torchrun with 2 CPU processes (ACCELERATE_USE_CPU=1 makes Accelerate use gloo): the effective batch
    doubles, and 61 validation images (an odd count: the last batch is padded) are each counted once, with
    the accuracy a single process measures on the exported model."""
    import os
    import subprocess

    out = tmp_path / "ft2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
               str(SCRIPTS / "finetune.py"), "--config", str(SCRIPTS.parent / "configs/finetune/demo.yaml"),
               "--model_name_or_path", str(pretrained), "--num_train_epochs", "2",
               "--per_device_train_batch_size", "16",
               "--max_eval_samples", "61", *_common_args(synthetic, out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "effective batch 32" in run.stderr
    history = json.loads((out / "eval_results.json").read_text())["history"]
    assert [h["num_examples"] for h in history] == [61, 61]
    model = MAEForImageClassification.from_pretrained(out).eval()
    images = _load_images(synthetic[2])[:61]
    labels = torch.arange(4).repeat_interleave(16)[:61]
    with torch.no_grad():
        logits = model(normalize_on_device(images)).logits
    assert 100.0 * (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(history[-1]["top1"])
