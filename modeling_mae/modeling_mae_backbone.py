"""The MAE encoder as a transformers Backbone, and UperNet semantic segmentation on top of it.

Contract (transformers' `BackboneMixin`, as BEiT / ViTDet): stage names are "stem" (the embeddings) and
"stageK" (the output of block K, 1-based); `config.out_features` / `out_indices` select any of them, and
the backbone returns one (N, D, H/p, W/p) map per selected stage, with one `channels` entry each (D).
Default: the last block.

The paper transfers the pretrained encoder to ADE20K with UperNet (BEiT's segmentation setup), which
wants four scales. With `config.add_fpn=True` (BEiT's option of the same name) a simple feature pyramid
(BEiT / MAE segmentation; ViTDet's "simple feature pyramid") makes them from the selected maps:

    level  stride (p=16)  operation on the (N, D, H/p, W/p) map
    fpn1   4              ConvTranspose(2x2, s2) + BatchNorm + GELU + ConvTranspose(2x2, s2)
    fpn2   8              ConvTranspose(2x2, s2)
    fpn3   16             identity
    fpn4   32             MaxPool(2x2, s2)

- four stages -> one per level, in order. The MAE / BEiT UperNet setup takes blocks 4, 6, 8, 12 of
  ViT-B (`out_indices=[4, 6, 8, 12]`) and 8, 12, 16, 24 of ViT-L.
- one stage -> that map feeds all four levels (ViTDet's single-scale simple pyramid).
The backbone then returns the four levels, and `channels` has four entries (D each). Strides scale with
the patch size (ViT-H/14: 3.5, 7, 14, 28). The UperNet model below sets `add_fpn`.

Weights: the backbone wraps an `MAEModel` as `mae` (no final LayerNorm, no pooling), so its keys are
`mae.embeddings.*`, `mae.encoder.layer.{i}.*` as in `MAEForPreTraining` / `MAEForImageClassification`
(and `embeddings.*`, `encoder.*` of a bare `MAEModel` get the prefix added on load), plus, with
`add_fpn`, `pyramid.fpn1.*`, `pyramid.fpn2.*`. Any MAE checkpoint's encoder loads without missing encoder keys;
the pretraining decoder, final norms and classifier heads are ignored, and only the new `pyramid.*`
layers start from scratch.
Position embeddings keep the checkpoint's grid and are interpolated (bicubic) to each input size,
e.g. 14x14 -> 32x32 for 512x512 ADE20K crops; like fine-tuning, segmentation trains them.

`MAEUperNetConfig` / `MAEUperNetForSemanticSegmentation` are transformers' UperNet with the MAE
backbone built directly: their saved directories load with `trust_remote_code=True` where this package
is not installed (see their docstrings for why plain `UperNetForSemanticSegmentation` cannot).
In eval mode and without labels, the model's forward runs the test-time inference its config names
(`test_mode`: mmseg's sliding windows `test_crop_size` / `test_stride`, or the whole image padded to a
multiple of 2 x patch), the inference `scripts/segment.py` scores; `slide_inference` / `whole_inference`
below are the one implementation.

This file imports only torch, transformers and its siblings, so `save_pretrained` can ship it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, SemanticSegmenterOutput
from transformers.models.upernet.configuration_upernet import UperNetConfig
from transformers.models.upernet.modeling_upernet import (
    UperNetFCNHead,
    UperNetForSemanticSegmentation,
    UperNetHead,
    UperNetPreTrainedModel,
)

from .configuration_mae import PYRAMID_LEVELS, MAEConfig, check_pyramid_stages
from .modeling_mae import MAEModel, MAEPreTrainedModel


def tokens_to_map(hidden_state: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1 + rows * cols, D) block output -> (N, D, rows, cols) map of the patch tokens (CLS dropped)."""
    batch, _, dim = hidden_state.shape
    return hidden_state[:, 1:].transpose(1, 2).reshape(batch, dim, grid[0], grid[1])


class MAESimpleFeaturePyramid(nn.Module):
    """Four (N, D, rows, cols) maps -> (N, D, 4 rows, 4 cols), (N, D, 2 rows, 2 cols), (N, D, rows, cols),
    (N, D, rows / 2, cols / 2): strides p/4, p/2, p, 2p. Module names and layout follow the BEiT / MAE
    segmentation checkpoints (`fpn1.0`, `fpn1.1`, `fpn1.3`, `fpn2.0`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (self.fpn1(maps[0]), self.fpn2(maps[1]), self.fpn3(maps[2]), self.fpn4(maps[3]))


class MAEBackbone(BackboneMixin, MAEPreTrainedModel):
    """MAE encoder -> `BackboneOutput.feature_maps`: one (N, D, H/p, W/p) map per stage in
    `config.out_features`, or with `config.add_fpn` the four pyramid levels at strides p/4, p/2, p, 2p
    (see the module docstring). Accepts any input size divisible by the patch size.
    """

    # Fine-tuning trains the (interpolated) position table, as the classifier does.
    _train_position_embeddings = True

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        check_pyramid_stages(config.add_fpn, config.out_features)  # out_features may be set after the config
        self.num_features = [config.hidden_size] * len(config.stage_names)
        # The encoder without the final LayerNorm (dense heads read intermediate blocks) and without pooling.
        self.mae = MAEModel(config, add_pooling_layer=False, use_final_norm=False)
        self.pyramid = MAESimpleFeaturePyramid(config.hidden_size) if config.add_fpn else None
        self.post_init()

    # Any MAE checkpoint: the decoder, final norms and classification heads are not part of the backbone.
    _keys_to_ignore_on_load_unexpected = [
        r"^decoder\.",
        r"^(mae\.)?(layernorm|fc_norm)\.",
        r"^(head_norm|classifier)\.",
    ]

    @property
    def channels(self) -> list[int]:
        """Channels of each returned map: one entry per out_feature, or per pyramid level with `add_fpn`
        (UperNet reads this to size its head)."""
        if self.pyramid is None:
            return super().channels
        return [self.config.hidden_size] * PYRAMID_LEVELS

    def get_input_embeddings(self):
        return self.mae.embeddings.patch_embeddings

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, nn.ConvTranspose2d):  # the pyramid's upsampling, xavier like the patch projection
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def select_maps(self, hidden_states: tuple[torch.Tensor, ...], grid: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The stages in `out_features` as (N, D, rows, cols) maps, in stage order."""
        return tuple(
            tokens_to_map(hidden, grid)
            for name, hidden in zip(self.stage_names, hidden_states)
            if name in self.out_features
        )

    def build_pyramid(self, maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Selected maps -> the four pyramid levels; one map feeds every level."""
        return self.pyramid(list(maps) * PYRAMID_LEVELS if len(maps) == 1 else list(maps))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`(N, C, H, W)`): normalised images, H and W divisible by the patch size.
        Returns:
            `BackboneOutput` with `feature_maps`: one map (N, D, H / p, W / p) per out_feature, or with
            `add_fpn` 4 maps (N, D, H / s, W / s) for s = p/4, p/2, p, 2p; `hidden_states` (embeddings +
            every block, (N, 1 + L, D)) when asked for; `attentions` when asked for.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.mae(
            pixel_values,
            output_hidden_states=True,
            output_attentions=output_attentions,
            interpolate_pos_encoding=True,
            return_dict=True,
        )
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        feature_maps = self.select_maps(out.hidden_states, grid)
        if self.pyramid is not None:
            feature_maps = self.build_pyramid(feature_maps)
        hidden_states = out.hidden_states if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (feature_maps, hidden_states, out.attentions) if v is not None)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=out.attentions)


# --------------------------------------------------------------------------------------------------
# Test-time inference (mmsegmentation's `whole` / `slide` modes)
# --------------------------------------------------------------------------------------------------
TEST_MODES = ("slide", "whole")


def _pad_to(pixel_values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.pad(pixel_values, (0, width - pixel_values.shape[-1], 0, height - pixel_values.shape[-2]))


def whole_inference(model, pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """(1, 3, h, w) normalised -> (1, num_labels, h, w) logits; padded to a multiple of `multiple` for the model."""
    height, width = pixel_values.shape[-2:]
    padded = _pad_to(pixel_values, -(-height // multiple) * multiple, -(-width // multiple) * multiple)
    return model(pixel_values=padded).logits[..., :height, :width]


def slide_inference(model, pixel_values: torch.Tensor, crop: int, stride: int, batch_size: int = 8) -> torch.Tensor:
    """(1, 3, h, w) normalised -> (1, num_labels, h, w) logits averaged over crop x crop windows
    `stride` apart (the last window of a row / column is aligned to the border; smaller images are padded)."""
    height, width = pixel_values.shape[-2:]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    logits = counts = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        windows = torch.cat([_pad_to(pixel_values[..., y1:y2, x1:x2], crop, crop) for y1, y2, x1, x2 in chunk])
        out = model(pixel_values=windows).logits.float()
        if logits is None:
            logits = out.new_zeros(1, out.shape[1], height, width)
            counts = out.new_zeros(1, 1, height, width)
        for window_logits, (y1, y2, x1, x2) in zip(out, chunk):
            logits[0, :, y1:y2, x1:x2] += window_logits[:, : y2 - y1, : x2 - x1]
            counts[0, :, y1:y2, x1:x2] += 1
    return logits / counts


@dataclass
class MAESemanticSegmenterOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` plus `image_sizes` (N, 2): the (h, w) of each image's own logits in a
    batch padded to its largest image (`MAESegmentationImageProcessor.post_process_semantic_segmentation`
    leaves the rest out)."""

    image_sizes: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------
# UperNet with the MAE backbone, loadable as remote code
# --------------------------------------------------------------------------------------------------
class MAEUperNetConfig(UperNetConfig):
    """`UperNetConfig` whose `backbone_config` is always an `MAEConfig`.

    Why it exists: transformers resolves a `backbone_config` dict through its static model-type mapping
    (`consolidate_backbone_kwargs_to_config` -> `CONFIG_MAPPING[model_type]`), which knows "mae" only
    after `import modeling_mae` has registered it; sub-configs have no `auto_map`. This class builds
    the `MAEConfig` itself, so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works anywhere.

    The MAE / BEiT segmentation setup puts the simple feature pyramid between the encoder and UperNet:
    the default backbone config sets `add_fpn=True`, and so does a saved backbone config from before
    `add_fpn` existed (the pyramid was then always on, and its weights are in those checkpoints).

    Test-time inference (the model's forward in eval mode without labels; `scripts/segment.py` sets
    these from its `eval_mode`, `crop_size`, `eval_stride`, so the saved model infers as it was scored):
        test_mode: "whole" (the default: the image padded to a multiple of 2 x patch, which leaves a
            divisible input as the plain UperNet forward has it) or "slide" (mmseg's sliding windows).
        test_crop_size / test_stride: the sliding window and its step, pixels (mmseg's ADE20K: 512 / 341).
    """

    model_type = "mae_upernet"

    test_mode: str = "whole"
    test_crop_size: int = 512
    test_stride: int = 341

    def __post_init__(self, **kwargs):
        if self.test_mode not in TEST_MODES:
            raise ValueError(f"MAEUperNetConfig.test_mode must be one of {TEST_MODES}, got {self.test_mode!r}")
        if not 0 < self.test_stride <= self.test_crop_size:
            raise ValueError(f"MAEUperNetConfig.test_stride must be in (0, test_crop_size={self.test_crop_size}], "
                             f"got {self.test_stride}")
        if self.backbone_config is None:
            # ViT-B/16 with the MAE / BEiT ADE20K block selection
            self.backbone_config = MAEConfig(out_indices=[4, 6, 8, 12], add_fpn=True)
        elif isinstance(self.backbone_config, dict):
            backbone = dict(self.backbone_config)
            model_type = backbone.pop("model_type", MAEConfig.model_type)
            if model_type != MAEConfig.model_type:
                raise ValueError(
                    f"MAEUperNetConfig.backbone_config must be an MAE config (model_type "
                    f"{MAEConfig.model_type!r}), got model_type {model_type!r}"
                )
            backbone.setdefault("add_fpn", True)  # saved before `add_fpn` existed: the pyramid was always on
            self.backbone_config = MAEConfig.from_dict(backbone)
        elif not isinstance(self.backbone_config, MAEConfig):
            raise ValueError(
                f"MAEUperNetConfig.backbone_config must be an MAEConfig or a dict, got "
                f"{type(self.backbone_config).__name__}"
            )
        super().__post_init__(**kwargs)


class MAEUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """transformers' `UperNetForSemanticSegmentation` (same modules, keys and forward) with the
    `MAEBackbone` built directly instead of through `AutoBackbone`.

    Why it exists: the plain class calls `load_backbone` -> `AutoBackbone.from_config(backbone_config)`,
    which finds `MAEBackbone` only when `import modeling_mae` has registered it; it passes no
    `trust_remote_code` and a nested config carries no `auto_map`. Saved with this class, a directory
    holds `auto_map` + these files and loads with `AutoModelForSemanticSegmentation.from_pretrained(dir,
    trust_remote_code=True)` without this package, and with `UperNetForSemanticSegmentation.from_pretrained`
    where `modeling_mae` is imported.
    """

    config_class = MAEUperNetConfig

    def __init__(self, config: MAEUperNetConfig):
        UperNetPreTrainedModel.__init__(self, config)
        self.backbone = MAEBackbone(config.backbone_config)
        self.decode_head = UperNetHead(config, in_channels=self.backbone.channels)
        self.auxiliary_head = (
            UperNetFCNHead(config, in_channels=self.backbone.channels) if config.use_auxiliary_head else None
        )
        self.post_init()

    # ---- test-time inference -----------------------------------------------------------------------
    def infer_logits(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, num_labels, H, W) logits by `config.test_mode`, one image at a
        time on its own (h, w) = `image_sizes[i]` (default: all of it); padding beyond it stays 0."""
        plain = functools.partial(UperNetForSemanticSegmentation.forward, self)  # the UperNet forward, per window
        logits = None
        for i in range(pixel_values.shape[0]):
            height, width = (int(v) for v in image_sizes[i]) if image_sizes is not None else pixel_values.shape[-2:]
            image = pixel_values[i : i + 1, :, :height, :width]
            if self.config.test_mode == "slide":
                own = slide_inference(plain, image, self.config.test_crop_size, self.config.test_stride)
            else:
                own = whole_inference(plain, image, multiple=2 * self.config.backbone_config.patch_size)
            if logits is None:
                logits = own.new_zeros(pixel_values.shape[0], own.shape[1], *pixel_values.shape[-2:])
            logits[i, :, :height, :width] = own[0]
        return logits

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | SemanticSegmenterOutput:
        r"""
        Training, or with `labels`, hidden states or attentions asked for: transformers' UperNet forward.
        Otherwise (inference) the test-time inference of `config.test_mode` (`infer_logits`).

        Args:
            pixel_values (`(N, 3, H, W)`): normalised images.
            image_sizes (`(N, 2)`, optional): each image's (h, w) inside a padded batch, as
                `MAESegmentationImageProcessor` returns it.
        Returns:
            `MAESemanticSegmenterOutput` with `logits` (N, num_labels, H, W) and `image_sizes` at inference.
        """
        if self.training or labels is not None or output_attentions or output_hidden_states:
            return super().forward(pixel_values=pixel_values, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, labels=labels, return_dict=return_dict,
                                   **kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits = self.infer_logits(pixel_values, image_sizes)
        if not return_dict:
            return (logits,)
        if image_sizes is None:
            image_sizes = torch.tensor([list(pixel_values.shape[-2:])] * pixel_values.shape[0], dtype=torch.long,
                                       device=pixel_values.device)
        return MAESemanticSegmenterOutput(logits=logits, image_sizes=image_sizes)

    # ---- what optimizers and layer decay ask the model (timm's interface) ------------------------
    def no_weight_decay(self) -> set[str]:
        """CLS token and position table of the backbone (besides biases and norms)."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style groups: backbone embeddings = layer 0, encoder block i = layer i + 1; the pyramid
        and the UperNet heads are unmatched and so get the top layer id (BEiT's layer-decay rule)."""
        return dict(stem=r"^backbone\.mae\.embeddings", blocks=[(r"^backbone\.mae\.encoder\.layer\.(\d+)", None)])


__all__ = [
    "MAEBackbone",
    "MAESemanticSegmenterOutput",
    "MAESimpleFeaturePyramid",
    "MAEUperNetConfig",
    "MAEUperNetForSemanticSegmentation",
]
