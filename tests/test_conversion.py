"""Checkpoint conversion: parity with transformers and timm, the official layout, the CLI.

Everything is tiny, random and offline: the reference models (transformers' ViTMAE, timm's
VisionTransformer) are built here and compared against numerically, never mocked.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

from modeling_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel, sincos_2d
from modeling_mae.conversion import (
    NewlyInitializedWeightsWarning,
    convert_official_to_mae,
    convert_timm_to_mae,
    convert_transformers_to_mae,
    load_checkpoint,
    load_transformers_model,
    mae_to_official,
    mae_to_timm,
    mae_to_transformers,
    official_architecture,
    timm_model_kwargs,
)
from modeling_mae.conversion.convert import DroppedWeightsWarning
from modeling_mae.pos_embed import interpolate_pos_embed


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_checkpoint.py"
ATOL = 1e-5

# tiny architecture used throughout: 32x32 images, 4x4 patches (8x8 grid), 32-d encoder with 2 blocks
# and 4 heads, 16-d decoder with 1 block and 4 heads
IMAGE, PATCH, GRID, DIM, DEPTH, HEADS, MLP = 32, 4, 8, 32, 2, 4, 64
DEC_DIM, DEC_DEPTH, DEC_HEADS, DEC_MLP = 16, 1, 4, 32
NUM_LABELS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter and float buffer (position tables, tokens, norms, biases included), so
    that no tensor is left at a value that would hide a swapped or dropped weight."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.add_(torch.randn_like(tensor) * std)
    return module.eval()


def images(n: int = 2, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def vit_mae_config(**overrides) -> ViTMAEConfig:
    # layer_norm_eps 1e-2 (neither transformers' 1e-12 nor our 1e-6): outputs differ visibly unless the
    # value is copied.
    kwargs = dict(
        image_size=IMAGE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=DEC_MLP, layer_norm_eps=1e-2,
        mask_ratio=0.75,
    )
    kwargs.update(overrides)
    return ViTMAEConfig(**kwargs)


def our_tiny_config(**overrides) -> MAEConfig:
    kwargs = dict(
        image_size=IMAGE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=DEC_MLP,
    )
    kwargs.update(overrides)
    return MAEConfig(**kwargs)


def timm_vit(**overrides) -> VisionTransformer:
    kwargs = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / DIM)
    kwargs.update(overrides)
    return randomize_(VisionTransformer(**kwargs))


def official_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """Random weights under the names and shapes of facebookresearch/mae, written out from its
    models_mae.py / models_vit.py / main_linprobe.py (not from our rename table).

    kind: "pretraining" (encoder + norm + decoder, the visualisation release), "encoder" (encoder + norm,
    the pretraining release), "finetuned" (global pool: fc_norm + head, no norm), "linprobe"
    (norm + head = Sequential(BatchNorm1d(affine=False), Linear)).
    """
    sd = {
        "cls_token": (1, 1, DIM),
        "pos_embed": (1, 1 + GRID * GRID, DIM),
        "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (DIM,),
    }

    def block(prefix, dim, mlp):
        return {
            f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (mlp, dim), f"{prefix}.mlp.fc1.bias": (mlp,),
            f"{prefix}.mlp.fc2.weight": (dim, mlp), f"{prefix}.mlp.fc2.bias": (dim,),
        }

    for i in range(DEPTH):
        sd.update(block(f"blocks.{i}", DIM, MLP))
    if kind in ("pretraining", "encoder", "linprobe"):
        sd.update({"norm.weight": (DIM,), "norm.bias": (DIM,)})
    if kind == "pretraining":
        sd.update({
            "mask_token": (1, 1, DEC_DIM),
            "decoder_pos_embed": (1, 1 + GRID * GRID, DEC_DIM),
            "decoder_embed.weight": (DEC_DIM, DIM), "decoder_embed.bias": (DEC_DIM,),
            "decoder_norm.weight": (DEC_DIM,), "decoder_norm.bias": (DEC_DIM,),
            "decoder_pred.weight": (PATCH * PATCH * 3, DEC_DIM), "decoder_pred.bias": (PATCH * PATCH * 3,),
        })
        for i in range(DEC_DEPTH):
            sd.update(block(f"decoder_blocks.{i}", DEC_DIM, DEC_MLP))
    if kind == "finetuned":
        sd.update({"fc_norm.weight": (DIM,), "fc_norm.bias": (DIM,),
                   "head.weight": (NUM_LABELS, DIM), "head.bias": (NUM_LABELS,)})
    if kind == "linprobe":
        sd.update({"head.0.running_mean": (DIM,), "head.0.running_var": (DIM,),
                   "head.1.weight": (NUM_LABELS, DIM), "head.1.bias": (NUM_LABELS,)})
    out = {k: torch.randn(shape) * 0.1 for k, shape in sd.items()}
    if kind == "linprobe":
        out["head.0.running_var"] = out["head.0.running_var"].abs() + 0.5
        out["head.0.num_batches_tracked"] = torch.tensor(1234)
    return out


def assert_close(actual, expected, name=""):
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# transformers parity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_transformers_pretraining_parity_both_directions(norm_pix_loss):
    hf = randomize_(ViTMAEForPreTraining(vit_mae_config(norm_pix_loss=norm_pix_loss)))
    config, ours = convert_transformers_to_mae(hf)
    assert isinstance(ours, MAEForPreTraining)
    assert (config.layer_norm_eps, config.norm_pix_loss, config.mask_ratio) == (1e-2, norm_pix_loss, 0.75)

    pixel_values, noise = images(), torch.rand(2, GRID * GRID)
    with torch.no_grad():
        theirs_out = hf(pixel_values, noise=noise)
        ours_out = ours(pixel_values, noise=noise)
        other_noise = ours(pixel_values, noise=torch.rand(2, GRID * GRID))
    for name in ("loss", "logits", "mask", "ids_restore"):
        assert_close(ours_out[name], theirs_out[name], name)
    assert (other_noise.logits - ours_out.logits).abs().max() > 1e-2  # the comparison can fail

    back = mae_to_transformers(ours)
    assert isinstance(back, ViTMAEForPreTraining)
    assert back.config.layer_norm_eps == 1e-2 and back.config.norm_pix_loss == norm_pix_loss
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    with torch.no_grad():
        back_out = back(pixel_values, noise=noise)
    for name in ("loss", "logits", "mask", "ids_restore"):
        assert_close(back_out[name], theirs_out[name], f"reverse {name}")


def test_transformers_encoder_parity_hidden_states_and_attentions():
    hf = randomize_(ViTMAEModel(vit_mae_config(attn_implementation="eager")))
    config, ours = convert_transformers_to_mae(hf)
    assert isinstance(ours, MAEModel) and config.pooling == "cls"  # no fc_norm to invent

    pixel_values, noise = images(), torch.rand(2, GRID * GRID)
    with torch.no_grad():  # transformers' ViTMAEModel always masks: give both the same noise
        theirs_out = hf(pixel_values, noise=noise, output_hidden_states=True, output_attentions=True)
        ours_out = ours(pixel_values, noise=noise, output_hidden_states=True, output_attentions=True)
    assert ours_out.last_hidden_state.shape == (2, 1 + 16, DIM)
    assert_close(ours_out.last_hidden_state, theirs_out.last_hidden_state, "last_hidden_state")
    assert_close(ours_out.mask, theirs_out.mask, "mask")
    assert torch.equal(ours_out.ids_restore, theirs_out.ids_restore)
    assert len(ours_out.hidden_states) == len(theirs_out.hidden_states) == DEPTH + 1
    for i, (a, b) in enumerate(zip(ours_out.hidden_states, theirs_out.hidden_states)):
        assert_close(a, b, f"hidden_states[{i}]")
    assert len(theirs_out.attentions) == DEPTH
    for i, (a, b) in enumerate(zip(ours_out.attentions, theirs_out.attentions)):
        assert_close(a, b, f"attentions[{i}]")

    back = mae_to_transformers(ours)
    assert isinstance(back, ViTMAEModel)
    with torch.no_grad():
        back_out = back(pixel_values, noise=noise)
    assert_close(back_out.last_hidden_state, theirs_out.last_hidden_state, "reverse last_hidden_state")


def test_ours_to_transformers_and_back():
    ours = randomize_(MAEForPreTraining(our_tiny_config()))
    hf = mae_to_transformers(ours)
    pixel_values, noise = images(), torch.rand(2, GRID * GRID)
    with torch.no_grad():
        ours_out, hf_out = ours(pixel_values, noise=noise), hf(pixel_values, noise=noise)
    for name in ("loss", "logits", "mask", "ids_restore"):
        assert_close(hf_out[name], ours_out[name], name)
    _, again = convert_transformers_to_mae(hf)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def _legacy_hub_layout(state_dict: dict) -> dict:
    """Rename transformers' module names to the layout of the files on the Hub (facebook/vit-mae-*,
    written by transformers 4): `encoder.layer.{i}.attention.attention.query`, `intermediate.dense`, ..."""
    renamed = {}
    for key, tensor in state_dict.items():
        key = key.replace("vit.layers.", "vit.encoder.layer.")
        for new, old in (
            ("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
        ):
            key = key.replace(new, old)
        renamed[key] = tensor.contiguous()
    return renamed


@pytest.mark.parametrize("layout", ["save_pretrained", "legacy_hub_files"])
def test_transformers_directory(tmp_path, layout):
    from safetensors.torch import save_file

    hf = randomize_(ViTMAEForPreTraining(vit_mae_config(norm_pix_loss=True)))
    hf.save_pretrained(tmp_path)
    if layout == "legacy_hub_files":
        save_file(_legacy_hub_layout(hf.state_dict()), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_transformers_model(str(tmp_path))
    _, ours = convert_transformers_to_mae(loaded)
    pixel_values, noise = images(), torch.rand(2, GRID * GRID)
    with torch.no_grad():
        assert_close(ours(pixel_values, noise=noise).logits, hf(pixel_values, noise=noise).logits, "logits")


# --------------------------------------------------------------------------------------------------
# timm parity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_timm_classifier_parity_both_directions(global_pool):
    # "avg" + fc_norm is the MAE fine-tuning layout (timm sets fc_norm for avg pooling, norm = Identity)
    timm_model = timm_vit(num_classes=NUM_LABELS, global_pool=global_pool)
    assert ("fc_norm.weight" in timm_model.state_dict()) == (global_pool == "avg")
    config, ours = convert_timm_to_mae(timm_model.state_dict(), num_attention_heads=HEADS)
    assert isinstance(ours, MAEForImageClassification)
    assert config.pooling == ("mean" if global_pool == "avg" else "cls") and config.num_labels == NUM_LABELS

    pixel_values = images()
    with torch.no_grad():
        features = timm_model.forward_features(pixel_values)
        timm_logits = timm_model.forward_head(features)
        timm_pre_logits = timm_model.forward_head(features, pre_logits=True)
        ours_out = ours(pixel_values)
        pooled = ours.forward_features(pixel_values).pooler_output
    assert_close(ours_out.logits, timm_logits, "logits")
    assert_close(ours.forward_head(pooled, pre_logits=True), timm_pre_logits, "pre-logits")

    back = VisionTransformer(**timm_model_kwargs(config, ours))
    back.load_state_dict(mae_to_timm(ours), strict=True)
    with torch.no_grad():
        assert_close(back.eval()(pixel_values), timm_logits, "reverse logits")


def test_timm_mae_encoder_parity():
    """`vit_*_patch16_224.mae` layout: encoder + final norm, no head, CLS-token features."""
    timm_model = timm_vit(num_classes=0, global_pool="token")
    config, ours = convert_timm_to_mae(timm_model.state_dict(), num_attention_heads=HEADS)
    assert isinstance(ours, MAEModel) and config.pooling == "cls"
    pixel_values = images()
    with torch.no_grad():
        features = timm_model.forward_features(pixel_values)
        out = ours(pixel_values)
    assert_close(out.last_hidden_state, features, "last_hidden_state")
    assert_close(out.pooler_output, timm_model.forward_head(features, pre_logits=True), "pooler_output")
    exported = mae_to_timm(ours)
    assert exported.keys() == timm_model.state_dict().keys()


# --------------------------------------------------------------------------------------------------
# official layout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, cls",
    [
        ("pretraining", MAEForPreTraining),
        ("encoder", MAEModel),
        ("finetuned", MAEForImageClassification),
        ("linprobe", MAEForImageClassification),
    ],
)
def test_official_layout_round_trip_unchanged(kind, cls):
    official = official_state_dict(kind)
    config, model = convert_official_to_mae(official, num_attention_heads=HEADS, decoder_num_attention_heads=DEC_HEADS)
    assert type(model) is cls
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (DIM, DEPTH, MLP)
    assert (config.patch_size, config.image_size, config.qkv_bias) == (PATCH, IMAGE, True)
    if kind == "pretraining":
        assert (config.decoder_hidden_size, config.decoder_num_hidden_layers) == (DEC_DIM, DEC_DEPTH)
        assert config.decoder_intermediate_size == DEC_MLP
        assert config.norm_pix_loss is False  # the released decoders regress raw pixels
        assert torch.equal(model.decoder.decoder_layers[0].attention.qkv.weight, official["decoder_blocks.0.attn.qkv.weight"])
        assert torch.equal(model.decoder.decoder_pos_embed, official["decoder_pos_embed"])  # copied, not regenerated
    if kind in ("finetuned", "linprobe"):
        assert config.num_labels == NUM_LABELS
        assert config.pooling == ("mean" if kind == "finetuned" else "cls")
        assert config.linear_probe_head == (kind == "linprobe")
    encoder = model if isinstance(model, MAEModel) else model.mae
    assert torch.equal(encoder.encoder.layer[1].attention.qkv.weight, official["blocks.1.attn.qkv.weight"])
    assert torch.equal(encoder.embeddings.position_embeddings, official["pos_embed"])

    back = mae_to_official(model)
    assert back.keys() == official.keys()
    for key, tensor in official.items():
        assert torch.equal(back[key], tensor), key


def test_official_weights_compute_what_timm_computes():
    """timm loads the official encoder and fine-tuned weights as they are (same names): our conversion
    of the same dicts must give the same features and logits."""
    pixel_values = images()
    encoder_sd = official_state_dict("encoder")
    timm_encoder = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                     mlp_ratio=MLP / DIM, num_classes=0, global_pool="token")
    timm_encoder.load_state_dict(encoder_sd, strict=True)
    _, ours = convert_official_to_mae(encoder_sd, num_attention_heads=HEADS)
    with torch.no_grad():
        assert_close(ours(pixel_values).last_hidden_state, timm_encoder.eval().forward_features(pixel_values), "features")

    finetuned_sd = official_state_dict("finetuned")
    timm_classifier = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                        mlp_ratio=MLP / DIM, num_classes=NUM_LABELS, global_pool="avg")
    timm_classifier.load_state_dict(finetuned_sd, strict=True)
    _, ours = convert_official_to_mae(finetuned_sd, num_attention_heads=HEADS)
    with torch.no_grad():
        assert_close(ours(pixel_values).logits, timm_classifier.eval()(pixel_values), "logits")


def test_official_pth_with_pickled_args(tmp_path):
    official = official_state_dict("pretraining")
    args = argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True, mask_ratio=0.6, input_size=IMAGE, blr=1.5e-4)
    path = tmp_path / "checkpoint-799.pth"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({"model": official, "optimizer": optimizer.state_dict(), "epoch": 799, "args": args}, path)

    checkpoint = load_checkpoint(path)
    assert checkpoint.args["norm_pix_loss"] is True and checkpoint.args["mask_ratio"] == 0.6
    assert checkpoint.state_dict.keys() == official.keys()
    config, model = convert_official_to_mae(
        checkpoint.state_dict, checkpoint_args=checkpoint.args, num_attention_heads=HEADS,
        decoder_num_attention_heads=DEC_HEADS,
    )
    assert config.norm_pix_loss is True and config.mask_ratio == 0.6  # from the pickled args
    _, overridden = convert_official_to_mae(
        checkpoint.state_dict, checkpoint_args=checkpoint.args, num_attention_heads=HEADS,
        decoder_num_attention_heads=DEC_HEADS, norm_pix_loss=False,
    )
    assert overridden.config.norm_pix_loss is False  # explicit overrides win


def test_fetch_checkpoint_downloads_urls_once(tmp_path, monkeypatch):
    import shutil

    from modeling_mae.conversion.checkpoint_io import fetch_checkpoint

    published = tmp_path / "published.pth"
    torch.save({"model": official_state_dict("encoder")}, published)
    downloads = []

    def fake_download(url, dst, *args, **kwargs):  # stop at the network call
        downloads.append(url)
        shutil.copy(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_tiny.pth"
    first, second = fetch_checkpoint(url), fetch_checkpoint(url)
    assert first == second == tmp_path / "hub" / "checkpoints" / "mae_pretrain_vit_tiny.pth"
    assert downloads == [url]
    assert fetch_checkpoint(str(published)) == published
    with pytest.raises(FileNotFoundError):
        fetch_checkpoint(str(tmp_path / "nowhere.pth"))


class _NotAllowed:
    pass


def test_load_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="state_dict_key"):
        load_checkpoint(path)
    assert load_checkpoint(path, state_dict_key="state_dict").state_dict.keys() == {"w"}


# --------------------------------------------------------------------------------------------------
# missing / unexpected keys, new parts, architecture inference, interpolation
# --------------------------------------------------------------------------------------------------
def test_missing_keys_fail_by_name_unless_allowed():
    official = official_state_dict("encoder")
    del official["blocks.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"mae\.encoder\.layer\.1\.layernorm_after\.weight <- blocks\.1\.norm2\.weight"):
        convert_official_to_mae(official, num_attention_heads=HEADS)
    with pytest.warns(NewlyInitializedWeightsWarning, match="layernorm_after"):
        _, model = convert_official_to_mae(official, num_attention_heads=HEADS, allow_missing=True)
    assert torch.equal(model.encoder.layer[1].layernorm_after.weight, torch.ones(DIM))  # official init


def test_unexpected_keys_fail_by_name_unless_allowed():
    official = official_state_dict("encoder")
    official["blocks.0.attn.q_norm.weight"] = torch.ones(DIM // HEADS)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        convert_official_to_mae(official, num_attention_heads=HEADS)
    with pytest.warns(DroppedWeightsWarning, match="q_norm"):
        convert_official_to_mae(official, num_attention_heads=HEADS, allow_unexpected=True)
    # the decoder of a visualisation checkpoint has no place in an encoder-only model unless allowed
    with pytest.raises(ValueError, match="decoder_embed.weight"):
        convert_official_to_mae(official_state_dict("pretraining"), model_class="MAEModel",
                                num_attention_heads=HEADS, decoder_num_attention_heads=DEC_HEADS)


def test_encoder_only_into_pretraining_warns_loudly_about_the_decoder():
    official = official_state_dict("encoder")
    with pytest.warns(NewlyInitializedWeightsWarning, match="DECODER .* NEWLY INITIALISED"):
        config, model = convert_official_to_mae(
            official, model_class="MAEForPreTraining", num_attention_heads=HEADS,
            decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=1, decoder_num_attention_heads=DEC_HEADS,
        )
    assert isinstance(model, MAEForPreTraining)
    # the new decoder gets the official initialisation: published sin-cos table, N(0, 0.02) mask token
    assert torch.allclose(model.decoder.decoder_pos_embed[0], sincos_2d(DEC_DIM, (GRID, GRID)))
    assert 0 < model.decoder.mask_token.std() < 0.1
    assert torch.equal(model.mae.layernorm.weight, official["norm.weight"])


def test_encoder_only_into_classifier_says_fc_norm_starts_as_the_official_fine_tuning():
    """fc_norm is not random: it is set to ones / zeros, as main_finetune.py starts it; the head is random.
    (The encoder's final `norm` has no place under mean pooling, as in the official fine-tuning model.)"""
    import warnings

    official = official_state_dict("encoder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model = convert_official_to_mae(official, model_class="MAEForImageClassification",
                                           num_attention_heads=HEADS, num_labels=3, allow_unexpected=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, NewlyInitializedWeightsWarning)]
    fc_norm = [m for m in messages if "fc_norm" in m]
    head = [m for m in messages if "HEAD" in m]
    assert len(fc_norm) == 1 and len(head) == 1, messages
    assert "set to weight 1 and bias 0 (ones / zeros), exactly as the official fine-tuning starts it" in fc_norm[0]
    assert "random" not in fc_norm[0].lower() and "NEWLY INITIALISED" not in fc_norm[0]
    assert "NEWLY INITIALISED (random)" in head[0]
    assert torch.equal(model.mae.fc_norm.weight, torch.ones(DIM))
    assert torch.equal(model.mae.fc_norm.bias, torch.zeros(DIM))


def test_heads_come_from_presets_or_must_be_given():
    def meta_vit(width, depth, mlp, patch=16, grid=14):
        sd = {"patch_embed.proj.weight": torch.empty(width, 3, patch, patch, device="meta"),
              "pos_embed": torch.empty(1, 1 + grid * grid, width, device="meta"),
              "blocks.0.mlp.fc1.weight": torch.empty(mlp, width, device="meta"),
              "blocks.0.attn.qkv.bias": torch.empty(3 * width, device="meta")}
        sd.update({f"blocks.{i}.norm1.weight": torch.empty(width, device="meta") for i in range(depth)})
        return sd

    base = official_architecture(meta_vit(768, 12, 3072))
    assert (base["num_attention_heads"], base["num_hidden_layers"], base["image_size"]) == (12, 12, 224)
    huge = official_architecture(meta_vit(1280, 32, 5120, patch=14, grid=16))
    assert (huge["num_attention_heads"], huge["patch_size"], huge["image_size"]) == (16, 14, 224)
    with pytest.raises(ValueError, match="num_attention_heads"):
        official_architecture(meta_vit(DIM, DEPTH, MLP, patch=PATCH, grid=GRID))
    assert official_architecture(meta_vit(DIM, DEPTH, MLP, patch=PATCH, grid=GRID), num_attention_heads=2)[
        "num_attention_heads"] == 2


def test_wrong_source_names_the_problem():
    hf_names = {"vit.embeddings.cls_token": torch.zeros(1, 1, DIM)}
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight.*--source official"):
        convert_official_to_mae(hf_names)
    with pytest.raises(ValueError, match="no MAE decoder"):
        convert_timm_to_mae(official_state_dict("pretraining"))
    with pytest.raises(ValueError, match="model_class"):
        convert_official_to_mae(official_state_dict("encoder"), model_class="ViTModel", num_attention_heads=HEADS)


def test_position_tables_are_interpolated_to_a_new_image_size():
    official = official_state_dict("pretraining")
    config, model = convert_official_to_mae(
        official, image_size=48, num_attention_heads=HEADS, decoder_num_attention_heads=DEC_HEADS
    )
    assert config.image_size == 48 and config.grid_size == (12, 12)
    expected = interpolate_pos_embed(official["pos_embed"], (GRID, GRID), (12, 12))
    assert model.mae.embeddings.position_embeddings.shape == (1, 1 + 144, DIM)
    assert torch.equal(model.mae.embeddings.position_embeddings, expected)
    assert torch.equal(model.mae.embeddings.position_embeddings[:, 0], official["pos_embed"][:, 0])  # CLS kept
    assert model.decoder.decoder_pos_embed.shape == (1, 1 + 144, DEC_DIM)
    with torch.no_grad():
        out = model(images(size=48), noise=torch.rand(2, 144))
    assert out.logits.shape == (2, 144, PATCH * PATCH * 3) and torch.isfinite(out.loss)


def test_exports_refuse_what_the_format_cannot_hold():
    classifier = MAEForImageClassification(our_tiny_config(num_labels=3))
    with pytest.raises(ValueError, match="transformers has no ViTMAE model"):
        mae_to_transformers(classifier)
    pretraining = MAEForPreTraining(our_tiny_config())
    with pytest.raises(ValueError, match=r"decoder\.decoder_embed\.weight.*allow_dropped"):
        mae_to_timm(pretraining)
    with pytest.warns(DroppedWeightsWarning):
        encoder_only = mae_to_timm(pretraining, allow_dropped=True)
    assert "norm.weight" in encoder_only and not any(k.startswith("decoder") for k in encoder_only)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _run_cli(argv):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    convert_checkpoint.main([str(a) for a in argv])


def test_cli_official_round_trip(tmp_path):
    official = official_state_dict("pretraining")
    source = tmp_path / "mae_visualize.pth"
    torch.save({"model": official, "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75)}, source)
    out = tmp_path / "converted"
    _run_cli(["--source", "official", source, out, "--num_attention_heads", HEADS,
              "--decoder_num_attention_heads", DEC_HEADS])
    model = AutoModelForPreTraining.from_pretrained(out)
    assert isinstance(model, MAEForPreTraining)
    assert AutoImageProcessor.from_pretrained(out).size == {"height": IMAGE, "width": IMAGE}
    assert torch.equal(model.mae.encoder.layer[0].mlp.fc1.weight, official["blocks.0.mlp.fc1.weight"])

    exported = tmp_path / "exported.pth"
    _run_cli(["--to", "official", out, exported])
    back = torch.load(exported, weights_only=True)["model"]
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


def test_cli_transformers_both_directions(tmp_path):
    hf = randomize_(ViTMAEModel(vit_mae_config()))
    hf.save_pretrained(tmp_path / "hf")
    _run_cli(["--source", "transformers", tmp_path / "hf", tmp_path / "ours"])
    ours = AutoModel.from_pretrained(tmp_path / "ours")
    assert isinstance(ours, MAEModel)
    _run_cli(["--to", "transformers", tmp_path / "ours", tmp_path / "hf_again"])
    again = ViTMAEModel.from_pretrained(tmp_path / "hf_again")
    pixel_values, noise = images(), torch.rand(2, GRID * GRID)
    with torch.no_grad():
        expected = hf(pixel_values, noise=noise).last_hidden_state
        assert_close(ours(pixel_values, noise=noise).last_hidden_state, expected, "converted")
        assert_close(again.eval()(pixel_values, noise=noise).last_hidden_state, expected, "exported")
    assert AutoImageProcessor.from_pretrained(tmp_path / "hf_again") is not None


def test_cli_timm_hub_id_and_export(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    timm_model = timm_vit(num_classes=NUM_LABELS, global_pool="avg")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(weights))
    requested = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):  # stop at the Hub call: no network in tests
        requested.append((repo_id, filename))
        return str(weights)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    _run_cli(["--source", "timm", "timm/vit_tiny_test.mae", tmp_path / "ours", "--num_attention_heads", HEADS])
    assert requested == [("timm/vit_tiny_test.mae", "model.safetensors")]
    ours = AutoModelForImageClassification.from_pretrained(tmp_path / "ours")
    pixel_values = images()
    with torch.no_grad():
        assert_close(ours(pixel_values).logits, timm_model(pixel_values), "logits")

    _run_cli(["--to", "timm", tmp_path / "ours", tmp_path / "exported.safetensors"])
    back = VisionTransformer(**timm_model_kwargs(ours.config, ours))
    from safetensors.torch import load_file

    back.load_state_dict(load_file(str(tmp_path / "exported.safetensors")), strict=True)
    with torch.no_grad():
        assert_close(back.eval()(pixel_values), timm_model(pixel_values), "exported logits")


def test_cli_imagenet_labels_for_a_1000_class_classifier(tmp_path):
    official = official_state_dict("finetuned")
    official["head.weight"], official["head.bias"] = torch.randn(1000, DIM) * 0.01, torch.zeros(1000)
    source = tmp_path / "mae_finetuned.pth"
    torch.save({"model": official}, source)
    _run_cli(["--source", "official", source, tmp_path / "out", "--num_attention_heads", HEADS, "--imagenet_labels"])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 1000 and model.config.pooling == "mean"
    assert model.config.id2label[0].startswith("tench") and model.config.label2id[model.config.id2label[999]] == 999


def test_cli_as_a_script_reports_errors(tmp_path):
    """One real subprocess: the script runs from a checkout, and a bad conversion exits non-zero with
    the offending key named."""
    official = official_state_dict("encoder")
    official["unexpected.weight"] = torch.zeros(1)
    source = tmp_path / "encoder.pth"
    torch.save({"model": official}, source)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--source", "official", str(source), str(tmp_path / "out"),
         "--num_attention_heads", str(HEADS)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "unexpected.weight" in result.stderr and "--allow_unexpected" in result.stderr
    assert not (tmp_path / "out").exists()
