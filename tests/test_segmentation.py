"""MAEBackbone, UperNet on it, the segmentation data path, the local mean_iou metric and scripts/segment.py.

Tiny CPU configs: a 4-block 32-d ViT with 16-pixel patches, so that the pyramid strides are the real
4 / 8 / 16 / 32.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from modeling_mae import (
    MAEBackbone,
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEUperNetConfig,
    MAEUperNetForSemanticSegmentation,
)
from modeling_mae.training.optim import layer_decay_param_groups
from modeling_mae.training.segmentation_data import (
    SegmentationDataset,
    SegTrainTransform,
    load_segmentation_split,
    slide_inference,
    whole_inference,
    write_synthetic_ade_folder,
)


REPO = Path(__file__).resolve().parents[1]
MEAN_IOU = str(REPO / "metrics" / "mean_iou")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> MAEConfig:
    kwargs = dict(
        image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        out_indices=[1, 2, 3, 4], add_fpn=True,
    )
    kwargs.update(overrides)
    return MAEConfig(**kwargs)


def tiny_upernet_kwargs(num_labels=5):
    return dict(num_labels=num_labels, hidden_size=16, auxiliary_channels=8, pool_scales=[1, 2])


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 512])
def test_backbone_feature_shapes_and_strides(size):
    backbone = AutoBackbone.from_config(tiny_config()).eval()  # registered with AutoBackbone
    assert isinstance(backbone, MAEBackbone)
    assert backbone.channels == [32, 32, 32, 32]
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = backbone(pixel_values).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 32, size // s, size // s) for s in (4, 8, 16, 32)]

    # level i is built from stage out_indices[i]: the identity level is block 3's tokens, the pooled
    # level block 4's; positions interpolated from the 14 x 14 table to the input's grid
    encoder = MAEModel(backbone.config, add_pooling_layer=False, use_final_norm=False).eval()
    encoder.load_state_dict(backbone.mae.state_dict())
    with torch.no_grad():
        hidden = encoder(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    grid = size // 16

    def as_map(tokens):
        return tokens[:, 1:].transpose(1, 2).reshape(2, 32, grid, grid)

    torch.testing.assert_close(maps[2], as_map(hidden[3]))
    torch.testing.assert_close(maps[3], F.max_pool2d(as_map(hidden[4]), 2))
    torch.testing.assert_close(maps[1], backbone.pyramid.fpn2(as_map(hidden[2])))


def test_backbone_single_stage_feeds_all_levels():
    backbone = MAEBackbone(tiny_config(out_indices=None)).eval()  # default: the last block (ViTDet style)
    assert backbone.out_features == ["stage4"]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64), output_hidden_states=True)
    last = out.hidden_states[4][:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    torch.testing.assert_close(out.feature_maps[2], last)
    torch.testing.assert_close(out.feature_maps[3], F.max_pool2d(last, 2))
    with pytest.raises(ValueError, match=r"`add_fpn=True` needs 4 stages .* or 1 .* got 2: \['stage2', 'stage4'\]"):
        tiny_config(out_indices=[2, 4])
    config = tiny_config(add_fpn=False, out_indices=[2, 4])
    config.add_fpn = True  # set after validation: the backbone checks again
    with pytest.raises(ValueError, match="`add_fpn=True` needs 4 stages"):
        MAEBackbone(config)


@pytest.mark.parametrize("out_indices", [[0, 2, 3], [3], [1, 2, 3, 4], [-2, -1]])
def test_backbone_without_pyramid_returns_one_map_per_stage(out_indices):
    """transformers' backbone contract (add_fpn off, the default): stage k's tokens as an (N, D, rows, cols)
    map for each selected stage, in stage order; one `channels` entry (D) each."""
    backbone = MAEBackbone(tiny_config(add_fpn=False, out_indices=out_indices)).eval()
    assert backbone.pyramid is None and not any(k.startswith("pyramid.") for k in backbone.state_dict())
    stages = [i % 5 for i in out_indices]  # stem + 4 blocks; -1 = the last block
    assert backbone.out_features == [("stem" if i == 0 else f"stage{i}") for i in stages]
    assert backbone.channels == [32] * len(out_indices)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 96, 64), output_hidden_states=True)
    assert len(out.feature_maps) == len(out_indices)
    for feature_map, stage in zip(out.feature_maps, stages):
        tokens = out.hidden_states[stage]  # (2, 1 + 6 * 4, 32): CLS first, patches row-major
        assert feature_map.shape == (2, 32, 6, 4)
        torch.testing.assert_close(feature_map[:, :, 1, 3], tokens[:, 1 + 1 * 4 + 3])  # row 1, column 3
        torch.testing.assert_close(feature_map[:, :, 5, 0], tokens[:, 1 + 5 * 4 + 0])


def test_upernet_config_saved_before_add_fpn_keeps_the_pyramid(tmp_path):
    """A segmentation model saved before `add_fpn` existed (its backbone config has no such key, its weights
    have `pyramid.*`) loads with the pyramid; a default MAEUperNetConfig has it too."""
    model = MAEUperNetForSemanticSegmentation(MAEUperNetConfig(backbone_config=tiny_config(), **tiny_upernet_kwargs()))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["backbone_config"]["add_fpn"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded, info = MAEUperNetForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert reloaded.config.backbone_config.add_fpn and reloaded.backbone.pyramid is not None
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(reloaded.backbone.pyramid.fpn2[0].weight, model.backbone.pyramid.fpn2[0].weight)
    assert MAEUperNetConfig().backbone_config.add_fpn
    assert MAEUperNetConfig().backbone_config.out_indices == [4, 6, 8, 12]


@pytest.mark.parametrize("source", ["pretraining", "encoder", "classifier"])
def test_mae_checkpoint_encoder_loads_into_backbone(tmp_path, source):
    config = tiny_config(num_labels=3)
    model_class = {"pretraining": MAEForPreTraining, "encoder": MAEModel, "classifier": MAEForImageClassification}
    model = model_class[source](config)
    model.save_pretrained(tmp_path)
    backbone, info = MAEBackbone.from_pretrained(tmp_path, output_loading_info=True)
    # only the new pyramid is missing; the decoder / final norm / head are ignored, not reported
    assert info["missing_keys"] and all(k.startswith("pyramid.") for k in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = {k.removeprefix("mae."): v for k, v in model.state_dict().items()}
    encoder_keys = [k for k in backbone.state_dict() if k.startswith("mae.")]
    assert len(encoder_keys) == 4 + 12 * 4  # cls, positions, patch weight + bias; 12 tensors per block
    for key in encoder_keys:
        torch.testing.assert_close(backbone.state_dict()[key], saved[key.removeprefix("mae.")], msg=key)
    assert backbone.mae.embeddings.position_embeddings.requires_grad  # trained in fine-tuning


# --------------------------------------------------------------------------------------------------
# UperNet
# --------------------------------------------------------------------------------------------------
def test_upernet_with_mae_backbone_forward_backward_save_load(tmp_path):
    config = UperNetConfig(backbone_config=tiny_config(), **tiny_upernet_kwargs())
    model = UperNetForSemanticSegmentation(config)  # the plain transformers class, through AutoBackbone
    assert isinstance(model.backbone, MAEBackbone)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255  # ignored pixels
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (2, 5, 64, 64)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    for name in ("embeddings.patch_embeddings.projection.weight", "encoder.layer.0.attention.qkv.weight",
                 "embeddings.position_embeddings"):
        grad = model.backbone.mae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.backbone.pyramid.fpn1[0].weight.grad.abs().sum() > 0

    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_mae_upernet_loads_as_remote_code_without_the_package(tmp_path):
    model = MAEUperNetForSemanticSegmentation(
        MAEUperNetConfig(backbone_config=tiny_config(), **tiny_upernet_kwargs())
    ).eval()
    assert isinstance(model, UperNetForSemanticSegmentation)
    model.save_pretrained(tmp_path / "model")
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save({"x": pixel_values, "logits": model(pixel_values).logits}, tmp_path / "ref.pt")
    shipped = set(os.listdir(tmp_path / "model"))
    assert {"modeling_mae_backbone.py", "modeling_mae.py", "configuration_mae.py", "pos_embed.py"} <= shipped
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_mae"] = None  # the package is not importable here
        import torch
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ref["x"]).logits, ref["logits"])
        print("REMOTE_OK", type(model.backbone).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE_OK MAEBackbone" in result.stdout, result.stderr[-3000:]


def test_layer_decay_groups_for_upernet():
    model = MAEUperNetForSemanticSegmentation(MAEUperNetConfig(backbone_config=tiny_config(), **tiny_upernet_kwargs()))
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    get = model.get_parameter
    # 4 blocks: embeddings = layer 0 (0.5^5), block i = layer i + 1, pyramid and heads = layer 5 (1.0)
    assert scale[id(get("backbone.mae.embeddings.patch_embeddings.projection.weight"))] == 0.5**5
    assert scale[id(get("backbone.mae.encoder.layer.0.mlp.fc1.weight"))] == 0.5**4
    assert scale[id(get("backbone.mae.encoder.layer.3.mlp.fc1.weight"))] == 0.5**1
    assert scale[id(get("backbone.pyramid.fpn1.0.weight"))] == 1.0
    assert scale[id(get("decode_head.classifier.weight"))] == 1.0
    assert decay[id(get("backbone.mae.embeddings.position_embeddings"))] == 0.0
    assert decay[id(get("backbone.mae.embeddings.cls_token"))] == 0.0
    assert decay[id(get("backbone.mae.encoder.layer.0.mlp.fc1.bias"))] == 0.0
    assert decay[id(get("backbone.mae.encoder.layer.0.mlp.fc1.weight"))] == 0.05


# --------------------------------------------------------------------------------------------------
# Data: ADE20K labels and joint augmentation
# --------------------------------------------------------------------------------------------------
def test_ade_folder_reduce_labels(tmp_path):
    write_synthetic_ade_folder(tmp_path, num_train=2, num_val=1, size=32, num_classes=3)
    Image.fromarray(np.array([[0, 1], [3, 255]], dtype=np.uint8), mode="L").save(
        tmp_path / "annotations/validation/ADE_validation_00000000.png"
    )
    Image.new("RGB", (2, 2)).save(tmp_path / "images/validation/ADE_validation_00000000.jpg")  # the mask's size
    split = load_segmentation_split("validation", data_dir=str(tmp_path))
    assert split.column_names == ["image", "annotation"]
    raw = SegmentationDataset(split, transform=lambda image: image, reduce_labels=False, train=False)[0]["labels"]
    reduced = SegmentationDataset(split, transform=lambda image: image, reduce_labels=True, train=False)[0]["labels"]
    assert raw.tolist() == [[0, 1], [3, 255]]
    assert reduced.tolist() == [[255, 0], [2, 255]]  # 0 = "other" is ignored, classes shift down by one


def test_train_transform_keeps_image_and_label_aligned():
    # the red channel encodes the class; after scale / crop / flip / pad every labelled pixel still agrees
    label = np.zeros((48, 80), dtype=np.int64)
    label[:, 40:] = 1
    label[10:30, 5:25] = 2
    image = Image.fromarray(np.stack([label * 100, np.zeros_like(label), np.zeros_like(label)], -1).astype(np.uint8))
    transform = SegTrainTransform(crop_size=64, base_scale=(160, 96), scale_range=(0.5, 1.5), photometric=False)
    for seed in range(8):
        random.seed(seed)
        pixels, target = transform(image, label)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8 and target.shape == (64, 64)
        assert set(target.unique().tolist()) <= {0, 1, 2, 255}
        valid = target != 255
        interior = valid & (F.max_pool2d((~valid).float()[None, None], 5, 1, 2)[0, 0] == 0)  # away from padding
        red = pixels[0].long()
        # nearest-neighbour labels vs bilinear image: compare away from class borders
        smooth = F.avg_pool2d(target.float()[None, None], 5, 1, 2)[0, 0] == target.float()
        keep = interior & smooth
        assert keep.sum() > 100
        assert (red[keep] - target[keep] * 100).abs().max() <= 2
        assert (pixels[:, ~valid] == 0).all()  # padding: black image, ignored label


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
def test_slide_inference_equals_whole_for_a_pointwise_model():
    conv = torch.nn.Conv2d(3, 4, 1)

    def model(pixel_values):
        return SimpleNamespace(logits=conv(pixel_values))

    pixel_values = torch.randn(1, 3, 50, 90)
    with torch.no_grad():
        whole = whole_inference(model, pixel_values, multiple=32)
        slide = slide_inference(model, pixel_values, crop=32, stride=21, batch_size=3)
        small = slide_inference(model, pixel_values[..., :20, :20], crop=32, stride=21)  # padded single window
    assert whole.shape == slide.shape == (1, 4, 50, 90)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(small, whole[..., :20, :20])


# --------------------------------------------------------------------------------------------------
# mean_iou metric (local evaluate module)
# --------------------------------------------------------------------------------------------------
def test_mean_iou_matches_hand_computed_values():
    metric = evaluate.load(MEAN_IOU)
    pred = np.array([[0, 0, 1], [1, 2, 2], [2, 2, 0]])
    ref = np.array([[0, 1, 1], [1, 2, 255], [2, 0, 0]])
    # valid pixels: 8 (one 255). class 0: pred {00,01,22}, ref {00,21,22} -> I 2, U 4
    # class 1: pred {02,10}, ref {01,02,10} -> I 2, U 3; class 2: pred {11,20,21} (12 ignored), ref {11,20} -> I 2, U 3
    # class 3: absent everywhere -> NaN, left out of the means
    result = metric.compute(predictions=[pred], references=[ref], num_labels=4, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [2 / 4, 2 / 3, 2 / 3, np.nan])
    np.testing.assert_allclose(result["per_category_accuracy"], [2 / 3, 2 / 3, 2 / 2, np.nan])
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert result["overall_accuracy"] == pytest.approx(6 / 8)
    # mmsegmentation's columns, in percent
    assert result["aAcc"] == pytest.approx(75.0)
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert result["mAcc"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)

    # areas are summed over images before dividing (not a mean of per-image IoUs)
    metric.add_batch(predictions=[np.zeros((2, 2), int)], references=[np.zeros((2, 2), int)])
    metric.add_batch(predictions=[np.zeros((1, 2), int)], references=[np.array([[1, 0]])])
    two = metric.compute(num_labels=2, ignore_index=255)
    np.testing.assert_allclose(two["per_category_iou"], [5 / 6, 0.0])
    assert two["overall_accuracy"] == pytest.approx(5 / 6)
    assert metric.compute(predictions=[pred], references=[ref], num_labels=4, ignore_index=255,
                          nan_to_num=-1)["per_category_iou"][3] == -1


def test_mean_iou_reduce_labels_follows_ade20k():
    metric = evaluate.load(MEAN_IOU)
    raw_reference = np.array([[0, 1, 2], [3, 255, 1]])  # ADE20K raw: 0 = other
    prediction = np.array([[2, 0, 1], [0, 0, 0]])  # classes after reduction: 0..2
    reduced = metric.compute(predictions=[prediction], references=[raw_reference], num_labels=3, ignore_index=255,
                             reduce_labels=True)
    by_hand = metric.compute(predictions=[prediction], references=[np.array([[255, 0, 1], [2, 255, 0]])],
                             num_labels=3, ignore_index=255)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert reduced[key] == by_hand[key]
    # the "other" pixel predicted as class 2 counts nowhere: class 2's IoU is 0 / 1 (ref only), not 0 / 2
    np.testing.assert_allclose(reduced["per_category_iou"], [2 / 3, 1.0, 0.0])
    assert reduced["overall_accuracy"] == pytest.approx(3 / 4)


# --------------------------------------------------------------------------------------------------
# scripts/segment.py
# --------------------------------------------------------------------------------------------------
def load_script():
    spec = importlib.util.spec_from_file_location("segment_script", REPO / "scripts" / "segment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_segment_script_lowers_the_loss_and_exports(tmp_path):
    data = write_synthetic_ade_folder(tmp_path / "data", num_train=16, num_val=4, size=48, num_classes=3, seed=1)
    out = tmp_path / "out"
    argv = [
        "--config", str(REPO / "configs" / "segment" / "demo.yaml"),
        "--data_dir", str(data), "--output_dir", str(out), "--num_labels", "3",
        "--model_config", "{patch_size: 8, num_hidden_layers: 4, image_size: 32, hidden_size: 32}",
        "--crop_size", "32", "--base_scale", "[64, 32]", "--eval_stride", "16",
        "--per_device_train_batch_size", "4", "--max_train_steps", "32", "--num_warmup_steps", "2",
        "--logging_steps", "8", "--eval_steps", "32", "--checkpointing_steps", "16",
    ]
    summary = load_script().main(argv)
    losses = [loss for _, loss in summary["train_loss"]]
    assert len(losses) == 4
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary["step"] == 32 and summary["best_step"] == 32
    assert 0.0 <= summary["best"]["mean_iou"] <= 1.0
    assert json.loads((out / "eval_results.json").read_text())["best_step"] == 32
    assert (out / "checkpoints" / "step_32" / "trainer_state.json").is_file()
    reloaded = MAEUperNetForSemanticSegmentation.from_pretrained(out)
    assert reloaded.config.num_labels == 3 and reloaded.config.backbone_config.out_indices == [1, 2, 3, 4]
    card = (out / "README.md").read_text()
    assert (out / "preprocessor_config.json").is_file() and "mIoU" in card
    assert "aAcc / mIoU / mAcc" in card and "| class | IoU |" in card
    per_class = summary["best"]["per_category_iou"]
    assert len(per_class) == 3 and all(f"| {i} | " in card for i in range(3))
    present = [v for v in per_class if v is not None]
    assert summary["best"]["mIoU"] == pytest.approx(100 * sum(present) / len(present))


def test_segment_script_fine_tunes_a_pretraining_checkpoint(tmp_path):
    """`--model_name_or_path` of an MAEForPreTraining directory: its encoder is the backbone."""
    script = load_script()
    pretrained = MAEForPreTraining(tiny_config(image_size=32, patch_size=8, add_fpn=False))
    pretrained.save_pretrained(tmp_path / "pt")
    cfg = script.SegmentConfig(model_name_or_path=str(tmp_path / "pt"), data_dir="unused", num_labels=3,
                               out_indices=[1, 2, 3, 4], decoder_hidden_size=16, auxiliary_channels=8)
    model = script.build_model(cfg)
    assert isinstance(model, MAEUperNetForSemanticSegmentation)
    torch.testing.assert_close(
        model.backbone.mae.encoder.layer[2].attention.qkv.weight, pretrained.mae.encoder.layer[2].attention.qkv.weight
    )
    assert model.config.backbone_config.drop_path_rate == 0.1 and model.config.num_labels == 3
    assert model.config.backbone_config.add_fpn and model.backbone.pyramid is not None  # the script sets it
    with pytest.raises(ValueError, match="exactly one of"):
        script.SegmentConfig(model_name_or_path="x", model_preset="mae-tiny")


def test_segment_script_resumes_exactly(tmp_path):
    """Stop-and-resume from a step-4 checkpoint ends with the same weights as an uninterrupted run
    (augmentation seeded per (seed, epoch, index), sampler reseeded per epoch, skipped batches)."""
    from safetensors.torch import load_file

    script = load_script()
    data = write_synthetic_ade_folder(tmp_path / "data", num_train=12, num_val=2, size=48, num_classes=3, seed=1)
    argv = [
        "--config", str(REPO / "configs" / "segment" / "demo.yaml"),
        "--data_dir", str(data), "--num_labels", "3",
        "--model_config", "{patch_size: 8, num_hidden_layers: 2, image_size: 32, hidden_size: 32}",
        "--out_indices", "[2]", "--crop_size", "32", "--base_scale", "[64, 32]", "--eval_stride", "16",
        "--per_device_train_batch_size", "4", "--max_train_steps", "8", "--num_warmup_steps", "2",
        "--logging_steps", "2", "--eval_steps", "100", "--checkpointing_steps", "4",
    ]
    straight = script.main(argv + ["--output_dir", str(tmp_path / "a")])
    resumed = script.main(argv + ["--output_dir", str(tmp_path / "b"),
                                  "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoints" / "step_4")])
    assert resumed["train_loss"] == straight["train_loss"]  # 3 steps per epoch: the resume crosses an epoch
    a = load_file(tmp_path / "a" / "checkpoints" / "step_8" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_8" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_segment_script_loads_an_official_checkpoint(tmp_path):
    """An official facebookresearch/mae `.pth` (made here from a tiny model) goes through the converter."""
    from modeling_mae.conversion.convert import mae_to_official

    script = load_script()
    pretrained = MAEForPreTraining(tiny_config(image_size=32, patch_size=8))
    torch.save({"model": mae_to_official(pretrained)}, tmp_path / "mae_pretrain_tiny.pth")
    cfg = script.SegmentConfig(model_name_or_path=str(tmp_path / "mae_pretrain_tiny.pth"), data_dir="unused",
                               model_config={"num_attention_heads": 2, "decoder_num_attention_heads": 2},
                               out_indices=[1, 2, 3, 4], num_labels=3)
    backbone = script.load_backbone(cfg)
    assert backbone.config.out_indices == [1, 2, 3, 4] and backbone.config.drop_path_rate == 0.1
    for key, value in pretrained.mae.state_dict().items():
        if not key.startswith("layernorm."):  # the backbone has no final norm
            torch.testing.assert_close(backbone.mae.state_dict()[key], value, msg=key)


def test_unreadable_segmentation_images_are_skipped_and_counted(tmp_path):
    """A zero-byte training JPEG is replaced by the next example (its index is reported); a truncated
    validation JPEG is left out of the evaluation batch and counted."""
    from modeling_mae.training.segmentation_data import collate_eval, collate_train

    write_synthetic_ade_folder(tmp_path, num_train=3, num_val=2, size=32, num_classes=3)
    (tmp_path / "images/training/ADE_training_00000001.jpg").write_bytes(b"")
    val_file = tmp_path / "images/validation/ADE_validation_00000000.jpg"
    val_file.write_bytes(val_file.read_bytes()[:100])
    train = SegmentationDataset(load_segmentation_split("train", data_dir=str(tmp_path)),
                                transform=lambda image, label, seed=None: (torch.zeros(3, 4, 4, dtype=torch.uint8),
                                                                           torch.from_numpy(label)), train=True)
    item = train[1]
    assert item["skipped"] == [1]
    direct = SegmentationDataset(load_segmentation_split("train", data_dir=str(tmp_path)),
                                 transform=lambda image, label, seed=None: (torch.zeros(3, 4, 4, dtype=torch.uint8),
                                                                            torch.from_numpy(label)), train=True)[2]
    assert torch.equal(item["labels"], direct["labels"])  # example 2 stands in
    assert int(collate_train([train[0], item])["num_skipped"]) == 1
    val = SegmentationDataset(load_segmentation_split("validation", data_dir=str(tmp_path)),
                              transform=lambda image: torch.zeros(3, 4, 4, dtype=torch.uint8), train=False)
    batch = collate_eval([val[0], val[1]])
    assert len(batch["pixel_values"]) == 1 and batch["num_skipped"] == 1
