"""OpenMMLab mmsegmentation MAE + UperNet checkpoints: conversion both ways, and parity with mmsegmentation.

The parity test runs mmsegmentation itself (1.2.2, with mmengine and mmcv-lite 2.1.0) in a cached
virtual environment of its own (`MMSEG_VENV`, default ~/.cache/modeling_mae/mmseg-venv), created on
first use from PyPI and skipped, with the reason, when that is not possible. The environment shares
this interpreter's packages (torch, numpy, ...) through a `.pth` file, so only mmsegmentation and
its small pure-Python dependencies are installed there. No mmsegmentation code is in this repository:
`tests/mmseg_reference.py` builds their model through their registry and saves weights and logits.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from modeling_mae import MAEConfig, MAEUperNetConfig, MAEUperNetForSemanticSegmentation
from modeling_mae.conversion.mmseg import convert_mmseg_to_mae, mae_to_mmseg, mmseg_grid
from modeling_mae.relative_position import relative_position_index


REPO = Path(__file__).resolve().parents[1]
MMSEG_PACKAGES = ("mmsegmentation==1.2.2", "mmcv-lite==2.1.0", "mmengine", "ftfy")  # ftfy: mmseg.utils imports it
MMSEG_VENV = Path(os.environ.get("MMSEG_VENV", Path.home() / ".cache" / "modeling_mae" / "mmseg-venv"))


def ours(image_size=(32, 48), seed=0, **backbone) -> MAEUperNetForSemanticSegmentation:
    """A small random UperNet model with relative tables, gammas and BatchNorm statistics all random."""
    backbone_config = MAEConfig(
        image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], use_relative_position_bias=True, layer_scale_init_value=1.0,
        **backbone,
    )
    model = MAEUperNetForSemanticSegmentation(
        MAEUperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_channels=8, num_labels=5)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = 0.3 * torch.rand(tensor.shape, generator=generator) if tensor.is_floating_point() else None
            if noise is not None:
                tensor.copy_(0.5 + noise if name.endswith("running_var") else noise - 0.15)
    return model.eval()


def test_export_and_import_are_lossless():
    model = ours()
    theirs = mae_to_mmseg(model)
    # their names, including the derived index buffers mmseg's strict load expects
    assert theirs["backbone.layers.2.attn.relative_position_bias_table"].shape == (7 * 11 + 3, 2)
    assert torch.equal(theirs["backbone.layers.0.attn.relative_position_index"], relative_position_index((4, 6)))
    assert torch.equal(theirs["backbone.layers.1.gamma_2"], model.backbone.mae.encoder.layer[1].layer_scale_2)
    assert torch.equal(theirs["backbone.layers.3.ffn.layers.1.weight"], model.backbone.mae.encoder.layer[3].mlp.fc2.weight)
    assert torch.equal(theirs["decode_head.fpn_bottleneck.bn.running_var"],
                       model.decode_head.fpn_bottleneck.batch_norm.running_var)
    assert torch.equal(theirs["neck.upsample_4x.3.weight"], model.backbone.pyramid.fpn1[3].weight)
    config, back = convert_mmseg_to_mae(theirs, out_indices=[1, 2, 3, 4])
    assert config.backbone_config.image_hw == (32, 48) and config.backbone_config.num_attention_heads == 2
    assert config.num_labels == 5 and config.hidden_size == 16 and config.auxiliary_channels == 8
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    again = mae_to_mmseg(back)
    assert sorted(again) == sorted(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, back(pixel_values=x).logits)


def test_plain_backbone_exports_as_zero_tables_and_unit_gammas():
    model = ours()
    plain_config = MAEConfig.from_dict({**model.config.backbone_config.to_dict(), "use_relative_position_bias": False,
                                        "layer_scale_init_value": 0.0, "out_features": None})
    plain = MAEUperNetForSemanticSegmentation(MAEUperNetConfig.from_dict({**model.config.to_dict(),
                                                                         "backbone_config": plain_config})).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    theirs = mae_to_mmseg(plain)
    assert torch.count_nonzero(theirs["backbone.layers.0.attn.relative_position_bias_table"]) == 0
    assert torch.all(theirs["backbone.layers.0.gamma_1"] == 1.0)
    _, back = convert_mmseg_to_mae(theirs, out_indices=[1, 2, 3, 4])
    back.config.backbone_config._attn_implementation = plain.config.backbone_config._attn_implementation = "eager"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=x).logits, back(pixel_values=x).logits)


def test_grid_inference_and_checks():
    theirs = mae_to_mmseg(ours(image_size=(48, 32)))  # 6 x 4: the stored index tells rows from columns
    assert mmseg_grid(theirs) == (6, 4)
    without_index = {k: v for k, v in theirs.items() if not k.endswith("relative_position_index")}
    with pytest.raises(ValueError, match="pass image_size"):
        mmseg_grid(without_index)
    bad = dict(theirs)
    bad["backbone.layers.2.attn.relative_position_index"] = relative_position_index((6, 4)).flip(0)
    with pytest.raises(ValueError, match="relative_position_index of"):
        convert_mmseg_to_mae(bad, out_indices=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="pass out_indices"):
        convert_mmseg_to_mae(theirs)
    extra = {**theirs, "backbone.norm.weight": torch.ones(32)}
    with pytest.raises(ValueError, match="no place in the model"):
        convert_mmseg_to_mae(extra, out_indices=[1, 2, 3, 4])


def test_loading_at_another_size_resizes_the_tables():
    model = ours()
    theirs = mae_to_mmseg(model)
    config, resized = convert_mmseg_to_mae(theirs, out_indices=[1, 2, 3, 4], image_size=(48, 64))
    assert config.backbone_config.grid_size == (6, 8)
    table = resized.backbone.mae.encoder.layer[0].relative_position_bias.relative_position_bias_table
    assert table.shape == (11 * 15 + 3, 2)
    torch.testing.assert_close(table[-3:], model.backbone.mae.encoder.layer[0].relative_position_bias.relative_position_bias_table[-3:])
    assert resized.backbone.mae.embeddings.position_embeddings.shape == (1, 49, 32)


def test_convert_script_both_ways(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_checkpoint_script", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = ours()
    torch.save({"state_dict": mae_to_mmseg(model), "meta": {"CLASSES": ("a", "b")}}, tmp_path / "mmseg.pth")
    script.main(["--source", "mmseg", str(tmp_path / "mmseg.pth"), str(tmp_path / "ours"), "--out_indices", "1,2,3,4"])
    loaded = MAEUperNetForSemanticSegmentation.from_pretrained(tmp_path / "ours")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    script.main(["--to", "mmseg", str(tmp_path / "ours"), str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    original = torch.load(tmp_path / "mmseg.pth", weights_only=True)["state_dict"]
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    with pytest.raises(SystemExit):
        script.main(["--source", "mmseg", str(tmp_path / "mmseg.pth"), str(tmp_path / "x"), "--pooling", "cls"])


# --------------------------------------------------------------------------------------------------
# Parity with mmsegmentation itself
# --------------------------------------------------------------------------------------------------
def mmseg_python() -> Path:
    """The python of the cached mmsegmentation environment, created on first use; skips with the reason."""
    python = MMSEG_VENV / "bin" / "python"
    ready = MMSEG_VENV / ".modeling_mae_ready"
    if ready.is_file() and python.is_file():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MMSEG_VENV)], check=True, capture_output=True, timeout=300)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # share this interpreter's packages (torch, numpy, ...): listed after the environment's own
        Path(site, "modeling_mae_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *MMSEG_PACKAGES],
                       check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        detail = getattr(err, "stderr", "") or ""
        pytest.skip(f"cannot build the mmsegmentation environment {MMSEG_VENV} ({' '.join(MMSEG_PACKAGES)}): "
                    f"{err}; {str(detail)[-500:]}")
    ready.write_text(" ".join(MMSEG_PACKAGES) + "\n")
    return python


@pytest.mark.slow  # the first run installs mmsegmentation from PyPI; later runs take ~15 s
def test_logits_match_mmsegmentation(tmp_path):
    python = mmseg_python()
    out = tmp_path / "reference.pt"
    result = subprocess.run([str(python), str(REPO / "tests" / "mmseg_reference.py"), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if result.returncode != 0:
        if "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr:
            pytest.skip(f"mmsegmentation does not import in {MMSEG_VENV}: {result.stderr[-500:]}")
        raise AssertionError(result.stderr[-3000:])
    reference = torch.load(out, weights_only=True)
    assert reference["mmseg_version"] == "1.2.2"
    state_dict = reference["state_dict"]
    # the reference really exercises the transfer parts
    assert torch.count_nonzero(state_dict["backbone.layers.0.attn.relative_position_bias_table"]) > 0
    assert not torch.allclose(state_dict["backbone.layers.0.gamma_1"], torch.ones(1))
    config, model = convert_mmseg_to_mae(state_dict, out_indices=[1, 2, 3, 4])
    assert config.backbone_config.image_hw == tuple(reference["settings"]["img_size"])  # non-square, 4 x 6 patches
    for impl in ("eager", "sdpa"):
        model.config.backbone_config._attn_implementation = impl
        with torch.no_grad():
            logits = model(pixel_values=reference["pixel_values"]).logits
            auxiliary = model.auxiliary_head(model.backbone(reference["pixel_values"]).feature_maps)
        for name, ours_, theirs in (("logits", logits, reference["logits"]),
                                    ("auxiliary", auxiliary, reference["auxiliary_logits"])):
            scale = theirs.abs().max().item()
            difference = (ours_ - theirs).abs().max().item()
            print(f"{impl} {name}: max |ours - mmseg| = {difference:.3g}, their scale {scale:.3g}")
            assert difference < 1e-4 * scale, (impl, name, difference, scale)
    assert torch.equal(mae_to_mmseg(model)["backbone.layers.3.attn.qkv.weight"], state_dict["backbone.layers.3.attn.qkv.weight"])
