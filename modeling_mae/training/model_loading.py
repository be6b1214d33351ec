"""Pretrained MAE weights for every script: one loading function for every format a user may hold.

    model = load_pretrained(MAEForPreTraining, "mae_pretrain_vit_base.pth")        # official, encoder only
    model = load_pretrained(MAEForPreTraining, "facebook/vit-mae-base")            # transformers, Hub id
    model = load_classifier("timm/vit_base_patch16_224.mae", num_labels=10)        # timm, Hub id
    model = load_pretrained(MAEModel, "outputs/mae-pretrain", image_size=384)      # ours, new resolution

The format is named, never guessed from key names (`checkpoint_format`):

- a file (`.pth`, `.pt`, `.pth.tar`, `.safetensors`, ...): the official facebookresearch/mae layout,
  which timm's ViT state dicts share (same names, no decoder); its pickled `args` (official full
  checkpoints, and files written by `convert_checkpoint.py --to official`) give the loss settings
  and head counts;
- a directory or a Hub id: its `config.json` says which: `model_type` "mae" is ours, "vit_mae" is
  transformers' ViTMAE, and timm's config format (`architecture` + `pretrained_cfg`, no
  `model_type`) is a timm model. A Hub id that is not local is read from the Hub (`config.json` first).

Foreign formats go through `modeling_mae.conversion` (the code behind `scripts/convert_checkpoint.py`),
with the architecture read from the weights. What the weights cannot say comes from the caller: the
head counts for widths of no official model (`num_attention_heads`, `decoder_num_attention_heads`) and
a new resolution (`image_size`: position tables interpolated). Parts the target has and the
checkpoint lacks (the decoder of an encoder-only release, a new head) are newly initialised and
logged loudly; parts the target has no place for (a decoder when fine-tuning) are dropped, as the
official fine-tuning code's non-strict load does.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin", ".ckpt", ".safetensors")
CHECKPOINT_FORMATS = ("ours", "official", "transformers", "timm")
# Fields the scripts share for checkpoints whose weights do not say everything (see `checkpoint_options`).
CHECKPOINT_OPTION_FIELDS = ("num_attention_heads", "decoder_num_attention_heads", "image_size")
# The classifier's Linear: ours, and the official / timm layouts' (fine-tuning `head`, linear probe `head.1`)
OUR_HEAD_PREFIX = "classifier."
FOREIGN_HEAD_PREFIXES = ("head.", "head.1.")


def is_official_checkpoint(path: str) -> bool:
    """A single checkpoint file (the official repository's format, or a timm state dict), not a directory."""
    return os.path.isfile(path) and str(path).endswith(OFFICIAL_CHECKPOINT_SUFFIXES)


def checkpoint_options(cfg) -> dict:
    """The set `CHECKPOINT_OPTION_FIELDS` of a script config, as keyword arguments of `load_pretrained`."""
    return {name: getattr(cfg, name) for name in CHECKPOINT_OPTION_FIELDS if getattr(cfg, name, None) is not None}


def merge_model_config(model_config: dict, fields: dict) -> dict:
    """A script's `MAEConfig` overrides: its `model_config` mapping plus the script's own fields for MAEConfig
    settings (`fields`, name -> value; None = not set, so model_config / the checkpoint / MAEConfig decide),
    as `from_pretrained` keyword arguments override a checkpoint's config. One source per setting: a name
    set both ways is a ValueError naming both, whatever the values (a field with a recipe default is always set)."""
    for name, value in fields.items():
        if value is not None and name in model_config:
            raise ValueError(
                f"`model_config` sets {name}={model_config[name]!r} and the field `{name}` sets {value!r}; "
                f"set it in one place (the field `{name}`)"
            )
    return {**model_config, **{name: value for name, value in fields.items() if value is not None}}


# --------------------------------------------------------------------------------------------------
# Which format
# --------------------------------------------------------------------------------------------------
def format_of_config(config: dict, where: str) -> str:
    """"ours" | "transformers" | "timm" from a `config.json` mapping, by its declared format."""
    model_type = config.get("model_type")
    if model_type == "mae":
        return "ours"
    if model_type == "vit_mae":
        return "transformers"
    if model_type is None and "architecture" in config:  # timm's config.json (push_to_hf_hub)
        return "timm"
    raise ValueError(
        f"{where}: config.json has model_type {model_type!r}; expected 'mae' (modeling_mae), 'vit_mae' "
        f"(transformers ViTMAE) or a timm config (with `architecture`)"
    )


def read_config_json(model_name_or_path: str, revision: str | None = None, token=None) -> dict:
    """`config.json` of a local directory, else of a Hub repository (downloaded with huggingface_hub)."""
    local = Path(model_name_or_path).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ValueError(f"`model_name_or_path` {model_name_or_path!r} is a directory without config.json")
    elif local.exists():
        raise ValueError(f"`model_name_or_path` {model_name_or_path!r} is neither a checkpoint file nor a directory")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model_name_or_path, "config.json", revision=revision, token=token))
        except Exception as err:  # RepositoryNotFoundError, offline, gated, HFValidationError ...
            raise ValueError(
                f"`model_name_or_path` {model_name_or_path!r} is no local file or directory and its config.json "
                f"could not be read from the Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
    return json.loads(path.read_text())


def checkpoint_format(model_name_or_path: str, revision: str | None = None, token=None) -> tuple[str, dict]:
    """(format, config.json contents or {}) of a checkpoint file, directory or Hub id (see the module doc)."""
    if os.path.isfile(model_name_or_path):
        if not str(model_name_or_path).endswith(OFFICIAL_CHECKPOINT_SUFFIXES):
            raise ValueError(
                f"`model_name_or_path` {model_name_or_path!r} is a file but not a checkpoint "
                f"({', '.join(OFFICIAL_CHECKPOINT_SUFFIXES)})"
            )
        return "official", {}
    config = read_config_json(str(model_name_or_path), revision, token)
    return format_of_config(config, str(model_name_or_path)), config


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_pretrained(
    model_cls,
    model_name_or_path: str,
    *,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    image_size=None,
    revision: str | None = None,
    token=None,
    **config_overrides,
):
    """`model_cls` (`MAEForPreTraining`, `MAEForImageClassification`, `MAEModel`) from any MAE checkpoint.

    Args:
        model_name_or_path: our `save_pretrained` directory or Hub id, an official `.pth`, a transformers
            ViTMAE directory or Hub id, a timm model directory or Hub id (`timm/vit_base_patch16_224.mae`).
        num_attention_heads / decoder_num_attention_heads: for widths of no official model when the file
            does not carry them.
        image_size: target resolution; position tables are interpolated when it differs.
        config_overrides: `MAEConfig` fields (num_labels, id2label, drop_path_rate, pooling, mask_ratio,
            norm_pix_loss, ...). An `image_size` among them is treated as the argument.
    Returns:
        the model (train/eval mode as transformers leaves it). Newly initialised and dropped parts are
        logged as warnings.
    """
    if "image_size" in config_overrides:
        image_size = config_overrides.pop("image_size") if image_size is None else image_size
        config_overrides.pop("image_size", None)
    fmt, hub_config = checkpoint_format(model_name_or_path, revision, token)
    heads = {k: v for k, v in (("num_attention_heads", num_attention_heads),
                                ("decoder_num_attention_heads", decoder_num_attention_heads)) if v is not None}
    logger.info("loading %s (%s format) as %s", model_name_or_path, fmt, model_cls.__name__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new_head_size = config_overrides.get("num_labels") if model_cls.__name__ == "MAEForImageClassification" else None
        if fmt == "ours":
            model = _from_ours(model_cls, model_name_or_path, image_size, revision, token, heads, config_overrides,
                               new_head_size)
        else:
            model = _from_foreign(model_cls, fmt, model_name_or_path, hub_config, image_size, revision, token,
                                  {**config_overrides, **heads}, new_head_size)
    for warning in caught:  # the converter's loud messages also reach the log file (blank ones do not)
        text = str(warning.message).strip()
        if text:
            logger.warning("%s", text)
    return model


def load_classifier(model_name_or_path: str, **kwargs):
    """`MAEForImageClassification` initialised from a pretrained MAE (see `load_pretrained`)."""
    from modeling_mae import MAEForImageClassification

    return load_pretrained(MAEForImageClassification, model_name_or_path, **kwargs)


def log_new_head(path, checkpoint_labels: int, num_labels: int) -> None:
    """The one line saying that a classifier checkpoint's head was replaced by a new one of `num_labels`."""
    logger.warning(
        "NEW classification head: %s has a %d-class head, this model has num_labels=%d; the encoder is the "
        "checkpoint's, the head is newly initialised (train it before use)", path, checkpoint_labels, num_labels,
    )


def _from_ours(model_cls, path, image_size, revision, token, heads, config_overrides, new_head_size=None):
    """Our directory / Hub id: transformers' `from_pretrained`; a new `image_size` rebuilds the model at that
    size with interpolated position tables. With `new_head_size` (a classifier's num_labels), a classifier
    checkpoint's head of another size is replaced by a new one (as `ignore_mismatched_sizes=True`, but
    only for the head, and said in the log); any other mismatch is an error."""
    if heads:
        logger.info("ignoring %s: %s carries its head counts in config.json", sorted(heads), path)
    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    model, info = model_cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=new_head_size is not None,
                                            **hub, **config_overrides)
    mismatched = {key: tuple(checkpoint_shape) for key, checkpoint_shape, _ in info.get("mismatched_keys") or ()}
    if any(not key.startswith(OUR_HEAD_PREFIX) for key in mismatched):
        raise ValueError(f"{path} does not fit {model_cls.__name__} with the given config: shapes differ for "
                         f"{sorted(mismatched)} (checkpoint {[mismatched[k] for k in sorted(mismatched)]})")
    if mismatched:
        log_new_head(path, mismatched[OUR_HEAD_PREFIX + "weight"][0], new_head_size)
    if info["missing_keys"]:
        logger.warning("loaded %s; NEWLY INITIALISED (train before use): %s", path, sorted(info["missing_keys"]))
    if image_size is None:
        return model
    from modeling_mae import MAEConfig
    from modeling_mae.conversion.convert import interpolate_positions
    from modeling_mae.conversion.keymaps import ours_state_dict, strip_ours

    config = MAEConfig.from_dict({**model.config.to_dict(), "image_size": image_size})
    if tuple(config.image_hw) == tuple(model.config.image_hw):
        return model
    resized = model_cls(config)
    state = interpolate_positions(ours_state_dict(model), model.config.grid_size, config.grid_size)
    resized.load_state_dict(strip_ours(resized, state), strict=True)
    resized.set_position_embeddings_trainable()
    resized.train(model.training)
    return resized


def without_other_head(state_dict: dict, num_labels: int | None, location) -> dict:
    """An official / timm state dict without its classifier Linear when that has another number of classes
    than `num_labels` (the conversion then makes a new head, and says so); unchanged otherwise."""
    for prefix in FOREIGN_HEAD_PREFIXES:
        weight = state_dict.get(prefix + "weight")
        if num_labels is not None and weight is not None and weight.ndim == 2 and weight.shape[0] != num_labels:
            log_new_head(location, checkpoint_labels=weight.shape[0], num_labels=num_labels)
            return {k: v for k, v in state_dict.items() if k not in (prefix + "weight", prefix + "bias")}
    return state_dict


def _from_foreign(model_cls, fmt, location, hub_config, image_size, revision, token, overrides, new_head_size=None):
    """Official file, transformers ViTMAE or timm model -> `model_cls`, through `modeling_mae.conversion`;
    a classifier head of another size than `new_head_size` is left out (a new one is made)."""
    from modeling_mae.conversion import (
        convert_official_to_mae,
        convert_timm_to_mae,
        convert_transformers_to_mae,
        load_checkpoint,
        load_transformers_model,
    )

    common = dict(model_class=model_cls.__name__, image_size=image_size, allow_unexpected=True, **overrides)
    if fmt == "official":
        checkpoint = load_checkpoint(location)
        state_dict = without_other_head(checkpoint.state_dict, new_head_size, location)
        _, model = convert_official_to_mae(state_dict, checkpoint_args=checkpoint.args, **common)
    elif fmt == "transformers":
        hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
        _, model = convert_transformers_to_mae(load_transformers_model(location, allow_unexpected=True, **hub), **common)
    else:
        checkpoint = load_checkpoint(_timm_weights(location, revision, token))
        _, model = convert_timm_to_mae(without_other_head(checkpoint.state_dict, new_head_size, location), **common)
    return model


def _timm_weights(location: str, revision=None, token=None) -> str:
    """The weights file of a timm model directory or Hub repository (safetensors preferred)."""
    local = Path(location).expanduser()
    names = ("model.safetensors", "pytorch_model.bin")
    if local.is_dir():
        for name in names:
            if (local / name).is_file():
                return str(local / name)
        raise ValueError(f"timm model directory {location} holds none of {names}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(location, names[0], revision=revision, token=token)
    except Exception:  # older timm repositories: pytorch_model.bin only
        return hf_hub_download(location, names[1], revision=revision, token=token)


# --------------------------------------------------------------------------------------------------
# Another channel count than the checkpoint's
# --------------------------------------------------------------------------------------------------
def adapt_num_channels(model, num_channels: int):
    """A copy of `model` for `num_channels` input channels, every other weight unchanged.

    - The patch projection (D, C, p, p) -> (D, N, p, p) by timm's `adapt_input_conv`: N = 1 sums the
      source channels (a gray image equal in every channel then gives the same embedding as before);
      other N repeat the source channels cyclically and scale by C / N (the summed response of
      equal inputs is kept).
    - The decoder's pixel head `decoder_pred` (p*p*C rows, channel fastest, as `patchify` orders a
      patch) -> p*p*N rows: N = 1 takes the mean of the source channels' rows (the prediction of a
      gray value), other N take the row of source channel n mod C.

    Returns (model, a sentence saying what was done) — the caller logs it."""
    from timm.models import adapt_input_conv

    from modeling_mae import MAEConfig
    from modeling_mae.conversion.keymaps import ours_state_dict, strip_ours

    old = int(model.config.num_channels)
    if num_channels == old:
        return model, f"the model already has {old} channel(s)"
    if num_channels < 1:
        raise ValueError(f"`num_channels` must be >= 1, got {num_channels}")
    config = MAEConfig.from_dict({**model.config.to_dict(), "num_channels": int(num_channels)})
    state = ours_state_dict(model)
    key = "mae.embeddings.patch_embeddings.projection.weight"
    state[key] = adapt_input_conv(num_channels, state[key], base_chans=old)
    done = [f"patch projection {old} -> {num_channels} channels ("
            + ("sum over the source channels" if num_channels == 1 else f"source channels repeated, scaled by {old}/{num_channels}")
            + ")"]
    if "decoder.decoder_pred.weight" in state:
        p = config.patch_size
        for name in ("decoder.decoder_pred.weight", "decoder.decoder_pred.bias"):
            rows = state[name].reshape(p * p, old, *state[name].shape[1:])  # (p*p, C, ...)
            if num_channels == 1:
                rows = rows.mean(dim=1, keepdim=True)
            else:
                rows = rows[:, torch.arange(num_channels) % old]
            state[name] = rows.reshape(p * p * num_channels, *state[name].shape[1:]).contiguous()
        done.append("decoder pixel head rows " + ("averaged over the source channels" if num_channels == 1
                                                  else "taken from source channel n mod " + str(old)))
    adapted = type(model)(config)
    adapted.load_state_dict(strip_ours(adapted, state), strict=True)
    adapted.set_position_embeddings_trainable()
    adapted.train(model.training)
    return adapted, f"adapted the {old}-channel checkpoint to {num_channels} channels: " + "; ".join(done)


# --------------------------------------------------------------------------------------------------
# The checkpoint's pixels (downstream runs)
# --------------------------------------------------------------------------------------------------
def read_image_processor_config(model_name_or_path: str, revision: str | None = None, token=None) -> dict | None:
    """`preprocessor_config.json` of a directory or a Hub repository (what `pixels.saved_pixels` reads the
    pixel format and statistics from); None for checkpoint files, and for repositories without one or out
    of reach (the caller then assumes 8-bit RGB for a 3-channel model, as for official checkpoints)."""
    if os.path.isfile(str(model_name_or_path)):
        return None
    local = Path(str(model_name_or_path)).expanduser()
    if local.is_dir():
        path = local / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(model_name_or_path), "preprocessor_config.json",
                                               revision=revision, token=token)).read_text())
    except Exception:  # no such file in the repository, offline: the model's config alone decides
        return None


def adapt_to_pixel_path(model, pixel_path):
    """`model` adapted to the channel count of `pixel_path` (`adapt_num_channels`, logged), or itself. A
    segmentation model (`MAEUperNetForSemanticSegmentation`) has its backbone adapted, and its config says so."""
    backbone_config = getattr(model.config, "backbone_config", None)
    channels = pixel_path.format.num_channels
    if (backbone_config or model.config).num_channels == channels:
        return model
    if backbone_config is not None:
        model.backbone, message = adapt_num_channels(model.backbone, channels)
        model.config.backbone_config = model.backbone.config
    else:
        model, message = adapt_num_channels(model, channels)
    logger.warning("%s", message)
    return model
