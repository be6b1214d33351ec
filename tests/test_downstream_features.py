"""Feature extraction: scripts/extract_features.py and the pipeline / MAEModel one-liners."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae import MAEConfig, MAEForPreTraining, MAEModel
from modeling_mae.training.classification_data import make_synthetic_classification
from modeling_mae.training.transforms import EvalTransform, normalize_on_device


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import extract_features  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "mae"
    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(path)
    return path


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_extract_features_writes_a_reloadable_dataset(model_dir, tmp_path, pooling):
    import datasets

    data = make_synthetic_classification(tmp_path / "data", num_per_class=3, size=36)  # 12 images, 4 classes
    out = tmp_path / "features"
    extract_features.main([
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--split", "train",
        "--pooling", pooling, "--per_device_eval_batch_size", "5", "--dataloader_num_workers", "0",
        "--eval_crop_pct", "1.0", "--output_dir", str(out),
    ])
    table = datasets.load_from_disk(str(out)).with_format("torch")
    assert table.column_names == ["features", "label", "id"]
    rows = table[:]
    assert rows["features"].shape == (12, 64) and rows["features"].dtype == torch.float32
    files = sorted(Path(data).rglob("*.png"))
    assert rows["id"] == [str(f) for f in files]  # the source file of each row
    assert rows["label"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert table.features["label"].names == sorted(p.name for p in Path(data).iterdir())
    # the same numbers as MAEModel(...).pooler_output on the same preprocessing (12 = 3 batches of 5, 5, 2)
    model = MAEModel.from_pretrained(model_dir, pooling=pooling).eval()
    pixels = torch.stack([EvalTransform(32, 1.0)(Image.open(f)) for f in files])
    with torch.no_grad():
        expected = model(normalize_on_device(pixels)).pooler_output
    torch.testing.assert_close(rows["features"], expected, atol=1e-5, rtol=1e-5)


def test_pipeline_one_liner(model_dir):
    """The documented `pipeline("image-feature-extraction", ..., trust_remote_code=True)` one-liner."""
    from transformers import pipeline

    extractor = pipeline("image-feature-extraction", model=str(model_dir), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tokens = np.array(extractor(image))
    pooled = np.array(extractor(image, pool=True))
    assert tokens.shape == (1, 1 + 64, 64)
    assert pooled.shape == (1, 64)
