"""Explicit key-rename tables between our parameter names and each foreign checkpoint format.

One table per format, chosen by the user (`--source official|transformers|timm|mmseg`); nothing here guesses a
checkpoint's origin from its key names.

Our names are written in their canonical form, the one `MAEForPreTraining` and
`MAEForImageClassification` use (encoder under `mae.`); `MAEModel` has the same names without the
`mae.` prefix (`ours_state_dict` / `strip_ours` add and remove it). `{i}` stands for a block index.
A rule maps a module or a parameter and everything below it: `mae.layernorm -> norm` maps
`mae.layernorm.weight -> norm.weight`. A rule with several foreign names is one fused tensor of ours
that the other format stores split along dim 0 (our `attention.qkv` = transformers' q, k, v).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..modeling_mae import MAEModel


# --------------------------------------------------------------------------------------------------
# Rules and tables
# --------------------------------------------------------------------------------------------------
def _template_regex(template: str) -> re.Pattern:
    """`a.{i}.b` -> regex matching `a.<int>.b` and anything below it (`a.3.b.weight`)."""
    pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(rf"^{pattern}(?P<rest>\..+)?$")


@dataclass(frozen=True)
class KeyRule:
    """Our module/parameter name and its name(s) in another format (several = split along dim 0)."""

    ours: str
    theirs: tuple[str, ...]
    _ours_re: re.Pattern = field(init=False, repr=False, compare=False)
    _theirs_re: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_ours_re", _template_regex(self.ours))
        object.__setattr__(self, "_theirs_re", tuple(_template_regex(t) for t in self.theirs))

    def theirs_for(self, our_key: str) -> tuple[str, ...] | None:
        match = self._ours_re.match(our_key)
        if match is None:
            return None
        index, rest = match.groupdict().get("i"), match.group("rest") or ""
        return tuple(t.replace("{i}", index or "") + rest for t in self.theirs)


def rule(ours: str, *theirs: str) -> KeyRule:
    return KeyRule(ours, tuple(theirs))


def block_rules(ours_block: str, theirs_block: str, names: tuple[tuple[str, tuple[str, ...]], ...]) -> list[KeyRule]:
    """Rules for one transformer block: `names` pairs our sub-module with the format's sub-module(s)."""
    return [KeyRule(f"{ours_block}.{ours}", tuple(f"{theirs_block}.{t}" for t in theirs)) for ours, theirs in names]


@dataclass(frozen=True)
class KeyMap:
    """A named, ordered table of KeyRules for one checkpoint format."""

    name: str
    rules: tuple[KeyRule, ...]

    def theirs_for(self, our_key: str) -> tuple[str, ...] | None:
        for r in self.rules:
            names = r.theirs_for(our_key)
            if names is not None:
                return names
        return None

    def __add__(self, rules) -> "KeyMap":
        return KeyMap(self.name, self.rules + tuple(rules))


# facebookresearch/mae (models_mae.py / models_vit.py) and timm's VisionTransformer share these names.
OFFICIAL_BLOCK = (
    ("layernorm_before", ("norm1",)),
    ("attention.qkv", ("attn.qkv",)),
    ("attention.proj", ("attn.proj",)),
    ("layernorm_after", ("norm2",)),
    ("mlp.fc1", ("mlp.fc1",)),
    ("mlp.fc2", ("mlp.fc2",)),
)

OFFICIAL_ENCODER = (
    rule("mae.embeddings.cls_token", "cls_token"),
    rule("mae.embeddings.position_embeddings", "pos_embed"),
    rule("mae.embeddings.patch_embeddings.projection", "patch_embed.proj"),
    *block_rules("mae.encoder.layer.{i}", "blocks.{i}", OFFICIAL_BLOCK),
    rule("mae.layernorm", "norm"),  # pretraining encoder / cls-token classifier
    rule("mae.fc_norm", "fc_norm"),  # global-pool fine-tuning head
)

OFFICIAL_DECODER = (
    rule("decoder.decoder_embed", "decoder_embed"),
    rule("decoder.mask_token", "mask_token"),
    rule("decoder.decoder_pos_embed", "decoder_pos_embed"),
    *block_rules("decoder.decoder_layers.{i}", "decoder_blocks.{i}", OFFICIAL_BLOCK),
    rule("decoder.decoder_norm", "decoder_norm"),
    rule("decoder.decoder_pred", "decoder_pred"),
)

# Fine-tuning (main_finetune.py): `head` is a Linear. Linear probe (main_linprobe.py):
# `head = Sequential(BatchNorm1d(affine=False), Linear)`.
OFFICIAL_FINETUNE_HEAD = (rule("classifier", "head"),)
OFFICIAL_LINEAR_PROBE_HEAD = (rule("head_norm", "head.0"), rule("classifier", "head.1"))

# timm `vit_*_patch16_224.mae` and fine-tuned ViTs: the official encoder names, `head` classifier,
# no decoder (timm has no MAE decoder) and no BatchNorm head.
TIMM = KeyMap("timm", OFFICIAL_ENCODER + OFFICIAL_FINETUNE_HEAD)

# transformers' ViTMAE as its modules name parameters (transformers >= 5; older files on the Hub, with
# `encoder.layer.{i}.attention.attention.query`, are renamed by transformers' own loader). Their
# `ViTMAEModel` has the same names without the `vit.` prefix (see `hf_state_dict`).
TRANSFORMERS_BLOCK = (
    ("layernorm_before", ("layernorm_before",)),
    ("attention.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("attention.proj", ("attention.o_proj",)),
    ("layernorm_after", ("layernorm_after",)),
    ("mlp.fc1", ("mlp.fc1",)),
    ("mlp.fc2", ("mlp.fc2",)),
)

TRANSFORMERS = KeyMap(
    "transformers",
    (
        rule("mae.embeddings.cls_token", "vit.embeddings.cls_token"),
        rule("mae.embeddings.position_embeddings", "vit.embeddings.position_embeddings"),
        rule("mae.embeddings.patch_embeddings.projection", "vit.embeddings.patch_embeddings.projection"),
        *block_rules("mae.encoder.layer.{i}", "vit.layers.{i}", TRANSFORMERS_BLOCK),
        rule("mae.layernorm", "vit.layernorm"),
        rule("decoder.decoder_embed", "decoder.decoder_embed"),
        rule("decoder.mask_token", "decoder.mask_token"),
        rule("decoder.decoder_pos_embed", "decoder.decoder_pos_embed"),
        *block_rules("decoder.decoder_layers.{i}", "decoder.decoder_layers.{i}", TRANSFORMERS_BLOCK),
        rule("decoder.decoder_norm", "decoder.decoder_norm"),
        rule("decoder.decoder_pred", "decoder.decoder_pred"),
    ),
)


# OpenMMLab mmsegmentation (1.x, and the 0.x checkpoints it publishes): `MAE` backbone (a BEiT subclass with
# relative position bias and layer scale), `Feature2Pyramid` neck, `UPerHead` and `FCNHead`, saved as
# `{"state_dict": ...}`. Our side is `MAEUperNetForSemanticSegmentation` (transformers' UperNet heads).
# Their `backbone.layers.{i}.attn.relative_position_index` buffers are derived, not learned: the converter
# checks them against our index instead of copying them (see `convert_mmseg_to_mae`).
MMSEG_BLOCK = (
    ("layernorm_before", ("ln1",)),
    ("attention.qkv", ("attn.qkv",)),
    ("attention.proj", ("attn.proj",)),
    ("relative_position_bias.relative_position_bias_table", ("attn.relative_position_bias_table",)),
    ("layer_scale_1", ("gamma_1",)),
    ("layer_scale_2", ("gamma_2",)),
    ("layernorm_after", ("ln2",)),
    ("mlp.fc1", ("ffn.layers.0.0",)),
    ("mlp.fc2", ("ffn.layers.1",)),
)


def _conv_module(ours: str, theirs: str) -> tuple[KeyRule, ...]:
    """transformers' UperNet ConvModule (`conv`, `batch_norm`) vs mmcv's ConvModule (`conv`, `bn`)."""
    return (rule(f"{ours}.conv", f"{theirs}.conv"), rule(f"{ours}.batch_norm", f"{theirs}.bn"))


MMSEG = KeyMap(
    "mmseg",
    (
        rule("backbone.mae.embeddings.cls_token", "backbone.cls_token"),
        rule("backbone.mae.embeddings.position_embeddings", "backbone.pos_embed"),
        rule("backbone.mae.embeddings.patch_embeddings.projection", "backbone.patch_embed.projection"),
        *block_rules("backbone.mae.encoder.layer.{i}", "backbone.layers.{i}", MMSEG_BLOCK),
        # pyramid: stride p/4 (ConvT, BN, GELU, ConvT) and p/2 (ConvT); identity and max-pool have no weights
        rule("backbone.pyramid.fpn1", "neck.upsample_4x"),
        rule("backbone.pyramid.fpn2", "neck.upsample_2x"),
        *_conv_module("decode_head.psp_modules.{i}.1", "decode_head.psp_modules.{i}.1"),
        *_conv_module("decode_head.bottleneck", "decode_head.bottleneck"),
        *_conv_module("decode_head.lateral_convs.{i}", "decode_head.lateral_convs.{i}"),
        *_conv_module("decode_head.fpn_convs.{i}", "decode_head.fpn_convs.{i}"),
        *_conv_module("decode_head.fpn_bottleneck", "decode_head.fpn_bottleneck"),
        rule("decode_head.classifier", "decode_head.conv_seg"),
        *_conv_module("auxiliary_head.convs.{i}", "auxiliary_head.convs.{i}"),
        *_conv_module("auxiliary_head.conv_cat", "auxiliary_head.conv_cat"),
        rule("auxiliary_head.classifier", "auxiliary_head.conv_seg"),
    ),
)
MMSEG_RELATIVE_POSITION_INDEX = "backbone.layers.{i}.attn.relative_position_index"


def official_keymap(linear_probe_head: bool = False) -> KeyMap:
    """The official table, with the fine-tuning head or the linear-probe head."""
    head = OFFICIAL_LINEAR_PROBE_HEAD if linear_probe_head else OFFICIAL_FINETUNE_HEAD
    return KeyMap("official", OFFICIAL_ENCODER + OFFICIAL_DECODER + head)


# --------------------------------------------------------------------------------------------------
# Applying a table
# --------------------------------------------------------------------------------------------------
def ours_state_dict(model) -> dict[str, torch.Tensor]:
    """A model's state dict under canonical names (`MAEModel` gets the `mae.` prefix)."""
    prefix = "mae." if isinstance(model, MAEModel) else ""
    return {prefix + k: v for k, v in model.state_dict().items()}


def strip_ours(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names -> the names of `model` (drops the `mae.` prefix for `MAEModel`)."""
    if not isinstance(model, MAEModel):
        return state_dict
    return {k[len("mae.") :]: v for k, v in state_dict.items()}


@dataclass
class RenameResult:
    """Tensors renamed to the target names, plus what did not match (each with its counterpart)."""

    state_dict: dict[str, torch.Tensor]
    missing: dict[str, tuple[str, ...]]  # target key -> the source key(s) that were absent
    unexpected: list[str]  # source keys nothing in the target takes


def rename_to_ours(keymap: KeyMap, theirs: dict[str, torch.Tensor], our_keys) -> RenameResult:
    """Fill each of `our_keys` from `theirs` (fusing split tensors); report what is missing or left over."""
    out, missing, used = {}, {}, set()
    for key in our_keys:
        names = keymap.theirs_for(key)
        if names is None:
            missing[key] = ()
            continue
        if not all(n in theirs for n in names):
            missing[key] = names
            continue
        used.update(names)
        tensors = [theirs[n] for n in names]
        out[key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    unexpected = [k for k in theirs if k not in used]
    return RenameResult(out, missing, unexpected)


def rename_to_theirs(keymap: KeyMap, ours: dict[str, torch.Tensor]) -> RenameResult:
    """Name each of our tensors for the other format (splitting fused ones); `unexpected` = ours with no
    place in that format. Tensors are cloned so that no two saved tensors share storage."""
    out, unmapped = {}, []
    for key, tensor in ours.items():
        names = keymap.theirs_for(key)
        if names is None:
            unmapped.append(key)
            continue
        if len(names) > 1 and tensor.shape[0] % len(names) != 0:
            raise ValueError(f"cannot split {key} of shape {tuple(tensor.shape)} into {len(names)} parts {names}")
        parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
        for name, part in zip(names, parts):
            out[name] = part.detach().clone().contiguous()
    return RenameResult(out, {}, unmapped)
