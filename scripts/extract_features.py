#!/usr/bin/env python
"""Encoder features of a dataset, written as a `datasets` dataset on disk.

    python scripts/extract_features.py --model_name_or_path DIR_OR_HUB_ID_OR_PTH \
        --dataset_name ILSVRC/imagenet-1k --split validation --pooling cls \
        --per_device_eval_batch_size 256 --output_dir /data/mae_features/val

    import datasets
    table = datasets.load_from_disk("/data/mae_features/val").with_format("torch")[:]
    table["features"]  # (N, D) float32; table["label"] (N,) class ids (-1 without labels)
    table.features["label"].names   # the class names (a ClassLabel when the data has names)
    table["id"]        # the source file of each row (its path), or "<split>/<row index>" without one

`--dataset_name` takes a Hub id, a local folder (parquet / webdataset / images, as the training
scripts read them) or a directory written by `save_to_disk`. The encoder runs unmasked; `--pooling`
picks the features: "cls" (the normalised CLS token, the linear-probe features), "mean" (mean of the
patch tokens + fc_norm, the fine-tuning features; a pretraining checkpoint has no trained fc_norm, so
it is the identity-initialised LayerNorm) or unset (the model config's). Runs on one device (GPU when
there is one), batched, with a progress bar. `--split` names the split: a Hub split, or for a local
folder its sub-folder of that name (`data/val` for `--split val`; the folder itself when it has none).
Images are preprocessed as the exported image processor does (EXIF orientation, shorter side to
size / crop_pct, centre crop); an unreadable image is skipped, logged with its file name and counted,
and the run stops when more than `max_corrupt_fraction` of the split is unreadable. Images that are not
8-bit RGB (1 channel, 16 bit, N bands) are read in the checkpoint's pixel format, with its statistics (its
saved image processor, `pixels.resolve_pixel_path`); images unlike the checkpoint's stop the run in one line.

One-liners for a few images:

    from transformers import pipeline
    extractor = pipeline("image-feature-extraction", model="DIR_OR_HUB_ID", trust_remote_code=True)
    tokens = extractor("cat.jpg")            # (1, 1 + L, D) nested list: the encoder's output tokens
    pooled = extractor("cat.jpg", pool=True)  # (1, D): `pooler_output`

    from modeling_mae import MAEModel
    model = MAEModel.from_pretrained("DIR_OR_HUB_ID")
    features = model(pixel_values).pooler_output  # (N, D)
"""

from __future__ import annotations

import logging
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import POOLING_MODES


@dataclass(frozen=True)
class ExtractFeaturesConfig:
    """Encoder features of a dataset, saved with `datasets.Dataset.save_to_disk`."""

    model_name_or_path: str = option(
        "", help="MAE encoder: save_pretrained directory, Hub id or official .pth (required)", hub_or_path=True)
    # what the checkpoint's weights cannot say (official / timm files of other widths, a new resolution)
    num_attention_heads: Optional[int] = option(None, help="encoder heads; official widths 768/1024/1280 need none")
    decoder_num_attention_heads: Optional[int] = option(None, help="decoder heads (512-d decoder: 16)")
    image_size: Optional[int] = option(None, help="train at this resolution: position tables are interpolated")
    dataset_name: str = option("", help="Hub id, local folder or save_to_disk directory (required)")
    dataset_config_name: str | None = option(None, help="configuration name of the Hub dataset")
    split: str = option("validation", help="split to encode")
    image_column: str | None = option(None, help="image column; detected when unset")
    label_column: str | None = option(None, help="label column, copied beside the features; detected when unset")
    pooling: str | None = option(None, help="pooled feature; default: the model config's", choices=POOLING_MODES)
    eval_crop_pct: float = option(224 / 256, help="resize to size / crop_pct, then center crop")
    per_device_eval_batch_size: int = option(64, help="images per batch")
    dataloader_num_workers: int = option(4, help="DataLoader worker processes")
    max_samples: int | None = option(None, help="encode only the first N examples")
    max_corrupt_fraction: float = option(
        0.1, help="stop when more of the split than this share cannot be decoded")
    mixed_precision: str = option("no", help="autocast dtype of the encoder", choices=("no", "fp16", "bf16"))
    output_dir: str = option("features", help="where the datasets.Dataset of features is saved")

    def __post_init__(self):
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES} or unset, got {self.pooling!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.per_device_eval_batch_size < 1:
            raise ValueError(f"per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}")

    def check_required(self):
        for name in ("model_name_or_path", "dataset_name", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` is required")


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(ExtractFeaturesConfig, description=__doc__)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from modeling_mae import MAEModel  # noqa: E402
from modeling_mae.training.classification_data import (  # noqa: E402
    PROBE_IMAGES,
    MapImageDataset,
    UnreadableImages,
    describe_example,
    image_cells,
    label_lookup,
    load_map_dataset,
    split_label_names,
)
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.model_loading import (  # noqa: E402
    checkpoint_options,
    load_pretrained,
    read_image_processor_config,
)
from modeling_mae.training.pixels import resolve_pixel_path  # noqa: E402
from modeling_mae.training.transforms import normalize_on_device  # noqa: E402



logger = logging.getLogger("extract_features")


def feature_rows(model, loader, device, dtype, source, image_column, split, unreadable, normalize=normalize_on_device):
    """Yield one {"features", "label", "id"} row per readable example, computing features batch by
    batch; unreadable images (placeholders from `MapImageDataset`) are skipped and recorded. `normalize`: the
    run's (`pixels.PixelPath.normalize`; default ImageNet's for uint8 RGB)."""
    for pixel_values, labels, used, asked in tqdm(loader, desc="extracting features", unit="batch"):
        unreadable.record(used, asked)
        keep = used >= 0
        if not bool(keep.any()):
            continue
        pixels = normalize(pixel_values[keep].to(device, non_blocking=True))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pooled = model(pixels).pooler_output  # (B, D)
        pooled = pooled.float().cpu().numpy()
        for feature, label, index in zip(pooled, labels[keep].tolist(), used[keep].tolist()):
            yield {"features": feature, "label": label, "id": example_id(source, index, image_column, split)}


def example_id(source, index: int, image_column: str, split: str) -> str:
    """The source file of a row (its path), else "<split>/<row index>"."""
    value = source[int(index)][image_column]
    path = value.get("path") if isinstance(value, dict) else None
    return str(path) if path else f"{split}/{index}"


def main(argv=None):
    import datasets

    cfg = parse_config(ExtractFeaturesConfig, argv)
    cfg.check_required()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    print(to_yaml(cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    overrides = {"pooling": cfg.pooling} if cfg.pooling else {}
    model = load_pretrained(MAEModel, cfg.model_name_or_path, **overrides, **checkpoint_options(cfg)).to(device).eval()
    source, image_column, label_column = load_map_dataset(
        cfg.dataset_name, cfg.split, cfg.dataset_config_name, cfg.image_column, cfg.label_column
    )
    if cfg.max_samples is not None:
        source = source.select(range(min(cfg.max_samples, len(source))))
    # the checkpoint's pixels (channels, bit depth, statistics), checked against the split's first images
    cells, cell_names = image_cells(source, image_column, PROBE_IMAGES)
    pixel_path = resolve_pixel_path(read_image_processor_config(cfg.model_name_or_path), model.config.num_channels,
                                    cells, cell_names, checkpoint=f"the checkpoint {cfg.model_name_or_path}",
                                    data=f"the {cfg.split} images", can_adapt=False)
    logger.info("pixels: %s", pixel_path.describe())
    transform = pixel_path.eval_transform(model.config.image_hw, cfg.eval_crop_pct)
    names = split_label_names(source, label_column) if label_column else None
    lookup = label_lookup(source, label_column, names, cfg.split, cfg.split) if names else None
    dataset = MapImageDataset(source, transform, image_column, label_column, label_lookup=lookup,
                              pixel_format=pixel_path.array_format)
    unreadable = UnreadableImages(source, image_column, cfg.split, cfg.max_corrupt_fraction)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.per_device_eval_batch_size, num_workers=cfg.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )

    features = datasets.Features({
        "features": datasets.List(datasets.Value("float32"), length=model.config.hidden_size),
        "label": datasets.ClassLabel(names=names) if names else datasets.Value("int64"),
        "id": datasets.Value("string"),
    })
    Path(cfg.output_dir).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(cfg.output_dir).parent) as tmp:  # Arrow shards, then save_to_disk
        table = datasets.Dataset.from_generator(
            feature_rows, features=features, cache_dir=tmp, fingerprint=uuid.uuid4().hex,
            gen_kwargs={"model": model, "loader": loader, "device": device, "dtype": dtype, "source": source,
                        "image_column": image_column, "split": cfg.split, "unreadable": unreadable,
                        "normalize": pixel_path.normalize},
        )
        table.info.description = (
            f"MAE features of {cfg.dataset_name} ({cfg.split}) from {cfg.model_name_or_path}, "
            f"pooling={model.config.pooling}; {len(unreadable.indices)} unreadable image(s) skipped"
        )
        table.save_to_disk(cfg.output_dir)
    print(f"wrote {len(table)} rows of {model.config.hidden_size}-d features to {cfg.output_dir}"
          + (f"; skipped {len(unreadable.indices)} unreadable image(s): "
             + ", ".join(describe_example(source, i, image_column) for i in sorted(unreadable.indices)[:10])
             if unreadable.indices else ""))
    return cfg.output_dir


if __name__ == "__main__":
    sys.exit(run_main(main))
