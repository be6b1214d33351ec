"""OpenMMLab mmsegmentation checkpoints <-> `MAEUperNetForSemanticSegmentation`.

mmsegmentation's MAE segmentation model (`configs/mae/`, e.g. the published 48.13-mIoU ADE20K ViT-B):
`MAE` backbone (relative position bias + layer scale), `Feature2Pyramid` neck (rescales 4, 2, 1, 0.5),
`UPerHead` and an `FCNHead` auxiliary head, saved as `{"state_dict": {"backbone.*", "neck.*",
"decode_head.*", "auxiliary_head.*"}, "meta": ...}`. The names map one to one through `keymaps.MMSEG`.

What the weights do not say and the converter takes from its arguments: which blocks feed the pyramid
(`out_indices`, 1-based like ours; mmsegmentation's 0-based [3, 5, 7, 11] for ViT-B = our [4, 6, 8, 12],
the default for 12 blocks, [8, 12, 16, 24] for 24), the pooling scales (1, 2, 3, 6 when there are four)
and LayerNorm eps (1e-6 in the MAE configs). The patch grid follows from the position table and the
relative position tables together, also for non-square grids.

Not carried over: mmsegmentation's `data_preprocessor` (mean / std in 0-255 BGR->RGB; our image
processor normalises with the same ImageNet constants on 0-1 RGB) and the 0.1 dropout before `conv_seg`
(transformers' UperNet heads have none; it is inactive at evaluation).
"""

from __future__ import annotations

import inspect
import logging
import math
import re

import torch

from ..configuration_mae import MAEConfig
from ..modeling_mae_backbone import MAEUperNetConfig, MAEUperNetForSemanticSegmentation
from ..relative_position import num_relative_positions, relative_position_index
from .convert import interpolate_positions
from .keymaps import MMSEG, MMSEG_RELATIVE_POSITION_INDEX, rename_to_ours, rename_to_theirs


logger = logging.getLogger(__name__)

# The blocks the MAE / BEiT UperNet configs feed to the pyramid, by depth (1-based).
DEFAULT_OUT_INDICES = {12: [4, 6, 8, 12], 24: [8, 12, 16, 24]}
TABLE_SUFFIX = "relative_position_bias_table"
_INDEX = re.compile(r"^backbone\.layers\.(\d+)\.attn\.relative_position_index$")


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"the checkpoint has no `{key}`, which every mmsegmentation MAE + UperNet state dict has; is "
            f"`--source mmseg` right? First keys found: {sorted(state_dict)[:8]}"
        )
    return state_dict[key]


def _count(state_dict: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def mmseg_grid(state_dict: dict) -> tuple[int, int]:
    """(rows, cols) from the position table (rows * cols + 1 entries) and a relative table
    ((2 rows - 1)(2 cols - 1) + 3 entries); the stored index says which side is which when not square."""
    length = _require(state_dict, "backbone.pos_embed").shape[1] - 1
    entries = _require(state_dict, f"backbone.layers.0.attn.{TABLE_SUFFIX}").shape[0]
    # (2r - 1)(2c - 1) = 4 rc - 2 (r + c) + 1  ->  r + c from rc = length
    total = (4 * length + 1 - (entries - 3)) / 2
    disc = total * total - 4 * length
    if total != int(total) or disc < 0 or math.isqrt(int(disc)) ** 2 != int(disc):
        raise ValueError(f"no patch grid has {length} patches and {entries} relative positions")
    small = (int(total) - math.isqrt(int(disc))) // 2
    candidates = [(small, length // small), (length // small, small)]
    stored = state_dict.get("backbone.layers.0.attn.relative_position_index")
    if candidates[0] == candidates[1] or stored is None:
        if candidates[0] != candidates[1]:
            raise ValueError(f"the grid is {candidates[0]} or {candidates[1]}; pass image_size=(height, width)")
        return candidates[0]
    for grid in candidates:
        if torch.equal(stored.long(), relative_position_index(grid)):
            return grid
    raise ValueError("the stored relative_position_index matches neither orientation of the grid")


def mmseg_configs(state_dict: dict, out_indices=None, image_size=None, **config_overrides) -> tuple[MAEUperNetConfig, tuple]:
    """The segmentation config of an mmsegmentation MAE + UperNet state dict, and its patch grid."""
    cls_token = _require(state_dict, "backbone.cls_token")
    projection = _require(state_dict, "backbone.patch_embed.projection.weight")
    table = _require(state_dict, f"backbone.layers.0.attn.{TABLE_SUFFIX}")
    depth = _count(state_dict, r"^backbone\.layers\.(\d+)\.")
    grid = mmseg_grid(state_dict)
    if out_indices is None:
        if depth not in DEFAULT_OUT_INDICES:
            raise ValueError(f"pass out_indices (the 4 blocks feeding the pyramid) for a {depth}-block backbone")
        out_indices = DEFAULT_OUT_INDICES[depth]
    backbone = dict(
        image_size=list(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        patch_size=projection.shape[-1],
        num_channels=projection.shape[1],
        hidden_size=cls_token.shape[-1],
        num_hidden_layers=depth,
        num_attention_heads=table.shape[1],
        intermediate_size=_require(state_dict, "backbone.layers.0.ffn.layers.0.0.weight").shape[0],
        qkv_bias="backbone.layers.0.attn.qkv.bias" in state_dict,
        layer_norm_eps=1e-6,
        use_relative_position_bias=True,
        layer_scale_init_value=1.0,  # the ADE20K recipe's init_values; the checkpoint's gammas replace it
        out_indices=list(out_indices),
    )
    if image_size is None:
        backbone["image_size"] = [grid[0] * backbone["patch_size"], grid[1] * backbone["patch_size"]]
    backbone_fields = set(inspect.signature(MAEConfig.__init__).parameters) - {"self", "kwargs"}
    backbone.update({k: v for k, v in config_overrides.items() if k in backbone_fields})
    heads = {k: v for k, v in config_overrides.items() if k not in backbone}
    num_pool = _count(state_dict, r"^decode_head\.psp_modules\.(\d+)\.")
    has_aux = "auxiliary_head.conv_seg.weight" in state_dict
    config = MAEUperNetConfig(
        backbone_config=MAEConfig(**backbone),
        hidden_size=_require(state_dict, "decode_head.bottleneck.conv.weight").shape[0],
        pool_scales=[1, 2, 3, 6] if num_pool == 4 else heads.pop("pool_scales"),
        num_labels=_require(state_dict, "decode_head.conv_seg.weight").shape[0],
        use_auxiliary_head=has_aux,
        auxiliary_channels=state_dict["auxiliary_head.convs.0.conv.weight"].shape[0] if has_aux else 256,
        auxiliary_num_convs=_count(state_dict, r"^auxiliary_head\.convs\.(\d+)\.") if has_aux else 1,
        auxiliary_concat_input="auxiliary_head.conv_cat.conv.weight" in state_dict,
        **heads,
    )
    return config, grid


def _check_index(state_dict: dict, grid: tuple[int, int]) -> list[str]:
    """The derived `relative_position_index` buffers must be ours for `grid`; returns their keys."""
    keys = [k for k in state_dict if _INDEX.match(k)]
    expected = relative_position_index(tuple(grid))
    wrong = [k for k in keys if not torch.equal(state_dict[k].long(), expected)]
    if wrong:
        raise ValueError(f"relative_position_index of {wrong[:3]} differs from BEiT's layout for grid {grid}")
    return keys


def convert_mmseg_to_mae(
    state_dict: dict[str, torch.Tensor],
    *,
    out_indices=None,
    image_size=None,
    allow_unexpected: bool = False,
    **config_overrides,
):
    """mmsegmentation MAE + UperNet `state_dict` -> `(MAEUperNetConfig, MAEUperNetForSemanticSegmentation)`.

    Args:
        out_indices: the blocks (1-based) feeding the pyramid; defaults to the MAE configs' for 12 / 24 blocks.
        image_size: target resolution; the position and relative tables are resized from the checkpoint's grid.
        config_overrides: `id2label`, `label2id`, `drop_path_rate`, ... (backbone or UperNet fields).
    Every weight of the model must come from the checkpoint and every checkpoint key must be used
    (the relative position index buffers are checked against ours) unless `allow_unexpected`.
    """
    config, source_grid = mmseg_configs(state_dict, out_indices, image_size, **config_overrides)
    index_keys = _check_index(state_dict, source_grid)
    model = MAEUperNetForSemanticSegmentation(config)
    fresh = model.state_dict()
    renamed = rename_to_ours(MMSEG, state_dict, fresh.keys())
    converted = interpolate_positions(renamed.state_dict, source_grid, config.backbone_config.grid_size)
    unexpected = [k for k in renamed.unexpected if k not in index_keys]
    if renamed.missing:
        described = [f"{k} <- {' + '.join(v) if v else '(no rule)'}" for k, v in renamed.missing.items()]
        raise ValueError(f"{len(described)} weight(s) missing from the mmseg checkpoint: {described[:10]}")
    if unexpected and not allow_unexpected:
        raise ValueError(
            f"{len(unexpected)} key(s) of the mmseg checkpoint have no place in the model: {unexpected[:10]}. "
            f"Pass allow_unexpected=True (CLI: --allow_unexpected) to drop them."
        )
    wrong_shape = [f"{k}: {tuple(v.shape)} vs {tuple(fresh[k].shape)}" for k, v in converted.items() if v.shape != fresh[k].shape]
    if wrong_shape:
        raise ValueError(f"mmseg checkpoint does not fit the inferred config: {wrong_shape[:10]}")
    model.load_state_dict(converted, strict=True)
    model.backbone.set_position_embeddings_trainable()
    return config, model.eval()


def mae_to_mmseg(model: MAEUperNetForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """Our UperNet model -> an mmsegmentation state dict (save as `{"state_dict": sd}`, see `save_mmseg`).

    mmsegmentation's MAE backbone always has relative tables and gammas: a backbone without them is
    exported with zero tables and unit gammas, which compute exactly what it computes."""
    if not isinstance(model, MAEUperNetForSemanticSegmentation):
        raise ValueError(f"--to mmseg exports MAEUperNetForSemanticSegmentation models, got {type(model).__name__}")
    config = model.config.backbone_config
    if len(config.out_features) != 4:
        raise ValueError(f"mmsegmentation's Feature2Pyramid needs 4 distinct blocks, got out_features {config.out_features}")
    ours = dict(model.state_dict())
    grid, heads, dim = config.grid_size, config.num_attention_heads, config.hidden_size
    for i in range(config.num_hidden_layers):
        block = f"backbone.mae.encoder.layer.{i}"
        ours.setdefault(f"{block}.relative_position_bias.{TABLE_SUFFIX}", torch.zeros(num_relative_positions(grid), heads))
        ours.setdefault(f"{block}.layer_scale_1", torch.ones(dim))
        ours.setdefault(f"{block}.layer_scale_2", torch.ones(dim))
    result = rename_to_theirs(MMSEG, ours)
    if result.unexpected:
        raise ValueError(f"weights with no place in the mmseg format: {result.unexpected[:10]}")
    state_dict = result.state_dict
    for i in range(config.num_hidden_layers):
        state_dict[MMSEG_RELATIVE_POSITION_INDEX.format(i=i)] = relative_position_index(grid).clone()
    return state_dict


def save_mmseg(state_dict: dict[str, torch.Tensor], path, meta: dict | None = None):
    """`{"state_dict": ..., "meta": ...}`, as mmengine's checkpoints are laid out."""
    from pathlib import Path

    path = Path(path)
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"an mmseg checkpoint is a .pth file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "meta": dict(meta or {})}, path)
    return path
