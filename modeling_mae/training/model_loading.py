"""Pretrained MAE weights for the downstream scripts: a `save_pretrained` directory, a Hub id, or an
official facebookresearch/mae checkpoint file, converted through `modeling_mae.conversion`."""

from __future__ import annotations

import logging
import os


logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar")


def is_official_checkpoint(path: str) -> bool:
    """A single `.pth` / `.pt` file (the official repository's format), not a transformers directory."""
    return os.path.isfile(path) and str(path).endswith(OFFICIAL_CHECKPOINT_SUFFIXES)


def load_pretrained(model_cls, model_name_or_path: str, **config_overrides):
    """`model_cls` (e.g. `MAEForImageClassification`, `MAEForPreTraining`, `MAEModel`) from a pretrained MAE.

    Args:
        model_name_or_path: a directory written by `save_pretrained`, a Hub id, or an official
            checkpoint file (`mae_pretrain_vit_base.pth`, ...), converted by `modeling_mae.conversion`
            (widths of no official model need `num_attention_heads=` / `decoder_num_attention_heads=`).
        config_overrides: `MAEConfig` fields (num_labels, id2label, label2id, drop_path_rate, pooling,
            linear_probe_head, ...).
    Returns:
        the model. Loading a pretraining checkpoint into a classifier drops the decoder and
        initialises the head (fc_norm / head_norm / classifier) as the official code does.
    """
    if is_official_checkpoint(model_name_or_path):
        return _from_official_checkpoint(model_cls, model_name_or_path, **config_overrides)
    model, info = model_cls.from_pretrained(model_name_or_path, output_loading_info=True, **config_overrides)
    if info["missing_keys"]:
        logger.info("loaded %s; newly initialised: %s", model_name_or_path, sorted(info["missing_keys"]))
    return model


def load_classifier(model_name_or_path: str, **config_overrides):
    """`MAEForImageClassification` initialised from a pretrained MAE (see `load_pretrained`)."""
    from modeling_mae import MAEForImageClassification

    return load_pretrained(MAEForImageClassification, model_name_or_path, **config_overrides)


def _from_official_checkpoint(model_cls, path: str, **config_overrides):
    """Official facebookresearch/mae `.pth` -> `model_cls`, through `modeling_mae.conversion`.

    Checkpoint parts the target has no place for (the decoder, the final norm of a mean-pooling
    classifier) are dropped, as the official fine-tuning code's non-strict load does; parts the
    checkpoint lacks (a new head) are initialised and warned about by the converter."""
    from modeling_mae.conversion import convert_official_to_mae, load_checkpoint

    checkpoint = load_checkpoint(path)
    _, model = convert_official_to_mae(
        checkpoint.state_dict,
        model_class=model_cls.__name__,
        checkpoint_args=checkpoint.args,
        allow_unexpected=True,
        **config_overrides,
    )
    return model
