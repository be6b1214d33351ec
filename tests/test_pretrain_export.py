"""The exported directory: AutoModel (encoder alone), remote code without modeling_mae, model card,
and the push to the Hub up to the huggingface_hub call."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pretrain_helpers import import_pretrain, tiny_args, write_dataset


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_dataset(root / "data", "parquet", count=16)
    out = root / "out"
    assert import_pretrain().main(tiny_args(data, out, max_train_steps=2, checkpointing_steps=0)) == 0
    return out


def test_encoder_loads_alone_through_automodel(exported):
    import modeling_mae  # noqa: F401  (registers model_type "mae")
    from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining

    encoder = AutoModel.from_pretrained(exported)
    full = AutoModelForPreTraining.from_pretrained(exported)
    assert type(encoder).__name__ == "MAEModel" and type(full).__name__ == "MAEForPreTraining"
    for name, value in encoder.state_dict().items():
        if name in full.mae.state_dict():
            torch.testing.assert_close(value, full.mae.state_dict()[name], msg=name)
    processor = AutoImageProcessor.from_pretrained(exported)
    assert processor.size == {"height": 32, "width": 32}


def test_remote_code_loads_without_modeling_mae(exported, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_mae"] = None  # the package is installed editable here: hide it
        try:
            import modeling_mae
        except ImportError:
            pass
        else:
            raise SystemExit("modeling_mae is importable: the test would prove nothing")
        import torch
        from transformers import AutoModel, AutoModelForPreTraining
        encoder = AutoModel.from_pretrained({str(exported)!r}, trust_remote_code=True)
        full = AutoModelForPreTraining.from_pretrained({str(exported)!r}, trust_remote_code=True)
        out = encoder(torch.zeros(1, 3, 32, 32))
        print(type(encoder).__name__, type(full).__name__, tuple(out.last_hidden_state.shape))
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MAEModel MAEForPreTraining (1, 65, 64)" in result.stdout


def test_model_card_has_recipe_steps_loss_and_picture(exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    assert card.data.license == "apache-2.0" and "mae" in card.data.tags
    assert "| optimizer steps | 2 |" in card.text and "![original" in card.text
    assert "blr: 0.00015" in card.text and "mask_ratio: 0.75" in card.text
    assert (exported / "reconstruction.png").stat().st_size > 1000


def _recorder(monkeypatch, fail=False):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        if fail:
            raise ConnectionError("401 Unauthorized: invalid token")  # what a failed request surfaces as

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {"name": "me"})  # checked before training
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_output_dir(tmp_path, monkeypatch):
    calls = _recorder(monkeypatch)
    data = write_dataset(tmp_path / "data", "parquet", count=16)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=2, checkpointing_steps=1) + ["--push_to_hub", "--hub_model_id", "me/mae-tiny"]
    assert import_pretrain().main(argv) == 0
    assert calls["create_repo"][0] == "me/mae-tiny"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/mae-tiny" and upload["folder_path"] == str(out)
    assert "checkpoints/*" in upload["ignore_patterns"]  # checkpoints only with hub_include_checkpoints


def test_failed_push_says_why_and_keeps_the_local_output(tmp_path, monkeypatch, caplog):
    _recorder(monkeypatch, fail=True)
    data = write_dataset(tmp_path / "data", "parquet", count=16)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=2, checkpointing_steps=0) + ["--push_to_hub", "--hub_model_id", "me/x"]
    with caplog.at_level("ERROR"):
        assert import_pretrain().main(argv) == 1
    assert "401 Unauthorized" in caplog.text and "local output is complete" in caplog.text
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "reconstruction.png"):
        assert (out / name).is_file(), name
