"""Attention goes through transformers' attention interface, and every path computes the same function.

- `attn_implementation=` / `set_attn_implementation` pick the function from `ALL_ATTENTION_FUNCTIONS`
  (checked with a function registered only for the test), an explicit choice is kept as made, and
  the model's own default (no choice) picks explicit matmuls or SDPA per call (`prefer_eager_attention`).
- eager, SDPA and the default give the softmax(q k^T / sqrt(d)) v of the formula, computed here in
  float64, with partial queries (`first_query`) and an additive bias: float32 tight, bfloat16 loose.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_mae import MAEConfig, MAEForPreTraining, MAEModel
from modeling_mae.modeling_mae import (
    MAEAttention,
    attention_function,
    default_attention_forward,
    eager_attention_forward,
    prefer_eager_attention,
    sdpa_attention_forward,
)


def tiny_config(**overrides) -> MAEConfig:
    return MAEConfig.from_preset("mae-tiny", **overrides)


def formula(x, attention: MAEAttention, first_query=0, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v, then the output projection, in float64 from the weights."""
    x = x.double()
    n, t, dim = x.shape
    heads, d = attention.num_heads, attention.head_dim
    qkv = x @ attention.qkv.weight.double().T + attention.qkv.bias.double()
    q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(n, t, heads, d).transpose(1, 2) for i in range(3))
    scores = q[:, :, first_query:] @ k.transpose(-1, -2) / d**0.5
    if bias is not None:
        scores = scores + bias.double()[..., first_query:, :]
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, t - first_query, dim)
    return out @ attention.proj.weight.double().T + attention.proj.bias.double(), weights


FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward, "default": default_attention_forward}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("first_query", [0, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_every_path_is_the_formula_with_its_gradients(monkeypatch, name, first_query, with_bias, dtype, tol):
    torch.manual_seed(0)
    config = tiny_config()
    attention = MAEAttention(32, 4, True, 0.0, 0.0, config).eval()
    monkeypatch.setattr("modeling_mae.modeling_mae.attention_function", lambda *a: FUNCTIONS[name])
    x = torch.randn(2, 9, 32, requires_grad=True)
    bias = torch.randn(4, 9, 9) if with_bias else None  # (heads, T, T), e.g. a relative position bias
    expected, _ = formula(x, attention, first_query, bias)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), x)

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out, _ = attention(x, first_query=first_query,
                           attention_bias=bias[:, first_query:] if with_bias else None)  # the queries' rows
    (grad,) = torch.autograd.grad((out.float() * grad_out.float()).sum(), x)
    assert out.shape == (2, 9 - first_query, 32)
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() < tol * scale
    assert (grad.double() - expected_grad).abs().max().item() < tol * expected_grad.abs().max().item()


def test_output_attentions_returns_the_formulas_weights_whatever_the_implementation():
    torch.manual_seed(0)
    attention = MAEAttention(32, 4, True, 0.0, 0.0, tiny_config()).eval()  # config: the default ("sdpa")
    x = torch.randn(2, 9, 32)
    _, weights = attention(x, output_attentions=True, first_query=2)
    _, expected = formula(x, attention, first_query=2)
    assert weights.shape == (2, 4, 7, 9)
    torch.testing.assert_close(weights.double(), expected, atol=1e-6, rtol=1e-5)


def test_default_chooses_eager_only_for_a_cpu_bfloat16_backward():
    def qk(tokens, dtype=torch.bfloat16, grad=True, device="cpu"):
        q = torch.zeros(1, 2, tokens, 8, dtype=dtype, device=device, requires_grad=grad)
        return q, q

    assert prefer_eager_attention(*qk(50))  # encoder, training in bf16 on CPU: explicit matmuls
    assert prefer_eager_attention(*qk(577))  # the longest sequence measured
    assert not prefer_eager_attention(*qk(578))  # beyond: SDPA (no T^2 scores kept)
    assert not prefer_eager_attention(*qk(50, dtype=torch.float32))  # fp32: SDPA faster
    assert not prefer_eager_attention(*qk(50, grad=False))  # inference: SDPA (no T^2 scores to page in)
    with torch.no_grad():
        q = torch.zeros(1, 2, 50, 8, dtype=torch.bfloat16, requires_grad=True)
        assert not prefer_eager_attention(q, q)
    assert not prefer_eager_attention(*qk(50, device="meta"))  # not a CPU (GPUs: SDPA's kernels)


def test_implementation_choice_explicit_or_default(tmp_path):
    model = MAEForPreTraining(tiny_config())
    assert model.config._attn_implementation == "sdpa"  # what transformers reports
    assert attention_function(model.config, False) is default_attention_forward  # no choice: ours
    assert attention_function(model.config, True) is eager_attention_forward  # weights asked for

    model.set_attn_implementation("eager")
    assert attention_function(model.config, False) is eager_attention_forward
    model.set_attn_implementation("sdpa")  # explicit: transformers' sdpa, whatever the shape
    assert attention_function(model.config, False) is ALL_ATTENTION_FUNCTIONS["sdpa"]

    model.save_pretrained(tmp_path)
    assert "_attn_implementation_autoset" not in json.loads((tmp_path / "config.json").read_text())
    loaded = MAEForPreTraining.from_pretrained(tmp_path)
    assert attention_function(loaded.config, False) is default_attention_forward
    loaded = MAEForPreTraining.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert attention_function(loaded.config, False) is ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert MAEModel(tiny_config(attn_implementation="eager")).config._attn_implementation == "eager"


def test_attention_goes_through_transformers_interface(monkeypatch):
    """A function registered in transformers' AttentionInterface and chosen by name is what runs."""
    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape)))
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "counting_for_test", counting_attention)
    config = tiny_config()
    model = MAEForPreTraining(config).eval()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, config.num_patches)
    with torch.no_grad():
        expected = model(pixel_values, noise=noise, predict_masked_only=True).loss
        model.set_attn_implementation("counting_for_test")
        loss = model(pixel_values, noise=noise, predict_masked_only=True).loss
    layers = config.num_hidden_layers + config.decoder_num_hidden_layers
    assert len(calls) == layers
    keep = 1 + config.num_patches // 4  # CLS + visible patches at mask ratio 0.75
    assert calls[0] == ((2, 4, keep, 16), (2, 4, keep, 16))
    assert calls[-1] == ((2, 4, config.num_patches - keep + 1, 8), (2, 4, 1 + config.num_patches, 8))  # first_query
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_model_losses_and_gradients_agree_across_implementations(dtype, tol):
    config = tiny_config()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, config.num_patches)
    results = {}
    for implementation in ("default", "eager", "sdpa"):
        torch.manual_seed(0)
        model = MAEForPreTraining(config)
        if implementation != "default":
            model.set_attn_implementation(implementation)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixel_values, noise=noise, predict_masked_only=True).loss
        loss.backward()
        results[implementation] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    loss, grads = results["sdpa"]
    for implementation in ("default", "eager"):
        other_loss, other_grads = results[implementation]
        assert abs(other_loss.item() - loss.item()) < tol * abs(loss.item())
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert (other_grads[name] - grad).abs().max() <= tol * grad.abs().max() + 1e-8, (implementation, name)
