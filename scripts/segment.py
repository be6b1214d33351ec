"""Semantic segmentation with a pretrained MAE encoder + UperNet (the paper's ADE20K transfer).

    accelerate launch scripts/segment.py --config configs/segment/ade20k_vit_base_upernet.yaml \
        --model_name_or_path PRETRAINED_MAE_DIR_OR_HUB_ID_OR_PTH
    python -m modeling_mae.training.segmentation_data /tmp/mae_seg_demo_data   # generated ADE-layout data
    python scripts/segment.py --config configs/segment/demo.yaml               # tiny CPU demo

One typed config (`SegmentConfig`: YAML + command-line overrides, flag names as in transformers'
`*_no_trainer` examples). The loop, top to bottom:

    model     MAEBackbone (blocks `out_indices` -> simple feature pyramid, strides 4/8/16/32) from any MAE
              checkpoint + transformers' UperNet head and auxiliary FCN head (MAEUperNetForSemanticSegmentation)
    data      `datasets` split (scene_parse_150 layout or ADEChallengeData2016 folders); ADE's 0 = "other"
              -> 255 (ignored), classes shifted down by one; random scale 0.5-2 of (2048, 512), 512 crop
              (no class > 75%), flip, photometric distortion; uint8 until the device
    optimize  AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay 0.65 (backbone blocks by depth, pyramid and
              heads at the top), linear warm-up then poly(1.0) = linear decay, per iteration
    evaluate  every `eval_steps`: sliding-window (512, stride 341) or whole-image inference on the resized
              image, logits resized to the annotation, mIoU / mAcc / aAcc from metrics/mean_iou; the steps
              are the exported image processor's and the model's forward (config `test_mode`), so
              `pipeline("image-segmentation")` on the export gives the reported mIoU
    persist   atomic checkpoints (`checkpointing_steps`, `--resume_from_checkpoint latest|PATH`); the best
              model by mIoU exported to `output_dir` (weights, code, image processor, model card),
              `--push_to_hub`

The paper's numbers (ADE20K, 160k iterations, batch 16): 48.1 mIoU with ViT-B, 53.6 with ViT-L.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import MODEL_PRESETS
from modeling_mae_cli.run_config import RunConfig, script_defaults


REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_MODES = ("slide", "whole")


@dataclass(frozen=True)
@script_defaults(per_device_train_batch_size=2, output_dir="outputs/mae-upernet-ade20k", checkpointing_steps=16000)
class SegmentConfig(RunConfig):
    """UperNet semantic segmentation on an MAE encoder (defaults: ViT-B/16 on ADE20K, 160k iterations; 2 images
    x 8 processes = 16 a step).

    Shared with every training script (`RunConfig`): the step (batch, accumulation, clipping, precision,
    compile, seed), checkpoints, logging and the Hub."""

    # ---- model -----------------------------------------------------------------------------------
    model_name_or_path: Optional[str] = option(
        None, help="any MAE checkpoint (directory, Hub id, official .pth) or a segmentation model", hub_or_path=True)
    model_preset: Optional[str] = option(
        None, help="random initialisation from an MAEConfig preset (tests / demo) when no checkpoint",
        choices=MODEL_PRESETS)
    # MAEConfig fields over the preset's ({num_hidden_layers: 4}) or the checkpoint's (an official .pth whose
    # width is not a published one: {num_attention_heads: 2}); a setting with its own field is set there
    model_config: dict = option(
        {}, help="MAEConfig fields over the preset's / checkpoint's (not those with a field here), e.g. '{num_hidden_layers: 4}'")
    out_indices: list[int] = option([4, 6, 8, 12], help="blocks feeding the pyramid's strides 4,8,16,32")
    add_fpn: bool = option(True, help="the simple feature pyramid (MAEConfig.add_fpn, as BEiT's); off: every block's map at stride p")
    drop_path_rate: float = option(0.1, help="stochastic depth rate of the last block (linear over depth)")
    # BEiT's relative position bias (zero-initialised, transfer-only) and layer scale (gammas starting at
    # this value; 0 = none), as mmsegmentation's MAE backbone: the ADE20K config turns both on
    use_relative_position_bias: bool = option(False, help="BEiT relative position bias per block (zero-initialised)")
    layer_scale_init_value: float = option(0.0, help="layer scale: per-channel gammas starting here; 0: none")
    decoder_hidden_size: int = option(768, help="UperNet channels (UperNetConfig.hidden_size)")
    use_auxiliary_head: bool = option(True, help="FCN auxiliary head on the third pyramid level")
    auxiliary_channels: int = option(256, help="channels of the auxiliary head")
    auxiliary_loss_weight: float = option(0.4, help="weight of the auxiliary head's loss")
    # ---- data ------------------------------------------------------------------------------------
    dataset_name: Optional[str] = option(
        "scene_parse_150", help="Hub id, local dataset directory or save_to_disk directory")
    dataset_config_name: Optional[str] = option(None, help="configuration name of the Hub dataset")
    data_dir: Optional[str] = option(None, help="ADEChallengeData2016 folder layout; used instead of dataset_name")
    train_split: str = option("train", help="split to train on")
    validation_split: str = option("validation", help="split to evaluate on")
    image_column_name: str = option("image", help="image column")
    label_column_name: str = option("annotation", help="segmentation map column")
    reduce_labels: bool = option(True, help="ADE20K: 0 ('other') -> 255 ignored, class c -> c - 1")
    num_labels: int = option(150, help="classes")
    id2label_file: Optional[str] = option(None, help="JSON {\"0\": \"wall\", ...}; names default to the ids")
    max_train_samples: Optional[int] = option(None, help="use only the first N training examples")
    max_eval_samples: Optional[int] = option(None, help="use only the first N validation examples")
    preprocessing_num_workers: int = option(4, help="DataLoader worker processes per training process")
    max_corrupt_fraction: float = option(
        0.1, help="stop when more than this share of the images read cannot be decoded")
    adapt_channels: bool = option(
        False, help="images unlike the checkpoint's (channels, bit depth): adapt the checkpoint to them, else stop")
    # ---- augmentation ----------------------------------------------------------------------------
    crop_size: int = option(512, help="training crop (pixels, square)")
    base_scale: list[int] = option([2048, 512], help="resize target long,short side before the random scale")
    scale_range: list[float] = option([0.5, 2.0], help="random scale range min,max")
    cat_max_ratio: float = option(0.75, help="re-draw a crop where one class covers more than this fraction")
    hflip: float = option(0.5, help="probability of a horizontal flip")
    photometric: bool = option(True, help="photometric distortion (brightness, contrast, saturation, hue)")
    # ---- optimization ----------------------------------------------------------------------------
    learning_rate: float = option(1e-4, help="peak learning rate (AdamW)")
    layer_decay: float = option(0.65, help="layer-wise lr decay in (0, 1]: block i gets lr x decay^(depth - i)")
    weight_decay: float = option(0.05, help="AdamW weight decay")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    max_train_steps: int = option(160000, help="optimizer steps to train")
    num_warmup_steps: int = option(1500, help="optimizer steps of linear warm-up")
    lr_scheduler_type: str = option(
        "linear", help="transformers scheduler name; linear = mmseg's poly with power 1")
    sync_batchnorm: bool = option(True, help="SyncBatchNorm in the pyramid / heads when running on several processes")
    # ---- evaluation ------------------------------------------------------------------------------
    eval_steps: Optional[int] = option(16000, help="evaluate every N optimizer steps (and at the end)")
    eval_mode: str = option("slide", help="sliding-window or whole-image inference", choices=EVAL_MODES)
    eval_stride: int = option(341, help="stride of the sliding window (pixels)")
    per_device_eval_batch_size: int = option(1, help="evaluation images per process per batch")
    mean_iou_path: str = option(str(REPO_ROOT / "metrics" / "mean_iou"), help="the mean_iou metric's folder")

    def __post_init__(self):
        super().__post_init__()
        if (self.model_name_or_path is None) == (self.model_preset is None):
            raise ValueError(
                f"give exactly one of `model_name_or_path` / `model_preset`; got {self.model_name_or_path!r} and "
                f"{self.model_preset!r}"
            )
        if self.dataset_name is None and self.data_dir is None:
            raise ValueError("give `dataset_name` or `data_dir`")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"`eval_mode` must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if not 0 < self.eval_stride <= self.crop_size:
            raise ValueError(f"`eval_stride` must be in (0, crop_size={self.crop_size}], got {self.eval_stride}")
        if len(self.base_scale) != 2 or len(self.scale_range) != 2:
            raise ValueError(
                f"`base_scale` and `scale_range` take two values each, got {self.base_scale} and {self.scale_range}"
            )
        for name in ("max_train_steps", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"`layer_decay` must be in (0, 1], got {self.layer_decay}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (user/name)")


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(SegmentConfig, description=__doc__)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch import nn  # noqa: E402

from modeling_mae import (  # noqa: E402
    MAEBackbone,
    MAEConfig,
    MAEModel,
    MAESegmentationImageProcessor,
    MAEUperNetConfig,
    MAEUperNetForSemanticSegmentation,
)
from modeling_mae.conversion.convert import interpolate_positions  # noqa: E402
from modeling_mae.file_modes import give_weights_usual_mode  # noqa: E402
from modeling_mae.modeling_mae import is_transfer_only, log_new_transfer_parameters  # noqa: E402
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.export import HubPushError, check_hub_access, push_to_hub  # noqa: E402
from modeling_mae.training.loop import TrainingLoop, compile_model, restore, start_run, start_trackers  # noqa: E402
from modeling_mae.training.model_loading import (  # noqa: E402
    adapt_to_pixel_path,
    checkpoint_format,
    checkpoint_options,
    is_official_checkpoint,
    load_pretrained,
    merge_model_config,
    read_config_json,
)
from modeling_mae.training.optim import create_optimizer, layer_decay_param_groups  # noqa: E402
from modeling_mae.training.runtime import GracefulStop, make_accelerator, resume_command  # noqa: E402
from modeling_mae.training.segmentation_data import (  # noqa: E402
    IGNORE_INDEX,
    SegEvalTransform,
    SegmentationDataset,
    segmentation_pixel_path,
    SegTrainTransform,
    collate_eval,
    collate_train,
    load_segmentation_split,
)
from modeling_mae.training.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402


logger = logging.getLogger("segment")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def label_names(cfg: SegmentConfig) -> dict[int, str]:
    if cfg.id2label_file is None:
        return {i: str(i) for i in range(cfg.num_labels)}
    names = {int(k): str(v) for k, v in json.loads(Path(cfg.id2label_file).read_text()).items()}
    if sorted(names) != list(range(cfg.num_labels)):
        raise ValueError(f"`id2label_file` must name classes 0..{cfg.num_labels - 1}, got ids {sorted(names)[:5]}...")
    return names


def transfer_options(cfg: SegmentConfig) -> dict:
    """MAEConfig fields the segmentation recipe sets on the pretrained encoder."""
    return dict(
        out_indices=list(cfg.out_indices),
        drop_path_rate=cfg.drop_path_rate,
        add_fpn=cfg.add_fpn,
        use_relative_position_bias=cfg.use_relative_position_bias,
        layer_scale_init_value=cfg.layer_scale_init_value,
    )


def encoder_overrides(cfg: SegmentConfig) -> dict:
    """MAEConfig overrides of the encoder: `model_config`, the transfer options and the checkpoint options;
    a setting given both in `model_config` and by its field is refused (`merge_model_config`)."""
    return merge_model_config(cfg.model_config, {**transfer_options(cfg), **checkpoint_options(cfg)})


def load_backbone(cfg: SegmentConfig) -> MAEBackbone:
    """The encoder of any MAE checkpoint (pretraining, encoder or classifier; ours, or converted on the fly
    from an official .pth, a transformers ViTMAE or a timm model: `load_pretrained`).

    Relative position tables and layer-scale gammas the checkpoint lacks start at zero and at
    `layer_scale_init_value` (logged once). With the relative position bias on, the backbone is rebuilt
    at the crop size, as mmsegmentation builds its MAE backbone at `img_size=(512, 512)`: the tables
    then train at the grid they are used at, and the position table is resized once here instead of
    at every forward."""
    overrides, transfer = encoder_overrides(cfg), transfer_options(cfg)
    fmt, _ = checkpoint_format(cfg.model_name_or_path)
    if fmt != "ours" or checkpoint_options(cfg):  # converted (or resized) as an MAEModel; move its blocks over
        encoder_only = {name: value for name, value in overrides.items() if name not in transfer}
        encoder = load_pretrained(MAEModel, cfg.model_name_or_path, **encoder_only)
        backbone = MAEBackbone(MAEConfig.from_dict({**encoder.config.to_dict(), "out_features": None, **transfer}))
        missing = backbone.mae.load_state_dict(encoder.state_dict(), strict=False).missing_keys
        missing = [k for k in missing if k not in log_new_transfer_parameters(missing, backbone.config)]
    else:
        backbone, info = MAEBackbone.from_pretrained(cfg.model_name_or_path, output_loading_info=True, **overrides)
        missing = [k for k in info["missing_keys"] if not k.startswith("pyramid.") and not is_transfer_only(k)]
    if missing:
        raise ValueError(f"{cfg.model_name_or_path!r} is not an MAE encoder checkpoint: missing {sorted(missing)[:5]}")
    if cfg.use_relative_position_bias:
        backbone = backbone_at_size(backbone, cfg.crop_size)
    return backbone


def backbone_at_size(backbone: MAEBackbone, image_size: int) -> MAEBackbone:
    """The same backbone built for `image_size` inputs: position and relative position tables resized."""
    source_grid = backbone.config.grid_size
    config = MAEConfig.from_dict({**backbone.config.to_dict(), "image_size": image_size, "out_features": None,
                                  "out_indices": list(backbone.config.out_indices)})
    if config.grid_size == source_grid:
        return backbone
    resized = MAEBackbone(config)
    resized.load_state_dict(interpolate_positions(backbone.state_dict(), source_grid, config.grid_size), strict=True)
    resized.set_position_embeddings_trainable()
    return resized


def build_model(cfg: SegmentConfig) -> MAEUperNetForSemanticSegmentation:
    id2label = label_names(cfg)
    labels = dict(num_labels=cfg.num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    heads = dict(
        hidden_size=cfg.decoder_hidden_size,
        use_auxiliary_head=cfg.use_auxiliary_head,
        auxiliary_channels=cfg.auxiliary_channels,
        auxiliary_loss_weight=cfg.auxiliary_loss_weight,
        loss_ignore_index=IGNORE_INDEX,
    )
    inference = inference_options(cfg)
    if cfg.model_preset is not None:
        backbone_config = MAEConfig.from_preset(cfg.model_preset, **encoder_overrides(cfg))
        return MAEUperNetForSemanticSegmentation(
            MAEUperNetConfig(backbone_config=backbone_config, **heads, **labels, **inference))
    if not is_official_checkpoint(cfg.model_name_or_path):
        if read_config_json(cfg.model_name_or_path).get("model_type") in ("mae_upernet", "upernet"):
            return MAEUperNetForSemanticSegmentation.from_pretrained(cfg.model_name_or_path, **labels, **inference)
    backbone = load_backbone(cfg)
    model = MAEUperNetForSemanticSegmentation(
        MAEUperNetConfig(backbone_config=backbone.config, **heads, **labels, **inference))
    model.backbone = backbone  # the pretrained encoder replaces the random one; pyramid and heads are new
    return model


def inference_options(cfg: SegmentConfig) -> dict:
    """MAEUperNetConfig fields of the evaluation's inference: the model's forward runs it, here and when exported."""
    return dict(test_mode=cfg.eval_mode, test_crop_size=cfg.crop_size, test_stride=cfg.eval_stride)


def image_processor(cfg: SegmentConfig, pixel_path=None) -> MAESegmentationImageProcessor:
    """The evaluation's pre- and post-processing, saved with the model: keep-ratio rescale to fit
    `base_scale`, the run's pixel format and mean / std (`pixel_path`; default 8-bit RGB with ImageNet's),
    ADE's label reduction, logits resized to the image before the argmax."""
    pixels = {} if pixel_path is None else dict(
        num_channels=pixel_path.format.num_channels, pixel_dtype=pixel_path.format.dtype,
        pixel_range=list(pixel_path.format.value_range))
    return MAESegmentationImageProcessor(
        scale=list(cfg.base_scale),
        image_mean=list(IMAGENET_DEFAULT_MEAN if pixel_path is None else pixel_path.mean),
        image_std=list(IMAGENET_DEFAULT_STD if pixel_path is None else pixel_path.std),
        do_reduce_labels=cfg.reduce_labels,
        ignore_index=IGNORE_INDEX,
        **pixels,
    )


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def load_mean_iou(path: str):
    """The steps of the local `evaluate` module metrics/mean_iou (the same code `evaluate.load(path)` runs)."""
    file = Path(path) / "mean_iou.py"
    if not file.is_file():
        raise ValueError(f"`mean_iou_path` must be a directory holding mean_iou.py, got {path!r}")
    spec = importlib.util.spec_from_file_location("mae_local_mean_iou", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def evaluate(model, dataset, accelerator, cfg: SegmentConfig, mean_iou, processor=None) -> dict:
    """mIoU / mAcc / aAcc over `dataset`: each process predicts its own share of the images and sums
    the per-class areas (`intersect_and_union`); one all-reduce adds them up.

    Every step is the exported model's and image processor's (the dataset's resize is the processor's
    `resize_uint8`, the model's forward runs `test_mode` inference, the processor resizes the logits to
    the annotation and takes the argmax), so `pipeline("image-segmentation")` on the export scores the same.
    `processor`: the run's (`image_processor(cfg, pixel_path)`); default the 8-bit RGB one."""
    model.eval()
    processor = processor or image_processor(cfg)
    shard = torch.utils.data.Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=cfg.per_device_eval_batch_size,
        collate_fn=collate_eval,
        num_workers=cfg.preprocessing_num_workers,
    )
    areas = torch.zeros(4, cfg.num_labels, dtype=torch.float64, device=accelerator.device)
    skipped = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        skipped += batch["num_skipped"]
        for pixels, label in zip(batch["pixel_values"], batch["labels"]):
            pixel_values = processor.normalize(pixels[None].to(accelerator.device))  # uint8 or float pixels
            with accelerator.autocast():
                outputs = model(pixel_values=pixel_values)  # eval mode: the config's slide / whole inference
            prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[tuple(label.shape)])
            prediction = prediction[0].cpu().numpy()
            parts = mean_iou.intersect_and_union(prediction, label.numpy(), cfg.num_labels, IGNORE_INDEX)
            areas += torch.from_numpy(np.stack(parts)).to(areas)
    areas = accelerator.reduce(areas, reduction="sum").cpu().numpy()
    num_skipped = int(accelerator.reduce(skipped, reduction="sum"))
    if num_skipped > cfg.max_corrupt_fraction * len(dataset):
        raise ValueError(f"{num_skipped} of the {len(dataset)} evaluation images cannot be decoded, more than "
                         f"max_corrupt_fraction={cfg.max_corrupt_fraction}")
    model.train()
    results = mean_iou.metrics_from_areas(*areas)
    per_class = [None if np.isnan(v) else float(v) for v in results["per_category_iou"]]  # None: class absent
    return {**{k: v for k, v in results.items() if not isinstance(v, np.ndarray)}, "per_category_iou": per_class,
            "num_unreadable": num_skipped}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
MODEL_CARD = """---
{{ card_data }}
---

# {{ model_name }}

UperNet semantic segmentation on a masked-autoencoder (MAE, [He et al., 2021](https://arxiv.org/abs/2111.06377))
ViT encoder, fine-tuned with `scripts/segment.py` of modeling_mae on **{{ dataset }}**: the encoder's blocks
{{ out_indices }} feed a simple feature pyramid (strides {{ strides }}) and transformers' UperNet head.

| | |
|---|---|
| best mIoU | {{ best_miou }} (step {{ best_step }}) |
| mean accuracy / overall accuracy | {{ best_macc }} / {{ best_aacc }} |
| aAcc / mIoU / mAcc (%, as mmsegmentation reports) | {{ best_aacc_pct }} / {{ best_miou_pct }} / {{ best_macc_pct }} |
| evaluation | {{ eval_mode }}, crop {{ crop_size }} |
| training | {{ steps }} iterations, batch {{ effective_batch }}, lr {{ lr }}, layer decay {{ layer_decay }} |

The saved image processor and model run the evaluation that gave these numbers: the image rescaled
(aspect ratio kept) to fit {{ test_scale }}, `test_mode: {{ eval_mode }}` inference (sliding windows are
{{ crop_size }} pixels, {{ eval_stride }} apart), the logits resized to the image before the argmax.
{{ pixels_note }}
```python
import torch
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

segmenter = pipeline("image-segmentation", model="{{ repo_id }}", trust_remote_code=True)
masks = segmenter(image)  # [{"label": ..., "mask": PIL image of the input's size}, ...]

processor = AutoImageProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained("{{ repo_id }}", trust_remote_code=True).eval()
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
```

Per-class IoU at the best step (%; "-" = class in neither predictions nor annotations):

| class | IoU |
|---|---|
{{ per_class_rows }}

The resolved run config:

```yaml
{{ config_yaml }}```
"""


def export(model, accelerator, cfg: SegmentConfig, card_values: dict, processor=None) -> None:
    """Weights + config + modeling code (remote-code loadable), image processor, model card."""
    from huggingface_hub import ModelCard, ModelCardData

    if not accelerator.is_main_process:
        return
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.sync_batchnorm and accelerator.num_processes > 1:
        unwrapped = revert_sync_batchnorm(unwrapped)
    unwrapped.save_pretrained(out)
    give_weights_usual_mode(out)  # safetensors writes 0600; every other file is 0644 (umask)
    processor = processor or image_processor(cfg)
    processor.save_pretrained(out)
    low, high = processor.pixel_range
    pixels_note = "" if processor.is_rgb8 else (
        f"\nInput pixels: {processor.num_channels} channel(s) of {processor.pixel_dtype}, scaled from [{low:g}, {high:g}] "
        f"to [0, 1], mean {processor.image_mean}, std {processor.image_std}. transformers' segmentation pipeline "
        f"converts images to 8-bit RGB and takes no arrays: give the processor below the image as a numpy array "
        f"(`np.load(\"scene.npy\")`, `np.asarray(Image.open(\"scan.png\"))`), with `target_sizes=[image.shape[:2]]`.\n")
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-segmentation",
        tags=["mae", "upernet", "semantic-segmentation"], datasets=[cfg.dataset_name] if cfg.data_dir is None else None,
    )
    card = ModelCard.from_template(
        data, template_str=MODEL_CARD, model_name=Path(cfg.hub_model_id or cfg.output_dir).name,
        dataset=cfg.data_dir or cfg.dataset_name, out_indices=list(cfg.out_indices), eval_mode=cfg.eval_mode,
        strides=", ".join(f"{s:g}" for s in pyramid_strides(unwrapped)), crop_size=cfg.crop_size,
        eval_stride=cfg.eval_stride, test_scale=tuple(cfg.base_scale),
        lr=cfg.learning_rate, layer_decay=cfg.layer_decay, num_labels=cfg.num_labels,
        repo_id=cfg.hub_model_id or cfg.output_dir, config_yaml=to_yaml(cfg), pixels_note=pixels_note, **card_values,
    )
    card.save(out / "README.md")


def per_class_rows(per_class_iou: list, names: dict[int, str]) -> str:
    """Markdown rows `| name | IoU % |` for the model card."""
    return "\n".join(
        f"| {names.get(i, i)} | {'-' if iou is None else f'{100 * iou:.2f}'} |" for i, iou in enumerate(per_class_iou)
    )


def pyramid_strides(model) -> list[float]:
    backbone = model.config.backbone_config
    patch = backbone.patch_size
    if not backbone.add_fpn:  # one map per selected block, all at the patch stride
        return [patch] * len(backbone.out_indices)
    return [patch / 4, patch / 2, patch, patch * 2]


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm (training on several processes) -> BatchNorm2d, so the saved model runs anywhere."""
    import copy

    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.SyncBatchNorm):
                bn = nn.BatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                bn.load_state_dict(child.state_dict())
                setattr(parent, name, bn.to(child.weight.device))
    return model


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def load_splits(cfg: SegmentConfig):
    """(train, evaluation) map-style splits, images and label maps undecoded."""
    source = dict(dataset_name=None if cfg.data_dir else cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                  data_dir=cfg.data_dir, token=cfg.hub_token)
    train_split = load_segmentation_split(cfg.train_split, **source)
    eval_split = load_segmentation_split(cfg.validation_split, **source)
    if cfg.max_train_samples is not None:
        train_split = train_split.select(range(min(cfg.max_train_samples, len(train_split))))
    if cfg.max_eval_samples is not None:
        eval_split = eval_split.select(range(min(cfg.max_eval_samples, len(eval_split))))
    return train_split, eval_split


def load_datasets(cfg: SegmentConfig, train_split, eval_split, pixel_path) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, evaluation) sets of the run's pixels (uint8, or float for other formats) and label maps, the
    training set augmented per (seed, epoch, index)."""
    columns = dict(
        image_column=cfg.image_column_name, label_column=cfg.label_column_name, reduce_labels=cfg.reduce_labels,
        num_labels=cfg.num_labels, pixel_format=pixel_path.array_format,
    )
    train_set = SegmentationDataset(
        train_split,
        SegTrainTransform(cfg.crop_size, tuple(cfg.base_scale), tuple(cfg.scale_range), cfg.cat_max_ratio, cfg.hflip,
                          cfg.photometric),
        train=True, seed=cfg.seed, **columns,
    )
    eval_set = SegmentationDataset(eval_split, SegEvalTransform(tuple(cfg.base_scale)), train=False, **columns)
    return train_set, eval_set


def best_model_card(results: dict, step: int, effective_batch: int, cfg: SegmentConfig) -> dict:
    """The model card's values of an evaluation."""
    return dict(
        best_miou=f"{results['mean_iou']:.4f}", best_step=step, best_macc=f"{results['mean_accuracy']:.4f}",
        best_aacc=f"{results['overall_accuracy']:.4f}", steps=step, effective_batch=effective_batch,
        best_aacc_pct=f"{results['aAcc']:.2f}", best_miou_pct=f"{results['mIoU']:.2f}",
        best_macc_pct=f"{results['mAcc']:.2f}",
        per_class_rows=per_class_rows(results["per_category_iou"], label_names(cfg)),
    )


class TrainingWindow:
    """What the log line reports about the steps since the last one: images / s, unreadable images."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.skipped = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # this process's, on the device
        self.reset()

    def reset(self) -> None:
        self.start, self.images = time.perf_counter(), 0
        self.skipped.zero_()

    def add(self, batch: dict) -> None:
        self.skipped += batch["num_skipped"]  # unreadable training images replaced by the next readable ones
        self.images += batch["pixel_values"].shape[0] * self.accelerator.num_processes

    def close(self, state: dict, step: int, effective_batch: int, max_corrupt_fraction: float) -> float:
        """Images / s of the window; the run's unreadable reads added up (a collective) and checked."""
        images_per_s = self.images / max(time.perf_counter() - self.start, 1e-9)
        state["unreadable_train_reads"] = state.get("unreadable_train_reads", 0) + int(
            self.accelerator.reduce(self.skipped, reduction="sum"))
        read = step * effective_batch
        if state["unreadable_train_reads"] > max_corrupt_fraction * read:
            raise ValueError(f"{state['unreadable_train_reads']} of the {read} training images read could not "
                             f"be decoded, more than max_corrupt_fraction={max_corrupt_fraction}")
        self.reset()
        return images_per_s


def main(argv=None) -> dict:
    cfg = parse_config(SegmentConfig, argv, description=__doc__)
    if cfg.push_to_hub:  # the login and the repository now, not after training
        check_hub_access(cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private_repo)
    accelerator, checkpoints, resume = start_run(cfg, make_accelerator)
    # Map-style training data: every process must take the same number of steps (DDP), so the last
    # round is padded as accelerate does by default. Evaluation shards its images by hand (no padding).
    accelerator.even_batches = True
    set_seed(cfg.seed)

    # ---- model and data --------------------------------------------------------------------------
    model = build_model(cfg)
    patch = model.config.backbone_config.patch_size
    if cfg.crop_size % (2 * patch):
        raise ValueError(f"`crop_size` ({cfg.crop_size}) must be a multiple of 2 x patch_size ({2 * patch})")
    train_split, eval_split = load_splits(cfg)
    # the checkpoint's pixels (channels, bit depth, statistics), checked against the data's
    pixel_path = segmentation_pixel_path(cfg.model_name_or_path, model.config.backbone_config.num_channels,
                                         train_split, cfg.image_column_name, cfg.hub_token,
                                         progress=accelerator.is_main_process, adapt_channels=cfg.adapt_channels)
    logger.info("pixels: %s", pixel_path.describe())
    model = adapt_to_pixel_path(model, pixel_path)  # the backbone's patch projection, when adapting
    if cfg.sync_batchnorm and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not pixel_path.is_rgb8 and cfg.photometric:
        logger.info("photometric distortion on %d channel(s) of %s: brightness and contrast of the float pixels "
                    "(saturation and hue need colour)", pixel_path.format.num_channels, pixel_path.format.dtype)
    normalize_on_device = pixel_path.normalize  # uint8 or float batch -> normalised with the run's mean / std
    processor = image_processor(cfg, pixel_path)  # the evaluation's pre- and post-processing, exported
    train_set, eval_set = load_datasets(cfg, train_split, eval_split, pixel_path)
    sampler_generator = torch.Generator()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.per_device_train_batch_size, drop_last=True,
        sampler=torch.utils.data.RandomSampler(train_set, generator=sampler_generator),
        collate_fn=collate_train, num_workers=cfg.preprocessing_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    # ---- AdamW over layer-wise lr-decayed groups (fused on GPUs: built on the device), schedule ------
    from transformers import get_scheduler

    model.to(accelerator.device)
    groups = layer_decay_param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.layer_decay)
    optimizer = create_optimizer(groups, cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.num_warmup_steps, cfg.max_train_steps)
    compile_model(model, cfg.torch_compile)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    accelerator.register_for_checkpointing(scheduler)
    steps_per_epoch = len(train_loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training split ({len(train_set)} images) is smaller than one optimizer step "
            f"({cfg.per_device_train_batch_size} x {accelerator.num_processes} x {cfg.gradient_accumulation_steps})"
        )
    mean_iou = load_mean_iou(cfg.mean_iou_path)
    state = {"step": 0, "best_miou": None, "best_step": None, "best": {}, "history": []}
    restore(accelerator, checkpoints, resume, state)
    start_trackers(accelerator, cfg, "segment")
    effective_batch = cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    logger.info(
        "%d training images, %d evaluation images; %d steps of batch %d (%d steps per epoch)",
        len(train_set), len(eval_set), cfg.max_train_steps, effective_batch, steps_per_epoch,
    )

    # ---- train: the loop calls these ------------------------------------------------------------
    window = TrainingWindow(accelerator)

    def micro_batches(epoch: int, skip: int):
        model.train()
        sampler_generator.manual_seed(cfg.seed * 100_003 + epoch)  # the same permutation on every process, every run
        train_set.set_epoch(epoch)  # augmentation seeded from (seed, epoch, index)
        return accelerator.skip_first_batches(train_loader, skip) if skip else train_loader

    def loss_of(batch: dict):
        window.add(batch)
        return model(pixel_values=normalize_on_device(batch["pixel_values"]), labels=batch["labels"]).loss

    def on_log(step: int, logs: dict):
        logs["train/images_per_s"] = window.close(state, step, effective_batch, cfg.max_corrupt_fraction)
        logger.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s", step, cfg.max_train_steps, logs["train/loss"],
                    logs["train/lr"], logs["train/images_per_s"])
        state.setdefault("train_loss", []).append([step, logs["train/loss"]])

    def evaluate_and_keep_best(step: int):
        results = evaluate(model, eval_set, accelerator, cfg, mean_iou, processor)
        state["history"].append({"step": step, **results})
        logger.info("step %d: mIoU %.4f  mAcc %.4f  aAcc %.4f%s", step, results["mean_iou"],
                    results["mean_accuracy"], results["overall_accuracy"],
                    f"  ({results['num_unreadable']} unreadable images skipped)" if results["num_unreadable"] else "")
        accelerator.log({f"eval/{k}": v for k, v in results.items() if not isinstance(v, list)}, step=step)
        if state["best_miou"] is None or results["mean_iou"] > state["best_miou"]:
            state.update(best_miou=results["mean_iou"], best_step=step, best=results)
            export(model, accelerator, cfg, card_values=best_model_card(results, step, effective_batch, cfg),
                   processor=processor)

    TrainingLoop(
        accelerator, model, optimizer, scheduler, cfg, state=state, steps_per_epoch=steps_per_epoch,
        max_steps=cfg.max_train_steps, micro_batches=micro_batches, loss_of=loss_of, on_log=on_log,
        eval_steps=cfg.eval_steps, evaluate=evaluate_and_keep_best, checkpoints=checkpoints,
        save=lambda: checkpoints.save(accelerator, state["step"], trainer_state=dict(state), config_yaml=to_yaml(cfg)),
        stop=GracefulStop(accelerator, resume_command(__file__, argv, accelerator.num_processes)),
    ).run(start_epoch=state["step"] // steps_per_epoch)
    return finish(accelerator, cfg, state)


def finish(accelerator, cfg: SegmentConfig, state: dict) -> dict:
    """eval_results.json (the best step's and every evaluation's results, the logged losses) and the Hub push;
    the best model is already exported."""
    summary = {"step": state["step"], "best_step": state["best_step"], "best": state["best"],
               "history": state["history"], "train_loss": state.get("train_loss", []),
               "unreadable_train_reads": state.get("unreadable_train_reads", 0)}
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "eval_results.json").write_text(json.dumps(summary, indent=2))
        logger.info("best mIoU %.4f at step %s; model in %s", state["best_miou"], state["best_step"], cfg.output_dir)
    accelerator.wait_for_everyone()
    if cfg.push_to_hub and accelerator.is_main_process:
        try:
            url = push_to_hub(cfg.output_dir, cfg.hub_model_id, cfg.hub_include_checkpoints, cfg.hub_private_repo,
                              cfg.hub_token, commit_message="Upload MAE + UperNet semantic segmentation (modeling_mae)")
            logger.info("pushed to %s", url)
        except HubPushError as err:
            logger.error("%s", err)
            raise
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
