"""The relative position bias under every attention implementation.

eager, SDPA and flex attention add the (heads, Tq, T) bias to the logits exactly (flex through a
`score_mod`, as transformers' flex wrapper reads a float `attention_mask` at head 0 only and per batch
index); flash attention (and its Hub kernels) would read it as a padding mask, so a model with
`use_relative_position_bias` refuses them, in one line naming the option and the implementation.
"""

from __future__ import annotations

import pytest
import torch
from transformers.utils import is_torch_flex_attn_available

from modeling_mae import MAEConfig, MAEForImageClassification, MAEModel, MAEUperNetConfig, MAEUperNetForSemanticSegmentation
from modeling_mae.relative_position import relative_position_index


HEADS = 4


def tiny(**overrides) -> MAEConfig:
    kwargs = dict(
        image_size=(16, 24), patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        use_relative_position_bias=True,
    )
    kwargs.update(overrides)
    return MAEConfig(**kwargs)


def biased_model() -> MAEModel:
    """Tables of +-2 per head and offset: a bias that differs by head, far from the zero start."""
    torch.manual_seed(0)
    model = MAEModel(tiny(), add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(2.0 * torch.randn(param.shape, generator=generator))
    return model


BACKENDS = ["sdpa", pytest.param("flex_attention", marks=pytest.mark.skipif(
    not is_torch_flex_attn_available(), reason="torch has no flex attention"))]


def block_zero_by_hand(model: MAEModel, tokens: torch.Tensor) -> torch.Tensor:
    """Block 0's attention output for its input `tokens` (N, 7, D), from the formula in float64:
    softmax(q k^T / sqrt(d) + table[index]) v, then the output projection."""
    block = model.encoder.layer[0]
    n, t, dim = tokens.shape
    d = dim // HEADS
    h = block.layernorm_before(tokens).double()
    qkv = h @ block.attention.qkv.weight.double().T + block.attention.qkv.bias.double()
    q, k, v = qkv.reshape(n, t, 3, HEADS, d).permute(2, 0, 3, 1, 4)  # each (N, heads, 7, d)
    table = block.relative_position_bias.relative_position_bias_table.double()
    bias = table[relative_position_index((2, 3))].permute(2, 0, 1)  # (heads, 7, 7), CLS first
    weights = torch.softmax(q @ k.transpose(-2, -1) / d**0.5 + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, t, dim)
    return out @ block.attention.proj.weight.double().T + block.attention.proj.bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_every_backend_adds_the_bias_as_eager_does(backend, batch):
    """Whole encoder (2 blocks, 4 heads, per-head tables of +-2): `backend` equals eager to 1e-5, and
    block 0's attention under `backend` is the formula, for a batch of 1 and of 2 (before the fix, flex
    added head 0's bias to every head, and a batch of 2 indexed past the bias' batch of 1)."""
    model = biased_model()
    x = torch.randn(batch, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
    model.set_attn_implementation(backend)
    with torch.no_grad():
        out = model(x).last_hidden_state
        block = model.encoder.layer[0]
        tokens = expected.hidden_states[0]  # (N, 7, D): the embeddings, block 0's input
        attn_out, _ = block.attention(block.layernorm_before(tokens), attention_bias=block.relative_position_bias((2, 3)))
    assert out.shape == (batch, 7, 32)
    torch.testing.assert_close(out, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn_out.double(), block_zero_by_hand(model, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa"])  # torch's flex attention has no backward on CPU (torch 2.14)
def test_gradients_of_the_tables_agree_with_eager(backend):
    """Training the tables (the segmentation transfer) under `backend`: same gradients as eager."""
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    grads = {}
    for implementation in ("eager", backend):
        model = biased_model()
        model.set_attn_implementation(implementation)
        model(x).last_hidden_state.square().mean().backward()
        grads[implementation] = [b.relative_position_bias.relative_position_bias_table.grad for b in model.encoder.layer]
    for got, expected in zip(grads[backend], grads["eager"]):
        assert torch.count_nonzero(expected) > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"])
def test_flash_attention_is_refused_with_the_bias(tmp_path, implementation):
    """At construction, from_pretrained and set_attn_implementation: one line naming the option and
    the implementation, before transformers looks for the flash package (absent here)."""
    message = rf"^use_relative_position_bias=True .*attn_implementation='{implementation}'"
    with pytest.raises(ValueError, match=message) as info:
        MAEModel(tiny(attn_implementation=implementation))
    assert "\n" not in str(info.value)
    model = MAEForImageClassification(tiny(num_labels=3))
    with pytest.raises(ValueError, match=message):
        model.set_attn_implementation(implementation)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        MAEForImageClassification.from_pretrained(tmp_path, attn_implementation=implementation)
    # the backbone of a segmentation model, set through its parent (transformers' nested-model path)
    segmenter = MAEUperNetForSemanticSegmentation(MAEUperNetConfig(
        backbone_config=tiny(num_hidden_layers=4, out_indices=[1, 2, 3, 4], add_fpn=True), hidden_size=16, auxiliary_channels=8, num_labels=3))
    with pytest.raises(ValueError, match=message):
        segmenter.set_attn_implementation({"backbone_config": implementation})
    # set behind transformers' back (the config's field): refused at the forward instead of run wrongly
    model.config._attn_implementation = implementation
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 16, 24))
