"""Checkpoint conversion between our models and the official, transformers and timm formats.

Into our models (each returns `(config, model)`, the model in eval mode):

    convert_official_to_mae(state_dict)        facebookresearch/mae .pth (`load_checkpoint(path).state_dict`)
    convert_timm_to_mae(state_dict)            timm `vit_*_patch16_224.mae` / fine-tuned ViT state dicts
    convert_transformers_to_mae(hf_model)      transformers ViTMAEForPreTraining / ViTMAEModel
                                               (`load_transformers_model(dir_or_hub_id)`)

Out of our models: `mae_to_official(model)` / `mae_to_timm(model)` -> state dict,
`mae_to_transformers(model)` -> a ViTMAE model.

Which of our classes a checkpoint becomes follows from what the weights hold (`detect_kind`):
encoder-only pretraining weights -> `MAEModel`, weights with the decoder (the visualisation
release) -> `MAEForPreTraining`, fine-tuned or linear-probe classifiers ->
`MAEForImageClassification`. `model_class=` picks another class: parts the checkpoint lacks
entirely (a decoder, a head) are then newly initialised, with a loud warning.

Missing and unexpected keys are reported by name and fail the conversion unless
`allow_missing=` / `allow_unexpected=` (exports: `allow_dropped=`). Position tables are copied as
published (never regenerated) and interpolated bicubically when `image_size=` differs.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

import torch

from ..configuration_mae import MAEConfig
from ..modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel
from ..pos_embed import interpolate_pos_embed
from ..relative_position import resize_relative_position_table
from .architecture import (
    default_pooling,
    detect_kind,
    make_config,
    official_architecture,
    transformers_architecture,
    transformers_config_from_mae,
)
from .keymaps import (
    TIMM,
    TRANSFORMERS,
    KeyMap,
    official_keymap,
    ours_state_dict,
    rename_to_ours,
    rename_to_theirs,
    strip_ours,
)


logger = logging.getLogger(__name__)

MODEL_CLASSES = {cls.__name__: cls for cls in (MAEModel, MAEForPreTraining, MAEForImageClassification)}
KIND_TO_CLASS = {"encoder": "MAEModel", "pretraining": "MAEForPreTraining", "classifier": "MAEForImageClassification"}

# Parts of our models that a release kind may lack entirely (encoder-only weights have no decoder and
# no head); asking for a class with such a part initialises it anew and says how. The decoder and the
# head are random, to be trained; `fc_norm` starts at weight 1, bias 0, as the official fine-tuning
# starts it (its model builds `fc_norm` fresh and loads only the encoder).
NEW_PARTS = (
    (("decoder.",), "the pretraining DECODER", None),
    (("classifier.", "head_norm."), "the classification HEAD", None),
    (("mae.fc_norm.",), "the pooled-feature LayerNorm `fc_norm`",
     "set to weight 1 and bias 0 (ones / zeros), exactly as the official fine-tuning starts it"),
)
POSITION_TABLES = ("mae.embeddings.position_embeddings", "decoder.decoder_pos_embed")
RELATIVE_POSITION_TABLE = "relative_position_bias_table"


class NewlyInitializedWeightsWarning(UserWarning):
    """A converted model has weights (a decoder, a head, allowed missing keys) the checkpoint did not provide."""


class DroppedWeightsWarning(UserWarning):
    """Checkpoint or model weights were left out of a conversion because the caller allowed it."""


# --------------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------------
def resolve_model_class(model_class, kind: str) -> type:
    """The class named by the caller (a class or its name), else the one matching the checkpoint kind."""
    if model_class is None:
        return MODEL_CLASSES[KIND_TO_CLASS[kind]]
    name = model_class if isinstance(model_class, str) else getattr(model_class, "__name__", repr(model_class))
    if name not in MODEL_CLASSES:
        raise ValueError(f"`model_class` must be one of {sorted(MODEL_CLASSES)}, got {model_class!r}")
    return MODEL_CLASSES[name]


def _describe(keys, limit: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def interpolate_positions(state_dict: dict, source_grid, target_grid) -> dict:
    """Resize the copied tables of a state dict (our names, any prefix) to the target patch grid: encoder /
    decoder position tables bicubically, relative position bias tables bilinearly over their offsets
    (CLS entries kept, see `relative_position.resize_relative_position_table`)."""
    if tuple(source_grid) == tuple(target_grid):
        return state_dict
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith(POSITION_TABLES):
            out[key] = interpolate_pos_embed(value, source_grid, target_grid)
        elif key.endswith(RELATIVE_POSITION_TABLE):
            out[key] = resize_relative_position_table(value, source_grid, target_grid)
        else:
            continue
        logger.info("interpolated %s from grid %s to %s", key, tuple(source_grid), tuple(target_grid))
    return out


def build_from_foreign(
    model_class: type,
    config: MAEConfig,
    keymap: KeyMap,
    foreign: dict[str, torch.Tensor],
    source_grid: tuple[int, int],
    allow_missing: bool = False,
    allow_unexpected: bool = False,
):
    """Instantiate `model_class(config)` and fill it from `foreign` through `keymap`.

    Every parameter and buffer of the model must come from the checkpoint, except parts the checkpoint
    lacks entirely (NEW_PARTS, warned about) and, if `allow_missing`, others (warned about, keep the
    official initialisation). Every checkpoint key must be used unless `allow_unexpected`.
    """
    model = model_class(config)
    fresh = ours_state_dict(model)
    renamed = rename_to_ours(keymap, foreign, fresh.keys())
    converted = interpolate_positions(renamed.state_dict, source_grid, config.grid_size)

    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(fresh[k].shape)}"
        for k, v in converted.items()
        if v.shape != fresh[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"{keymap.name} checkpoint does not fit {model_class.__name__} with the inferred/given config "
            f"(check num_attention_heads, image_size, ...): {_describe(wrong_shape)}"
        )

    missing = dict(renamed.missing)
    for prefixes, what, initialised_as in NEW_PARTS:
        part = [k for k in fresh if k.startswith(prefixes)]
        if part and all(k in missing for k in part):
            for k in part:
                missing.pop(k)
            absent = f"the {keymap.name} checkpoint has no weights for it ({len(part)} tensors, e.g. {part[0]})"
            if initialised_as is None:
                message = (
                    f"\n{'!' * 100}\n{what} of this {model_class.__name__} is NEWLY INITIALISED (random): "
                    f"{absent}. Train it before using its outputs.\n{'!' * 100}"
                )
            else:
                message = f"{what} of this {model_class.__name__} is {initialised_as}: {absent}."
            warnings.warn(message, NewlyInitializedWeightsWarning, stacklevel=3)
    if missing:
        described = [f"{k} <- {' + '.join(v) if v else '(no rule)'}" for k, v in missing.items()]
        if not allow_missing:
            raise ValueError(
                f"{len(missing)} weight(s) of {model_class.__name__} are missing from the {keymap.name} checkpoint: "
                f"{_describe(described)}. Pass allow_missing=True (CLI: --allow_missing) to initialise them anew."
            )
        warnings.warn(
            f"missing from the checkpoint, initialised anew (allowed): {_describe(described)}",
            NewlyInitializedWeightsWarning,
            stacklevel=3,
        )
    if renamed.unexpected:
        if not allow_unexpected:
            raise ValueError(
                f"{len(renamed.unexpected)} key(s) of the {keymap.name} checkpoint have no place in "
                f"{model_class.__name__}: {_describe(renamed.unexpected)}. Pass allow_unexpected=True "
                f"(CLI: --allow_unexpected) to drop them, or choose another model_class."
            )
        warnings.warn(f"dropped (allowed): {_describe(renamed.unexpected)}", DroppedWeightsWarning, stacklevel=3)

    model.load_state_dict(strip_ours(model, converted), strict=False)
    return model.eval()


def _check_dropped(result_unexpected: list[str], fmt: str, allow_dropped: bool, model) -> None:
    if not result_unexpected:
        return
    message = f"{len(result_unexpected)} weight(s) of {type(model).__name__} have no place in the {fmt} format: "
    if not allow_dropped:
        raise ValueError(message + f"{_describe(result_unexpected)}. Pass allow_dropped=True (CLI: --allow_dropped) to leave them out.")
    warnings.warn(message + f"left out (allowed): {_describe(result_unexpected)}", DroppedWeightsWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# official facebookresearch/mae and timm
# --------------------------------------------------------------------------------------------------
def _convert_vit_layout(
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    keymap_for: Callable[[MAEConfig], KeyMap],
    model_class,
    image_size,
    source_image_size,
    allow_missing: bool,
    allow_unexpected: bool,
    checkpoint_args: dict | None,
    config_overrides: dict,
):
    """Shared by the official and timm formats (same names): kind -> class, weights -> config, load."""
    overrides = dict(config_overrides)
    heads = {k: overrides.pop(k) for k in ("num_attention_heads", "decoder_num_attention_heads") if k in overrides}
    # Head counts written by `save_official(..., args=official_args(config))` (the weights cannot hold them)
    for name in ("num_attention_heads", "decoder_num_attention_heads"):
        if name not in heads and isinstance((checkpoint_args or {}).get(name), int):
            heads[name] = checkpoint_args[name]
    kind = detect_kind(state_dict, "decoder_embed.weight", ("head.weight", "head.1.weight"))
    cls = resolve_model_class(model_class, kind)
    architecture = {**official_architecture(state_dict, source, source_image_size, **heads), **heads}
    # Training arguments pickled in full official checkpoints say how the decoder was trained.
    for name in ("norm_pix_loss", "mask_ratio", "layer_norm_eps"):
        if name in (checkpoint_args or {}) and name not in overrides:
            architecture[name] = checkpoint_args[name]
    architecture = default_pooling(cls.__name__, architecture, overrides)
    config, source_grid = make_config(architecture, overrides, image_size)
    logger.info("%s checkpoint of kind %r -> %s", source, kind, cls.__name__)
    model = build_from_foreign(cls, config, keymap_for(config), state_dict, source_grid, allow_missing, allow_unexpected)
    return config, model


def convert_official_to_mae(
    state_dict: dict[str, torch.Tensor],
    *,
    model_class=None,
    image_size=None,
    source_image_size=None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    checkpoint_args: dict | None = None,
    **config_overrides,
):
    """facebookresearch/mae state dict -> `(MAEConfig, model)`.

    Args:
        state_dict: the `"model"` entry of an official `.pth` (see `load_checkpoint`).
        model_class: `"MAEModel"`, `"MAEForPreTraining"` or `"MAEForImageClassification"`; by default
            the class matching what the weights hold.
        image_size: target resolution; position tables are interpolated when it differs.
        source_image_size: the checkpoint's resolution, needed only for non-square position tables.
        checkpoint_args: `load_checkpoint(...).args`; its `norm_pix_loss` / `mask_ratio` are used.
        config_overrides: MAEConfig fields that win over the inferred ones (`num_attention_heads` is
            required for widths that match no official model).
    """
    return _convert_vit_layout(
        state_dict, source="official", keymap_for=lambda config: official_keymap(config.linear_probe_head),
        model_class=model_class, image_size=image_size, source_image_size=source_image_size,
        allow_missing=allow_missing, allow_unexpected=allow_unexpected, checkpoint_args=checkpoint_args,
        config_overrides=config_overrides,
    )


def convert_timm_to_mae(
    state_dict: dict[str, torch.Tensor],
    *,
    model_class=None,
    image_size=None,
    source_image_size=None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    **config_overrides,
):
    """timm VisionTransformer state dict (`vit_*_patch16_224.mae`, or a fine-tuned ViT with
    `global_pool="avg"` + `fc_norm`, or `global_pool="token"`) -> `(MAEConfig, model)`.
    Arguments as in `convert_official_to_mae`."""
    if "decoder_embed.weight" in state_dict:
        raise ValueError("timm ViT checkpoints have no MAE decoder; this one has `decoder_embed`: use --source official")
    return _convert_vit_layout(
        state_dict, source="timm", keymap_for=lambda config: TIMM, model_class=model_class, image_size=image_size,
        source_image_size=source_image_size, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
        checkpoint_args=None, config_overrides=config_overrides,
    )


def mae_to_official(model, allow_dropped: bool = False) -> dict[str, torch.Tensor]:
    """Our model -> a state dict with the official names (save as `{"model": sd}`, see `save_official`)."""
    result = rename_to_theirs(official_keymap(model.config.linear_probe_head), ours_state_dict(model))
    _check_dropped(result.unexpected, "official", allow_dropped, model)
    return result.state_dict


def mae_to_timm(model, allow_dropped: bool = False) -> dict[str, torch.Tensor]:
    """Our model -> a timm VisionTransformer state dict (build the timm model with `timm_model_kwargs`)."""
    ours = ours_state_dict(model)
    has_norm = any(k.startswith("mae.layernorm.") for k in ours)
    fc_norm = [k for k in ours if k.startswith("mae.fc_norm.")]
    if has_norm and fc_norm:
        # timm's ViT has either `norm` (token pooling) or `fc_norm` (average pooling), never both
        _check_dropped(fc_norm, "timm", allow_dropped, model)
        ours = {k: v for k, v in ours.items() if k not in fc_norm}
    result = rename_to_theirs(TIMM, ours)
    _check_dropped(result.unexpected, "timm", allow_dropped, model)
    return result.state_dict


def timm_model_kwargs(config: MAEConfig, model=None) -> dict:
    """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` (or `timm.create_model`)
    for the architecture `mae_to_timm` exports."""
    is_classifier = isinstance(model, MAEForImageClassification) if model is not None else config.num_labels > 0
    mean_pool = is_classifier and config.pooling == "mean"
    return dict(
        img_size=config.image_hw if config.image_hw[0] != config.image_hw[1] else config.image_hw[0],
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_labels if is_classifier else 0,
        global_pool="avg" if mean_pool else "token",
        fc_norm=mean_pool,
    )


# --------------------------------------------------------------------------------------------------
# transformers ViTMAE
# --------------------------------------------------------------------------------------------------
def _hf_classes() -> dict:
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    return {"ViTMAEForPreTraining": ViTMAEForPreTraining, "ViTMAEModel": ViTMAEModel}


def hf_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """A ViTMAE model's state dict under the ViTMAEForPreTraining names (`vit.` prefix for ViTMAEModel)."""
    prefix = "vit." if type(hf_model).__name__ == "ViTMAEModel" else ""
    return {prefix + k: v for k, v in hf_model.state_dict().items()}


def load_transformers_model(
    name_or_path: str | os.PathLike,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    **from_pretrained_kwargs,
):
    """A transformers ViTMAE checkpoint (local directory or Hub id, e.g. `facebook/vit-mae-base`), loaded
    with transformers' own `from_pretrained` (which also reads the older Hub key layout). The class
    is the one named in its config's `architectures` (ViTMAEForPreTraining when none is named)."""
    from transformers import AutoConfig, ViTMAEConfig

    hf_config = AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if not isinstance(hf_config, ViTMAEConfig):
        raise ValueError(
            f"{name_or_path} is not a transformers ViTMAE checkpoint: its config has model_type "
            f"{getattr(hf_config, 'model_type', None)!r}, expected 'vit_mae'"
        )
    classes = _hf_classes()
    name = (hf_config.architectures or ["ViTMAEForPreTraining"])[0]
    if name not in classes:
        raise ValueError(f"{name_or_path}: architecture {name!r} is not supported; expected one of {sorted(classes)}")
    hf_model, info = classes[name].from_pretrained(name_or_path, output_loading_info=True, **from_pretrained_kwargs)
    problems = {
        "missing": (sorted(info.get("missing_keys", [])), allow_missing),
        "unexpected": (sorted(info.get("unexpected_keys", [])), allow_unexpected),
        "mismatched": ([str(k) for k in info.get("mismatched_keys", [])], False),
    }
    for what, (keys, allowed) in problems.items():
        if keys and not allowed:
            raise ValueError(f"loading {name_or_path} as {name}: {what} keys {_describe(keys)}")
    return hf_model.eval()


def convert_transformers_to_mae(
    hf_model,
    *,
    model_class=None,
    image_size=None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    **config_overrides,
):
    """transformers ViTMAEForPreTraining / ViTMAEModel -> `(MAEConfig, model)`; ViTMAEConfig values
    (layer_norm_eps, norm_pix_loss, mask_ratio, ...) are copied. Other arguments as in
    `convert_official_to_mae`."""
    hf_name = type(hf_model).__name__
    if hf_name not in _hf_classes():
        raise ValueError(f"expected a ViTMAEForPreTraining or ViTMAEModel, got {hf_name}")
    kind = "pretraining" if hf_name == "ViTMAEForPreTraining" else "encoder"
    cls = resolve_model_class(model_class, kind)
    architecture = default_pooling(cls.__name__, transformers_architecture(hf_model.config), config_overrides)
    config, source_grid = make_config(architecture, dict(config_overrides), image_size)
    model = build_from_foreign(
        cls, config, TRANSFORMERS, hf_state_dict(hf_model), source_grid, allow_missing, allow_unexpected
    )
    return config, model


def mae_to_transformers(model, allow_dropped: bool = False):
    """Our `MAEForPreTraining` -> ViTMAEForPreTraining, `MAEModel` -> ViTMAEModel (eval mode)."""
    classes = _hf_classes()
    if isinstance(model, MAEForPreTraining):
        hf_cls = classes["ViTMAEForPreTraining"]
    elif isinstance(model, MAEModel):
        hf_cls = classes["ViTMAEModel"]
    else:
        raise ValueError(
            f"transformers has no ViTMAE model for {type(model).__name__}; export MAEForPreTraining or MAEModel, "
            f"or use the official / timm format for classifiers"
        )
    hf_config = transformers_config_from_mae(model.config)
    hf_config.architectures = [hf_cls.__name__]
    result = rename_to_theirs(TRANSFORMERS, ours_state_dict(model))
    _check_dropped(result.unexpected, "transformers", allow_dropped, model)
    state_dict = result.state_dict
    if hf_cls.__name__ == "ViTMAEModel":
        state_dict = {k[len("vit.") :]: v for k, v in state_dict.items()}
    hf_model = hf_cls(hf_config)
    hf_model.load_state_dict(state_dict, strict=True)
    return hf_model.eval()


# --------------------------------------------------------------------------------------------------
# Our own directories
# --------------------------------------------------------------------------------------------------
def load_mae_model(path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a directory written by our `save_pretrained`, as the class named in its config."""
    config = MAEConfig.from_pretrained(path, **from_pretrained_kwargs)
    raw_type = MAEConfig.get_config_dict(path, **from_pretrained_kwargs)[0].get("model_type")
    if raw_type != MAEConfig.model_type:
        raise ValueError(f"{path} is not a modeling_mae model (model_type {raw_type!r}, expected 'mae')")
    name = (config.architectures or [None])[0]
    if name not in MODEL_CLASSES:
        raise ValueError(f"{path}: config.architectures {config.architectures} names none of {sorted(MODEL_CLASSES)}")
    model, info = MODEL_CLASSES[name].from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(f"{path}: incomplete weights for {name}: {info}")
    return model.eval()
