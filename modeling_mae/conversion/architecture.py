"""Architecture of a foreign checkpoint: read from the weights (official / timm names) or from its
config (transformers), then turned into an `MAEConfig`.

What the weights fix: widths, depths, MLP sizes, patch size and channels (the patch projection),
image size (the position table, assumed square), qkv bias, the decoder and the head. What they cannot
fix: the number of attention heads, taken from the official preset of the same width (ViT-B 768 -> 12,
ViT-L 1024 -> 16, ViT-H 1280 -> 16; the 512-d decoder -> 16), or given by the caller.
"""

from __future__ import annotations

import math
import re

import torch

from ..configuration_mae import MAE_PRESETS, MAEConfig


# Heads of the official encoders and of the paper's default decoder, by width.
ENCODER_HEADS_BY_WIDTH = {
    preset["hidden_size"]: preset["num_attention_heads"]
    for name, preset in MAE_PRESETS.items()
    if name != "mae-tiny"
}
DECODER_HEADS_BY_WIDTH = {512: 16}

KINDS = ("encoder", "pretraining", "classifier")


def _require(state_dict: dict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"the checkpoint has no `{key}`, which every {source} MAE/ViT state dict has; is `--source {source}` "
            f"right? First keys found: {sorted(state_dict)[:8]}"
        )
    return state_dict[key]


def count_blocks(state_dict: dict, prefix: str) -> int:
    """Number of blocks `prefix.{i}.*` (indices must run 0..n-1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ValueError(f"blocks under `{prefix}` are not numbered 0..n-1: found {sorted(indices)}")
    return len(indices)


def square_grid(num_positions: int, key: str) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(
            f"`{key}` holds {num_positions} patch positions, not a square grid; pass the checkpoint's "
            f"`source_image_size=(height, width)`"
        )
    return side


def heads_for_width(width: int, table: dict[int, int], field_name: str) -> int:
    if width not in table:
        known = ", ".join(f"{w} -> {h}" for w, h in sorted(table.items()))
        raise ValueError(
            f"cannot infer `{field_name}` for width {width}: the weights do not hold it and no official model has "
            f"this width (known: {known}); pass {field_name}=N (CLI: --{field_name} N)"
        )
    return table[width]


def detect_kind(state_dict: dict, decoder_key: str, head_keys: tuple[str, ...]) -> str:
    """Which release kind the weights are: which parts (decoder, classification head) they hold."""
    has_decoder = decoder_key in state_dict
    has_head = any(k in state_dict for k in head_keys)
    if has_decoder and has_head:
        raise ValueError(
            f"the checkpoint holds both a pretraining decoder (`{decoder_key}`) and a classification head "
            f"({[k for k in head_keys if k in state_dict]}); no MAE release does"
        )
    return "pretraining" if has_decoder else "classifier" if has_head else "encoder"


def official_architecture(
    state_dict: dict[str, torch.Tensor],
    source: str = "official",
    source_image_size: int | tuple[int, int] | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> dict:
    """MAEConfig fields of an official / timm state dict (names `patch_embed.proj`, `blocks.{i}`, ...),
    at the checkpoint's own image size. Heads come from the arguments or the official presets."""
    proj = _require(state_dict, "patch_embed.proj.weight", source)  # (D, C, p, p)
    hidden, channels, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise ValueError(f"`patch_embed.proj.weight` has non-square patches {patch_h}x{patch_w}; MAEConfig needs square")
    depth = count_blocks(state_dict, "blocks")
    if depth == 0:
        raise ValueError(f"the checkpoint has no `blocks.{{i}}.*` keys; is `--source {source}` right?")
    positions = _require(state_dict, "pos_embed", source).shape[1] - 1  # minus the CLS position
    if source_image_size is None:
        side = square_grid(positions, "pos_embed") * patch_h
        source_image_size = side
    kwargs = dict(
        image_size=source_image_size,
        patch_size=patch_h,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=num_attention_heads
        or heads_for_width(hidden, ENCODER_HEADS_BY_WIDTH, "num_attention_heads"),
        intermediate_size=_require(state_dict, "blocks.0.mlp.fc1.weight", source).shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    # A classifier pools as its weights say: mean of patch tokens + fc_norm when it has fc_norm
    # (global-pool fine-tuning), else the CLS token after the final norm (linear probe, token-pool ViTs).
    # Without a head the pooling is left to the target class (see `default_pooling`).
    if "fc_norm.weight" in state_dict:
        kwargs["pooling"] = "mean"
    elif "head.weight" in state_dict or "head.1.weight" in state_dict:
        kwargs["pooling"] = "cls"
    if "decoder_embed.weight" in state_dict:
        decoder_width = state_dict["decoder_embed.weight"].shape[0]
        kwargs.update(
            decoder_hidden_size=decoder_width,
            decoder_num_hidden_layers=count_blocks(state_dict, "decoder_blocks"),
            decoder_num_attention_heads=decoder_num_attention_heads
            or heads_for_width(decoder_width, DECODER_HEADS_BY_WIDTH, "decoder_num_attention_heads"),
            decoder_intermediate_size=_require(state_dict, "decoder_blocks.0.mlp.fc1.weight", source).shape[0],
            # The official model's default, and the target of the released decoder weights
            # (mae_visualize_vit_*.pth: "trained with pixels as targets"). Full training checkpoints
            # carry the real value in their args, which the converter applies over this.
            norm_pix_loss=False,
        )
        pred_rows = _require(state_dict, "decoder_pred.weight", source).shape[0]
        if pred_rows != patch_h * patch_w * channels:
            raise ValueError(
                f"`decoder_pred.weight` predicts {pred_rows} values per patch, expected p*p*C = "
                f"{patch_h * patch_w * channels} for patch {patch_h} and {channels} channels"
            )
    if "head.weight" in state_dict:
        kwargs.update(num_labels=state_dict["head.weight"].shape[0], linear_probe_head=False)
    elif "head.1.weight" in state_dict:
        kwargs.update(num_labels=state_dict["head.1.weight"].shape[0], linear_probe_head=True)
    return kwargs


# --------------------------------------------------------------------------------------------------
# transformers' ViTMAEConfig <-> MAEConfig
# --------------------------------------------------------------------------------------------------
# Fields with the same meaning and name on both sides; their values are copied as they are (including
# transformers' defaults that differ from the paper: layer_norm_eps 1e-12, norm_pix_loss False).
SHARED_VIT_MAE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "num_channels",
    "qkv_bias",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "mask_ratio",
    "norm_pix_loss",
)


def _int_size(value, name: str) -> int | list[int]:
    if isinstance(value, int):
        return value
    value = list(value)
    if name == "patch_size":
        if len(set(value)) != 1:
            raise ValueError(f"transformers config `patch_size` {value} is not square; MAEConfig needs a square patch")
        return int(value[0])
    return value[0] if value[0] == value[1] else [int(v) for v in value]


def transformers_architecture(hf_config) -> dict:
    """MAEConfig fields with the values of a transformers `ViTMAEConfig`."""
    kwargs = {name: getattr(hf_config, name) for name in SHARED_VIT_MAE_FIELDS}
    kwargs["image_size"] = _int_size(hf_config.image_size, "image_size")
    kwargs["patch_size"] = _int_size(hf_config.patch_size, "patch_size")
    return kwargs


def default_pooling(model_class_name: str, architecture: dict, overrides: dict) -> dict:
    """Encoder-only targets (`MAEModel`) pool the CLS token after the final LayerNorm unless told
    otherwise: the checkpoint has no `fc_norm`, so mean pooling would add an untrained LayerNorm. The
    other classes keep the config default (mean pooling, the official fine-tuning head)."""
    if model_class_name == "MAEModel" and "pooling" not in architecture and "pooling" not in overrides:
        return {**architecture, "pooling": "cls"}
    return architecture


def make_config(architecture: dict, overrides: dict, image_size=None) -> tuple[MAEConfig, tuple[int, int]]:
    """The target MAEConfig (architecture + caller overrides, at `image_size` if given) and the patch
    grid of the checkpoint itself, from which position tables are interpolated."""
    if "image_size" in overrides:
        raise ValueError("pass the target resolution as `image_size=`, not among the config overrides")
    source = MAEConfig(**{**architecture, **overrides})
    if image_size is None:
        return source, source.grid_size
    return MAEConfig(**{**architecture, **overrides, "image_size": image_size}), source.grid_size


def transformers_config_from_mae(config: MAEConfig):
    """transformers `ViTMAEConfig` with our values (square images only: ViTMAE assumes them)."""
    from transformers import ViTMAEConfig

    height, width = config.image_hw
    if height != width:
        raise ValueError(f"transformers' ViTMAE supports square images only; this model has image_size {(height, width)}")
    return ViTMAEConfig(
        image_size=height,
        patch_size=config.patch_size,
        **{name: getattr(config, name) for name in SHARED_VIT_MAE_FIELDS},
    )


# --------------------------------------------------------------------------------------------------
# MAEConfig -> the `args` an official-layout file carries
# --------------------------------------------------------------------------------------------------
OFFICIAL_MODEL_NAMES = {  # (width, depth, patch) -> the official `args.model` of models_mae.py
    (768, 12, 16): "mae_vit_base_patch16",
    (1024, 24, 16): "mae_vit_large_patch16",
    (1280, 32, 14): "mae_vit_huge_patch14",
}


def official_args(config: MAEConfig) -> dict:
    """What official checkpoints carry as `args` (model name, input_size, norm_pix_loss, mask_ratio), plus
    what their weights cannot say for other widths (head counts), as plain types: the file written by
    `save_official(..., args=official_args(config))` loads with `torch.load(weights_only=True)` and converts
    back without any flag (`convert_official_to_mae(..., checkpoint_args=...)`)."""
    height, width = config.image_hw
    name = OFFICIAL_MODEL_NAMES.get((config.hidden_size, config.num_hidden_layers, config.patch_size))
    return {
        "model": name or f"mae_vit_{config.hidden_size}d{config.num_hidden_layers}_patch{config.patch_size}",
        "input_size": height if height == width else [height, width],
        "in_chans": int(config.num_channels),
        "norm_pix_loss": bool(config.norm_pix_loss),
        "mask_ratio": float(config.mask_ratio),
        "layer_norm_eps": float(config.layer_norm_eps),
        "num_attention_heads": int(config.num_attention_heads),
        "decoder_num_attention_heads": int(config.decoder_num_attention_heads),
    }
