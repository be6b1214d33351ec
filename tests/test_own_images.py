"""Fine-tuning on your own labelled folder (issue 15): labels matched by class name, a feature cache
that is never stale, unreadable images skipped and counted in every script, EXIF orientation and one
preprocessing for training, evaluation and the exported model, and what the user sees (log, card,
messages)."""

import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.image_processing_mae import MAEImageProcessor
from modeling_mae.training.classification_data import (
    MapImageDataset,
    build_classification_loaders,
    load_classification_splits,
    report_class_balance,
)
from modeling_mae.training.data import decode_image
from modeling_mae.training.evaluation import evaluate_classifier
from modeling_mae.training.transforms import EvalTransform, TrainTransform, normalize_on_device


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import extract_features  # noqa: E402
import finetune  # noqa: E402
import linprobe  # noqa: E402


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def solid(path: Path, colour: str, size=(20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def colour_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    """root/<class>/<i>.png, one solid-colour image per entry of layout[class]."""
    for name, colours in layout.items():
        for i, colour in enumerate(colours):
            solid(root / name / f"{i:03d}.png", colour)
    return root


def dominant_colour_logits(pixel_values: torch.Tensor) -> torch.Tensor:
    """A fixed 'model': logits = mean R, G, B, so it predicts id 0 for red, 1 for green, 2 for blue,
    i.e. cat, coffee, rocket in the training folder's (sorted) class order."""
    return pixel_values.float().mean(dim=(2, 3))


def split_config(train: Path, val: Path, **overrides):
    values = dict(dataset_name=None, dataset_config_name=None, train_dir=str(train), validation_dir=str(val),
                  train_split="train", validation_split="validation", image_column=None, label_column=None,
                  hub_token=None, max_train_samples=None, max_eval_samples=None, num_labels=None, label_names=None,
                  dataloader_num_workers=0, per_device_train_batch_size=2, per_device_eval_batch_size=3, seed=0)
    values.update(overrides)
    return SimpleNamespace(**values)


def evaluate_folders(train: Path, val: Path, **overrides) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    splits = load_classification_splits(split_config(train, val, **overrides), accelerator)
    transform = EvalTransform(8, 1.0)
    _, eval_loader = build_classification_loaders(split_config(train, val, **overrides), accelerator, splits,
                                                  transform, transform)
    eval_loader = accelerator.prepare(eval_loader)
    return splits, evaluate_classifier(dominant_colour_logits, eval_loader, accelerator, len(splits.class_names))


TRAIN_LAYOUT = {"cat": ["red"] * 4, "coffee": ["green"] * 4, "rocket": ["blue"] * 4}


# --------------------------------------------------------------------------------------------------
# 1. One label map, every split matched by class name
# --------------------------------------------------------------------------------------------------
def test_validation_without_a_class_is_scored_by_name_and_warned(tmp_path, caplog):
    """Validation lacks coffee/: by position, rocket would be id 1 (coffee's) and every blue image
    wrong (4 of 10 right = 40 %). By name: 4 red cats right, 4 blue rockets right, 2 red rockets
    predicted cat -> 8/10 = 80 %, per class cat 4/4, coffee 0/0, rocket 4/6."""
    train = colour_folder(tmp_path / "train", TRAIN_LAYOUT)
    val = colour_folder(tmp_path / "val", {"cat": ["red"] * 4, "rocket": ["blue"] * 4 + ["red"] * 2})
    with caplog.at_level(logging.WARNING):
        splits, results = evaluate_folders(train, val)
    assert splits.class_names == ["cat", "coffee", "rocket"]
    assert results["num_examples"] == 10
    assert results["top1"] == pytest.approx(80.0)
    assert results["per_class"] == [[4, 4], [0, 0], [4, 6]]
    assert "validation split has no class 'coffee'" in caplog.text


def test_validation_classes_in_another_order_keep_their_names(tmp_path):
    """Validation holds only coffee and rocket: its own numbering is coffee 0, rocket 1; the training
    ids are 1 and 2. Every image is predicted right by name: 100 %."""
    train = colour_folder(tmp_path / "train", TRAIN_LAYOUT)
    val = colour_folder(tmp_path / "val", {"coffee": ["green"] * 3, "rocket": ["blue"] * 3})
    _, results = evaluate_folders(train, val)
    assert results["top1"] == pytest.approx(100.0)
    assert results["per_class"] == [[0, 0], [3, 3], [3, 3]]


@pytest.mark.parametrize("layout, unknown", [
    ({"kitty": ["red"] * 2, "coffee": ["green"] * 2, "rocket": ["blue"] * 2}, "kitty"),   # cat renamed
    ({"cat": ["red"] * 2, "coffee": ["green"] * 2, "rocket": ["blue"] * 2, "dog": ["red"]}, "dog"),  # extra class
])
def test_a_validation_class_unknown_to_training_stops_before_training(tmp_path, layout, unknown):
    train = colour_folder(tmp_path / "train", TRAIN_LAYOUT)
    val = colour_folder(tmp_path / "val", layout)
    with pytest.raises(ValueError, match=rf"validation class\(es\) \['{unknown}'\] are not among the 3 classes"):
        evaluate_folders(train, val)
    # the script stops on it before loading a model or training
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=unknown):
        finetune.main(["--model_name_or_path", "someone/no-model-needed", "--train_dir", str(train),
                       "--validation_dir", str(val), "--output_dir", str(out)])
    assert not (out / "checkpoints").exists()


def test_label_names_fix_the_map_for_every_split(tmp_path):
    """--label_names rocket,cat,coffee: ids follow that order in both splits (the dominant-colour model
    then predicts red -> 0 = rocket, so the red cats are wrong and the blue rockets right: 3 of 6)."""
    train = colour_folder(tmp_path / "train", TRAIN_LAYOUT)
    val = colour_folder(tmp_path / "val", {"cat": ["red"] * 3, "rocket": ["red"] * 3})
    splits, results = evaluate_folders(train, val, label_names=["rocket", "cat", "coffee"])
    assert splits.class_names == ["rocket", "cat", "coffee"]
    assert splits.train_counts == [4, 4, 4]
    assert results["per_class"] == [[3, 3], [0, 3], [0, 0]]
    with pytest.raises(ValueError, match=r"training class\(es\) \['rocket'\] are not among the 2 classes of `label_names`"):
        evaluate_folders(train, val, label_names=["cat", "coffee"])


def test_hub_style_classlabel_splits_are_matched_by_name(tmp_path):
    """A saved DatasetDict whose validation ClassLabel lists other names in another order."""
    import datasets

    def split(names, rows):
        images = [{"bytes": _png(c), "path": None} for c, _ in rows]
        return datasets.Dataset.from_dict(
            {"image": images, "label": [names.index(n) for _, n in rows]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
        )

    train = split(["cat", "coffee", "rocket"], [("red", "cat"), ("green", "coffee"), ("blue", "rocket")] * 2)
    val = split(["rocket", "cat"], [("blue", "rocket"), ("red", "cat"), ("red", "rocket")])
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "hub"))
    splits, results = evaluate_folders(tmp_path / "x", tmp_path / "y", dataset_name=str(tmp_path / "hub"),
                                       train_dir=None, validation_dir=None)
    assert splits.validation_lookup == {0: 2, 1: 0}  # rocket -> 2, cat -> 0
    assert results["per_class"] == [[1, 1], [0, 0], [1, 2]]
    assert results["top1"] == pytest.approx(200.0 / 3)


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_without_class_subfolders_says_what_an_image_folder_needs(tmp_path):
    flat = tmp_path / "flat"
    for i, colour in enumerate(["red", "green", "blue"]):
        solid(flat / f"{i}.png", colour)
    val = colour_folder(tmp_path / "val", TRAIN_LAYOUT)
    with pytest.raises(ValueError, match="an image folder needs one sub-folder per class"):
        evaluate_folders(flat, val)


def test_a_small_class_is_warned_about(caplog):
    with caplog.at_level(logging.INFO):
        messages = report_class_balance(["cat", "coffee", "rocket"], [49, 45, 9])
    assert messages == ["class 'rocket' has 9 training images against 49 in the largest class: an imbalanced "
                        "training set (more images of it, or class weights, would help)"]
    assert "training set: 103 images in 3 classes: cat 49, coffee 45, rocket 9" in caplog.text
    assert report_class_balance(["a", "b"], [10, 8]) == []


# --------------------------------------------------------------------------------------------------
# 3. Unreadable images: skipped, named, counted; a stop past max_corrupt_fraction
# --------------------------------------------------------------------------------------------------
def add_bad_files(folder: Path) -> list[Path]:
    """A zero-byte JPEG and a truncated one in `folder`."""
    zero = folder / "zero.jpg"
    zero.write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buffer, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [zero, truncated]


def test_unreadable_training_images_are_replaced_and_evaluation_ones_dropped(tmp_path, caplog):
    """cat/ sorts as 000..003.png, truncated.jpg, zero.jpg (indices 0-5). Training asks for them and gets the next readable example
    (coffee's first); evaluation drops them and counts 2; each file is named once in the log."""
    train = colour_folder(tmp_path / "train", TRAIN_LAYOUT)
    bad = add_bad_files(train / "cat")
    val = colour_folder(tmp_path / "val", {"cat": ["red"] * 2, "rocket": ["blue"] * 2})
    add_bad_files(val / "rocket")
    from accelerate import Accelerator

    from modeling_mae.training.classification_data import UnreadableImages

    cfg = split_config(train, val)
    splits = load_classification_splits(cfg, Accelerator(cpu=True))
    dataset = MapImageDataset(splits.train, EvalTransform(8, 1.0), splits.image_column, splits.label_column,
                              label_lookup=splits.train_lookup, substitute_unreadable=True)
    files = [Path(splits.train[i]["image"]["path"]).name for i in range(len(splits.train))]
    assert files[:6] == ["000.png", "001.png", "002.png", "003.png", "truncated.jpg", "zero.jpg"]
    pixels, label, used, asked = dataset[4]
    assert (used, asked, label) == (6, 4, 1)  # coffee/000.png stands in; its label is coffee's
    assert torch.equal(pixels[:, 0, 0], torch.tensor(COLOURS["green"], dtype=torch.uint8))
    tracker = UnreadableImages(splits.train, splits.image_column, "training", max_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        tracker.record(torch.tensor([6, 6, 0]), torch.tensor([4, 5, 0]))
    assert tracker.state_dict() == [4, 5]
    assert [str(p) in caplog.text for p in bad] == [True, True]
    with pytest.raises(ValueError, match=r"2 of the 14 training images cannot be decoded, more than max_corrupt_fraction=0.1"):
        UnreadableImages(splits.train, splits.image_column, "training", max_fraction=0.1).record(
            torch.tensor([6, 6]), torch.tensor([4, 5]))

    _, results = evaluate_folders(train, val)
    assert (results["num_examples"], results["num_unreadable"]) == (4, 2)
    assert results["top1"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------
# 4. EXIF orientation everywhere; the saved processor is the evaluation transform
# --------------------------------------------------------------------------------------------------
def rotated_jpeg(path: Path, stored_size=(48, 24), orientation: int = 6) -> Path:
    """A JPEG stored `stored_size` (w, h) with an EXIF orientation tag: displayed rotated (6: 90° CW)."""
    rng = np.random.default_rng(0)
    w, h = stored_size
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, : w // 2] = (250, 0, 0)  # left half red, right half blue (stored)
    array[:, w // 2:] = (0, 0, 250)
    array = (array.astype(int) + rng.integers(-3, 4, array.shape)).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_in_decoding_and_the_fast_crop_path(tmp_path):
    path = rotated_jpeg(tmp_path / "phone.jpg")
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # what the pipeline sees
    assert upright.size == (24, 48)
    decoded = decode_image(str(path))
    assert decoded.size == (24, 48)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))
    # the crop box is drawn on the upright picture: scale 1 and its aspect (w/h = 0.5) take it whole
    transform = TrainTransform((48, 24), scale=(1.0, 1.0), ratio=(0.5, 0.5), hflip=0.0)
    out = transform.from_bytes(path.read_bytes())
    assert out.shape == (3, 48, 24)
    assert (out.int() - torch.from_numpy(np.asarray(upright)).permute(2, 0, 1).int()).abs().max() <= 1


def test_eval_transform_crops_as_computed_by_hand():
    """A 40x20 (w x h) image, size 20, crop_pct 1: no resize, the centre 20 columns (10..29)."""
    array = np.arange(20 * 40 * 3, dtype=np.int64).reshape(20, 40, 3) % 251
    image = Image.fromarray(array.astype(np.uint8))
    out = EvalTransform(20, 1.0)(image)
    assert torch.equal(out, torch.from_numpy(array[:, 10:30].astype(np.uint8)).permute(2, 0, 1))


@pytest.mark.parametrize("crop_pct", [0.875, 1.0, 0.9])
def test_saved_processor_gives_the_evaluation_tensors(tmp_path, crop_pct):
    """The same file through (a) the training-time evaluation (decode_image + EvalTransform +
    normalize_on_device), (b) the processor reloaded from disk after `transformers.image_utils.load_image`
    (what pipelines do), and (c) torchvision's Resize + CenterCrop (an independent reference)."""
    from torchvision.transforms import InterpolationMode, v2
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    model.save_pretrained(tmp_path / "m", image_processor=model.default_image_processor(crop_pct=crop_pct))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "m")
    assert isinstance(processor, MAEImageProcessor) and processor.crop_pct == crop_pct
    gray = tmp_path / "gray.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 71), dtype=np.uint8)).save(gray)
    for path in (rotated_jpeg(tmp_path / "phone.jpg", (61, 37)), gray):
        ours = normalize_on_device(EvalTransform(32, crop_pct)(decode_image(str(path)))[None])
        served = processor(load_image(str(path)), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(served, ours, atol=1e-6, rtol=0)
        resize = int(round(32 / crop_pct))
        reference = v2.Compose([v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                v2.CenterCrop(32), v2.PILToTensor()])(load_image(str(path)))
        assert torch.equal(EvalTransform(32, crop_pct)(decode_image(str(path))), reference)


# --------------------------------------------------------------------------------------------------
# End to end on a folder with the usual oddities: fine-tune, card, log, pipeline, linear probe, features
# --------------------------------------------------------------------------------------------------
def photo_folder(root: Path, counts: dict[str, int], seed: int) -> Path:
    """Crops of scikit-image's photographs (cat: chelsea, coffee, rocket), 36-60 px, not square."""
    import skimage.data

    photos = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket()}
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        photo = Image.fromarray(photos[name])
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            side = int(rng.integers(80, 200))
            left = int(rng.integers(0, photo.width - side))
            top = int(rng.integers(0, photo.height - side))
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (int(rng.integers(36, 60)), int(rng.integers(36, 60))), Image.BICUBIC)
            crop.save(root / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_images")
    train = photo_folder(root / "data" / "train", {"cat": 14, "coffee": 14, "rocket": 2}, seed=0)
    val = photo_folder(root / "data" / "val", {"cat": 5, "coffee": 5, "rocket": 4}, seed=1)
    bad = add_bad_files(train / "cat") + add_bad_files(val / "coffee")
    rotated_jpeg(val / "rocket" / "phone.jpg", (61, 37))
    gray = Image.open(train / "rocket" / "000.jpg").convert("L")
    gray.save(train / "rocket" / "gray.png")
    torch.manual_seed(0)
    model = root / "mae"
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(model)
    return SimpleNamespace(root=root, train=train, val=val, bad=bad, model=model)


@pytest.fixture(scope="module")
def finetuned(odd_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "cats-ft"
    handler_records = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append((record.name, record.levelno, record.getMessage()))

    handler = Keep(level=logging.DEBUG)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)  # as the script's basicConfig sets it outside pytest
    try:
        code = finetune.main([
            "--config", str(SCRIPTS.parent / "configs/finetune/demo.yaml"), "--model_name_or_path", str(odd_folder.model),
            "--train_dir", str(odd_folder.train), "--validation_dir", str(odd_folder.val), "--output_dir", str(out),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "5",
            "--dataloader_num_workers", "0", "--mixed_precision", "no", "--logging_steps", "1000",
            "--checkpointing_steps", "1", "--eval_crop_pct", "0.875", "--max_corrupt_fraction", "0.2",
        ])
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    assert code == 0
    return SimpleNamespace(out=out, records=handler_records, results=json.loads((out / "eval_results.json").read_text()))


def test_finetune_skips_and_counts_unreadable_images(odd_folder, finetuned):
    results = finetuned.results
    assert len(results["unreadable_train"]) == 2
    assert [h["num_unreadable"] for h in results["history"]] == [2, 2]
    assert [h["num_examples"] for h in results["history"]] == [15, 15]  # 14 files + phone.jpg, less 2 unreadable
    messages = "\n".join(m for _, _, m in finetuned.records)
    for path in odd_folder.bad:
        assert str(path) in messages
    card = (finetuned.out / "README.md").read_text()
    assert "unreadable images skipped: 2 in training, 2 in validation" in card


def test_finetune_log_is_one_line_per_epoch_without_library_chatter(finetuned):
    ours = [m for name, level, m in finetuned.records if name == "finetune" or name == "__main__"]
    epoch_lines = [m for m in ours if m.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert "top-1" in epoch_lines[0] and "top-5" not in epoch_lines[0]  # 3 classes: no top-5
    assert any(m.startswith("per-class top-1 (last epoch): cat ") for m in ours)
    assert not [m for name, level, m in finetuned.records if name.startswith("accelerate") and level < logging.WARNING]
    assert any("class 'rocket' has 3 training images against 16" in m for _, _, m in finetuned.records)


def test_finetune_card_names_classes_counts_and_dataset(odd_folder, finetuned):
    card = (finetuned.out / "README.md").read_text()
    assert "trained with\n`scripts/finetune.py` of modeling_mae on **data**" in card
    assert "| cat | 0 | 16 |" in card and "| coffee | 1 | 14 |" in card and "| rocket | 2 | 3 |" in card
    assert "training set: 33 images in 3 classes" in card
    assert f'model="{finetuned.out.resolve()}"' in card  # an absolute path: works from any directory


def test_pipeline_on_the_exported_model_matches_the_script_evaluation(odd_folder, finetuned):
    """pipeline("image-classification") over the readable validation files, scored by folder name,
    gives the top-1 the script measured for the last epoch."""
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(finetuned.out), trust_remote_code=True)
    files = [p for p in sorted(odd_folder.val.rglob("*")) if p.is_file() and p not in odd_folder.bad]
    predictions = [classifier(str(p), top_k=1)[0]["label"] for p in files]
    top1 = 100.0 * np.mean([pred == p.parent.name for pred, p in zip(predictions, files)])
    assert top1 == pytest.approx(finetuned.results["last"]["top1"], abs=1e-9)
    names = ["cat", "coffee", "rocket"]
    per_class = [[sum(pred == p.parent.name == n for pred, p in zip(predictions, files)),
                  sum(p.parent.name == n for p in files)] for n in names]
    assert per_class == finetuned.results["per_class"][str(finetuned.results["last"]["epoch"])]
    assert [t for _, t in per_class] == [5, 5, 5]


def test_linear_probe_cache_is_rebuilt_when_images_move_between_classes(odd_folder, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(odd_folder.train, data / "train")
    shutil.copytree(odd_folder.val, data / "val")
    out = tmp_path / "probe"
    argv = ["--config", str(SCRIPTS.parent / "configs/linprobe/demo.yaml"), "--model_name_or_path", str(odd_folder.model),
            "--train_dir", str(data / "train"), "--validation_dir", str(data / "val"), "--output_dir", str(out),
            "--num_train_epochs", "2", "--num_warmup_epochs", "1", "--per_device_train_batch_size", "33", "--gradient_accumulation_steps", "1",
            "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0", "--mixed_precision", "no",
            "--cache_features", "--logging_steps", "1000", "--max_corrupt_fraction", "0.2"]
    with caplog.at_level(logging.INFO):
        assert linprobe.main(argv) == 0
    assert "training the head on the cached features" in caplog.text
    # cat/truncated.jpg and cat/zero.jpg (sorted after cat/0xx.jpg) are replaced by the next readable
    # example, coffee/000.jpg: 14 cats, 14 + 2 coffees, 3 rockets
    cached = torch.load(out / "feature_cache" / "rank0.pt", weights_only=True)["labels"]
    assert torch.bincount(cached, minlength=3).tolist() == [14, 16, 3]
    # move 6 coffee images to cat/ and rerun the same command
    for p in sorted((data / "train" / "coffee").glob("*.jpg"))[:6]:
        p.rename(data / "train" / "cat" / f"moved_{p.name}")
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the finished run's directory is replaced only when asked (issue 10)
        assert linprobe.main(argv + ["--overwrite_output_dir"]) == 0
    assert "was made from other data: rebuilding it" in caplog.text
    cached = torch.load(out / "feature_cache" / "rank0.pt", weights_only=True)["labels"]
    # 20 readable cats; the two unreadable ones now stand in for coffee/006.jpg: 8 + 2 coffees
    assert torch.bincount(cached, minlength=3).tolist() == [20, 10, 3]


def test_feature_cache_key_follows_weights_files_and_labels(odd_folder, tmp_path):
    from accelerate import Accelerator

    from modeling_mae import MAEModel
    from modeling_mae.training.linear_probe import feature_cache_key

    data = tmp_path / "train"
    shutil.copytree(odd_folder.train, data)
    encoder = MAEModel(MAEConfig.from_preset("mae-tiny"))

    def key():
        splits = load_classification_splits(split_config(data, odd_folder.val), Accelerator(cpu=True))
        return feature_cache_key(encoder, splits, EvalTransform(32), 1, 8, 0, "data", "no")

    first = key()
    assert key() == first
    target = sorted((data / "coffee").glob("*.jpg"))[0]
    os.utime(target, ns=(10**18, 10**18))  # same bytes, another modification time
    assert key()["data"] != first["data"]
    with torch.no_grad():
        encoder.embeddings.cls_token.add_(1.0)
    assert key()["model"] != first["model"]


def test_extract_features_names_labels_ids_and_takes_any_split_name(odd_folder, tmp_path):
    import datasets

    out = tmp_path / "features"
    extract_features.main(["--model_name_or_path", str(odd_folder.model), "--dataset_name",
                           str(odd_folder.root / "data"), "--split", "val", "--per_device_eval_batch_size", "4",
                           "--dataloader_num_workers", "0", "--max_corrupt_fraction", "0.2", "--output_dir", str(out)])
    table = datasets.load_from_disk(str(out))
    assert table.features["label"].names == ["cat", "coffee", "rocket"]
    files = [p for p in sorted(odd_folder.val.rglob("*")) if p.is_file() and p not in odd_folder.bad]
    assert sorted(table["id"]) == sorted(str(p) for p in files)
    assert len(table) == 15
    names = table.features["label"].names
    assert all(Path(i).parent.name == names[label] for i, label in zip(table["id"], table["label"]))
    assert "2 unreadable image(s) skipped" in table.info.description


def test_linear_probe_transform_key_is_the_same_in_every_run():
    """The feature cache is keyed by the transform's description: it must not hold an object address,
    or a rerun of the same command never finds its cache (found by the merged suite)."""
    from modeling_mae.training.augmentation import LinprobeTrainTransform

    first, second = repr(LinprobeTrainTransform(32).ops), repr(LinprobeTrainTransform(32).ops)
    assert first == second and " at 0x" not in first
    assert "OfficialRandomResizedCrop(size=[32, 32], scale=(0.08, 1.0)" in first
