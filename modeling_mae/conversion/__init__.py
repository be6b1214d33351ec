"""Converting MAE checkpoints: official facebookresearch/mae `.pth`, transformers ViTMAE, timm ViT.

    from modeling_mae.conversion import load_checkpoint, convert_official_to_mae

    ckpt = load_checkpoint("mae_pretrain_vit_base.pth")          # torch.load(weights_only=True)
    config, model = convert_official_to_mae(ckpt.state_dict, checkpoint_args=ckpt.args)
    model.save_pretrained("mae-vit-base")                       # + image processor, auto_map, code

See `convert.py` for the rules and `keymaps.py` for the rename tables; the command line is
`scripts/convert_checkpoint.py`.
"""

from .architecture import official_architecture, official_args, transformers_architecture
from .checkpoint_io import LoadedCheckpoint, load_checkpoint, save_official, save_state_dict
from .convert import (
    MODEL_CLASSES,
    DroppedWeightsWarning,
    NewlyInitializedWeightsWarning,
    convert_official_to_mae,
    convert_timm_to_mae,
    convert_transformers_to_mae,
    load_mae_model,
    load_transformers_model,
    mae_to_official,
    mae_to_timm,
    mae_to_transformers,
    timm_model_kwargs,
)
from .keymaps import TIMM, TRANSFORMERS, KeyMap, KeyRule, official_keymap


__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "save_official",
    "save_state_dict",
    "MODEL_CLASSES",
    "NewlyInitializedWeightsWarning",
    "DroppedWeightsWarning",
    "convert_official_to_mae",
    "convert_timm_to_mae",
    "convert_transformers_to_mae",
    "load_transformers_model",
    "load_mae_model",
    "mae_to_official",
    "mae_to_timm",
    "mae_to_transformers",
    "timm_model_kwargs",
    "official_architecture",
    "official_args",
    "transformers_architecture",
    "official_keymap",
    "TIMM",
    "TRANSFORMERS",
    "KeyMap",
    "KeyRule",
]
