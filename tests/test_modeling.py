"""MAE models: configuration, initialisation, masking, forward shapes, save/load, Auto classes, remote code,
pipelines, bad inputs. Tester pattern of transformers: one tiny CPU config, fixed noise, numbers checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)

import modeling_mae
from modeling_mae import (
    MAE_PRESETS,
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    make_noise,
    random_masking,
    sincos_2d,
)


def tiny_config(**overrides) -> MAEConfig:
    return MAEConfig.from_preset("mae-tiny", **overrides)


def images(batch=2, size=32, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(size, int):
        size = (size, size)
    return torch.randn(batch, channels, *size, generator=g)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    config = MAEConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 3072
    assert config.layer_norm_eps == 1e-6
    assert config.qkv_bias is True
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        8,
        16,
    )
    assert config.decoder_intermediate_size == 2048
    assert config.mask_ratio == 0.75 and config.mask_strategy == "random"
    assert config.num_patches == 196


@pytest.mark.parametrize(
    "name, hidden, layers, heads, mlp, patch",
    [
        ("mae-vit-base-patch16", 768, 12, 12, 3072, 16),
        ("mae-vit-large-patch16", 1024, 24, 16, 4096, 16),
        ("mae-vit-huge-patch14", 1280, 32, 16, 5120, 14),
    ],
)
def test_official_presets(name, hidden, layers, heads, mlp, patch):
    config = MAEConfig.from_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert (config.intermediate_size, config.patch_size) == (mlp, patch)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        8,
        16,
    )
    assert config.num_patches == (224 // patch) ** 2
    assert name in MAE_PRESETS


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(image_size=30, patch_size=4), "image_size"),
        (dict(image_size=(32, 30), patch_size=4), "image_size"),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(decoder_hidden_size=30, decoder_num_attention_heads=4), "decoder_hidden_size"),
        (dict(mask_strategy="checkerboard"), "mask_strategy"),
        (dict(pooling="max"), "pooling"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(patch_size=0), "patch_size"),
        (dict(decoder_num_hidden_layers=0), "decoder_num_hidden_layers"),
    ],
)
def test_invalid_config_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="mae-vit-giant"):
        MAEConfig.from_preset("mae-vit-giant")


def test_config_round_trip(tmp_path):
    config = tiny_config(image_size=(32, 48), mask_strategy="block", out_indices=[1, 2])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MAEConfig)
    assert loaded.image_hw == (32, 48) and loaded.grid_size == (8, 12)
    assert loaded.mask_strategy == "block" and loaded.out_indices == [1, 2]


# --------------------------------------------------------------------------------------------------
# Initialisation (the ViTMAE trap: positions and tokens left at zero after construction)
# --------------------------------------------------------------------------------------------------
def _check_fresh_init(model: MAEForPreTraining, config: MAEConfig):
    enc = model.mae.embeddings
    torch.testing.assert_close(enc.position_embeddings[0], sincos_2d(config.hidden_size, config.grid_size))
    torch.testing.assert_close(
        model.decoder.decoder_pos_embed[0], sincos_2d(config.decoder_hidden_size, config.grid_size)
    )
    assert not enc.position_embeddings.requires_grad
    assert not model.decoder.decoder_pos_embed.requires_grad
    for token in (enc.cls_token, model.decoder.mask_token):
        assert token.requires_grad
        assert token.abs().sum() > 0
        assert abs(token.std().item() - 0.02) < 0.01, token.std()
    # xavier-uniform Linear with zero bias; LayerNorm 1/0
    layer = model.mae.encoder.layer[0]
    bound = (6 / (layer.attention.qkv.in_features + layer.attention.qkv.out_features)) ** 0.5
    assert layer.attention.qkv.weight.abs().max() <= bound + 1e-6
    assert layer.attention.qkv.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.attention.qkv.bias) == 0
    assert torch.all(layer.layernorm_before.weight == 1) and torch.all(layer.layernorm_before.bias == 0)
    # patch projection: xavier-uniform on the flattened (D, C*p*p) weight
    w = enc.patch_embeddings.projection.weight
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert w.abs().max() <= bound + 1e-6 and w.abs().max() > 0.8 * bound


# The official rules, parameter by parameter, on full-size ViT-B models (models_mae.py `initialize_weights`
# / `_init_weights`, main_finetune.py and main_linprobe.py for the heads):
#   Linear: xavier-uniform U(+-sqrt(6 / (fan_in + fan_out))), bias 0
#   patch projection: xavier-uniform on the weight viewed as (D, C*p*p); bias left at PyTorch's Conv2d
#     default U(+-1/sqrt(C*p*p))
#   CLS / mask token: N(0, 0.02); LayerNorm: weight 1, bias 0; position tables: fixed sin-cos
#   heads: truncated normal std 2e-5 (fine-tuning) / 0.01 (linear probe), bias 0
def _check_uniform(t: torch.Tensor, bound: float, name: str):
    """Max |x| within the bound and reaching it; mean 0; std bound / sqrt(3); half the mass within bound / 2."""
    x = t.detach().double().flatten()
    n = x.numel()
    assert x.abs().max() <= bound * (1 + 1e-6), name
    assert x.abs().max() >= bound * (1 - 20 / n), name  # the max of n uniform draws: within ~bound / n
    sd = bound / 3**0.5
    assert abs(x.mean().item()) < 5 * sd / n**0.5, name
    assert abs(x.std().item() / sd - 1) < 5 * 0.45 / n**0.5, name  # s.e. of a uniform std: sqrt(0.8 / 4n)
    inside = (x.abs() < bound / 2).double().mean().item()
    assert abs(inside - 0.5) < 5 * 0.5 / n**0.5, name


def _check_normal(t: torch.Tensor, std: float, name: str):
    x = t.detach().double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 5 * std / n**0.5, name
    assert abs(x.std().item() / std - 1) < 5 / (2 * n) ** 0.5, name
    inside = (x.abs() < std).double().mean().item()  # 68.27 % within one std
    assert abs(inside - 0.6827) < 5 * 0.47 / n**0.5, name


def _check_official_init(model: torch.nn.Module, head_std: float | None = None):
    """Every parameter and buffer of `model` against the rule for its module; returns nothing unchecked."""
    config = model.config
    checked = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, torch.nn.Linear):
            if mod_name == "classifier":
                _check_normal(module.weight, head_std, mod_name)
                assert module.weight.abs().max() <= 2.0  # the truncation bounds of trunc_normal_ (+-2)
            else:
                fan_out, fan_in = module.weight.shape
                _check_uniform(module.weight, (6 / (fan_in + fan_out)) ** 0.5, mod_name)
            assert torch.count_nonzero(module.bias) == 0, mod_name
            checked |= {prefix + "weight", prefix + "bias"}
        elif isinstance(module, torch.nn.Conv2d):
            d, c, p, _ = module.weight.shape
            _check_uniform(module.weight, (6 / (d + c * p * p)) ** 0.5, mod_name)
            _check_uniform(module.bias, 1 / (c * p * p) ** 0.5, mod_name + ".bias")
            assert torch.count_nonzero(module.bias) == d
            checked |= {prefix + "weight", prefix + "bias"}
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), mod_name
            checked |= {prefix + "weight", prefix + "bias"}
        elif isinstance(module, torch.nn.BatchNorm1d):
            assert not module.affine and torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)
            checked |= {prefix + "running_mean", prefix + "running_var", prefix + "num_batches_tracked"}
    for name, param in model.named_parameters():
        if name.endswith(("cls_token", "mask_token")):
            _check_normal(param, 0.02, name)
            checked.add(name)
        elif name.endswith("position_embeddings"):
            torch.testing.assert_close(param[0], sincos_2d(config.hidden_size, config.grid_size))
            checked.add(name)
        elif name.endswith("decoder_pos_embed"):
            torch.testing.assert_close(param[0], sincos_2d(config.decoder_hidden_size, config.grid_size))
            checked.add(name)
    everything = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert everything - checked == set()


def test_fresh_vit_base_follows_the_official_initialisation_rules():
    torch.manual_seed(0)
    _check_official_init(MAEForPreTraining(MAEConfig.from_preset("mae-vit-base-patch16")))
    # the heads on a one-block ViT-B (the rules do not depend on depth)
    finetune = MAEForImageClassification(
        MAEConfig.from_preset("mae-vit-base-patch16", num_hidden_layers=1, num_labels=1000)
    )
    assert finetune.mae.fc_norm is not None
    _check_official_init(finetune, head_std=2e-5)
    probe = MAEForImageClassification(MAEConfig.from_preset(
        "mae-vit-base-patch16", num_hidden_layers=1, num_labels=1000, pooling="cls", linear_probe_head=True
    ))
    _check_official_init(probe, head_std=0.01)


def test_published_sincos_layout():
    # first half of the channels encodes the column (width) index, second half the row index
    table = sincos_2d(8, (2, 3), add_cls_token=True)
    assert torch.all(table[0] == 0)
    patches = table[1:].reshape(2, 3, 8)
    # moving along a row (column index changes) changes only the first half
    assert torch.equal(patches[0, :, 4:], patches[0, :1, 4:].expand(3, 4))
    assert not torch.equal(patches[0, 0, :4], patches[0, 1, :4])
    # moving down a column changes only the second half
    assert torch.equal(patches[:, 0, :4], patches[:1, 0, :4].expand(2, 4))
    # values: pos * omega with omega = 1 / 10000^(i / (D/4)); column 1, channel 0 -> sin(1)
    assert torch.isclose(patches[0, 1, 0], torch.tensor(np.sin(1.0), dtype=torch.float32))
    assert torch.isclose(patches[1, 0, 6], torch.tensor(np.cos(1.0), dtype=torch.float32))


def test_fresh_init_constructor():
    config = tiny_config()
    _check_fresh_init(MAEForPreTraining(config), config)


def test_fresh_init_from_config_and_auto():
    config = tiny_config()
    _check_fresh_init(MAEForPreTraining._from_config(config), config)
    _check_fresh_init(AutoModelForPreTraining.from_config(config), config)
    encoder = AutoModel.from_config(config)
    torch.testing.assert_close(
        encoder.embeddings.position_embeddings[0], sincos_2d(config.hidden_size, config.grid_size)
    )
    assert encoder.embeddings.cls_token.abs().sum() > 0


def test_decoder_and_encoder_both_trained():
    model = MAEForPreTraining(tiny_config())
    out = model(images(), noise=torch.rand(2, 64))
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.decoder_layers") for n in trainable)
    assert "mae.embeddings.patch_embeddings.projection.weight" in trainable
    assert "decoder.mask_token" in trainable
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_masking_strategies(strategy, ratio):
    grid = (8, 8)
    length = 64
    x = torch.randn(4, length, 5)
    noise = make_noise(strategy, 4, grid, ratio, generator=torch.Generator().manual_seed(0))
    x_masked, mask, ids_restore, ids_keep = random_masking(x, noise, ratio)
    keep = int(length * (1 - ratio))
    # exact kept count, per sample
    assert x_masked.shape == (4, keep, 5)
    assert torch.all(mask.sum(1) == length - keep)
    # ids_restore inverts the shuffle: unshuffling [kept, removed] recovers the original order
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(4, -1))
    # kept tokens are the right ones and the mask marks exactly the others
    assert torch.equal(x_masked, torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 5)))
    kept_from_mask = (mask == 0).nonzero()[:, 1].reshape(4, keep)
    assert torch.equal(kept_from_mask, ids_keep.sort(1).values)
    # the same noise gives the same mask
    _, mask2, restore2, _ = random_masking(x, noise.clone(), ratio)
    assert torch.equal(mask, mask2) and torch.equal(ids_restore, restore2)
    # different samples get different masks (grid masking is the same for every sample by design)
    if strategy != "grid":
        assert len({tuple(m.tolist()) for m in mask}) == 4


def test_grid_masking_keeps_one_of_every_2x2():
    noise = make_noise("grid", 2, (8, 8), 0.75)
    _, mask, _, _ = random_masking(torch.zeros(2, 64, 1), noise, 0.75)
    kept = (mask[0] == 0).reshape(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[::2, ::2] = True
    assert torch.equal(kept, expected)


def test_block_masking_is_blocky():
    # block masks are spatially clustered: masked patches have more masked 4-neighbours than random ones
    def neighbour_agreement(mask_2d):
        m = mask_2d.float()
        same = (m[1:, :] == m[:-1, :]).float().mean() + (m[:, 1:] == m[:, :-1]).float().mean()
        return same.item() / 2

    g = torch.Generator().manual_seed(1)
    block = make_noise("block", 16, (14, 14), 0.5, generator=g)
    rand = make_noise("random", 16, (14, 14), 0.5, generator=g)
    agree_block = np.mean(
        [neighbour_agreement(random_masking(torch.zeros(1, 196, 1), n[None], 0.5)[1].reshape(14, 14)) for n in block]
    )
    agree_rand = np.mean(
        [neighbour_agreement(random_masking(torch.zeros(1, 196, 1), n[None], 0.5)[1].reshape(14, 14)) for n in rand]
    )
    assert agree_block > agree_rand + 0.15


def test_model_masking_reproducible_with_noise():
    model = MAEForPreTraining(tiny_config()).eval()
    noise = torch.rand(2, 64)
    a = model(images(), noise=noise)
    b = model(images(), noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.all(a.mask.sum(1) == 48)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_model_uses_config_strategy(strategy):
    model = MAEForPreTraining(tiny_config(mask_strategy=strategy)).eval()
    out = model(images(batch=3))
    assert torch.all(out.mask.sum(1) == 48)


# --------------------------------------------------------------------------------------------------
# Forward semantics
# --------------------------------------------------------------------------------------------------
def test_encoder_default_is_unmasked_and_deterministic():
    model = MAEModel(tiny_config()).eval()
    a = model(images())
    b = model(images())
    assert a.last_hidden_state.shape == (2, 1 + 64, 64)
    assert a.mask is None and a.ids_restore is None
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    assert a.pooler_output.shape == (2, 64)
    masked = model(images(), mask_ratio=0.75)
    assert masked.last_hidden_state.shape == (2, 1 + 16, 64)
    assert masked.mask.shape == (2, 64) and masked.ids_restore.shape == (2, 64)


def test_encoder_sees_only_visible_patches():
    """Masked patches are removed: changing a removed patch's pixels changes nothing in the encoder."""
    config = tiny_config()
    model = MAEModel(config).eval()
    x = images(batch=1)
    noise = torch.rand(1, 64)
    out = model(x, noise=noise)
    removed = int(out.mask[0].nonzero()[0])
    row, col = divmod(removed, 8)
    y = x.clone()
    y[:, :, row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4] += 10.0
    torch.testing.assert_close(model(y, noise=noise).last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_predict_masked_only_matches_the_full_prediction(norm_pix_loss):
    """The pretraining fast path (last decoder block, norm and prediction on the removed patches only)
    gives the full path's loss, gradients and removed-patch predictions."""
    config = tiny_config(norm_pix_loss=norm_pix_loss, decoder_num_hidden_layers=2)
    torch.manual_seed(0)
    model = MAEForPreTraining(config).train()
    x, noise = images(), torch.rand(2, 64)
    full = model(x, noise=noise)
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = model(x, noise=noise, predict_masked_only=True)
    fast.loss.backward()

    assert full.ids_masked is None
    assert fast.logits.shape == (2, 48, config.patch_size**2 * 3) and fast.ids_masked.shape == (2, 48)
    # ids_masked lists exactly the removed patches
    assert torch.equal(torch.sort(fast.ids_masked, 1).values, torch.sort((full.mask == 1).nonzero()[:, 1].view(2, 48), 1).values)
    expected = torch.gather(full.logits, 1, fast.ids_masked.unsqueeze(-1).expand(-1, -1, full.logits.shape[-1]))
    torch.testing.assert_close(fast.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=1e-5)
    assert torch.equal(fast.mask, full.mask) and torch.equal(fast.ids_restore, full.ids_restore)
    for name, grad in full_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)
    # the loss helper, given the order, agrees with the mask form
    torch.testing.assert_close(
        model.forward_loss(x, fast.logits, fast.mask, fast.ids_masked), model.forward_loss(x, full.logits, full.mask)
    )
    as_tuple = model(x, noise=noise, predict_masked_only=True, return_dict=False)
    assert torch.equal(as_tuple[-1], fast.ids_masked)
    # nothing masked: nothing to predict, a zero loss as on the full path
    none_masked = model(x, mask_ratio=0.0, predict_masked_only=True)
    assert none_masked.logits.shape == (2, 0, config.patch_size**2 * 3) and none_masked.loss.item() == 0.0


def test_loss_only_on_removed_patches():
    """Perturbing the prediction of a visible patch does not change the loss; a removed one does."""
    model = MAEForPreTraining(tiny_config(norm_pix_loss=False)).eval()
    x = images()
    out = model(x, noise=torch.rand(2, 64))
    pred = out.logits.detach().clone()
    base = model.forward_loss(x, pred, out.mask)
    visible = (out.mask == 0).nonzero()[0]
    removed = (out.mask == 1).nonzero()[0]
    pred_v = pred.clone()
    pred_v[visible[0], visible[1]] += 5
    pred_r = pred.clone()
    pred_r[removed[0], removed[1]] += 5
    torch.testing.assert_close(model.forward_loss(x, pred_v, out.mask), base)
    assert model.forward_loss(x, pred_r, out.mask) > base
    # by hand: per-patch MSE averaged over the removed ones
    target = model.patchify(x)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(base, (per_patch * out.mask).sum() / out.mask.sum())


def test_norm_pix_target_and_unnormalize():
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True)).eval()
    x = images()
    target = model.patchify(x)
    normed = model.normalize_target(target)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    # a perfect norm_pix prediction, un-normalised, gives back the pixels
    torch.testing.assert_close(model.unnormalize_predictions(normed, x), target, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.unpatchify(target), x)


def test_patchify_layout():
    model = MAEForPreTraining(tiny_config())
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = model.patchify(x)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    # patch (row 1, col 2), pixel (0, 1), channel 2
    assert patches[1, 1 * 8 + 2, (0 * 4 + 1) * 3 + 2] == x[1, 2, 4 + 0, 8 + 1]
    torch.testing.assert_close(model.unpatchify(patches), x)


def test_output_hidden_states_and_attentions_sdpa_matches_eager():
    model = MAEModel(tiny_config()).eval()
    x = images()
    sdpa = model(x, output_hidden_states=True)
    eager = model(x, output_attentions=True, output_hidden_states=True)
    assert len(sdpa.hidden_states) == 1 + 2
    assert len(eager.attentions) == 2 and eager.attentions[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(eager.attentions[0].sum(-1), torch.ones(2, 4, 65))
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    tup = model(x, return_dict=False)
    torch.testing.assert_close(tup[0], sdpa.last_hidden_state)


def test_interpolate_pos_encoding_non_square():
    config = tiny_config()
    model = MAEForPreTraining(config).eval()
    x = images(size=(48, 64))
    with pytest.raises(ValueError, match="48x64"):
        model(x)
    out = model(x, interpolate_pos_encoding=True, noise=torch.rand(2, 12 * 16))
    assert out.logits.shape == (2, 12 * 16, 48)
    assert torch.isfinite(out.loss)
    assert model.unpatchify(out.logits, image_size=(48, 64)).shape == (2, 3, 48, 64)
    enc = MAEModel(config).eval()
    assert enc(x, interpolate_pos_encoding=True).last_hidden_state.shape == (2, 1 + 192, 64)
    # the same grid interpolates to itself
    same = enc(images(), interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(same, enc(images()).last_hidden_state)


def test_non_square_config():
    config = tiny_config(image_size=(32, 48))
    model = MAEForPreTraining(config).eval()
    out = model(images(size=(32, 48)))
    assert out.logits.shape == (2, 8 * 12, 48)
    torch.testing.assert_close(model.mae.embeddings.position_embeddings[0], sincos_2d(64, (8, 12)))


def test_bad_inputs_raise_with_shapes():
    model = MAEForPreTraining(tiny_config())
    with pytest.raises(ValueError, match=r"3.*\(2, 1, 32, 32\)"):
        model(images(channels=1))
    with pytest.raises(ValueError, match=r"\(16x16\).*\(32x32\)"):
        model(images(size=16))
    with pytest.raises(ValueError, match="divisible"):
        model(images(size=30), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="noise"):
        model(images(), noise=torch.rand(2, 10))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(images(), mask_ratio=1.0)


def test_gradient_checkpointing_same_gradients():
    config = tiny_config()
    torch.manual_seed(0)
    a = MAEForPreTraining(config).train()
    b = MAEForPreTraining(config).train()
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    noise = torch.rand(2, 64)
    a(images(), noise=noise).loss.backward()
    b(images(), noise=noise).loss.backward()
    assert b.mae.encoder.layer[0].gradient_checkpointing
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    model = MAEForPreTraining(tiny_config()).to(dtype)
    out = model(images().to(dtype), noise=torch.rand(2, 64))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.logits.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MAEForPreTraining(tiny_config())(images(), noise=torch.rand(2, 64))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_drop_path_only_in_training():
    model = MAEModel(tiny_config(drop_path_rate=0.5))
    x = images()
    model.eval()
    torch.testing.assert_close(model(x).last_hidden_state, model(x).last_hidden_state)
    model.train()
    assert not torch.allclose(model(x).last_hidden_state, model(x).last_hidden_state)


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
def test_classification_mean_pooling_is_official_head():
    model = MAEForImageClassification(tiny_config(num_labels=5)).eval()
    assert model.mae.layernorm is None and model.mae.fc_norm is not None
    x = images()
    out = model(x, labels=torch.tensor([1, 3]), output_hidden_states=True)
    assert out.logits.shape == (2, 5)
    last = out.hidden_states[-1]
    expected = model.classifier(model.mae.fc_norm(last[:, 1:].mean(1)))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 3])))
    assert model.mae.embeddings.position_embeddings.requires_grad  # fine-tuning trains the positions


def test_classification_soft_targets():
    model = MAEForImageClassification(tiny_config(num_labels=4)).eval()
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])
    out = model(images(), labels=soft)
    expected = torch.sum(-soft * torch.log_softmax(out.logits, -1), -1).mean()
    torch.testing.assert_close(out.loss, expected)


def test_linear_probe_head():
    model = MAEForImageClassification(tiny_config(num_labels=3, pooling="cls", linear_probe_head=True))
    assert isinstance(model.head_norm, torch.nn.BatchNorm1d) and not model.head_norm.affine
    assert model.head_norm.eps == 1e-6
    assert model.mae.layernorm is not None and model.mae.fc_norm is None
    model.eval()
    x = images()
    out = model(x)
    cls = model.mae(x).last_hidden_state[:, 0]
    torch.testing.assert_close(out.logits, model.classifier(model.head_norm(cls)))
    assert abs(model.classifier.weight.std().item() - 0.01) < 0.005


def test_weight_decay_and_layer_ids():
    model = MAEForPreTraining(tiny_config())
    names = model.no_weight_decay()
    assert {"mae.embeddings.cls_token", "decoder.mask_token"} <= names
    assert model.layer_id("mae.embeddings.cls_token") == 0
    assert model.layer_id("mae.encoder.layer.1.mlp.fc1.weight") == 2
    assert model.layer_id("mae.layernorm.weight") == 3


# --------------------------------------------------------------------------------------------------
# Save / load / Auto / remote code / pipelines
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pretraining_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mae_pretrain")
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config())
    model.save_pretrained(path)
    return path, model


def test_save_load_round_trip(saved_pretraining_dir):
    path, model = saved_pretraining_dir
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_mae.py"} <= files
    assert not any(f.endswith(".bin") for f in files)
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"].endswith("MAEModel")
    assert auto_map["AutoModelForPreTraining"].endswith("MAEForPreTraining")
    loaded = AutoModelForPreTraining.from_pretrained(path)
    assert isinstance(loaded, MAEForPreTraining)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert not loaded.mae.embeddings.position_embeddings.requires_grad
    noise = torch.rand(2, 64)
    torch.testing.assert_close(model.eval()(images(), noise=noise).loss, loaded.eval()(images(), noise=noise).loss)


def test_encoder_loads_alone(saved_pretraining_dir):
    path, model = saved_pretraining_dir
    encoder = AutoModel.from_pretrained(path)
    assert isinstance(encoder, MAEModel)
    torch.testing.assert_close(encoder.embeddings.cls_token, model.mae.embeddings.cls_token)
    noise = torch.rand(2, 64)
    torch.testing.assert_close(
        encoder.eval()(images(), noise=noise).last_hidden_state,
        model.eval().mae(images(), noise=noise).last_hidden_state,
    )


def test_classifier_from_pretraining_checkpoint(saved_pretraining_dir):
    path, model = saved_pretraining_dir
    clf = AutoModelForImageClassification.from_pretrained(path, num_labels=7)
    assert isinstance(clf, MAEForImageClassification)
    torch.testing.assert_close(clf.mae.encoder.layer[1].mlp.fc2.weight, model.mae.encoder.layer[1].mlp.fc2.weight)
    assert clf(images()).logits.shape == (2, 7)


def test_load_with_dtype(saved_pretraining_dir):
    path, _ = saved_pretraining_dir
    model = AutoModelForPreTraining.from_pretrained(path, dtype=torch.bfloat16)
    assert model.mae.embeddings.cls_token.dtype == torch.bfloat16
    out = model(images().to(torch.bfloat16))
    assert torch.isfinite(out.loss)


def test_image_processor_saved(saved_pretraining_dir, tmp_path):
    path, _ = saved_pretraining_dir
    processor = AutoImageProcessor.from_pretrained(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    # a given processor is kept
    model = MAEModel(tiny_config(image_size=(32, 48)))
    model.save_pretrained(tmp_path / "ns")
    assert AutoImageProcessor.from_pretrained(tmp_path / "ns").size == {"height": 32, "width": 48}
    processor.save_pretrained(tmp_path / "given")
    model.save_pretrained(tmp_path / "given2", image_processor=processor)
    assert AutoImageProcessor.from_pretrained(tmp_path / "given2").size == {"height": 32, "width": 32}


def test_remote_code_load_without_package(saved_pretraining_dir, tmp_path):
    """A saved directory loads with trust_remote_code in a Python where `modeling_mae` cannot be imported."""
    path, model = saved_pretraining_dir
    noise = torch.rand(2, 64)
    x = images()
    torch.save({"x": x, "noise": noise}, tmp_path / "inputs.pt")
    expected = model.eval().mae(x, noise=noise).last_hidden_state
    repo = str(Path(__file__).resolve().parents[1])  # the checkout (a virtual environment inside it stays)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p.rstrip('/') != {repo!r} and p not in ('', '.')]
        try:
            import modeling_mae
            raise SystemExit('modeling_mae must not be importable here')
        except ImportError:
            pass
        import torch
        from transformers import AutoModel, AutoModelForPreTraining
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        model = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == 'MAEModel', type(model)
        out = model(inputs['x'], noise=inputs['noise']).last_hidden_state
        torch.save(out, {str(tmp_path / 'out.pt')!r})
        pre = AutoModelForPreTraining.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(pre).__name__ == 'MAEForPreTraining'
        from PIL import Image
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(processor).__name__ == 'MAEImageProcessor', type(processor)
        assert processor(Image.new('RGB', (50, 40)), return_tensors='pt')['pixel_values'].shape == (1, 3, 32, 32)
        print('remote-ok', type(model).__module__, type(processor).__module__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    # -s: no user site; run from tmp_path so the repo is not on the path; the editable install's
    # path hook is removed by filtering sys.path above and by hiding its finder
    script = script.replace(
        "import sys\n",
        "import sys\nsys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()"
        " and 'editable' not in repr(f).lower()]\n",
        1,
    )
    result = subprocess.run(
        [sys.executable, "-s", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remote-ok transformers_modules" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_feature_extraction_pipeline(saved_pretraining_dir):
    path, model = saved_pretraining_dir
    extractor = pipeline("image-feature-extraction", model=str(path), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    features = extractor(image, return_tensors=True)
    assert features.shape == (1, 65, 64)
    pooled = extractor(image, pool=True, return_tensors=True)
    assert pooled.shape[-1] == 64


def test_image_classification_pipeline(tmp_path):
    config = tiny_config(num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    MAEForImageClassification(config).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == {"cat", "dog", "fish"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_push_to_hub_writes_processor_and_code(monkeypatch, saved_pretraining_dir):
    """push_to_hub goes through save_pretrained: the commit carries weights, code and processor.
    The test stops at huggingface_hub's HfApi calls (no network)."""
    import huggingface_hub

    _, model = saved_pretraining_dir
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {op.path_in_repo for op in operations}
        uploaded["config"] = json.loads(
            open(next(op.path_or_fileobj for op in operations if op.path_in_repo == "config.json")).read()
        )
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    model.push_to_hub("someone/mae-tiny", token="hf_dummy")
    assert uploaded["repo_id"] == "someone/mae-tiny"
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_mae.py",
            "configuration_mae.py", "masking.py", "pos_embed.py"} <= uploaded["files"]
    assert uploaded["config"]["auto_map"]["AutoModel"] == "modeling_mae.MAEModel"


def test_package_registers_auto_classes():
    assert AutoConfig.for_model("mae").__class__ is MAEConfig
    assert modeling_mae.__version__
