"""Reconstruction pictures: the grid's panels and size, norm_pix handling, and scripts/visualize.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.training.visualization import (
    caption,
    grid_image_size,
    reconstruct,
    reconstruction_grid,
    save_reconstruction_png,
)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import visualize  # noqa: E402


def tiny(norm_pix_loss=True):
    torch.manual_seed(0)
    return MAEForPreTraining(MAEConfig.from_preset("mae-tiny", norm_pix_loss=norm_pix_loss))


def test_panels_keep_visible_patches_and_unnormalise_norm_pix_predictions():
    model = tiny(norm_pix_loss=True)
    x = torch.randn(2, 3, 32, 32)
    panels = reconstruct(model, x, mask_ratio=0.75, seed=3)
    mask = panels["mask"]  # (N, 1, H, W), 1 = removed
    assert mask.shape == (2, 1, 32, 32)
    assert mask.mean().item() == pytest.approx(0.75)  # 48 of 64 patches removed
    visible = mask.expand_as(x) == 0
    # the pasted panel: the input where visible, the reconstruction where removed
    torch.testing.assert_close(panels["pasted"][visible], x[visible])
    torch.testing.assert_close(panels["pasted"][~visible], panels["reconstruction"][~visible])
    assert torch.isnan(panels["masked"][~visible]).all() and not torch.isnan(panels["masked"][visible]).any()
    # norm_pix: each predicted patch is mapped back with its original patch's mean / std
    with torch.no_grad():
        noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
        logits = model(x, noise=noise, mask_ratio=0.75).logits
    target = model.patchify(x)
    expected = logits * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    torch.testing.assert_close(panels["reconstruction"], model.unpatchify(expected))


def test_same_seed_same_mask_and_model_mode_restored():
    model = tiny()
    model.train()
    x = torch.randn(1, 3, 32, 32)
    a = reconstruct(model, x, mask_ratio=0.5, seed=7)["mask"]
    b = reconstruct(model, x, mask_ratio=0.5, seed=7)["mask"]
    c = reconstruct(model, x, mask_ratio=0.5, seed=8)["mask"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # switched to eval for the pass, then restored
    grid = reconstruct(model, x, mask_ratio=0.75, mask_strategy="grid")["mask"]
    patch_mask = grid[0, 0, ::4, ::4]  # one value per 4x4 patch
    assert patch_mask[::2, ::2].sum() == 0 and patch_mask.sum() == 48  # grid: one visible patch per 2x2


def test_grid_size_and_caption():
    model = tiny(norm_pix_loss=True)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    picture = reconstruction_grid(model, images, mask_ratio=0.6, seed=1)
    # 32 px panels are upscaled x4 to 128: width 4 * 128 + 5 * 4, height 4 text lines + 3 rows
    assert picture.size == grid_image_size(3, 32, 32) == (4 * 128 + 5 * 4, 4 * 16 + 3 * (128 + 4) + 4)
    assert "norm_pix_loss" in caption(model, 0.6, None, 1, None)
    assert "norm_pix" not in caption(tiny(norm_pix_loss=False), 0.6, None, 1, None)
    # the original column shows the input pixels (upscaled with nearest neighbours)
    array = np.asarray(picture)
    top, left = 4 * 16, 4
    shown = array[top : top + 128 : 4, left : left + 128 : 4]
    assert np.array_equal(shown, images[0].permute(1, 2, 0).numpy())


def test_visualize_script_writes_pngs_of_the_expected_size(tmp_path):
    model_dir = tmp_path / "model"
    tiny().save_pretrained(model_dir)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # not square and not 32 px: resized and center-cropped to the model's 32 x 32
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    written = visualize.main([
        "--model_name_or_path", str(model_dir), "--images", str(folder), "--images_per_grid", "3",
        "--mask_ratio", "0.5", "--mask_strategy", "block", "--output_dir", str(out),
    ])
    assert [p.name for p in written] == ["reconstruction_000.png", "reconstruction_001.png"]
    assert Image.open(written[0]).size == grid_image_size(3, 32, 32)
    assert Image.open(written[1]).size == grid_image_size(2, 32, 32)
    assert Image.open(written[0]).format == "PNG"


def test_official_checkpoint_and_dataset_sources(tmp_path):
    """An official .pth goes through the converter (a tiny width needs its head counts); a dataset
    written by `save_to_disk` is an image source of visualize.py."""
    import datasets

    from modeling_mae.conversion import mae_to_official, save_official

    model = tiny()
    checkpoint = save_official(mae_to_official(model), tmp_path / "mae_tiny.pth")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(str(tmp_path / "data"))
    from modeling_mae.training.model_loading import load_pretrained

    loaded = load_pretrained(MAEForPreTraining, str(checkpoint), num_attention_heads=4, decoder_num_attention_heads=4)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    batch = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])
    path = save_reconstruction_png(loaded, batch, tmp_path / "official.png", seed=0)
    assert Image.open(path).size == grid_image_size(4, 32, 32)
    model.save_pretrained(tmp_path / "saved")
    written = visualize.main([
        "--model_name_or_path", str(tmp_path / "saved"), "--dataset_name", str(tmp_path / "data"),
        "--num_images", "4", "--output_dir", str(tmp_path / "out"),
    ])
    assert Image.open(written[0]).size == grid_image_size(4, 32, 32)
