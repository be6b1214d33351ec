"""Your own pixels all the way (issue 23): a model pretrained on 1-channel 16-bit PNGs or 4-band uint16 .npy
arrays is fine-tuned, probed, used for segmentation and for features on those pixels, each run from the
previous one's output, and the exported processors give the scripts' own numbers."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.training.pixels import PixelFormatError, decode_array


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import extract_features  # noqa: E402
import finetune  # noqa: E402
import linprobe  # noqa: E402
import segment  # noqa: E402
from pretrain_helpers import import_pretrain, tiny_args  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
CHANNELS = {"gray16": 1, "bands4": 4}
CLASSES = ("horizontal", "vertical")


# --------------------------------------------------------------------------------------------------
# Data: labelled folders of bars, and segmentation scenes in the ADE20K layout
# --------------------------------------------------------------------------------------------------
def write(path: Path, array: np.ndarray) -> Path:
    """(H, W) uint16 -> 16-bit PNG (mode I;16); (H, W, C) -> .npy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 2:
        path = path.with_suffix(".png")
        Image.fromarray(array).save(path)
    else:
        path = path.with_suffix(".npy")
        np.save(path, array)
    return path


def bar(rng, orientation: str, channels: int) -> np.ndarray:
    """A bright bar (horizontal or vertical) on a noisy background of a random level, uint16."""
    image = rng.normal(rng.uniform(3000, 20000), 800, (SIZE, SIZE, channels))
    length, width = int(rng.uniform(0.6, 0.9) * SIZE), int(rng.uniform(0.2, 0.3) * SIZE)
    top, left = int(rng.integers(0, SIZE - width + 1)), int(rng.integers(0, SIZE - length + 1))
    rows, cols = slice(top, top + width), slice(left, left + length)
    if orientation == "vertical":
        rows, cols = cols, rows
    image[rows, cols] += rng.uniform(15000, 30000) * np.linspace(1.0, 0.5, channels)
    image = image.clip(0, 65535).astype(np.uint16)
    return image[..., 0] if channels == 1 else image


def class_folder(root: Path, kind: str, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        for i in range(per_class):
            write(root / name / f"{i:03d}", bar(rng, name, CHANNELS[kind]))
    return root


def ade_folder(root: Path, kind: str, num_train: int = 16, num_val: int = 8, num_classes: int = 3, seed: int = 0) -> Path:
    """images/<split>/*.png|npy and annotations/<split>/*.png: rectangles whose level says their class
    (annotations 0 = "other", 1..num_classes, as ADE20K's)."""
    rng = np.random.default_rng(seed)
    channels = CHANNELS[kind]
    levels = np.array([4000.0] + [12000.0 * c for c in range(1, num_classes + 1)])
    for split, count in (("training", num_train), ("validation", num_val)):
        for i in range(count):
            label = np.zeros((SIZE, SIZE), dtype=np.uint8)
            for _ in range(3):
                h, w = rng.integers(SIZE // 4, SIZE // 2 + 1, size=2)
                top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
                label[top:top + h, left:left + w] = int(rng.integers(1, num_classes + 1))
            image = levels[label][..., None] * np.linspace(1.0, 0.6, channels) + rng.normal(0, 600, (SIZE, SIZE, channels))
            image = image.clip(0, 65535).astype(np.uint16)
            write(root / "images" / split / f"scene_{i:04d}", image[..., 0] if channels == 1 else image)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"scene_{i:04d}.png")
    return root


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".npy"))


def as_array(path: Path) -> np.ndarray:
    """The file as a numpy array in its own dtype: what one hands `pipeline(...)` (it converts PIL images
    to 8-bit RGB, arrays go through untouched)."""
    return decode_array(str(path))


COMMON = ["--dataloader_num_workers", "0", "--mixed_precision", "no", "--logging_steps", "1000",
          "--eval_crop_pct", "1.0"]


def finetune_args(model, train, val, out, *extra) -> list[str]:
    return ["--config", str(SCRIPTS.parent / "configs/finetune/demo.yaml"), "--model_name_or_path", str(model),
            "--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(out),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
            # the fine-tuning recipe's augmentation, on these pixels: RandAugment, random erasing, mixup / cutmix
            "--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
            *COMMON, *extra]


def segment_args(model, data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--num_labels", "3", "--reduce_labels", "true", "--crop_size", "32", "--base_scale", "64,32",
            "--scale_range", "0.75,1.5", "--eval_mode", "slide", "--eval_stride", "16", "--max_train_steps", "4",
            "--eval_steps", "4", "--num_warmup_steps", "1", "--checkpointing_steps", "4", "--mixed_precision", "no",
            "--logging_steps", "1", "--out_indices", "1,2,3,4", "--add_fpn", "true", "--drop_path_rate", "0",
            "--decoder_hidden_size", "32", "--auxiliary_channels", "16", "--preprocessing_num_workers", "0",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", *extra]


@pytest.fixture(scope="module", params=["gray16", "bands4"])
def chain(request, tmp_path_factory):
    """pretrain -> finetune -> linprobe -> segment, extract_features, each from the previous output."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    train = class_folder(root / "cls" / "train", kind, 16, seed=0)
    val = class_folder(root / "cls" / "val", kind, 8, seed=1)
    seg_data = ade_folder(root / "seg", kind)
    pre, ft, lp, seg, feats = (root / name for name in ("pre", "ft", "lp", "seg_out", "features"))
    assert import_pretrain().main(tiny_args(train, pre, max_train_steps=2, image_mean="auto", image_std="auto",
                                            model_config="{num_hidden_layers: 4}")) == 0
    assert finetune.main(finetune_args(pre, train, val, ft)) == 0
    assert linprobe.main(["--config", str(SCRIPTS.parent / "configs/linprobe/demo.yaml"), "--model_name_or_path",
                          str(ft), "--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(lp),
                          "--num_train_epochs", "2", "--num_warmup_epochs", "0", "--per_device_train_batch_size", "8",
                          *COMMON]) == 0
    seg_results = segment.main(segment_args(lp, seg_data, seg))
    assert extract_features.main(["--model_name_or_path", str(lp), "--dataset_name", str(root / "cls"),
                                  "--split", "val", "--output_dir", str(feats), "--dataloader_num_workers", "0",
                                  "--pooling", "cls"]) == str(feats)
    return SimpleNamespace(kind=kind, channels=CHANNELS[kind], root=root, train=train, val=val, seg_data=seg_data,
                           pre=pre, ft=ft, lp=lp, seg=seg, features=feats, seg_results=seg_results)


def pipeline_top1(model_dir: Path, val: Path) -> tuple[float, list]:
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model_dir), trust_remote_code=True)
    files = files_of(val)
    predictions = [classifier(as_array(p), top_k=1)[0]["label"] for p in files]
    top1 = 100.0 * np.mean([pred == p.parent.name for pred, p in zip(predictions, files)])
    per_class = [[sum(pred == p.parent.name == n for pred, p in zip(predictions, files)),
                  sum(p.parent.name == n for p in files)] for n in CLASSES]
    return top1, per_class


# --------------------------------------------------------------------------------------------------
# The chain: every step reads the pixels the model was pretrained on
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["ft", "lp"])
def test_exported_classifier_pipeline_gives_the_scripts_accuracy(chain, run):
    """pipeline("image-classification") on the exported folder, given the validation files as arrays,
    scores exactly the top-1 and per-class counts the script reported for its last epoch."""
    out = getattr(chain, run)
    results = json.loads((out / "eval_results.json").read_text())
    processor = json.loads((out / "preprocessor_config.json").read_text())
    pretrained = json.loads((chain.pre / "preprocessor_config.json").read_text())
    assert processor["num_channels"] == chain.channels and processor["pixel_dtype"] == "uint16"
    assert processor["image_mean"] == pretrained["image_mean"] and processor["image_std"] == pretrained["image_std"]
    top1, per_class = pipeline_top1(out, chain.val)
    assert top1 == pytest.approx(results["last"]["top1"], abs=1e-9)
    assert per_class == results["per_class"][str(results["last"]["epoch"])]
    card = (out / "README.md").read_text()
    assert f"{chain.channels} channel(s) of uint16 scaled from [0, 65535] to [0, 1]" in card
    assert "classifier(np.asarray(Image.open(" in card and "ImageNet" not in card


def test_exported_segmentation_model_gives_the_scripts_miou(chain):
    """The exported processor and model (the card's snippet; transformers' segmentation pipeline takes no
    arrays) over the validation scenes give the mIoU the script reported."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(str(chain.seg), trust_remote_code=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(str(chain.seg), trust_remote_code=True).eval()
    assert (processor.num_channels, processor.pixel_dtype) == (chain.channels, "uint16")
    assert f"Input pixels: {chain.channels} channel(s) of uint16" in (chain.seg / "README.md").read_text()
    mean_iou = segment.load_mean_iou(str(SCRIPTS.parent / "metrics" / "mean_iou"))
    areas = np.zeros((4, 3))
    for image in files_of(chain.seg_data / "images" / "validation"):
        annotation = Image.open(chain.seg_data / "annotations" / "validation" / f"{image.stem}.png")
        inputs = processor(images=as_array(image), segmentation_maps=annotation, return_tensors="pt")
        labels = inputs.pop("labels")[0]
        with torch.no_grad():
            outputs = model(**inputs)
        prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[tuple(labels.shape)])[0]
        areas += np.stack(mean_iou.intersect_and_union(prediction.numpy(), labels.numpy(), 3, 255))
    measured = mean_iou.metrics_from_areas(*areas)["mean_iou"]
    assert measured == pytest.approx(chain.seg_results["best"]["mean_iou"], abs=1e-9)


def test_reconstruction_pictures_of_the_checkpoint_pixels(chain, tmp_path):
    import visualize

    written = visualize.main(["--model_name_or_path", str(chain.pre), "--images", str(chain.val / "vertical"),
                              "--num_images", "3", "--images_per_grid", "3", "--output_dir", str(tmp_path)])
    assert [p.name for p in written] == ["reconstruction_000.png"] and Image.open(written[0]).mode == "RGB"


def test_features_of_the_checkpoint_pixels(chain):
    import datasets

    table = datasets.load_from_disk(str(chain.features)).with_format("numpy")
    assert np.asarray(table["features"]).shape == (16, 64)
    assert np.isfinite(np.asarray(table["features"])).all()
    assert table.features["label"].names == list(CLASSES)


# --------------------------------------------------------------------------------------------------
# Mismatches and adaptation
# --------------------------------------------------------------------------------------------------
def rgb_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def gray16_model(tmp_path_factory):
    """A 1-channel uint16 pretraining output (pretrain's own export) and its data."""
    root = tmp_path_factory.mktemp("gray16_model")
    train = class_folder(root / "train", "gray16", 8, seed=0)
    val = class_folder(root / "val", "gray16", 4, seed=1)
    assert import_pretrain().main(tiny_args(train, root / "pre", max_train_steps=1, image_mean="auto",
                                            image_std="auto")) == 0
    return SimpleNamespace(root=root, train=train, val=val, pre=root / "pre")


def test_rgb_files_for_a_one_channel_model_are_one_line_naming_both(gray16_model, tmp_path, capsys):
    from modeling_mae_cli import run_main

    rgb = rgb_folder(tmp_path / "rgb")
    argv = finetune_args(gray16_model.pre, rgb, rgb, tmp_path / "out")
    with pytest.raises(PixelFormatError) as err:
        finetune.main(argv)
    message = str(err.value)
    assert "\n" not in message
    assert "was trained on 1 channel(s) of uint16" in message and "have 3 channel(s) of uint8" in message
    assert "adapt_channels" in message
    import extract_features as features_script  # no adaptation there: the checkpoint as it is, the mismatch named

    with pytest.raises(PixelFormatError, match="trained on 1 channel\\(s\\) of uint16 but the val images have 3"):
        features_script.main(["--model_name_or_path", str(gray16_model.pre), "--dataset_name", str(tmp_path / "rgb"),
                              "--split", "val", "--output_dir", str(tmp_path / "f"), "--dataloader_num_workers", "0"])
    assert run_main(finetune.main, finetune_args(gray16_model.pre, rgb, rgb, tmp_path / "out2")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "1 channel(s) of uint16" in errors[0] and "3 channel(s) of uint8" in errors[0]


def test_an_rgb_checkpoint_is_adapted_to_gray16_data_when_asked(gray16_model, tmp_path):
    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(tmp_path / "rgb")
    argv = finetune_args(tmp_path / "rgb", gray16_model.train, gray16_model.val, tmp_path / "no")
    with pytest.raises(PixelFormatError,
                       match="3 channel\\(s\\) of uint8 but the training images have 1 channel\\(s\\) of uint16"):
        finetune.main(argv)
    out = tmp_path / "adapted"
    assert finetune.main(finetune_args(tmp_path / "rgb", gray16_model.train, gray16_model.val, out,
                                       "--adapt_channels", "true")) == 0
    assert json.loads((out / "config.json").read_text())["num_channels"] == 1
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert (processor["num_channels"], processor["pixel_dtype"]) == (1, "uint16")
    arrays = np.stack([as_array(p) for p in files_of(gray16_model.train)]).astype(np.float64) / 65535.0
    assert processor["image_mean"] == pytest.approx([arrays.mean()], abs=2e-6)  # the data's own statistics
    top1, _ = pipeline_top1(out, gray16_model.val)
    assert top1 == pytest.approx(json.loads((out / "eval_results.json").read_text())["last"]["top1"], abs=1e-9)


def test_segmentation_from_an_rgb_checkpoint_adapts_its_backbone_when_asked(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny", num_hidden_layers=4)).save_pretrained(tmp_path / "rgb")
    data = ade_folder(tmp_path / "seg", "gray16", num_train=8, num_val=2)
    with pytest.raises(PixelFormatError, match="trained on 3 channel\\(s\\) of uint8 but the training images have 1"):
        segment.main(segment_args(tmp_path / "rgb", data, tmp_path / "no"))
    out = tmp_path / "adapted"
    results = segment.main(segment_args(tmp_path / "rgb", data, out, "--adapt_channels", "true"))
    assert json.loads((out / "config.json").read_text())["backbone_config"]["num_channels"] == 1
    processor = AutoImageProcessor.from_pretrained(str(out), trust_remote_code=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(str(out), trust_remote_code=True).eval()
    assert (processor.num_channels, processor.pixel_dtype) == (1, "uint16")
    image = files_of(data / "images" / "validation")[0]
    with torch.no_grad():
        outputs = model(**processor(images=as_array(image), return_tensors="pt"))
    assert outputs.logits.shape[1] == 3 and results["best"]["mean_iou"] >= 0


# --------------------------------------------------------------------------------------------------
# Augmentation and segmentation checks on these pixels
# --------------------------------------------------------------------------------------------------
def test_randaugment_on_four_bands_keeps_geometric_and_intensity_ops_and_says_so():
    from modeling_mae.training.augmentation import ArrayFinetuneTrainTransform
    from modeling_mae.training.classification_data import seeded

    transform = ArrayFinetuneTrainTransform(32, "rand-m9-mstd0.5-inc1", fill=[0.2, 0.3, 0.4, 0.5], num_channels=4)
    assert set(transform.kept) == {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
                                   "BrightnessIncreasing", "ContrastIncreasing"}
    assert {"Equalize", "SolarizeIncreasing", "PosterizeIncreasing", "ColorIncreasing"} <= set(transform.dropped)
    assert "left out" in transform.describe() and "Equalize" in transform.describe()
    pixels = torch.rand(4, 40, 48)
    first = seeded(lambda: transform(pixels), 3)
    assert first.shape == (4, 32, 32) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, seeded(lambda: transform(pixels), 3))  # the per-example seed fixes every draw


def test_segmentation_masks_are_checked_on_the_non_rgb_path(tmp_path):
    from modeling_mae.training.pixels import PixelFormat
    from modeling_mae.training.segmentation_data import SegEvalTransform, SegmentationDataset, load_ade_folder

    root = ade_folder(tmp_path / "seg", "bands4", num_train=2, num_val=1)
    image = root / "images" / "training" / "scene_0001.npy"
    np.save(image, np.zeros((SIZE, SIZE + 4, 4), dtype=np.uint16))  # wider than its annotation
    annotation = root / "annotations" / "training" / "scene_0000.png"
    Image.fromarray(np.full((SIZE, SIZE), 7, dtype=np.uint8), mode="L").save(annotation)  # class 7 of 3
    fmt = PixelFormat(4, "uint16", (0.0, 65535.0))
    dataset = SegmentationDataset(load_ade_folder(root, "train"), SegEvalTransform((64, 32)), train=False,
                                  num_labels=3, pixel_format=fmt)
    with pytest.raises(ValueError, match=f"annotation {annotation} holds class id 7"):
        dataset[0]
    with pytest.raises(ValueError, match="is 32x32 \\(width x height\\) but its image .*scene_0001.npy is 36x32"):
        dataset[1]
    assert dataset.pixel_format == fmt


def test_segmentation_processor_refuses_rgb_images_for_a_gray16_model():
    from modeling_mae.image_processing_mae_segmentation import MAESegmentationImageProcessor

    processor = MAESegmentationImageProcessor(scale=[64, 32], image_mean=[0.2], image_std=[0.1], num_channels=1,
                                              pixel_dtype="uint16")
    gray = np.full((20, 40), 13107, dtype=np.uint16)
    pixels = processor(images=gray, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 1, 32, 64)
    assert torch.allclose(pixels, torch.full_like(pixels, (0.2 - 0.2) / 0.1), atol=1e-5)
    with pytest.raises(ValueError,
                       match="3 channel\\(s\\) of uint8, but this processor expects 1 channel\\(s\\) of uint16"):
        processor(images=Image.new("RGB", (40, 20)))


def test_the_pixel_path_is_decided_from_the_checkpoint_and_the_data():
    """RGB checkpoints keep the uint8 photograph path (8-bit grayscale photographs included); a checkpoint
    whose processor saved a format keeps it and its statistics; one that saved none takes the data's."""
    import io

    from modeling_mae.image_processing_mae import IMAGENET_DEFAULT_MEAN
    from modeling_mae.training.pixels import resolve_pixel_path

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rgb, gray8 = png(np.zeros((8, 8, 3), np.uint8)), png(np.zeros((8, 8), np.uint8))
    gray16 = [png(np.full((8, 8), v, np.uint16)) for v in (1000, 3000)]
    for cells in ([rgb, gray8], [gray8]):
        path = resolve_pixel_path(None, 3, cells)
        assert path.is_rgb8 and path.array_format is None and path.mean == IMAGENET_DEFAULT_MEAN
    saved = {"num_channels": 1, "pixel_dtype": "uint16", "pixel_range": [0, 65535], "image_mean": [0.5],
             "image_std": [0.25]}
    path = resolve_pixel_path(saved, 1, gray16)
    assert (path.format.num_channels, path.format.dtype, path.mean, path.std) == (1, "uint16", (0.5,), (0.25,))
    path = resolve_pixel_path(None, 1, gray16, progress=False)  # a 1-channel model that saved no format
    assert path.format.dtype == "uint16" and path.mean == pytest.approx((2000 / 65535,), abs=1e-6)
    with pytest.raises(PixelFormatError, match="has num_channels=1 but the training images have 3 channel"):
        resolve_pixel_path(None, 1, [rgb])
