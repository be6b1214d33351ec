"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021) as transformers models.

The method, one named step each:

    patchify        (N, C, H, W)      -> (N, L, p*p*C)     the regression target
    embed           (N, C, H, W)      -> (N, L, D)         Conv2d patch projection + fixed sin-cos positions
    random_masking  (N, L, D)         -> (N, L_keep, D)    masked patches are REMOVED, not zeroed
    forward_encoder (N, 1+L_keep, D)  -> (N, 1+L_keep, D)  ViT blocks on the visible patches (+ CLS) only
    forward_decoder (N, 1+L_keep, D)  -> (N, L, p*p*C)     + shared mask token at removed positions
    forward_loss    pred, target, mask -> scalar           MSE on removed patches only

This file only imports torch and transformers (and its siblings in this package), so that
`save_pretrained` can ship it beside the weights for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.hub_kernels import is_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput
from transformers.utils.generic import is_flash_attention_requested

from .configuration_mae import MAEConfig
from .masking import make_noise, random_masking
from .pos_embed import interpolate_pos_embed, sincos_2d
from .relative_position import MAERelativePositionBias


logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# Auto class -> "module.Class" of the files that save_pretrained copies beside the weights.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_mae.MAEConfig",
    "AutoModel": "modeling_mae.MAEModel",
    "AutoModelForPreTraining": "modeling_mae.MAEForPreTraining",
    "AutoModelForImageClassification": "modeling_mae.MAEForImageClassification",
}


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
@dataclass
class MAEModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`(N, 1 + L_visible, D)`): encoder output (after the final LayerNorm when the
            encoder has one). L_visible = L without masking.
        pooler_output (`(N, D)`): pooled features per `config.pooling`.
        hidden_states (tuple of `(N, 1 + L_visible, D)`): embeddings, then each block's output.
        attentions (tuple of `(N, heads, 1 + L_visible, 1 + L_visible)`).
        mask (`(N, L)`): 1 = removed, 0 = visible; only when masking was asked for.
        ids_restore (`(N, L)`): permutation that unshuffles the visible + mask tokens; only when masking.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None


@dataclass
class MAEForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss (scalar): MSE on removed patches (of normalised pixels when `norm_pix_loss`).
        logits (`(N, L, p*p*C)`): per-patch pixel predictions, in `patchify` order (normalised pixels
            when `norm_pix_loss`; see `MAEForPreTraining.unnormalize_predictions`).
        mask (`(N, L)`): 1 = removed. ids_restore (`(N, L)`).
        hidden_states / attentions: of the encoder.
        ids_masked (`(N, L_masked)`): with `predict_masked_only=True`, the patch index of each row of
            `logits` (which is then `(N, L_masked, p*p*C)`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    ids_masked: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class MAEPatchEmbeddings(nn.Module):
    """(N, C, H, W) -> (N, L, D) with a stride-p Conv2d; checks the input shape."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.image_size = config.image_hw
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def check_input(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """Validate `pixel_values` and return its patch grid (rows, cols)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width) to match "
                f"config.num_channels={self.num_channels}; got shape {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (height, width) != tuple(self.image_size):
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's image size "
                f"({self.image_size[0]}x{self.image_size[1]}); pass interpolate_pos_encoding=True to use "
                f"another resolution"
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input image size ({height}x{width}) must be divisible by patch_size={self.patch_size}"
            )
        return (height // self.patch_size, width // self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class MAEEmbeddings(nn.Module):
    """Patch projection, learned CLS token and fixed 2-D sin-cos position table (1, 1 + L, D)."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = MAEPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            sincos_2d(config.hidden_size, config.grid_size).unsqueeze(0), requires_grad=False
        )

    def position_table(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + rows * cols, D), interpolated bicubically when the grid differs from the config's."""
        return interpolate_pos_embed(self.position_embeddings, self.config.grid_size, grid_size)


# --------------------------------------------------------------------------------------------------
# Attention: transformers' attention interface (`config._attn_implementation`), plus our default
# --------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as explicit batched matmuls, transformers' `eager` signature.

    query (N, H, Tq, d), key / value (N, H, T, d), attention_mask additive, broadcastable to
    (N, H, Tq, T) -> output (N, Tq, H, d) and weights (N, H, Tq, T).
    The softmax runs in the scores' dtype: torch's reduced-precision softmax accumulates in float32 and
    rounds once, so this equals transformers' float32 softmax + cast without the float32 copy."""
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(F.dropout(weights, dropout, module.training), value)
    return out.transpose(1, 2), weights


def sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """torch's `scaled_dot_product_attention` (no causal mask), same shapes as `eager_attention_forward`."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' flex attention with the additive bias as its `position_bias`, a `score_mod` adding
    bias[b, h, q, k] to each score; same shapes as `eager_attention_forward`. Its `attention_mask` would be
    read as mask[b, 0, q, k], head 0 for every head and out of range for a bias shared by the batch, so the
    bias is expanded (a view) to (N, heads, Tq, T) and passed that way."""
    from transformers.integrations.flex_attention import flex_attention_forward as transformers_flex_attention

    bias = None
    if attention_mask is not None:
        bias = attention_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return transformers_flex_attention(
        module, query, key, value, None, scaling=scaling, dropout=dropout, position_bias=bias, **kwargs
    )


def check_attention_bias_support(config, implementation: str | None) -> None:
    """ValueError when the model has a relative position bias and `implementation` cannot add it.

    eager, sdpa and flex_attention add a (N or 1, heads, Tq, T) bias to the logits exactly (as do functions
    registered in transformers' `AttentionInterface`, which receive it as `attention_mask`). Flash attention
    (2, 3, 4, paged) and the Hub's attention kernels ("org/repo") take `attention_mask` as a padding mask."""
    if not getattr(config, "use_relative_position_bias", False) or implementation is None:
        return
    if is_flash_attention_requested(requested_attention_implementation=implementation) or is_kernel(implementation):
        raise ValueError(
            f"use_relative_position_bias=True adds a bias to the attention logits, which "
            f"attn_implementation={implementation!r} cannot take (it reads attention_mask as a padding mask); "
            f"use 'sdpa', 'eager' or 'flex_attention'"
        )


# Our default ("sdpa" when the user did not choose an implementation) uses explicit matmuls where they
# beat torch's fused kernel: on CPU, in bfloat16, when a backward pass follows. Measured with
# `scripts/benchmark.py --parts attention` (attention core alone, batch 16, 2-core AMD EPYC Zen 4 with
# AVX512-BF16, no AMX, torch 2.14), SDPA time / explicit matmuls time (> 1: explicit faster):
#   bfloat16, forward + backward: encoder 50 tokens x 12 heads x 64: 4.15; decoder 197 x 16 x 32: 2.22;
#             decoder last block (147 queries): 2.82; earlier runs: ViT-L 197 x 16 x 64 2.1, ViT-H
#             257 x 16 x 80 1.7, 577 x 12 x 64 1.45
#   bfloat16, forward only (inference): 1.3-1.6 at 50-577 tokens where freed memory is reused (the
#             training scripts' allocator setting, `training.runtime.reuse_freed_cpu_memory`), but
#             0.77-0.94 at 197-577 tokens with glibc's default malloc, which every other user of the
#             model has (the T^2 scores page-fault in on every call); SDPA also keeps no scores.
#   float32:  0.67-0.85 either way (SDPA faster).
# The CPU flash kernel's backward is what is slow at these short sequences. Beyond the longest
# measured sequence SDPA stays the choice (explicit scores take O(T^2) memory).
EAGER_ON_CPU_MAX_TOKENS = {torch.bfloat16: 577}


def prefer_eager_attention(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True where explicit matmuls are faster than torch's SDPA for this call: CPU, bfloat16, at most
    `EAGER_ON_CPU_MAX_TOKENS` keys, and a backward pass to come (the query needs a gradient)."""
    if query.device.type != "cpu" or not (torch.is_grad_enabled() and query.requires_grad):
        return False
    return key.shape[-2] <= EAGER_ON_CPU_MAX_TOKENS.get(query.dtype, 0)


def default_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The model's default implementation: `eager_attention_forward` where `prefer_eager_attention`
    says it is faster, torch's SDPA elsewhere. Both compute the same function (tested)."""
    if prefer_eager_attention(query, key):
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def attention_function(config, output_attentions: bool):
    """The function for `config._attn_implementation`: for an explicit choice, transformers' registry
    (`ALL_ATTENTION_FUNCTIONS`: sdpa, flash_attention_2/3, Hub kernels; eager is ours; flex_attention is
    transformers' through `flex_attention_forward`); when the user chose nothing
    (`_attn_implementation_autoset`, set by `MAEPreTrainedModel`), our `default_attention_forward`; eager
    whenever attention weights are asked for (only it computes them)."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if output_attentions or implementation == "eager":
        return eager_attention_forward
    if implementation == "sdpa" and getattr(config, "_attn_implementation_autoset", False):
        return default_attention_forward
    if implementation == "flex_attention":
        return flex_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class MAEAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, through transformers' attention interface."""

    is_causal = False  # read by transformers' attention functions

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float, config):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.config = config

    def forward(
        self,
        x: torch.Tensor,
        output_attentions: bool = False,
        first_query: int = 0,
        attention_bias: torch.Tensor | None = None,
    ):
        """x: (N, T, D) -> (N, T - first_query, D), and (N, heads, T - first_query, T) weights when
        `output_attentions`. Every token is a key; only tokens from `first_query` on are queries.
        `attention_bias` (heads, T - first_query, T), optional: added to the scaled logits before the
        softmax (the relative position bias; an additive mask for SDPA)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        q = q[:, :, first_query:]
        # (heads, Tq, T) -> (1, heads, Tq, T): the additive mask of transformers' attention functions
        bias = None
        if attention_bias is not None:
            # refused at set-up already (`MAEPreTrainedModel`); this catches a config field set by hand
            check_attention_bias_support(self.config, getattr(self.config, "_attn_implementation", None))
            bias = attention_bias.to(q.dtype).unsqueeze(0)
        attend = attention_function(self.config, output_attentions)
        out, weights = attend(self, q, k, v, bias, scaling=self.scale, dropout=self.attn_drop if self.training else 0.0)
        out = out.reshape(batch, tokens - first_query, dim)  # (N, Tq, heads, head_dim) -> (N, Tq, D)
        return self.proj_drop(self.proj(out)), (weights if output_attentions else None)


class MAEMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MAELayer(GradientCheckpointingLayer):
    """Pre-norm ViT block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    Transfer options (encoder blocks only, see `MAEConfig`): a relative position bias table added to the
    attention logits (`relative_position_bias`), and layer scale, x + DropPath(gamma_1 * Attn(LN(x))) and
    x + DropPath(gamma_2 * MLP(LN(x))) with per-channel `layer_scale_1` / `layer_scale_2`."""

    def __init__(
        self,
        config: MAEConfig,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        drop_path_rate: float = 0.0,
        transfer_options: bool = False,
    ):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = MAEAttention(
            dim, num_heads, config.qkv_bias, config.attention_probs_dropout_prob, config.hidden_dropout_prob, config
        )
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MAEMLP(dim, mlp_dim, config.hidden_act, config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate
        use_bias = transfer_options and config.use_relative_position_bias
        self.relative_position_bias = MAERelativePositionBias(config.grid_size, num_heads) if use_bias else None
        use_scale = transfer_options and config.layer_scale_init_value > 0
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value))) if use_scale else None
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value))) if use_scale else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        first_query: int = 0,
        grid: tuple[int, int] | None = None,
    ):
        """(N, T, D) -> (N, T - first_query, D): tokens before `first_query` are attended to but not updated.
        `grid`: the (rows, cols) patch grid of the T - 1 patch tokens, needed by the relative position bias."""
        bias = None
        if self.relative_position_bias is not None:
            if grid is None:
                raise ValueError("a block with a relative position bias needs the patch grid (`grid=(rows, cols)`)")
            bias = self.relative_position_bias(grid)[:, first_query:]
        attn_out, weights = self.attention(
            self.layernorm_before(hidden_states), output_attentions, first_query, attention_bias=bias
        )
        if self.layer_scale_1 is not None:
            attn_out = self.layer_scale_1 * attn_out
        hidden_states = hidden_states[:, first_query:] + drop_path(attn_out, self.drop_path_rate, self.training)
        mlp_out = self.mlp(self.layernorm_after(hidden_states))
        if self.layer_scale_2 is not None:
            mlp_out = self.layer_scale_2 * mlp_out
        hidden_states = hidden_states + drop_path(mlp_out, self.drop_path_rate, self.training)
        return hidden_states, weights


class MAEEncoder(nn.Module):
    def __init__(self, config: MAEConfig):
        super().__init__()
        # Stochastic depth rising linearly over the blocks (the official values). Computed on the CPU
        # explicitly: under a meta default device (big-model / FSDP loading) `.tolist()` could not copy out.
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layer = nn.ModuleList(
            MAELayer(
                config, config.hidden_size, config.num_attention_heads, config.intermediate_size, rate,
                transfer_options=True,
            )
            for rate in rates
        )

    def forward(self, hidden_states, output_attentions=False, output_hidden_states=False, grid=None):
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        for block in self.layer:
            hidden_states, weights = block(hidden_states, output_attentions, grid=grid)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
            if output_attentions:
                all_attn = all_attn + (weights,)
        return hidden_states, all_hidden, all_attn


class MAEDecoder(nn.Module):
    """The lightweight pretraining decoder: 512-d, 8 blocks by default."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = config
        dim = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dim, config.grid_size).unsqueeze(0), requires_grad=False)
        self.decoder_layers = nn.ModuleList(
            MAELayer(config, dim, config.decoder_num_attention_heads, config.decoder_intermediate_size)
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(dim, config.patch_size**2 * config.num_channels)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid_size: tuple[int, int],
        predict_masked_only: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            latent: (N, 1 + L_keep, D) encoder output, CLS first, visible patches in shuffled order.
            ids_restore: (N, L) inverse of the masking shuffle.
            predict_masked_only: predict only the removed patches (all the loss uses).
        Returns:
            (N, L, p*p*C) pixel predictions for every patch, in the original patch order; with
            `predict_masked_only`, (N, L - L_keep, p*p*C) for the removed patches in shuffled order,
            i.e. for patches `ids_restore.argsort(dim=1)[:, L_keep:]`.
        """
        x = self.append_mask_tokens(latent, ids_restore, grid_size)  # (N, 1 + L, Dd), shuffled order
        num_visible = latent.shape[1]  # 1 + L_keep
        pred = self.predict(x, first_query=num_visible if predict_masked_only else 1)
        if predict_masked_only:
            return pred
        return torch.gather(pred, 1, ids_restore.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # unshuffle

    def append_mask_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size) -> torch.Tensor:
        """(N, 1 + L_keep, D) -> (N, 1 + L, Dd): project to the decoder width, append one shared mask token
        per removed patch and add every token's position.

        The tokens stay in the masking's shuffled order (CLS, visible, removed) and the position table is
        gathered into that order instead: attention does not depend on token order, so this is the
        official unshuffle-then-add-positions up to float rounding, and the removed patches form one
        contiguous block at the end."""
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, Dd)
        batch, _, dim = x.shape
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, num_masked, dim)
        pos = interpolate_pos_embed(self.decoder_pos_embed, self.config.grid_size, grid_size).to(x.dtype)
        ids_shuffle = torch.argsort(ids_restore, dim=1)  # (N, L): original index of each shuffled token
        patch_pos = torch.gather(pos[:, 1:].expand(batch, -1, -1), 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, dim))
        pos = torch.cat([pos[:, :1].expand(batch, -1, -1), patch_pos], dim=1)  # (N, 1 + L, Dd)
        return torch.cat([x, mask_tokens], dim=1) + pos

    def predict(self, x: torch.Tensor, first_query: int = 1) -> torch.Tensor:
        """(N, T, Dd) -> (N, T - first_query, p*p*C): the decoder blocks, norm and pixel prediction. Every
        token is attended to in every block; the last block, the norm and the prediction run only on
        the tokens from `first_query` on (1 = every patch, not the CLS token)."""
        *blocks, last = self.decoder_layers
        for block in blocks:
            x, _ = block(x)
        x, _ = last(x, first_query=first_query)
        return self.decoder_pred(self.decoder_norm(x))


# --------------------------------------------------------------------------------------------------
# Pretrained base
# --------------------------------------------------------------------------------------------------
TRANSFER_ONLY_PARAMETERS = ("relative_position_bias_table", "layer_scale_1", "layer_scale_2")


def is_transfer_only(name: str) -> bool:
    """Parameters no MAE pretraining checkpoint has: relative position tables and layer-scale gammas."""
    return name.rsplit(".", 1)[-1] in TRANSFER_ONLY_PARAMETERS


def log_new_transfer_parameters(missing_keys, config: MAEConfig) -> list[str]:
    """One log line when a checkpoint lacked the transfer-only parameters: they keep their start values
    (tables zero, gammas `layer_scale_init_value`), with which the encoder computes exactly what the
    plain ViT computes. Returns those keys."""
    new = sorted(k for k in missing_keys if is_transfer_only(k))
    if new:
        tables = sum(k.endswith("relative_position_bias_table") for k in new)
        logger.info(
            "checkpoint without transfer-only parameters: %d relative position bias table(s) start at zero and "
            "%d layer-scale gamma(s) at %s (the plain ViT's output until they are trained)",
            tables, len(new) - tables, config.layer_scale_init_value,
        )
    return new


class MAEPreTrainedModel(PreTrainedModel):
    config_class = MAEConfig
    base_model_prefix = "mae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["MAELayer", "MAEEmbeddings"]

    # The sin-cos tables are fixed in pretraining; the official fine-tuning model trains its copy.
    _train_position_embeddings = False

    def post_init(self):
        super().post_init()
        self.set_position_embeddings_trainable()

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        # transformers turns "no choice" (None) into "sdpa" here; remember that no choice was made, so
        # that attention takes our per-call default (`default_attention_forward`), not torch's kernel
        # whatever the shape. Nested models built later from the same config see "sdpa" and keep the flag.
        if is_init_check and attn_implementation is None:
            self.config._attn_implementation_autoset = True
        # before transformers' own checks, so that flash is refused for the bias, not for a missing package
        check_attention_bias_support(self.config, attn_implementation)
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)

    def get_correct_attn_implementation(self, requested_attention, is_init_check: bool = False) -> str:
        # the check transformers runs on a nested model (e.g. the backbone of UperNet) when its parent's
        # implementation is set
        check_attention_bias_support(self.config, requested_attention)
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' method; an explicit choice (even "sdpa") is then kept as made."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.config._attn_implementation_autoset = False

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        # loading re-creates parameters with requires_grad=True: restore the fixed tables' freeze
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.set_position_embeddings_trainable()
        log_new_transfer_parameters(info["missing_keys"], model.config)
        return (model, info) if output_loading_info else model

    def set_position_embeddings_trainable(self, trainable: bool | None = None):
        """Freeze the decoder's table always, and the encoder's unless `trainable` (default: the class's rule)."""
        trainable = self._train_position_embeddings if trainable is None else trainable
        for name, param in self.named_parameters():
            if name.endswith("decoder_pos_embed"):
                param.requires_grad_(False)
            elif name.endswith("embeddings.position_embeddings"):
                param.requires_grad_(trainable)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """The official MAE initialisation (also applied to keys missing from a loaded checkpoint):
        Linear xavier-uniform with zero bias (classifier heads: truncated normal, std 2e-5 fine-tuning /
        0.01 linear probe); patch projection xavier-uniform on its flattened weight with PyTorch's default
        Conv2d bias U(+-1/sqrt(fan_in)); CLS / mask token N(0, 0.02); LayerNorm 1/0; fixed sin-cos tables."""
        if isinstance(module, nn.Linear):
            head_std = getattr(module, "_mae_head_std", None)
            if head_std is not None:  # classifier: truncated normal as in the official fine-tune / probe
                init.trunc_normal_(module.weight, std=head_std)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection: xavier-uniform on its flattened weight
            # (initialised at the Conv2d itself: transformers skips param-less modules of remote code)
            if not getattr(module.weight, "_is_hf_initialized", False):  # a view loses the flag: check here
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:  # the official code keeps PyTorch's Conv2d default: U(+-1/sqrt(fan_in))
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MAEEmbeddings):
            init.normal_(module.cls_token, std=self.config.initializer_range)
            table = sincos_2d(self.config.hidden_size, self.config.grid_size).unsqueeze(0)
            init.copy_(module.position_embeddings, table.to(module.position_embeddings.dtype))
        elif isinstance(module, MAERelativePositionBias):  # transfer-only: starts as "no bias" (paper, A.4)
            init.zeros_(module.relative_position_bias_table)
        elif isinstance(module, MAELayer) and module.layer_scale_1 is not None:
            init.constant_(module.layer_scale_1, float(self.config.layer_scale_init_value))
            init.constant_(module.layer_scale_2, float(self.config.layer_scale_init_value))
        elif isinstance(module, MAEDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            table = sincos_2d(self.config.decoder_hidden_size, self.config.grid_size).unsqueeze(0)
            init.copy_(module.decoder_pos_embed, table.to(module.decoder_pos_embed.dtype))

    # ---- what optimizers and layer decay ask the model (timm's interface) ------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides biases and norms (dim < 2)."""
        names = {"cls_token", "position_embeddings", "mask_token", "decoder_pos_embed", "relative_position_bias_table"}
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in names}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style groups: embeddings = layer 0, encoder block i = layer i + 1, the rest last.

        The final `layernorm` / `fc_norm` are left unmatched, so timm puts them with the head (lr scale 1),
        as the official MAE layer decay does (timm's `(99999,)` suffix would merge them into the last block)."""
        prefix = "" if isinstance(self, MAEModel) else r"mae\."
        return dict(
            stem=rf"^{prefix}embeddings",
            blocks=[(rf"^{prefix}encoder\.layer\.(\d+)", None)],
        )

    def layer_id(self, name: str) -> int:
        """Layer index used by layer-wise lr decay: 0 for embeddings, i + 1 for encoder block i,
        `num_hidden_layers + 1` for everything after the encoder (norms, heads, decoder)."""
        base = name[len("mae.") :] if name.startswith("mae.") else name
        if base.startswith("embeddings."):
            return 0
        if base.startswith("encoder.layer."):
            return int(base.split(".")[2]) + 1
        return self.config.num_hidden_layers + 1

    # ---- every saved model directory carries its image processor ---------------------------------
    def default_image_processor(self, crop_pct: float | None = None):
        """`MAEImageProcessor` sized to the model: the training scripts' evaluation transform (shorter
        side to size / crop_pct, bicubic, centre crop; crop_pct 0.875 unless given), ImageNet mean/std."""
        from .image_processing_mae import DEFAULT_CROP_PCT, MAEImageProcessor

        height, width = self.config.image_hw
        return MAEImageProcessor(
            size={"height": height, "width": width},
            crop_pct=DEFAULT_CROP_PCT if crop_pct is None else crop_pct,
            image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )

    def save_pretrained(self, save_directory, *args, image_processor=None, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the image processor (given, or the default one
        when the directory has none yet)."""
        import os

        # transformers writes only the saved class into `auto_map`; list every head so that any Auto
        # class (e.g. AutoModel on a pretraining directory) loads it with trust_remote_code.
        self.config.auto_map = {**dict(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            if image_processor is not None:
                image_processor.save_pretrained(save_directory)
            elif not os.path.exists(os.path.join(save_directory, "preprocessor_config.json")):
                self.default_image_processor().save_pretrained(save_directory)
        return result


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
class MAEModel(MAEPreTrainedModel):
    """The MAE encoder. Unmasked and deterministic unless masking is asked for (`noise=` or `mask_ratio=`)."""

    # Loading a pretraining checkpoint into the encoder alone: the decoder is expected to be left out,
    # and `fc_norm` (only in fine-tuned checkpoints) starts as an identity-affine LayerNorm.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]
    _keys_to_ignore_on_load_missing = [r"^fc_norm\."]

    def __init__(self, config: MAEConfig, add_pooling_layer: bool = True, use_final_norm: bool = True):
        super().__init__(config)
        self.embeddings = MAEEmbeddings(config)
        self.encoder = MAEEncoder(config)
        # The pretraining encoder ends in a LayerNorm. The official fine-tuning model (mean pooling)
        # drops it and normalises the pooled patch tokens with `fc_norm` instead.
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None
        use_fc_norm = add_pooling_layer and config.pooling == "mean"
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_fc_norm else None
        self.add_pooling_layer = add_pooling_layer
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        """(N, C, H, W) -> patch tokens (N, L, D) with positions added, the grid, and the CLS token (N, 1, D)."""
        grid = self.embeddings.patch_embeddings.check_input(pixel_values, interpolate_pos_encoding)
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        x = self.embeddings.patch_embeddings(pixel_values.to(dtype))
        pos = self.embeddings.position_table(grid).to(x.dtype)
        x = x + pos[:, 1:]
        cls = (self.embeddings.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return x, grid, cls

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MAEModelOutput | tuple:
        r"""
        Args:
            pixel_values (`(N, C, H, W)`): normalised images.
            noise (`(N, L)`, *optional*): masking scores (lowest kept); implies masking.
            mask_ratio (`float`, *optional*): mask this fraction (config's strategy, fresh noise);
                with `noise` alone, `config.mask_ratio` is used.
            interpolate_pos_encoding: accept another resolution (bicubic resize of the positions).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        x, grid, cls = self.embed(pixel_values, interpolate_pos_encoding)
        mask = ids_restore = None
        if noise is not None or mask_ratio is not None:
            ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"`mask_ratio` must be in [0, 1), got {ratio!r}")
            if self.config.use_relative_position_bias:
                raise ValueError(
                    "`use_relative_position_bias` is a transfer option (the bias needs every patch of the grid); "
                    "it cannot be combined with masking (`noise` / `mask_ratio`)"
                )
            if noise is None:
                noise = make_noise(self.config.mask_strategy, x.shape[0], grid, ratio, device=x.device)
            x, mask, ids_restore, _ = random_masking(x, noise.to(x.device), ratio)
        x = torch.cat([cls, x], dim=1)

        hidden, all_hidden, all_attn = self.encoder(x, output_attentions, output_hidden_states, grid=grid)
        sequence_output = self.layernorm(hidden) if self.layernorm is not None else hidden
        pooled = self.pool(hidden, sequence_output) if self.add_pooling_layer else None

        if not return_dict:
            return tuple(
                v for v in (sequence_output, pooled, all_hidden, all_attn, mask, ids_restore) if v is not None
            )
        return MAEModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=all_hidden,
            attentions=all_attn,
            mask=mask,
            ids_restore=ids_restore,
        )

    def pool(self, hidden: torch.Tensor, sequence_output: torch.Tensor) -> torch.Tensor:
        """(N, 1 + L, D) -> (N, D): mean of the patch tokens + fc_norm, or the normalised CLS token."""
        if self.config.pooling == "mean":
            return self.fc_norm(hidden[:, 1:].mean(dim=1))
        return sequence_output[:, 0]


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------
class MAEForPreTraining(MAEPreTrainedModel):
    """Encoder on the visible patches + lightweight decoder; both are trained."""

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.mae = MAEModel(config, add_pooling_layer=False)
        self.decoder = MAEDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.mae.embeddings.patch_embeddings

    # ---- the method's steps ------------------------------------------------------------------
    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (row, column, channel)."""
        p, c = self.config.patch_size, self.config.num_channels
        n, _, height, width = pixel_values.shape
        h, w = height // p, width // p
        x = pixel_values.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); `image_size` defaults to the config's (needed if not square)."""
        p, c = self.config.patch_size, self.config.num_channels
        n, length, dim = patches.shape
        if dim != p * p * c:
            raise ValueError(f"patches must have last dimension p*p*C = {p * p * c}, got {dim}")
        if image_size is None:
            image_size = self.config.image_hw
            if (image_size[0] // p) * (image_size[1] // p) != length:
                side = int(math.isqrt(length))
                if side * side != length:
                    raise ValueError(f"cannot infer the image size of {length} patches; pass image_size=(H, W)")
                image_size = (side * p, side * p)
        h, w = image_size[0] // p, image_size[1] // p
        if h * w != length:
            raise ValueError(f"image_size {tuple(image_size)} has {h * w} patches, got {length}")
        x = patches.reshape(n, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, w * p)

    def forward_encoder(self, pixel_values, noise, mask_ratio, interpolate_pos_encoding, **kwargs):
        """Encode the visible patches: (N, C, H, W) -> MAEModelOutput with (N, 1 + L_keep, D), mask, ids_restore.

        Pretraining always masks: without `noise`, the encoder draws it with `config.mask_strategy`."""
        return self.mae(
            pixel_values,
            noise=noise,
            mask_ratio=self.config.mask_ratio if mask_ratio is None else mask_ratio,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **kwargs,
        )

    def forward_decoder(self, latent, ids_restore, grid_size, predict_masked_only: bool = False):
        """(N, 1 + L_keep, D) + ids_restore -> (N, L, p*p*C) predictions in patch order, or
        (N, L - L_keep, p*p*C) for the removed patches only, in shuffled order (see `MAEDecoder.forward`)."""
        return self.decoder(latent, ids_restore, grid_size, predict_masked_only=predict_masked_only)

    def normalize_target(self, target: torch.Tensor) -> torch.Tensor:
        """Per-patch normalisation of (N, L, p*p*C) targets: (x - mean) / sqrt(var + 1e-6)."""
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return (target - mean) / (var + 1.0e-6) ** 0.5

    def patch_loss(self, pixel_values, pred, ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch MSE in the loss's space (normalised pixels when `norm_pix_loss`), in fp32.

        Args:
            pixel_values: (N, C, H, W); pred: (N, L, p*p*C), or (N, L_masked, p*p*C) for `ids_masked`.
        Returns:
            (N, L) (or (N, L_masked)): the mean over a patch's pixel values of the squared error.
        """
        target = self.patchify(pixel_values.float())
        if ids_masked is not None:
            target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        if self.config.norm_pix_loss:
            target = self.normalize_target(target)
        return (pred.float() - target).pow(2).mean(dim=-1)

    def forward_loss(self, pixel_values, pred, mask, ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pixel_values: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
            ids_masked: (N, L_masked), optional: `pred` is then (N, L_masked, p*p*C), the predictions
                for exactly these patches (as `forward_decoder(..., predict_masked_only=True)` gives).
        Returns:
            Mean over removed patches of the per-patch MSE, computed in fp32.
        """
        loss = self.patch_loss(pixel_values, pred, ids_masked)  # (N, L) or (N, L_masked)
        if ids_masked is not None:
            return loss.sum() / max(loss.numel(), 1)  # 0 when nothing is masked, as below
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def unnormalize_predictions(self, logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Turn norm_pix predictions (N, L, p*p*C) back into pixel space with each target patch's own
        mean and variance, so that a reconstruction is viewable (a no-op without `norm_pix_loss`)."""
        if not self.config.norm_pix_loss:
            return logits
        target = self.patchify(pixel_values.float())
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return logits.float() * (var + 1.0e-6) ** 0.5 + mean

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        predict_masked_only: bool = False,
        **kwargs,
    ) -> MAEForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`(N, C, H, W)`): normalised images.
            noise (`(N, L)`, *optional*): masking scores for a reproducible mask.
            mask_ratio (`float`, *optional*): overrides `config.mask_ratio` for this call.
            predict_masked_only (`bool`): skip the decoder work the loss throws away: the last decoder
                block, the norm and the pixel prediction run on the removed patches only. The loss is the
                same; `logits` is then `(N, L_masked, p*p*C)` for the patches in `ids_masked`.
                The pretraining script uses it; leave it off to get a prediction for every patch.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        enc = self.forward_encoder(
            pixel_values,
            noise,
            mask_ratio,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        pred = self.forward_decoder(enc.last_hidden_state, enc.ids_restore, grid, predict_masked_only)
        ids_masked = None
        if predict_masked_only:  # the decoder's shuffled order: visible first, then removed
            ids_masked = torch.argsort(enc.ids_restore, dim=1)[:, enc.last_hidden_state.shape[1] - 1 :]
        loss = self.forward_loss(pixel_values, pred, enc.mask, ids_masked)
        if not return_dict:
            extra = tuple(v for v in (enc.hidden_states, enc.attentions, ids_masked) if v is not None)
            return (loss, pred, enc.mask, enc.ids_restore) + extra
        return MAEForPreTrainingOutput(
            loss=loss,
            logits=pred,
            mask=enc.mask,
            ids_restore=enc.ids_restore,
            hidden_states=enc.hidden_states,
            attentions=enc.attentions,
            ids_masked=ids_masked,
        )


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
class MAEForImageClassification(MAEPreTrainedModel):
    """Encoder + head. `pooling="mean"`: mean of patch tokens + fc_norm + Linear (official fine-tuning);
    `pooling="cls"` + `linear_probe_head`: CLS token + BatchNorm1d(affine=False) + Linear (linear probe)."""

    # Fine-tuning trains the position embeddings, as the official fine-tuning model does.
    _train_position_embeddings = True

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mae = MAEModel(config, add_pooling_layer=True, use_final_norm=config.pooling == "cls")
        self.head_norm = (
            nn.BatchNorm1d(config.hidden_size, affine=False, eps=1e-6) if config.linear_probe_head else None
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        if isinstance(self.classifier, nn.Linear):
            self.classifier._mae_head_std = 0.01 if config.linear_probe_head else 2e-5
        self.post_init()

    def forward_features(self, pixel_values, interpolate_pos_encoding=False, **kwargs) -> MAEModelOutput:
        return self.mae(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs)

    def forward_head(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, D) pooled features -> (N, num_labels) logits (or the normalised features if `pre_logits`)."""
        if self.head_norm is not None:
            pooled = self.head_norm(pooled)
        return pooled if pre_logits else self.classifier(pooled)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for class ids (N,), or soft targets (N, num_labels) as made by Mixup/CutMix."""
        if labels.is_floating_point() and labels.shape == logits.shape:
            return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long().view(-1))

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.forward_features(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.forward_head(out.pooler_output)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        if not return_dict:
            output = (logits,) + tuple(v for v in (out.hidden_states, out.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


__all__ = [
    "MAEPreTrainedModel",
    "MAEModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "MAEModelOutput",
    "MAEForPreTrainingOutput",
]
