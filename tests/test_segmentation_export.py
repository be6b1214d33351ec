"""The exported segmentation model + image processor score what scripts/segment.py reports.

The script's evaluation (mmseg's ADE20K test pipeline) rescales each image keeping its aspect ratio to
fit `base_scale`, predicts on sliding windows (or the whole image), resizes the logits to the
annotation and takes the argmax. The export must do the same through `pipeline("image-segmentation")`
and through `processor -> model -> post_process_semantic_segmentation`, on images larger than the crop
and not square, so that both the keep-ratio resize and the windows matter.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
MEAN_IOU = str(REPO / "metrics" / "mean_iou")
NUM_LABELS = 3
IMAGE_HW = (60, 108)  # rescaled to fit (96, 48): 48 x 86 (factor 0.8), larger than the 32 crop both ways


pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("segment_script", REPO / "scripts" / "segment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_segment(tmp_path: Path, eval_mode: str) -> tuple[dict, Path, Path]:
    """A few steps of scripts/segment.py on generated 60 x 108 ADE-layout data -> (summary, data, output)."""
    from modeling_mae.training.segmentation_data import write_synthetic_ade_folder

    data = write_synthetic_ade_folder(tmp_path / "data", num_train=8, num_val=3, size=IMAGE_HW[1],
                                      num_classes=NUM_LABELS, seed=2)
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):  # 108 x 108 -> the top 60 x 108
        for path in (data / kind).glob(f"*/*{suffix}"):
            Image.open(path).crop((0, 0, IMAGE_HW[1], IMAGE_HW[0])).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    out = tmp_path / f"out_{eval_mode}"
    argv = [
        "--config", str(REPO / "configs" / "segment" / "demo.yaml"),
        "--data_dir", str(data), "--output_dir", str(out), "--num_labels", str(NUM_LABELS),
        "--model_config", "{patch_size: 8, num_hidden_layers: 2, image_size: 32, hidden_size: 32}",
        "--out_indices", "[2]", "--crop_size", "32", "--base_scale", "[96, 48]", "--eval_stride", "16",
        "--eval_mode", eval_mode, "--per_device_train_batch_size", "4", "--max_train_steps", "12",
        "--num_warmup_steps", "2", "--logging_steps", "12", "--eval_steps", "12", "--checkpointing_steps", "100",
        "--mixed_precision", "no",
    ]
    return load_script().main(argv), data, out


def validation_files(data: Path) -> list[tuple[Image.Image, np.ndarray]]:
    """(RGB image, reduced reference) pairs, reduced by hand: ADE's 0 -> 255, class c -> c - 1."""
    pairs = []
    for image_path in sorted((data / "images" / "validation").iterdir()):
        raw = np.asarray(Image.open(data / "annotations" / "validation" / f"{image_path.stem}.png")).astype(np.int64)
        pairs.append((Image.open(image_path).convert("RGB"), np.where(raw == 0, 255, raw - 1)))
    return pairs


def mean_iou(predictions: list[np.ndarray], references: list[np.ndarray]) -> float:
    return evaluate.load(MEAN_IOU).compute(predictions=predictions, references=references, num_labels=NUM_LABELS,
                                           ignore_index=255)["mean_iou"]


def pipeline_label_map(segmenter, image: Image.Image) -> np.ndarray:
    """The pipeline's one binary mask per predicted class -> an (H, W) class-id map."""
    label2id = {name: int(i) for i, name in segmenter.model.config.id2label.items()}
    label_map = np.full((image.height, image.width), -1, dtype=np.int64)
    for item in segmenter(image):
        label_map[np.asarray(item["mask"]) > 0] = label2id[item["label"]]
    assert (label_map >= 0).all()  # every pixel got exactly one class
    return label_map


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    return run_segment(tmp_path_factory.mktemp("slide"), "slide")


# --------------------------------------------------------------------------------------------------
# The export scores what the script reports
# --------------------------------------------------------------------------------------------------
def test_exported_pipeline_gives_the_script_miou(slide_run):
    """pipeline("image-segmentation") on the exported folder, on the validation images and masks, with the
    same metric: the mIoU the script reports and writes to eval_results.json (sliding windows)."""
    from transformers import pipeline

    import modeling_mae  # noqa: F401  (registers mae_upernet with the Auto classes)

    summary, data, out = slide_run
    reported = json.loads((out / "eval_results.json").read_text())["best"]["mean_iou"]
    assert reported == summary["best"]["mean_iou"]
    segmenter = pipeline("image-segmentation", model=str(out))
    pairs = validation_files(data)
    predictions = [pipeline_label_map(segmenter, image) for image, _ in pairs]
    assert all(p.shape == IMAGE_HW for p in predictions)
    assert mean_iou(predictions, [ref for _, ref in pairs]) == pytest.approx(reported, abs=1e-6)


def test_exported_processor_and_model_give_the_pipeline_maps(slide_run):
    """processor(images) -> model(**inputs) -> post_process_semantic_segmentation, on all validation images
    as one batch (the processor pads; `image_sizes` keeps each image's own windows): the pipeline's maps,
    and the script's mIoU on the processor's reduced `labels`."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    from modeling_mae import MAESegmentationImageProcessor, MAEUperNetForSemanticSegmentation

    summary, data, out = slide_run
    processor = AutoImageProcessor.from_pretrained(out)
    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    assert isinstance(processor, MAESegmentationImageProcessor) and isinstance(model, MAEUperNetForSemanticSegmentation)
    assert processor.scale == [96, 48] and processor.do_reduce_labels
    saved = json.loads((out / "config.json").read_text())
    assert (saved["test_mode"], saved["test_crop_size"], saved["test_stride"]) == ("slide", 32, 16)

    pairs = validation_files(data)
    # one image made square: rescaled to 48 x 48, it is padded to the batch's 48 x 86
    images = [image for image, _ in pairs[:-1]] + [pairs[-1][0].resize((60, 60), Image.BILINEAR)]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 48, 86)
    assert inputs["image_sizes"].tolist() == [[48, 86], [48, 86], [48, 48]]  # 60 x 60 x min(96/60, 48/60)
    with torch.no_grad():
        outputs = model(**inputs)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(i.height, i.width) for i in images])
    segmenter = pipeline("image-segmentation", model=str(out))
    for label_map, image in zip(maps, images):
        np.testing.assert_array_equal(label_map.numpy(), pipeline_label_map(segmenter, image))

    labels = processor(images=[i for i, _ in pairs], segmentation_maps=[
        Image.open(data / "annotations" / "validation" / f"ADE_validation_{k:08d}.png") for k in range(3)])["labels"]
    np.testing.assert_array_equal(labels.numpy(), np.stack([ref for _, ref in pairs]))
    first_two = [m.numpy() for m in maps[:2]]
    full = processor.post_process_semantic_segmentation(
        model(**processor(images=[pairs[2][0]], return_tensors="pt")), target_sizes=[IMAGE_HW])[0].numpy()
    assert mean_iou(first_two + [full], list(labels.numpy())) == pytest.approx(summary["best"]["mean_iou"], abs=1e-6)


def test_exported_pipeline_loads_as_remote_code_without_the_package(slide_run, tmp_path):
    """With trust_remote_code and `modeling_mae` not importable, the shipped files (processor included)
    give the same label maps."""
    from transformers import pipeline

    import modeling_mae  # noqa: F401

    _, data, out = slide_run
    assert {"image_processing_mae_segmentation.py", "image_processing_mae.py"} <= set(os.listdir(out))
    image = validation_files(data)[0][0]
    expected = pipeline_label_map(pipeline("image-segmentation", model=str(out)), image)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_mae"] = None  # the package is not importable here
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model={str(out)!r}, trust_remote_code=True)
        image = Image.open(sorted(__import__("pathlib").Path({str(data / 'images' / 'validation')!r}).iterdir())[0])
        label2id = {{name: int(i) for i, name in segmenter.model.config.id2label.items()}}
        label_map = np.full((image.height, image.width), -1)
        for item in segmenter(image.convert("RGB")):
            label_map[np.asarray(item["mask"]) > 0] = label2id[item["label"]]
        np.testing.assert_array_equal(label_map, np.load({str(tmp_path / 'expected.npy')!r}))
        print("REMOTE_OK", type(segmenter.image_processor).__name__, type(segmenter.model).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE_OK MAESegmentationImageProcessor MAEUperNetForSemanticSegmentation" in result.stdout, \
        result.stderr[-3000:]


def test_exported_pipeline_gives_the_script_miou_whole_image(tmp_path):
    """The same with `eval_mode: whole` (the image padded to a multiple of 2 x patch, one forward)."""
    from transformers import pipeline

    import modeling_mae  # noqa: F401

    summary, data, out = run_segment(tmp_path, "whole")
    segmenter = pipeline("image-segmentation", model=str(out))
    pairs = validation_files(data)
    predictions = [pipeline_label_map(segmenter, image) for image, _ in pairs]
    assert mean_iou(predictions, [ref for _, ref in pairs]) == pytest.approx(summary["best"]["mean_iou"], abs=1e-6)
    assert json.loads((out / "config.json").read_text())["test_mode"] == "whole"


# --------------------------------------------------------------------------------------------------
# The pieces, by hand
# --------------------------------------------------------------------------------------------------
def test_processor_rescales_keeping_the_ratio_and_normalises():
    from modeling_mae import MAESegmentationImageProcessor
    from modeling_mae.training.transforms import normalize_on_device

    processor = MAESegmentationImageProcessor(scale=[96, 48])
    image = Image.fromarray(np.full((60, 108, 3), [255, 0, 128], dtype=np.uint8))
    small = Image.fromarray(np.full((20, 30, 3), [255, 0, 128], dtype=np.uint8))
    inputs = processor(images=[image, small])
    # 60 x 108 x min(96 / 108, 48 / 60) = 48 x 86.4 -> 48 x 86; 20 x 30 x min(96 / 30, 48 / 20) = 48 x 72 (upscaled)
    assert inputs["image_sizes"].tolist() == [[48, 86], [48, 72]]
    assert inputs["pixel_values"].shape == (2, 3, 48, 86)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(inputs["pixel_values"][0, channel].numpy(), value, rtol=1e-6)
        np.testing.assert_allclose(inputs["pixel_values"][1, channel, :, :72].numpy(), value, rtol=1e-6)
    assert (inputs["pixel_values"][1, :, :, 72:] == 0).all()  # padding
    # the training loop's normalisation, bit for bit
    pixels = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)
    assert torch.equal(processor.normalize_uint8(pixels), normalize_on_device(pixels))
    # ADE20K's labels: 0 ("other") and 255 ignored, class c -> c - 1
    annotation = Image.fromarray(np.array([[0, 1], [3, 255]], dtype=np.uint8), mode="L")
    tiny = Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8))
    assert processor(images=tiny, segmentation_maps=annotation)["labels"].tolist() == [[[255, 0], [2, 255]]]
    raw = MAESegmentationImageProcessor(do_reduce_labels=False)(images=tiny, segmentation_maps=annotation)["labels"]
    assert raw.tolist() == [[[0, 1], [3, 255]]]
    with pytest.raises(ValueError, match=r"`scale` must be two positive ints .* got \[512\]"):
        MAESegmentationImageProcessor(scale=[512])


def test_post_processing_leaves_the_padding_out():
    """Image 1 is 4 x 3 inside a 4 x 6 batch: its padded columns (class 1 there) never reach its map."""
    from types import SimpleNamespace

    from modeling_mae import MAESegmentationImageProcessor

    logits = torch.zeros(2, 2, 4, 6)
    logits[:, 0, :, :3] = 1.0  # class 0 on the left half
    logits[:, 1, :, 3:] = 5.0  # class 1 on the right half
    outputs = SimpleNamespace(logits=logits, image_sizes=torch.tensor([[4, 6], [4, 3]]))
    processor = MAESegmentationImageProcessor()
    full, own = processor.post_process_semantic_segmentation(outputs, target_sizes=[(8, 12), (8, 6)])
    # bilinear x2: output column j reads input column j / 2 - 0.25; column 5 -> 2.25: class 0 at 0.75 x 1,
    # class 1 at 0.25 x 5 = 1.25, so columns 0..4 are class 0 and 5..11 class 1
    assert full.shape == (8, 12) and (full[:, :5] == 0).all() and (full[:, 5:] == 1).all()
    assert own.shape == (8, 6) and (own == 0).all()
    # without target sizes: the argmax at each image's own size
    maps = processor.post_process_semantic_segmentation(outputs)
    assert [tuple(m.shape) for m in maps] == [(4, 6), (4, 3)] and maps[0][:, 3:].eq(1).all()


def tiny_upernet(**test):
    from modeling_mae import MAEConfig, MAEUperNetConfig, MAEUperNetForSemanticSegmentation

    backbone = MAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, out_indices=[2], add_fpn=True)
    config = MAEUperNetConfig(backbone_config=backbone, num_labels=3, hidden_size=16, auxiliary_channels=8,
                              pool_scales=[1, 2], **test)
    torch.manual_seed(0)
    return MAEUperNetForSemanticSegmentation(config).eval()


def test_model_forward_runs_the_configured_test_inference():
    """Eval mode without labels: sliding 32 x 32 windows 16 apart on a 48 x 86 image (rows at 0 and 16);
    a pixel seen by one window has that window's logits, one seen by two their mean."""
    import torch.nn.functional as F
    from transformers import UperNetForSemanticSegmentation

    model = tiny_upernet(test_mode="slide", test_crop_size=32, test_stride=16)

    def plain(pixel_values):  # transformers' UperNet forward on one input
        return UperNetForSemanticSegmentation.forward(model, pixel_values=pixel_values).logits

    image = torch.randn(1, 3, 48, 86)
    with torch.no_grad():
        logits = model(pixel_values=image).logits
        top_left, below = plain(image[..., :32, :32]), plain(image[..., 16:48, :32])
        assert logits.shape == (1, 3, 48, 86)
        torch.testing.assert_close(logits[..., :16, :16], top_left[..., :16, :16])
        torch.testing.assert_close(logits[..., 16:32, :16], (top_left[..., 16:32, :16] + below[..., :16, :16]) / 2)
        # a batch padded to 86 columns: image 1 is 48 x 48, its windows never see the padding
        batch = torch.cat([image, F.pad(image[..., :48], (0, 38))])
        out = model(pixel_values=batch, image_sizes=torch.tensor([[48, 86], [48, 48]]))
        torch.testing.assert_close(out.logits[1, :, :, :48], model(pixel_values=image[..., :48]).logits[0])
        assert (out.logits[1, :, :, 48:] == 0).all() and out.image_sizes.tolist() == [[48, 86], [48, 48]]

        # whole image: padded to a multiple of 2 x patch = 16 (86 -> 96), cropped back
        model.config.test_mode = "whole"
        whole = model(pixel_values=image).logits
        torch.testing.assert_close(whole, plain(F.pad(image, (0, 10)))[..., :86])
        # with labels (or in training): transformers' forward and its loss
        with_labels = model(pixel_values=image[..., :32, :32], labels=torch.zeros(1, 32, 32, dtype=torch.long))
        torch.testing.assert_close(with_labels.logits, top_left)
        assert with_labels.loss is not None and torch.isfinite(with_labels.loss)


def test_test_inference_config_is_checked_and_defaults_to_whole(tmp_path):
    from modeling_mae import MAEUperNetConfig

    with pytest.raises(ValueError, match=r"test_mode must be one of \('slide', 'whole'\), got 'sliding'"):
        tiny_upernet(test_mode="sliding")
    with pytest.raises(ValueError, match=r"test_stride must be in \(0, test_crop_size=32\], got 48"):
        tiny_upernet(test_mode="slide", test_crop_size=32, test_stride=48)
    model = tiny_upernet()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("test_mode", "test_crop_size", "test_stride"):  # a model saved before these fields existed
        saved.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert MAEUperNetConfig.from_pretrained(tmp_path).test_mode == "whole"


# --------------------------------------------------------------------------------------------------
# Annotations the script refuses
# --------------------------------------------------------------------------------------------------
def script_argv(data: Path, out: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "segment" / "demo.yaml"),
        "--data_dir", str(data), "--output_dir", str(out), "--num_labels", "3",
        "--model_config", "{patch_size: 8, num_hidden_layers: 1, image_size: 32, hidden_size: 32}",
        "--out_indices", "[1]", "--crop_size", "32", "--base_scale", "[64, 32]", "--eval_stride", "16",
        "--per_device_train_batch_size", "4", "--max_train_steps", "1", "--num_warmup_steps", "0",
        "--eval_steps", "1", "--checkpointing_steps", "100", "--mixed_precision", "no",
    ]


def test_segment_script_refuses_a_class_id_beyond_num_labels(tmp_path):
    from modeling_mae.training.segmentation_data import write_synthetic_ade_folder

    data = write_synthetic_ade_folder(tmp_path / "data", num_train=4, num_val=1, size=32, num_classes=3)
    bad = data / "annotations" / "training" / "ADE_training_00000002.png"
    label = np.asarray(Image.open(bad)).copy()
    label[:4, :4] = 7  # num_labels 3 with reduce_labels: the file may hold 0, 1..3 and 255
    Image.fromarray(label, mode="L").save(bad)
    with pytest.raises(ValueError, match=rf"^annotation {re.escape(str(bad))} holds class id 7; expected 0 \('other'\), "
                                         r"1\.\.3 or 255 \(reduce_labels=True\) for num_labels=3$"):
        load_script().main(script_argv(data, tmp_path / "out"))


def test_segment_script_refuses_an_annotation_of_another_size(tmp_path):
    from modeling_mae.training.segmentation_data import write_synthetic_ade_folder

    data = write_synthetic_ade_folder(tmp_path / "data", num_train=4, num_val=1, size=32, num_classes=3)
    bad = data / "annotations" / "validation" / "ADE_validation_00000000.png"
    Image.open(bad).resize((16, 32), Image.NEAREST).save(bad)
    image = data / "images" / "validation" / "ADE_validation_00000000.jpg"
    with pytest.raises(ValueError, match=rf"^annotation {re.escape(str(bad))} is 16x32 \(width x height\) but its image "
                                         rf"{re.escape(str(image))} is 32x32$"):
        load_script().main(script_argv(data, tmp_path / "out"))
