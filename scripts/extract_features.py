#!/usr/bin/env python
"""Encoder features of a dataset, written as a `datasets` dataset on disk.

    python scripts/extract_features.py --model_name_or_path DIR_OR_HUB_ID_OR_PTH \
        --dataset_name ILSVRC/imagenet-1k --split validation --pooling cls \
        --per_device_eval_batch_size 256 --output_dir /data/mae_features/val

    import datasets
    table = datasets.load_from_disk("/data/mae_features/val").with_format("torch")[:]
    table["features"]  # (N, D) float32; table["label"] (N,) (-1 without labels); table["id"] (N,) row index

`--dataset_name` takes a Hub id, a local folder (parquet / webdataset / images, as the training
scripts read them) or a directory written by `save_to_disk`. The encoder runs unmasked; `--pooling`
picks the features: "cls" (the normalised CLS token, the linear-probe features), "mean" (mean of the
patch tokens + fc_norm, the fine-tuning features; a pretraining checkpoint has no trained fc_norm, so
it is the identity-initialised LayerNorm) or unset (the model config's). Runs on one device (GPU when
there is one), batched, with a progress bar.

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

import tempfile
import uuid
import sys
from dataclasses import dataclass
from pathlib import Path

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import POOLING_MODES


@dataclass(frozen=True)
class ExtractFeaturesConfig:
    """Encoder features of a dataset, saved with `datasets.Dataset.save_to_disk`."""

    model_name_or_path: str = option(
        "", help="MAE encoder: save_pretrained directory, Hub id or official .pth (required)", hub_or_path=True)
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
from modeling_mae.training.classification_data import MapImageDataset, load_map_dataset  # noqa: E402
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.model_loading import load_pretrained  # noqa: E402
from modeling_mae.training.transforms import EvalTransform, normalize_on_device  # noqa: E402


def feature_rows(model, loader, device, dtype):
    """Yield one {"features", "label", "id"} row per example, computing features batch by batch."""
    for pixel_values, labels, ids in tqdm(loader, desc="extracting features", unit="batch"):
        pixels = normalize_on_device(pixel_values.to(device, non_blocking=True))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pooled = model(pixels).pooler_output  # (B, D)
        pooled = pooled.float().cpu().numpy()
        for feature, label, index in zip(pooled, labels.tolist(), ids.tolist()):
            yield {"features": feature, "label": label, "id": index}


def main(argv=None):
    import datasets

    cfg = parse_config(ExtractFeaturesConfig, argv)
    cfg.check_required()
    print(to_yaml(cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    overrides = {"pooling": cfg.pooling} if cfg.pooling else {}
    model = load_pretrained(MAEModel, cfg.model_name_or_path, **overrides).to(device).eval()
    source, image_column, label_column = load_map_dataset(
        cfg.dataset_name, cfg.split, cfg.dataset_config_name, cfg.image_column, cfg.label_column
    )
    if cfg.max_samples is not None:
        source = source.select(range(min(cfg.max_samples, len(source))))
    transform = EvalTransform(model.config.image_hw, cfg.eval_crop_pct)
    dataset = MapImageDataset(source, transform, image_column, label_column)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.per_device_eval_batch_size, num_workers=cfg.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )

    features = datasets.Features({
        "features": datasets.List(datasets.Value("float32"), length=model.config.hidden_size),
        "label": datasets.Value("int64"),
        "id": datasets.Value("int64"),
    })
    Path(cfg.output_dir).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(cfg.output_dir).parent) as tmp:  # Arrow shards, then save_to_disk
        table = datasets.Dataset.from_generator(
            feature_rows, features=features, cache_dir=tmp, fingerprint=uuid.uuid4().hex,
            gen_kwargs={"model": model, "loader": loader, "device": device, "dtype": dtype},
        )
        table.info.description = (
            f"MAE features of {cfg.dataset_name} ({cfg.split}) from {cfg.model_name_or_path}, "
            f"pooling={model.config.pooling}"
        )
        table.save_to_disk(cfg.output_dir)
    print(f"wrote {len(table)} rows of {model.config.hidden_size}-d features to {cfg.output_dir}")
    return cfg.output_dir


if __name__ == "__main__":
    sys.exit(run_main(main))
