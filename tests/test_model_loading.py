"""One loading function for every script: our directories, official `.pth` files, transformers ViTMAE
directories / Hub ids and timm models, converted on the fly (issues 13 and 15.5).

The references are built here, tiny and random (transformers' ViTMAEForPreTraining, timm's
VisionTransformer, an official-layout state dict); Hub calls are stopped at `hf_hub_download`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from modeling_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from modeling_mae.training.model_loading import checkpoint_format, load_pretrained

from pretrain_helpers import import_pretrain, tiny_args, write_dataset


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# 32x32 images, 4x4 patches, a 32-d encoder (a width of no official model: heads must be given or carried)
IMAGE, PATCH, GRID, DIM, DEPTH, HEADS, MLP = 32, 4, 8, 32, 2, 4, 64
DEC_DIM, DEC_DEPTH, DEC_HEADS, DEC_MLP = 16, 1, 4, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.add_(torch.randn_like(tensor) * 0.1)
    return module.eval()


def official_state_dict(with_decoder: bool) -> dict[str, torch.Tensor]:
    """facebookresearch/mae names and shapes (models_mae.py), random values."""
    shapes = {"cls_token": (1, 1, DIM), "pos_embed": (1, 1 + GRID * GRID, DIM),
              "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,),
              "norm.weight": (DIM,), "norm.bias": (DIM,)}

    def block(prefix, dim, mlp):
        return {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
                f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
                f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
                f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
                f"{prefix}.mlp.fc1.weight": (mlp, dim), f"{prefix}.mlp.fc1.bias": (mlp,),
                f"{prefix}.mlp.fc2.weight": (dim, mlp), f"{prefix}.mlp.fc2.bias": (dim,)}

    for i in range(DEPTH):
        shapes.update(block(f"blocks.{i}", DIM, MLP))
    if with_decoder:
        shapes.update({"mask_token": (1, 1, DEC_DIM), "decoder_pos_embed": (1, 1 + GRID * GRID, DEC_DIM),
                       "decoder_embed.weight": (DEC_DIM, DIM), "decoder_embed.bias": (DEC_DIM,),
                       "decoder_norm.weight": (DEC_DIM,), "decoder_norm.bias": (DEC_DIM,),
                       "decoder_pred.weight": (PATCH * PATCH * 3, DEC_DIM), "decoder_pred.bias": (PATCH * PATCH * 3,)})
        for i in range(DEC_DEPTH):
            shapes.update(block(f"decoder_blocks.{i}", DEC_DIM, DEC_MLP))
    return {k: torch.randn(shape) * 0.1 for k, shape in shapes.items()}


def transformers_dir(path: Path) -> ViTMAEForPreTraining:
    hf = randomize_(ViTMAEForPreTraining(ViTMAEConfig(
        image_size=IMAGE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=DEC_MLP, norm_pix_loss=True)))
    hf.save_pretrained(path)
    return hf


def timm_dir(path: Path) -> VisionTransformer:
    """A timm `.mae`-style encoder (no head) saved as timm's push_to_hf_hub does: config.json + model.safetensors."""
    vit = randomize_(VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                       mlp_ratio=MLP / DIM, num_classes=0))
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_test_patch4_32", "num_classes": 0, "num_features": DIM,
        "pretrained_cfg": {"tag": "mae", "input_size": [3, IMAGE, IMAGE]},
    }))
    return vit


# --------------------------------------------------------------------------------------------------
# Which format: named by the file type or config.json, never guessed from key names
# --------------------------------------------------------------------------------------------------
def test_formats_are_named_by_config_json(tmp_path):
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).save_pretrained(tmp_path / "ours")
    transformers_dir(tmp_path / "hf")
    timm_dir(tmp_path / "timm")
    torch.save({"model": official_state_dict(True)}, tmp_path / "mae.pth")
    assert checkpoint_format(str(tmp_path / "ours"))[0] == "ours"
    assert checkpoint_format(str(tmp_path / "hf"))[0] == "transformers"
    assert checkpoint_format(str(tmp_path / "timm"))[0] == "timm"
    assert checkpoint_format(str(tmp_path / "mae.pth"))[0] == "official"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'; expected 'mae'"):
        checkpoint_format(str(tmp_path / "other"))


def test_hub_id_reads_config_json_from_the_hub_first(tmp_path, monkeypatch):
    vit = timm_dir(tmp_path / "hub")
    requested = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):  # the Hub call stops here: no network in tests
        requested.append((repo_id, filename))
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    model = load_pretrained(MAEModel, "timm/vit_tiny_test.mae", num_attention_heads=HEADS)
    assert requested == [("timm/vit_tiny_test.mae", "config.json"), ("timm/vit_tiny_test.mae", "model.safetensors")]
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():  # timm's token-pooled features = our CLS after the final norm
        torch.testing.assert_close(model.eval()(x).pooler_output, vit.forward_head(vit.forward_features(x), pre_logits=True),
                                   atol=1e-5, rtol=0)


def test_transformers_dir_loads_with_its_loss_settings(tmp_path):
    hf = transformers_dir(tmp_path / "hf")
    model = load_pretrained(MAEForPreTraining, str(tmp_path / "hf")).eval()
    assert model.config.norm_pix_loss is True and model.config.num_attention_heads == HEADS
    x, noise = torch.randn(2, 3, IMAGE, IMAGE), torch.rand(2, GRID * GRID)
    with torch.no_grad():
        torch.testing.assert_close(model(x, noise=noise).loss, hf(x, noise=noise).loss, atol=1e-5, rtol=0)


def test_our_dir_at_a_new_image_size_interpolates_positions(tmp_path):
    from modeling_mae.pos_embed import interpolate_pos_embed

    model = randomize_(MAEModel(MAEConfig.from_preset("mae-tiny")))
    model.save_pretrained(tmp_path / "ours")
    resized = load_pretrained(MAEModel, str(tmp_path / "ours"), image_size=48)
    assert resized.config.image_hw == (48, 48)
    expected = interpolate_pos_embed(model.embeddings.position_embeddings, (8, 8), (12, 12))
    torch.testing.assert_close(resized.embeddings.position_embeddings, expected)


# --------------------------------------------------------------------------------------------------
# convert_checkpoint.py --to official writes the architecture and loss settings as `args`
# --------------------------------------------------------------------------------------------------
def test_official_export_round_trip_needs_no_flags_and_keeps_norm_pix_loss(tmp_path):
    import convert_checkpoint

    ours = randomize_(MAEForPreTraining(MAEConfig.from_preset("mae-tiny", norm_pix_loss=True, mask_ratio=0.6)))
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint.main(["--to", "official", str(tmp_path / "ours"), str(tmp_path / "mae_demo.pth")])
    raw = torch.load(tmp_path / "mae_demo.pth", weights_only=True)  # plain types only: no allow-listed class
    assert raw["args"]["norm_pix_loss"] is True and raw["args"]["num_attention_heads"] == 4
    assert raw["args"]["input_size"] == 32 and raw["args"]["mask_ratio"] == 0.6
    back = load_pretrained(MAEForPreTraining, str(tmp_path / "mae_demo.pth"))  # no head counts passed
    assert (back.config.norm_pix_loss, back.config.mask_ratio) == (True, 0.6)
    assert (back.config.num_attention_heads, back.config.decoder_num_attention_heads) == (4, 4)
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # and the CLI converts it back without --num_attention_heads
    convert_checkpoint.main(["--source", "official", str(tmp_path / "mae_demo.pth"), str(tmp_path / "again")])
    assert MAEConfig.from_pretrained(tmp_path / "again").norm_pix_loss is True


def test_a_file_without_args_names_the_flag(tmp_path):
    torch.save({"model": official_state_dict(False)}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="--num_attention_heads"):
        load_pretrained(MAEForImageClassification, str(tmp_path / "mae.pth"), num_labels=3)
    model = load_pretrained(MAEForImageClassification, str(tmp_path / "mae.pth"), num_labels=3, num_attention_heads=HEADS)
    assert model.config.num_attention_heads == HEADS and model.config.num_labels == 3


# --------------------------------------------------------------------------------------------------
# pretrain.py continues from each published format
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("loading_data"), "parquet", count=16, num_shards=2)


def _published(kind: str, root: Path) -> tuple[str, torch.Tensor, list[str]]:
    """(model_name_or_path, its patch projection weight, extra flags) of one published format."""
    if kind in ("official_with_decoder", "official_encoder_only"):
        sd = official_state_dict(with_decoder=kind == "official_with_decoder")
        torch.save({"model": sd}, root / "mae.pth")
        return str(root / "mae.pth"), sd["patch_embed.proj.weight"], [
            "--num_attention_heads", str(HEADS), "--decoder_num_attention_heads", str(DEC_HEADS)]
    if kind == "transformers":
        hf = transformers_dir(root / "hf")
        return str(root / "hf"), hf.vit.embeddings.patch_embeddings.projection.weight.detach().clone(), []
    vit = timm_dir(root / "timm")
    return str(root / "timm"), vit.patch_embed.proj.weight.detach().clone(), ["--num_attention_heads", str(HEADS)]


@pytest.mark.parametrize("kind", ["official_with_decoder", "official_encoder_only", "transformers", "timm"])
def test_pretrain_continues_from_each_published_format(kind, small_data, tmp_path, caplog):
    source, patch_weight, extra = _published(kind, tmp_path)
    pretrain = import_pretrain()
    out = tmp_path / "out"
    # lr 0: the exported weights must be exactly the checkpoint's (AdamW's decay is scaled by lr, too)
    argv = tiny_args(small_data, out, model_name_or_path=source, model_preset="unused", max_train_steps=2,
                     checkpointing_steps=2, learning_rate=0.0) + extra
    with caplog.at_level(logging.WARNING):
        assert pretrain.main(argv) == 0
    exported = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(exported["mae.embeddings.patch_embeddings.projection.weight"], patch_weight,
                               atol=0, rtol=0)
    state = json.loads(next((out / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["step"] == 2 and state["last_loss"] == state["last_loss"]  # finite, not NaN
    newly = "DECODER of this MAEForPreTraining is NEWLY INITIALISED"
    if kind in ("official_encoder_only", "timm"):
        assert newly in caplog.text  # loudly logged
    else:
        assert newly not in caplog.text


def test_finetune_starts_from_an_official_layout_file(tmp_path):
    """Issue 15.5: `finetune.py --model_name_or_path mae_demo.pth` (a 64-d width no official model has)."""
    import finetune

    from modeling_mae.conversion import mae_to_official, official_args, save_official
    from modeling_mae.training.classification_data import make_synthetic_classification

    ours = randomize_(MAEForPreTraining(MAEConfig.from_preset("mae-tiny")))
    save_official(mae_to_official(ours), tmp_path / "mae_demo.pth", args=official_args(ours.config))
    train = make_synthetic_classification(tmp_path / "train", num_per_class=4, seed=0)
    val = make_synthetic_classification(tmp_path / "val", num_per_class=2, seed=1)
    argv = ["--config", str(REPO / "configs/finetune/demo.yaml"), "--model_name_or_path", str(tmp_path / "mae_demo.pth"),
            "--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(tmp_path / "ft"),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--create_demo_data", "false"]
    assert finetune.main(argv) == 0
    exported = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert exported["mae.encoder.layer.0.attention.qkv.weight"].shape == (3 * 64, 64)
