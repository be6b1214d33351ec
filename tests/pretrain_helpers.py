"""Helpers shared by the pretraining / data tests: small image datasets in both Hub layouts, and
running scripts/pretrain.py in-process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_mae.training.data import encode_image, write_parquet_shards, write_webdataset_shards


REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "scripts" / "pretrain.py"


def smooth_images(count: int, size: int = 40, seed: int = 0) -> list[tuple[bytes, int]]:
    """`count` JPEGs of smooth random colour fields (learnable by a tiny MAE), label = index."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        out.append((encode_image(image), index))
    return out


def write_dataset(root: Path, layout: str, count: int = 48, num_shards: int = 4, seed: int = 0) -> Path:
    examples = smooth_images(count, seed=seed)
    writer = write_parquet_shards if layout == "parquet" else write_webdataset_shards
    writer(examples, root, num_shards=num_shards)
    return root


def tiny_args(train_dir: Path, output_dir: Path, **overrides) -> list[str]:
    """Command-line flags for a tiny, fast CPU run."""
    values = dict(
        train_dir=train_dir,
        output_dir=output_dir,
        model_preset="mae-tiny",
        per_device_train_batch_size=4,
        dataloader_num_workers=0,
        shuffle_buffer_size=7,
        learning_rate=1e-3,
        num_warmup_steps=1,
        max_train_steps=6,
        checkpointing_steps=3,
        checkpoints_total_limit=2,
        mixed_precision="no",
        logging_steps=1,
        reconstruction_steps=0,
        num_reconstruction_images=2,
        report_to="none",
    )
    values.update(overrides)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_pretrain(argv: list[str], env: dict | None = None, launcher: list[str] | None = None, timeout: int = 300,
                 cwd=None):
    """Run scripts/pretrain.py in a subprocess (plain python, or under `launcher`), in `cwd` (the repository)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    full_env.update(env or {})
    cmd = (launcher or [sys.executable]) + [str(PRETRAIN)] + argv
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(cwd or REPO))


def import_pretrain():
    """scripts/pretrain.py as a module (its `main(argv)` runs in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mae_pretrain_script", PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def read_sample_ids(output_dir: Path, rank: int = 0) -> list[str]:
    path = Path(output_dir) / "sample_ids" / f"rank{rank}.txt"
    return path.read_text().splitlines()
