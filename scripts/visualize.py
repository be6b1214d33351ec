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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import MASK_STRATEGIES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")  # .npy: multi-band arrays


@dataclass(frozen=True)
class VisualizeConfig:
    """Reconstruction grids of a pretrained MAE."""

    model_name_or_path: str = option(
        "", help="MAEForPreTraining: save_pretrained directory, Hub id or official .pth (required)", hub_or_path=True)
    # what the checkpoint's weights cannot say (official / timm files of other widths, a new resolution)
    num_attention_heads: Optional[int] = option(None, help="encoder heads; official widths 768/1024/1280 need none")
    decoder_num_attention_heads: Optional[int] = option(None, help="decoder heads (512-d decoder: 16)")
    image_size: Optional[int] = option(None, help="train at this resolution: position tables are interpolated")
    images: list[str] = option([], help="image files and/or folders (searched recursively)")
    dataset_name: str | None = option(None, help="Hub id, local folder or save_to_disk directory, instead of images")
    dataset_config_name: str | None = option(None, help="configuration name of the Hub dataset")
    split: str = option("validation", help="split of dataset_name")
    image_column: str | None = option(None, help="image column; detected when unset (image, jpg, ...)")
    num_images: int = option(8, help="images taken from the dataset / folders (all given files when 0)")
    images_per_grid: int = option(8, help="rows per PNG grid")
    mask_ratio: float | None = option(None, help="fraction of patches removed; default: the model config's")
    mask_strategy: str | None = option(
        None, help="which patches are removed; default: the model config's", choices=MASK_STRATEGIES)
    seed: int = option(0, help="seed of the masks")
    eval_crop_pct: float = option(1.0, help="resize the shorter side to size / crop_pct, then center crop")
    output_dir: str = option("reconstructions", help="where the PNG grids go")


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


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(VisualizeConfig, description=__doc__)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_mae import MAEForPreTraining  # noqa: E402
from modeling_mae.training.classification_data import load_map_dataset  # noqa: E402
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.model_loading import (  # noqa: E402
    checkpoint_options,
    load_pretrained,
    read_image_processor_config,
)
from modeling_mae.training.pixels import resolve_pixel_path  # noqa: E402
from modeling_mae.training.visualization import save_reconstruction_png  # noqa: E402



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


def named_cells(cfg: VisualizeConfig) -> list[tuple[str, object]]:
    """(name, undecoded cell) of the images to show: the given files and folders, or the dataset's first ones."""
    from modeling_mae.training.classification_data import describe_example

    if cfg.images:
        files = image_files(cfg.images)
        cells = [(str(f), f) for f in (files[: cfg.num_images] if cfg.num_images > 0 else files)]
    else:
        source, image_column, _ = load_map_dataset(cfg.dataset_name, cfg.split, cfg.dataset_config_name,
                                                   cfg.image_column)
        count = min(len(source), cfg.num_images) if cfg.num_images > 0 else len(source)
        cells = [(describe_example(source, i, image_column), source[i][image_column]) for i in range(count)]
    return cells


def load_images(cfg: VisualizeConfig, cells=None, pixel_format=None) -> list:
    """The images to show: upright (EXIF orientation) RGB PIL images, or with a `pixel_format` (not 8-bit
    RGB) float (C, H, W) tensors scaled by the dataset's range; an unreadable one is skipped with a
    warning naming its file (or dataset row), never a crash."""
    from modeling_mae.training.data import CorruptImageError, decode_image
    from modeling_mae.training.pixels import load_float_pixels

    cells = named_cells(cfg) if cells is None else cells
    images, skipped = [], []
    for name, cell in cells:
        try:
            images.append(decode_image(cell) if pixel_format is None else load_float_pixels(cell, pixel_format, name))
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
    # the checkpoint's pixels (channels, bit depth, statistics), checked against the images'
    cells = named_cells(cfg)
    pixel_path = resolve_pixel_path(read_image_processor_config(cfg.model_name_or_path), model.config.num_channels,
                                    [c for _, c in cells[:8]], [n for n, _ in cells[:8]],
                                    checkpoint=f"the checkpoint {cfg.model_name_or_path}", data="the images",
                                    can_adapt=False)
    transform = pixel_path.eval_transform(model.config.image_hw, crop_pct=cfg.eval_crop_pct)
    images = load_images(cfg, cells, pixel_path.array_format)
    batch = torch.stack([transform(image) for image in images])  # uint8 (N, 3, H, W) or float (N, C, H, W)
    batch = pixel_path.normalize(batch)

    written = []
    for k, start in enumerate(range(0, len(batch), cfg.images_per_grid)):
        chunk = batch[start : start + cfg.images_per_grid]
        path = Path(cfg.output_dir) / f"reconstruction_{k:03d}.png"
        save_reconstruction_png(
            model, chunk, path, mask_ratio=cfg.mask_ratio, mask_strategy=cfg.mask_strategy, seed=cfg.seed + k,
            mean=pixel_path.mean, std=pixel_path.std,
        )
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
