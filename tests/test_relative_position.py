"""Relative position bias (BEiT, transfer-only) and layer scale in the MAE encoder / backbone."""

from __future__ import annotations

import logging

import pytest
import torch

from modeling_mae import MAEBackbone, MAEConfig, MAEForPreTraining, MAEModel, MAEUperNetConfig, MAEUperNetForSemanticSegmentation
from modeling_mae.relative_position import (
    num_relative_positions,
    relative_position_index,
    resize_relative_position_table,
)
from modeling_mae.training.optim import layer_decay_param_groups
from modeling_mae.training.segmentation_data import slide_inference


TRANSFER = dict(use_relative_position_bias=True, layer_scale_init_value=1.0)


def tiny(**overrides) -> MAEConfig:
    kwargs = dict(
        image_size=(16, 24), patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        out_indices=[1, 2, 3, 4],
    )
    kwargs.update(overrides)
    return MAEConfig(**kwargs)


def randomize_transfer_parameters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith(("layer_scale_1", "layer_scale_2")):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))


def test_relative_position_index_by_hand_on_a_2x3_grid():
    """Rows/columns of the (1 + 6)^2 index: token 0 is CLS, tokens 1..6 the patches (r, c) in row-major
    order (0,0) (0,1) (0,2) (1,0) (1,1) (1,2). Offsets dr in {-1, 0, 1}, dc in {-2..2}: patch->patch
    entry = (dr + 1) * 5 + (dc + 2), 15 offsets; then 15 = CLS->patch, 16 = patch->CLS, 17 = CLS->CLS."""
    assert num_relative_positions((2, 3)) == 3 * 5 + 3
    # query (0,0) vs keys (0,0) (0,1) (0,2) (1,0) (1,1) (1,2): dr = 0,0,0,-1,-1,-1; dc = 0,-1,-2,0,-1,-2
    expected = torch.tensor([
        [17, 15, 15, 15, 15, 15, 15],
        [16, 7, 6, 5, 2, 1, 0],
        [16, 8, 7, 6, 3, 2, 1],
        [16, 9, 8, 7, 4, 3, 2],
        [16, 12, 11, 10, 7, 6, 5],
        [16, 13, 12, 11, 8, 7, 6],
        [16, 14, 13, 12, 9, 8, 7],
    ])
    assert torch.equal(relative_position_index((2, 3)), expected)


def test_tables_start_at_zero_and_gammas_at_the_config_value():
    model = MAEModel(tiny(use_relative_position_bias=True, layer_scale_init_value=0.1), add_pooling_layer=False)
    for block in model.encoder.layer:
        assert block.relative_position_bias.relative_position_bias_table.shape == (3 * 5 + 3, 2)
        assert torch.count_nonzero(block.relative_position_bias.relative_position_bias_table) == 0
        assert torch.all(block.layer_scale_1 == 0.1) and torch.all(block.layer_scale_2 == 0.1)
    plain = MAEModel(tiny(), add_pooling_layer=False)
    assert plain.encoder.layer[0].relative_position_bias is None and plain.encoder.layer[0].layer_scale_1 is None
    assert not any("relative" in k or "layer_scale" in k for k in plain.state_dict())
    decoder = MAEForPreTraining(tiny(**TRANSFER)).decoder  # transfer options are encoder-only
    assert decoder.decoder_layers[0].relative_position_bias is None and decoder.decoder_layers[0].layer_scale_1 is None


def test_config_rejects_bad_values_and_masking_with_the_bias():
    with pytest.raises(ValueError, match="layer_scale_init_value"):
        tiny(layer_scale_init_value=-1.0)
    with pytest.raises(ValueError, match="use_relative_position_bias"):
        tiny(use_relative_position_bias="yes")
    model = MAEModel(tiny(**TRANSFER))
    with pytest.raises(ValueError, match="transfer option"):
        model(torch.randn(1, 3, 16, 24), mask_ratio=0.5)


def test_bias_is_added_to_the_scaled_logits_before_softmax():
    """Attention weights of block 0 recomputed by hand: softmax(q k^T / sqrt(d) + table[index])."""
    model = MAEModel(tiny(**TRANSFER), add_pooling_layer=False).eval()
    randomize_transfer_parameters(model)
    x = torch.randn(2, 3, 16, 24)
    out = model(x, output_attentions=True, output_hidden_states=True)
    block = model.encoder.layer[0]
    h = block.layernorm_before(out.hidden_states[0])
    q, k, _ = block.attention.qkv(h).reshape(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)
    table = block.relative_position_bias.relative_position_bias_table
    bias = table[relative_position_index((2, 3))].permute(2, 0, 1)  # (heads, 7, 7)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 16**0.5 + bias, dim=-1)
    torch.testing.assert_close(out.attentions[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(16, 24), (32, 16)])
def test_eager_and_sdpa_agree_with_the_bias(size):
    config = tiny(**TRANSFER)
    model = MAEBackbone(config).eval()
    randomize_transfer_parameters(model)
    x = torch.randn(2, 3, *size)
    outputs = {}
    for impl in ("eager", "sdpa"):
        config._attn_implementation = impl
        with torch.no_grad():
            outputs[impl] = model(x).feature_maps
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"]):
        torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 24), (24, 40)])
def test_zero_tables_and_unit_gammas_compute_the_plain_backbone(size):
    """Bit-identical with the eager attention path; the SDPA kernel with an (all-zero) additive mask is
    another kernel than without one, so there the match is to float rounding."""
    plain_config, transfer_config = tiny(), tiny(**TRANSFER)
    plain = MAEBackbone(plain_config).eval()
    transfer = MAEBackbone(transfer_config).eval()
    missing = transfer.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("relative_position_bias_table" in k or "layer_scale" in k for k in missing)
    x = torch.randn(2, 3, *size)
    for impl in ("eager", "sdpa"):
        plain_config._attn_implementation = transfer_config._attn_implementation = impl
        with torch.no_grad():
            a, b = plain(x, output_hidden_states=True), transfer(x, output_hidden_states=True)
        for p, t in zip(a.feature_maps + a.hidden_states, b.feature_maps + b.hidden_states):
            if impl == "eager":
                assert torch.equal(p, t)
            else:
                torch.testing.assert_close(t, p, rtol=1e-5, atol=1e-5)


def test_any_mae_checkpoint_loads_into_the_transfer_backbone(tmp_path, caplog):
    pretrained = MAEForPreTraining(tiny())
    pretrained.save_pretrained(tmp_path / "pt")
    plain = MAEBackbone.from_pretrained(tmp_path / "pt").eval()
    with caplog.at_level(logging.INFO, logger="modeling_mae.modeling_mae"):
        transfer = MAEBackbone.from_pretrained(tmp_path / "pt", **TRANSFER).eval()
    lines = [r.getMessage() for r in caplog.records if "transfer-only" in r.getMessage()]
    assert len(lines) == 1 and "4 relative position bias table(s) start at zero" in lines[0]
    assert "8 layer-scale gamma(s) at 1.0" in lines[0]
    transfer.pyramid.load_state_dict(plain.pyramid.state_dict())  # new in both: make them the same
    plain.config._attn_implementation = transfer.config._attn_implementation = "eager"
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        a, b = plain(x, output_hidden_states=True), transfer(x, output_hidden_states=True)
    for p, t in zip(a.feature_maps + a.hidden_states, b.feature_maps + b.hidden_states):
        assert torch.equal(p, t)


def test_gradients_reach_tables_and_gammas():
    model = MAEBackbone(tiny(**TRANSFER)).train()
    randomize_transfer_parameters(model)
    sum(m.square().mean() for m in model(torch.randn(2, 3, 24, 40)).feature_maps).backward()
    for i, block in enumerate(model.mae.encoder.layer):
        for param in (block.relative_position_bias.relative_position_bias_table, block.layer_scale_1, block.layer_scale_2):
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, i


def test_resize_by_hand_along_rows_and_columns():
    """Grid (1, 2) -> offsets (1, 3) [a, b, c]; to grid (1, 3) -> offsets (1, 5). Bilinear, half-pixel
    centres: source x = (j + 0.5) * 3 / 5 - 0.5 = -0.2, 0.4, 1.0, 1.6, 2.2 (clamped to [0, 2])."""
    a, b, c = 1.0, 3.0, -2.0
    cls = [7.0, 8.0, 9.0]
    table = torch.tensor([a, b, c] + cls).unsqueeze(1)  # one head
    expected = [a, a + 0.4 * (b - a), b, b + 0.6 * (c - b), c] + cls
    torch.testing.assert_close(resize_relative_position_table(table, (1, 2), (1, 3))[:, 0], torch.tensor(expected))
    # the same along rows: grid (2, 1) -> (3, 1) (transformers' BEiT swaps rows and columns here)
    torch.testing.assert_close(resize_relative_position_table(table, (2, 1), (3, 1))[:, 0], torch.tensor(expected))
    assert resize_relative_position_table(table, (1, 2), (1, 2)) is table
    with pytest.raises(ValueError, match=r"grid \(2, 2\) has 12 rows, got 6"):
        resize_relative_position_table(table, (2, 2), (3, 3))


def test_another_input_grid_uses_the_resized_table():
    """A non-square input at a grid other than the table's: the bias of block 0 is the resized table
    gathered with the new grid's index (checked through the attention weights)."""
    model = MAEModel(tiny(**TRANSFER), add_pooling_layer=False).eval()
    randomize_transfer_parameters(model)
    out = model(torch.randn(1, 3, 24, 40), interpolate_pos_encoding=True, output_attentions=True, output_hidden_states=True)
    block = model.encoder.layer[0]
    h = block.layernorm_before(out.hidden_states[0])
    q, k, _ = block.attention.qkv(h).reshape(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
    table = resize_relative_position_table(block.relative_position_bias.relative_position_bias_table, (2, 3), (3, 5))
    bias = table[relative_position_index((3, 5))].permute(2, 0, 1)
    torch.testing.assert_close(out.attentions[0], torch.softmax(q @ k.transpose(-2, -1) / 4 + bias, dim=-1),
                               rtol=1e-5, atol=1e-6)


def upernet(**backbone) -> MAEUperNetForSemanticSegmentation:
    config = MAEUperNetConfig(backbone_config=tiny(**backbone), hidden_size=16, auxiliary_channels=8, num_labels=3)
    return MAEUperNetForSemanticSegmentation(config).eval()


def test_sliding_window_with_the_bias():
    """Crops at the table's grid: columns only the first window covers are that window's logits; an
    image smaller than the crop is padded to it."""
    model = upernet(image_size=16, **TRANSFER)
    randomize_transfer_parameters(model)
    image = torch.randn(1, 3, 16, 40)
    with torch.no_grad():
        logits = slide_inference(model, image, crop=16, stride=8)
        first = model(pixel_values=image[..., :16]).logits
        torch.testing.assert_close(logits[..., :8], first[..., :8])
        small = slide_inference(model, image[..., :16, :8], crop=16, stride=8)
    assert small.shape == (1, 3, 16, 8) and torch.isfinite(small).all()


def test_layer_decay_puts_tables_and_gammas_in_their_block():
    model = upernet(**TRANSFER)
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    depth = model.config.backbone_config.num_hidden_layers
    for i, block in enumerate(model.backbone.mae.encoder.layer):
        for param in (block.relative_position_bias.relative_position_bias_table, block.layer_scale_1, block.layer_scale_2):
            group = where[id(param)]
            assert group["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - (i + 1)))  # block i = layer i + 1
            assert group["weight_decay"] == 0.0  # tables as in timm's / transformers' BEiT; gammas are 1-d


def load_segment_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "segment.py"
    spec = importlib.util.spec_from_file_location("segment_script_rpb", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("official", [False, True])
def test_segment_script_builds_the_transfer_backbone_at_the_crop_grid(tmp_path, official):
    """The ADE20K recipe's options on a pretraining checkpoint (ours or an official .pth): tables zero
    and gammas 1 at the crop's grid, the position table resized once (as the per-forward interpolation
    would), so the first forward equals the plain backbone's."""
    from modeling_mae.conversion.convert import mae_to_official
    from modeling_mae.pos_embed import interpolate_pos_embed

    script = load_segment_script()
    pretrained = MAEForPreTraining(tiny(image_size=16))
    if official:
        path = tmp_path / "mae_pretrain.pth"
        torch.save({"model": mae_to_official(pretrained)}, path)
        extra = dict(model_config={"num_attention_heads": 2, "decoder_num_attention_heads": 2})
    else:
        path = tmp_path / "pt"
        pretrained.save_pretrained(path)
        extra = {}
    common = dict(model_name_or_path=str(path), data_dir="unused", num_labels=3, out_indices=[1, 2, 3, 4],
                  crop_size=32, eval_stride=16, drop_path_rate=0.0, **extra)
    backbone = script.load_backbone(script.SegmentConfig(**common, use_relative_position_bias=True,
                                                         layer_scale_init_value=1.0)).eval()
    assert backbone.config.grid_size == (4, 4)
    for block in backbone.mae.encoder.layer:
        assert block.relative_position_bias.relative_position_bias_table.shape == (7 * 7 + 3, 2)
        assert torch.count_nonzero(block.relative_position_bias.relative_position_bias_table) == 0
        assert torch.all(block.layer_scale_1 == 1.0)
    torch.testing.assert_close(backbone.mae.embeddings.position_embeddings,
                               interpolate_pos_embed(pretrained.mae.embeddings.position_embeddings, (2, 2), (4, 4)))
    assert backbone.mae.embeddings.position_embeddings.requires_grad  # trained, as in fine-tuning
    plain = script.load_backbone(script.SegmentConfig(**common)).eval()
    assert plain.config.grid_size == (2, 2)  # without the bias: the checkpoint's grid, interpolated per forward
    backbone.pyramid.load_state_dict(plain.pyramid.state_dict())
    backbone.config._attn_implementation = plain.config._attn_implementation = "eager"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(plain(x).feature_maps, backbone(x).feature_maps):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_the_classifier_takes_the_transfer_options_too():
    from modeling_mae import MAEForImageClassification

    model = MAEForImageClassification(tiny(num_labels=3, **TRANSFER)).eval()
    randomize_transfer_parameters(model)
    block = model.mae.encoder.layer[1]
    assert block.relative_position_bias is not None and block.layer_scale_2 is not None
    x = torch.randn(2, 3, 16, 24)
    logits = model(x).logits
    with torch.no_grad():
        block.relative_position_bias.relative_position_bias_table.zero_()
    assert logits.shape == (2, 3) and not torch.allclose(model(x).logits, logits)  # the table matters
