"""MAE configuration: the one source of truth for model defaults (He et al., 2021).

Defaults are the paper's ViT-B/16 encoder with the default 512-d, 8-block decoder. Named presets
(`MAEConfig.from_preset`) give the official ViT-B/16, ViT-L/16 and ViT-H/14 models and a tiny model
for tests and demos.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


MASK_STRATEGIES = ("random", "block", "grid")
POOLING_MODES = ("mean", "cls")

# Encoder sizes of the official models; every preset uses the paper's default decoder (512-d, 8
# blocks, 16 heads, MLP ratio 4) and the released models' normalised-pixel target.
MAE_PRESETS: dict[str, dict] = {
    "mae-vit-base-patch16": dict(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072,
    ),
    "mae-vit-large-patch16": dict(
        image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096,
    ),
    "mae-vit-huge-patch14": dict(
        image_size=224, patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
        intermediate_size=5120,
    ),
    # Tiny model for tests and the CPU demo (not a published architecture).
    "mae-tiny": dict(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=128,
    ),
}


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"`{name}` must be an int or a (height, width) pair of ints, got {value!r}")


class MAEConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of an MAE model (encoder, pretraining decoder, classification head).

    Args:
        image_size (`int` or `tuple[int, int]`, defaults to 224): input resolution, square or (height, width).
        patch_size (`int`, defaults to 16): side of a square patch; must divide both image sides.
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 768): encoder width.
        num_hidden_layers (`int`, defaults to 12): encoder blocks.
        num_attention_heads (`int`, defaults to 12): encoder heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*): encoder MLP width; defaults to `mlp_ratio * hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): used only when `intermediate_size` is not given.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU as in the official code).
        qkv_bias (`bool`, defaults to `True`).
        layer_norm_eps (`float`, defaults to 1e-6): the official value (transformers' ViTMAE uses 1e-12).
        hidden_dropout_prob / attention_probs_dropout_prob (`float`, defaults to 0.0).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over encoder blocks.
        initializer_range (`float`, defaults to 0.02): std of the CLS and mask tokens.
        decoder_hidden_size / decoder_num_hidden_layers / decoder_num_attention_heads (512 / 8 / 16).
        decoder_intermediate_size (`int`, *optional*): defaults to `mlp_ratio * decoder_hidden_size`.
        mask_ratio (`float`, defaults to 0.75): fraction of patches removed in pretraining, in [0, 1).
        mask_strategy (`str`, defaults to `"random"`): `"random"` (per-sample uniform, the paper's
            default), `"block"` (BEiT-style rectangles) or `"grid"` (keep one patch of every 2x2).
        norm_pix_loss (`bool`, defaults to `True`): regress each patch normalised by its own mean and
            variance (the target of the released models and of the official recipe).
        pooling (`str`, defaults to `"mean"`): `"mean"` = average of patch tokens + `fc_norm` LayerNorm
            (the official fine-tuning head); `"cls"` = the CLS token after the final LayerNorm (linear probe).
        linear_probe_head (`bool`, defaults to `False`): put `BatchNorm1d(affine=False, eps=1e-6)` before
            the classifier Linear, as the official linear probe does.
        use_relative_position_bias (`bool`, defaults to `False`): a learned relative position bias per
            encoder block (BEiT's), added to the attention logits; transfer-only (MAE pretraining has none),
            zero-initialised, as in the paper's ADE20K setup (appendix A.4). See `relative_position.py`.
        layer_scale_init_value (`float`, defaults to 0.0): > 0 adds per-channel layer scale (gammas) on the
            attention and MLP branches of every encoder block, starting at this value (1.0 in the
            mmsegmentation MAE ADE20K recipe); 0 = none (the paper's plain ViT).
        out_features / out_indices: backbone stages (`"stem"`, `"stage1"` ... `"stageN"`, one per block).
    """

    model_type = "mae"

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=None,
        mlp_ratio=4.0,
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        initializer_range=0.02,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=None,
        mask_ratio=0.75,
        mask_strategy="random",
        norm_pix_loss=True,
        pooling="mean",
        linear_probe_head=False,
        use_relative_position_bias=False,
        layer_scale_init_value=0.0,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        image_hw = _pair(image_size, "image_size")
        self.image_size = image_size if isinstance(image_size, int) else list(image_hw)
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.intermediate_size = intermediate_size if intermediate_size is not None else _mlp(hidden_size, mlp_ratio)
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = (
            decoder_intermediate_size if decoder_intermediate_size is not None else _mlp(decoder_hidden_size, mlp_ratio)
        )
        self.mask_ratio = mask_ratio
        self.mask_strategy = mask_strategy
        self.norm_pix_loss = norm_pix_loss
        self.pooling = pooling
        self.linear_probe_head = linear_probe_head
        self.use_relative_position_bias = use_relative_position_bias
        self.layer_scale_init_value = layer_scale_init_value
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.validate()

    # ----------------------------------------------------------------------------------------------
    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the input."""
        return _pair(self.image_size, "image_size")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        h, w = self.image_hw
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    # ----------------------------------------------------------------------------------------------
    def validate(self):
        """Raise a ValueError naming the field, the expected and the actual value."""
        positive = {
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "decoder_hidden_size": self.decoder_hidden_size,
            "decoder_num_hidden_layers": self.decoder_num_hidden_layers,
            "decoder_num_attention_heads": self.decoder_num_attention_heads,
            "decoder_intermediate_size": self.decoder_intermediate_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for side, name in zip(self.image_hw, ("height", "width")):
            if side <= 0:
                raise ValueError(f"`image_size` must be positive, got {name} {side}")
            if side % self.patch_size != 0:
                raise ValueError(
                    f"`image_size` {name} ({side}) must be divisible by `patch_size` ({self.patch_size})"
                )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"`decoder_hidden_size` ({self.decoder_hidden_size}) must be divisible by "
                f"`decoder_num_attention_heads` ({self.decoder_num_attention_heads})"
            )
        if not (0.0 <= float(self.mask_ratio) < 1.0):
            raise ValueError(f"`mask_ratio` must be in [0, 1), got {self.mask_ratio!r}")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"`mask_strategy` must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"`pooling` must be one of {POOLING_MODES}, got {self.pooling!r}")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not (0.0 <= float(value) < 1.0):
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if not isinstance(self.use_relative_position_bias, bool):
            raise ValueError(f"`use_relative_position_bias` must be a bool, got {self.use_relative_position_bias!r}")
        if isinstance(self.layer_scale_init_value, bool) or not isinstance(self.layer_scale_init_value, (int, float)) \
                or self.layer_scale_init_value < 0:
            raise ValueError(
                f"`layer_scale_init_value` must be a float >= 0 (0 = no layer scale), got {self.layer_scale_init_value!r}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MAEConfig":
        """Build a named preset (see `MAE_PRESETS`), with field overrides, e.g. `num_labels=1000`."""
        if name not in MAE_PRESETS:
            raise ValueError(f"Unknown MAE preset {name!r}; expected one of {sorted(MAE_PRESETS)}")
        kwargs = copy.deepcopy(MAE_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def _mlp(width: int, ratio: float) -> int:
    return int(round(width * ratio))
