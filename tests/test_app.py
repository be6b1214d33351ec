"""The reconstruction page (issue 22): its logic on tiny random models, the Space the export writes, and the
page itself in a real headless browser (Debian's chromium driven by Playwright), served by the exported
Space's own app.py from its own folder."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from modeling_mae import MAEConfig, MAEForPreTraining, make_noise
from modeling_mae.training.export import SPACE_PACKAGES, export_model, write_space_files
from modeling_mae.training.transforms import EvalTransform, normalize_on_device
from modeling_mae_app.reconstruction import (
    COLOUR_MAP,
    VISIBLE_GRAY,
    LoadedModel,
    load_model,
    reconstruct_image,
)


REPO = Path(__file__).resolve().parents[1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAY = 128  # visualization.MASK_GRAY (0.5) as uint8: the removed patches of the "masked" panel
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_channels=3, norm_pix_loss=True, seed=0):
    torch.manual_seed(seed)
    return MAEForPreTraining(MAEConfig.from_preset("mae-tiny", num_channels=num_channels,
                                                   norm_pix_loss=norm_pix_loss)).eval()


def rgb_loaded(norm_pix_loss=True):
    return LoadedModel(tiny(norm_pix_loss=norm_pix_loss), "tiny", *IMAGENET, (0.0, 255.0))


def smooth_photo(height=40, width=56, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def patch_blocks(panel: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (h, w, size, size, 3): the panel cut into its (upscaled) patches."""
    h, w = panel.shape[0] // size, panel.shape[1] // size
    return panel.reshape(h, size, w, size, 3).transpose(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------------------
# The logic (no browser)
# --------------------------------------------------------------------------------------------------
def test_rgb_panels_masked_pasted_and_error_map():
    loaded = rgb_loaded()
    photo = smooth_photo()
    pixel_values = loaded.prepare(photo)
    # the image processor's evaluation crop (EvalTransform, crop_pct 1.0), normalised with the model's mean / std
    crop = EvalTransform((32, 32), crop_pct=1.0)(Image.fromarray(photo))
    expected = normalize_on_device(crop.unsqueeze(0), *IMAGENET)
    torch.testing.assert_close(pixel_values, expected)
    result = reconstruct_image(loaded, pixel_values, mask_ratio=0.75, mask_strategy="random", seed=3,
                               window="dataset range")
    assert {k: v.shape for k, v in result.panels.items()} == {k: (128, 128, 3) for k in result.panels}  # 32 px x4
    assert (result.num_removed, result.num_patches) == (48, 64)
    masked, pasted, original = (patch_blocks(result.panels[k], 16) for k in ("masked", "pasted", "original"))
    error = patch_blocks(result.panels["error"], 16)
    removed = (masked == GRAY).all(axis=(2, 3, 4))  # (8, 8): fully gray patches in the masked panel
    assert removed.sum() == 48
    # visible patches: the original in the masked and pasted panels, gray in the error map; removed: coloured
    assert np.array_equal(masked[~removed], original[~removed]) and np.array_equal(pasted[~removed], original[~removed])
    assert (error[~removed] == VISIBLE_GRAY).all() and not (error[removed] == VISIBLE_GRAY).all(axis=-1).any()
    # the loss is the model's own loss on the same mask: the mean of the error map's patches
    noise = make_noise("random", 1, (8, 8), 0.75, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model_loss = loaded.model(pixel_values, noise=noise, mask_ratio=0.75).loss
    assert result.loss == pytest.approx(float(model_loss), rel=1e-5)
    # the patch of the largest error is drawn in the colour map's top colour
    with torch.no_grad():
        pred = loaded.model(pixel_values, noise=noise, mask_ratio=0.75).logits
    per_patch = loaded.model.patch_loss(pixel_values, pred)[0].reshape(8, 8).numpy()
    top = np.unravel_index(np.where(removed, per_patch, -1).argmax(), (8, 8))
    assert np.array_equal(error[top][0, 0], COLOUR_MAP[-1].astype(np.uint8))
    assert result.error_max == pytest.approx(per_patch[removed].max(), rel=1e-5)
    assert "norm_pix_loss" in result.caption


def test_seed_strategy_and_ratio_change_the_mask():
    loaded = rgb_loaded()
    x = loaded.prepare(smooth_photo())
    a = reconstruct_image(loaded, x, 0.75, "random", seed=0)
    b = reconstruct_image(loaded, x, 0.75, "random", seed=0)
    c = reconstruct_image(loaded, x, 0.75, "random", seed=1)
    assert np.array_equal(a.panels["reconstruction"], b.panels["reconstruction"])
    assert not np.array_equal(a.panels["reconstruction"], c.panels["reconstruction"])
    grid = reconstruct_image(loaded, x, 0.75, "grid", seed=5)
    removed = (patch_blocks(grid.panels["masked"], 16) == GRAY).all(axis=(2, 3, 4))
    assert not removed[::2, ::2].any() and removed.sum() == 48  # grid: the top-left patch of every 2x2 is kept
    assert reconstruct_image(loaded, x, 0.5, "block", seed=2).num_removed == 32
    with pytest.raises(ValueError, match="mask strategy must be one of"):
        reconstruct_image(loaded, x, 0.75, "checkerboard")


def test_sixteen_bit_gray_is_shown_through_its_own_window():
    model = tiny(num_channels=1)
    loaded = LoadedModel(model, "gray16", (0.3,), (0.1,), (0.0, 65535.0))
    rng = np.random.default_rng(0)
    array = (30000 + 2000 * rng.random((32, 32, 1))).astype(np.uint16)  # a narrow band of a 16-bit range
    x = loaded.prepare(array)
    torch.testing.assert_close(x[0] * 0.1 + 0.3, torch.from_numpy(array.astype(np.float32) / 65535).permute(2, 0, 1))
    full = reconstruct_image(loaded, x, 0.75, "random", 0, window="dataset range").panels["original"]
    own = reconstruct_image(loaded, x, 0.75, "random", 0, window="image").panels["original"]
    assert full.max() - full.min() <= 9  # 2000 / 65535 of the range: a flat gray
    assert own.min() <= 2 and own.max() >= 253  # the image's 0.5-99.5 percentiles: black to white
    assert (own[..., 0] == own[..., 1]).all() and (own[..., 0] == own[..., 2]).all()
    with pytest.raises(ValueError, match="takes images of 1 channel"):
        loaded.prepare(np.zeros((32, 32, 6), dtype=np.uint16))
    assert "darker" in loaded.scale_note(np.zeros((32, 32, 1), dtype=np.uint8))


def test_multi_band_is_shown_as_the_chosen_band_triple():
    model = tiny(num_channels=6)
    loaded = LoadedModel(model, "bands6", (0.5,) * 6, (0.25,) * 6, (0.0, 600.0))
    levels = np.array([0, 100, 200, 300, 400, 500], dtype=np.float32)
    array = np.broadcast_to(levels, (32, 32, 6)).astype(np.uint16)
    x = loaded.prepare(array)
    original = reconstruct_image(loaded, x, 0.75, "random", 0, bands=(5, 0, 3),
                                 window="dataset range").panels["original"]
    # band 5 as red, band 0 as green, band 3 as blue, each at level / 600 of the range
    assert tuple(original[0, 0]) == tuple(int(round(v / 600 * 255)) for v in (500, 0, 300))
    with pytest.raises(ValueError, match="bands must be 3 channel numbers in 0..5"):
        reconstruct_image(loaded, x, 0.75, "random", 0, bands=(0, 1, 6))


def test_load_model_takes_every_format_through_the_one_loader(tmp_path):
    from modeling_mae.conversion import mae_to_official, official_args, save_official

    ours = tiny()
    export_model(ours, tmp_path / "ours")
    loaded = load_model(str(tmp_path / "ours"))
    assert loaded.mean == IMAGENET[0] and loaded.value_range == (0.0, 255.0) and loaded.notes == []
    torch.testing.assert_close(loaded.model.decoder.decoder_pred.weight, ours.decoder.decoder_pred.weight)

    hf = ViTMAEForPreTraining(ViTMAEConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16,
                                           decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                                           decoder_intermediate_size=32, norm_pix_loss=True))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         "rescale_factor": 1 / 255}))
    loaded = load_model(str(tmp_path / "hf"))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.model.config.norm_pix_loss and loaded.value_range == (0.0, 255.0)
    x = loaded.prepare(smooth_photo())
    assert reconstruct_image(loaded, x).panels["error"].shape == (128, 128, 3)

    save_official(mae_to_official(ours), tmp_path / "mae.pth", args=official_args(ours.config))
    loaded = load_model(str(tmp_path / "mae.pth"))
    assert loaded.mean == IMAGENET[0] and loaded.notes == []
    torch.testing.assert_close(loaded.model.decoder.decoder_pred.weight, ours.decoder.decoder_pred.weight)

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'; expected 'mae'"):
        load_model(str(tmp_path / "bert"))


def test_an_encoder_only_checkpoint_is_loaded_with_a_warning_to_show(tmp_path):
    from modeling_mae.conversion import mae_to_official, official_args, save_official

    ours = tiny()
    state = {k: v for k, v in mae_to_official(ours).items() if not k.startswith(("decoder", "mask_token"))}
    save_official(state, tmp_path / "encoder.pth", args=official_args(ours.config))
    loaded = load_model(str(tmp_path / "encoder.pth"))
    assert any("NEWLY INITIALISED" in note and "decoder" in note for note in loaded.notes), loaded.notes


def test_command_line_answers_before_torch_and_names_a_wrong_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    help_run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "app.py"), "--help"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--model" in help_run.stdout and "--num_threads" in help_run.stdout
    assert not any(line.rstrip().endswith(("| torch", "| gradio")) for line in help_run.stderr.splitlines())
    wrong = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(tmp_path / "mae-dmeo")], env=env,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "no such directory or file" in wrong.stderr and "mae-dmeo" in wrong.stderr


# --------------------------------------------------------------------------------------------------
# The Space the export writes
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def space_dir(tmp_path_factory):
    """A tiny model exported with the Space files and two example images, as `write_space_files: true` does."""
    folder = tmp_path_factory.mktemp("space") / "app"  # as in a Space: the page takes the name from the card
    export_model(tiny(), folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\nmodel_name: mae-space\n---\n"
                                      "# model card\n")
    examples = torch.from_numpy(np.stack([smooth_photo(32, 32, seed) for seed in (1, 2)])).permute(0, 3, 1, 2)
    write_space_files(folder, examples=examples, title="mae-space")
    return folder


def test_space_files(space_dir):
    from huggingface_hub.repocard import metadata_load

    assert (space_dir / "app.py").read_text() == (REPO / "app.py").read_text()
    for package in SPACE_PACKAGES:
        copy = space_dir / "app_code" / package
        copied = sorted(p.relative_to(copy) for p in copy.rglob("*.py"))
        source = sorted(p.relative_to(REPO / package) for p in (REPO / package).rglob("*.py"))
        assert copied == source and copied
    assert not list((space_dir / "app_code").rglob("__pycache__"))
    requirements = [line for line in (space_dir / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements[:3] == ["torch>=2.4", "torchvision>=0.19", "transformers>=5.0"] and "pyyaml>=6" in requirements
    metadata = metadata_load(space_dir / "README.md")
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py" and metadata["sdk_version"]
    assert metadata["license"] == "apache-2.0" and metadata["title"] == "mae-space"  # the model card's fields stay
    assert "# model card" in (space_dir / "README.md").read_text()
    shown = np.asarray(Image.open(space_dir / "examples" / "example_1.png"))
    assert np.array_equal(shown, smooth_photo(32, 32, 2))


def test_space_runs_on_its_own_copy_of_the_code(space_dir):
    """The Space's app.py imports the code copied beside it, ahead of this installed checkout."""
    script = ("import sys; sys.argv = ['app.py']; sys.path.insert(0, '.'); import app, modeling_mae, modeling_mae_app; "
              "from modeling_mae_app.reconstruction import load_model, reconstruct_image; "
              "from modeling_mae.training.pixels import decode_array; "
              "loaded = load_model('.'); "
              "r = reconstruct_image(loaded, loaded.prepare(decode_array('examples/example_0.png'))); "
              "print(modeling_mae.__file__, modeling_mae_app.__file__, r.panels['pasted'].shape)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=space_dir, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mae_file, app_file, shape = out.stdout.split(maxsplit=2)
    assert Path(mae_file).resolve().is_relative_to((space_dir / "app_code").resolve())
    assert Path(app_file).resolve().is_relative_to((space_dir / "app_code").resolve())
    assert shape.strip() == "(128, 128, 3)"


def test_pretraining_writes_the_space_when_asked(tmp_path):
    from huggingface_hub.repocard import metadata_load
    from pretrain_helpers import import_pretrain, tiny_args, write_dataset

    data = write_dataset(tmp_path / "data", "parquet", count=16, num_shards=2)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=2, checkpointing_steps=0) + ["--write_space_files", "true"]
    assert import_pretrain().main(argv) == 0
    assert (out / "app.py").is_file() and (out / "app_code" / "modeling_mae_app" / "ui.py").is_file()
    card = metadata_load(out / "README.md")
    assert card["sdk"] == "gradio" and card["pipeline_tag"] == "image-feature-extraction"  # Space + model card
    examples = sorted((out / "examples").iterdir())
    assert [p.name for p in examples] == ["example_0.png", "example_1.png"]  # num_reconstruction_images: 2
    loaded = load_model(str(out))
    assert loaded.prepare(np.asarray(Image.open(examples[0]))).shape == (1, 3, 32, 32)
    assert not (tmp_path / "plain").exists()
    plain = tiny_args(data, tmp_path / "plain", max_train_steps=1, checkpointing_steps=0)
    assert import_pretrain().main(plain) == 0 and not (tmp_path / "plain" / "app.py").exists()  # only when asked


# --------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------
def chromium_or_skip() -> str:
    pytest.importorskip("gradio", reason="the page needs gradio: pip install -e '.[dev]' (or '.[app]')")
    pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright: pip install -e '.[dev]'")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_space(space_dir, tmp_path):
    """`python app.py --port N` in the exported Space's folder; the URL once it serves (bounded wait)."""
    port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with open(log, "w") as stream:
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=space_dir, env=env,
                                  stdout=stream, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while "Running on local URL" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start (exit {server.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield url, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_page_in_a_real_browser(served_space, tmp_path):
    """Load the page, upload an image, move the mask slider, change the seed; check the returned images."""
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    url, log = served_space
    upload = tmp_path / "photo.png"
    Image.fromarray(smooth_photo(48, 64, seed=7)).save(upload)
    timeout_ms = 30_000

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=timeout_ms)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.wait_for_selector("#image-file input[type=file]", state="attached")
            assert "mae-space:" in page.inner_text("body") and "norm_pix_loss" in page.inner_text("body")

            def panel(key: str, previous: str | None = None) -> tuple[str, np.ndarray]:
                """The panel's image as the page shows it (its src, once it differs from `previous`)."""
                selector = f"#panel-{key} img"
                page.wait_for_function(
                    "([sel, prev]) => { const i = document.querySelector(sel); return i && i.complete && "
                    "i.naturalWidth > 0 && i.getAttribute('src') !== prev; }", arg=[selector, previous])
                src = page.get_attribute(selector, "src")
                response = page.request.get(src)
                assert response.ok, src
                with open(tmp_path / "panel.png", "wb") as f:
                    f.write(response.body())
                return src, np.asarray(Image.open(tmp_path / "panel.png").convert("RGB"))

            def removed_patches(masked: np.ndarray) -> int:
                return int((patch_blocks(masked, 16) == GRAY).all(axis=(2, 3, 4)).sum())

            page.set_input_files("#image-file input[type=file]", str(upload))
            src_masked, masked = panel("masked")
            src_recon, recon = panel("reconstruction")
            for key in ("original", "pasted", "error"):
                assert panel(key)[1].shape == (128, 128, 3)
            assert masked.shape == recon.shape == (128, 128, 3)  # the 32 px model, upscaled x4
            assert removed_patches(masked) == 48  # mask ratio 0.75 of 64 patches
            # the original panel: the upload's evaluation crop (resize the shorter side, centre crop)
            expected = EvalTransform((32, 32), crop_pct=1.0)(Image.open(upload)).permute(1, 2, 0).numpy()
            assert np.array_equal(panel("original")[1][::4, ::4], expected)

            # the mask slider: type 0.5 into its number box
            box = page.locator("#mask-ratio input[type=number]")
            box.fill("0.5")
            box.press("Enter")
            src_masked, masked = panel("masked", src_masked)
            assert removed_patches(masked) == 32
            page.wait_for_function("() => document.querySelector('#info').innerText.includes('32 removed of 64')")
            src_recon, recon_half = panel("reconstruction", src_recon)

            # another seed: another mask, another reconstruction
            seed = page.locator("#seed input")
            seed.fill("1")
            seed.press("Enter")
            _, masked_seed1 = panel("masked", src_masked)
            _, recon_seed1 = panel("reconstruction", src_recon)
            assert removed_patches(masked_seed1) == 32
            assert not np.array_equal(masked_seed1, masked)
            assert not np.array_equal(recon_seed1, recon_half)
        finally:
            browser.close()
    assert "app_code" in log.read_text()  # the server said it runs the Space's own copy of the code
