#!/usr/bin/env python
"""Reconstruction pictures of a pretrained MAE: original | masked | reconstruction | + visible patches.

    python scripts/visualize.py --model_name_or_path DIR_OR_HUB_ID \
        --images photo.jpg,my_folder/ --mask_ratio 0.75 --mask_strategy random --seed 0 \
        --output_dir /tmp/recon
    python scripts/visualize.py --model_name_or_path mae_visualize_vit_large.pth \
        --dataset_name beans --split validation --num_images 8 --output_dir /tmp/recon

The model is a `save_pretrained` directory, a Hub id, or an official `.pth` checkpoint with its
decoder (converted on the fly by `modeling_mae.conversion`). Images come from files and folders
(`--images`, comma-separated) or a `datasets` dataset (`--dataset_name`: a Hub id, a local folder of
parquet / webdataset / images, or a directory written by `save_to_disk`). Each grid holds
`--images_per_grid` rows and is written as `{output_dir}/reconstruction_{k:03d}.png`, masked with
seed `--seed + k`. Models trained with norm_pix_loss are shown with each predicted patch
un-normalised by its original patch's statistics, and the caption says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from modeling_mae import MAEForPreTraining
from modeling_mae.configuration_mae import MASK_STRATEGIES
from modeling_mae.training.classification_data import load_map_dataset
from modeling_mae.training.config import parse_config, to_yaml
from modeling_mae.training.model_loading import checkpoint_options, load_pretrained
from modeling_mae.training.transforms import EvalTransform
from modeling_mae.training.visualization import save_reconstruction_png


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class VisualizeConfig:
    """Reconstruction grids of a pretrained MAE."""

    model_name_or_path: str = ""
    # what the checkpoint's weights cannot say (official / timm files of other widths, a new resolution)
    num_attention_heads: Optional[int] = None  # encoder heads; official widths 768/1024/1280 need none
    decoder_num_attention_heads: Optional[int] = None  # decoder heads (512-d decoder: 16)
    image_size: Optional[int] = None  # train at this resolution: position tables are interpolated
    images: list[str] = field(default_factory=list)  # image files and/or folders (searched recursively)
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    split: str = "validation"
    image_column: str | None = None  # detected when None (image, jpg, ...)
    num_images: int = 8  # images taken from the dataset / folders (all given files when 0)
    images_per_grid: int = 8
    mask_ratio: float | None = None  # default: the model config's
    mask_strategy: str | None = None  # random | block | grid; default: the model config's
    seed: int = 0
    eval_crop_pct: float = 1.0  # resize the shorter side to size / crop_pct, then center crop
    output_dir: str = "reconstructions"

    def __post_init__(self):
        if self.mask_strategy is not None and self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.images_per_grid < 1:
            raise ValueError(f"images_per_grid must be >= 1, got {self.images_per_grid}")

    def check_required(self):
        """Fields without a usable default (checked after the YAML and the command line are merged)."""
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required (a directory, a Hub id or an official .pth file)")
        if bool(self.images) == bool(self.dataset_name):
            raise ValueError(
                f"give exactly one image source: images (got {self.images!r}) or dataset_name "
                f"(got {self.dataset_name!r})"
            )


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive)."""
    files = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif entry.is_file():
            files.append(entry)
        else:
            raise ValueError(f"images: {entry} is neither a file nor a folder")
    if not files:
        raise ValueError(f"images: no image files found in {paths}")
    return files


def load_images(cfg: VisualizeConfig) -> list[Image.Image]:
    """The images to show, upright (EXIF orientation) and RGB; an unreadable one is skipped with a
    warning naming its file (or dataset row), never a crash."""
    from modeling_mae.training.classification_data import describe_example
    from modeling_mae.training.data import CorruptImageError, decode_image

    if cfg.images:
        files = image_files(cfg.images)
        cells = [(str(f), f) for f in (files[: cfg.num_images] if cfg.num_images > 0 else files)]
    else:
        source, image_column, _ = load_map_dataset(cfg.dataset_name, cfg.split, cfg.dataset_config_name,
                                                   cfg.image_column)
        count = min(len(source), cfg.num_images) if cfg.num_images > 0 else len(source)
        cells = [(describe_example(source, i, image_column), source[i][image_column]) for i in range(count)]
    images, skipped = [], []
    for name, cell in cells:
        try:
            images.append(decode_image(cell))
        except CorruptImageError as err:
            skipped.append(name)
            print(f"skipped an unreadable image: {name} ({err})", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) of {len(cells)}", file=sys.stderr)
    if not images:
        raise ValueError(f"none of the {len(cells)} images can be decoded: {skipped[:5]}")
    return images


def main(argv=None) -> list[Path]:
    cfg = parse_config(VisualizeConfig, argv)
    cfg.check_required()
    print(to_yaml(cfg))
    model = load_pretrained(MAEForPreTraining, cfg.model_name_or_path, **checkpoint_options(cfg)).eval()
    transform = EvalTransform(model.config.image_hw, crop_pct=cfg.eval_crop_pct)
    batch = torch.stack([transform(image) for image in load_images(cfg)])  # uint8 (N, 3, H, W)

    written = []
    for k, start in enumerate(range(0, len(batch), cfg.images_per_grid)):
        chunk = batch[start : start + cfg.images_per_grid]
        path = Path(cfg.output_dir) / f"reconstruction_{k:03d}.png"
        save_reconstruction_png(
            model, chunk, path, mask_ratio=cfg.mask_ratio, mask_strategy=cfg.mask_strategy, seed=cfg.seed + k
        )
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
