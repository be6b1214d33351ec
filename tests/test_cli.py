"""The scripts' command line: `--help` (fast, one line per flag with its default and choices), usage
errors (exit 2, "did you mean"), model paths that do not exist, the Hub check before training, and
expected errors as one line (modeling_mae_cli)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modeling_mae_cli import ConfigError, build_parser, check_model_location, parse_config, run_main


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))
CONFIG_SCRIPTS = {  # script -> its config dataclass; configs/<dir>/*.yaml load through it
    "pretrain": "PretrainConfig",
    "finetune": "FinetuneConfig",
    "linprobe": "LinprobeConfig",
    "segment": "SegmentConfig",
    "extract_features": "ExtractFeaturesConfig",
    "visualize": "VisualizeConfig",
}
RECIPE_DIRS = {"pretrain": "pretrain", "finetune": "finetune", "linprobe": "linprobe", "segment": "segment"}
HEAVY = ("torch", "transformers", "datasets")


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("COLUMNS", None)
    return env


def _run(script: str, *args: str, cwd=None, importtime=False):
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + [str(REPO / "scripts" / f"{script}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd or str(REPO), env=_env())


def _imported_heavy(importtime_stderr: str) -> set[str]:
    """Top-level heavy packages named in `python -X importtime` output ("import time: ... | torch")."""
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}
    return {name for name in names if name in HEAVY}


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"cli_test_{script}", REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _config_class(script: str):
    return getattr(_load(script), CONFIG_SCRIPTS[script])


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [p.stem for p in SCRIPTS])
def test_help_answers_without_importing_torch(script):
    result = _run(script, "--help", importtime=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
    assert _imported_heavy(result.stderr) == set()
    assert "MAE_CRASH_AT_STEP" not in result.stdout and "memory-probe" not in result.stdout  # test hooks


@pytest.mark.parametrize("script", sorted(CONFIG_SCRIPTS))
def test_every_flag_has_one_help_line_its_default_and_choices(script):
    cls = _config_class(script)
    parser = build_parser(cls, description=sys.modules[cls.__module__].__doc__, prog=f"{script}.py")
    text = parser.format_help()
    for field in dataclasses.fields(cls):
        helptext = field.metadata.get("help", "")
        assert helptext and "\n" not in helptext, f"--{field.name} has no one-line help"
        (entry,) = [a for a in parser._actions if a.option_strings == [f"--{field.name}"]]
        assert "(default: " in entry.help
        choices = field.metadata.get("choices")
        if choices:
            assert "{" + ",".join(choices) + "}" in text
    # the module docstring keeps its layout: its indented usage lines come out as written
    doc_line = next(line for line in sys.modules[cls.__module__].__doc__.splitlines() if line.startswith("    "))
    assert doc_line in text


def test_help_shows_defaults_and_choices_as_written():
    text = _run("pretrain", "--help").stdout
    assert re.search(r"--per_device_train_batch_size INT\s+images per process per micro-batch \(default: 64\)", text)
    assert re.search(r"--report_to \{tensorboard,wandb,mlflow,comet_ml,all,none\}\s+.*\(default: tensorboard\)", text)
    assert re.search(r"--crop_scale FLOAT,\.\.\.\s+.*\(default: \[0\.2, 1\.0\]\)", text)
    assert re.search(r"--mixed_precision \{auto,no,bf16,fp16,fp8\}\s+[^\n]*\n?[^\n]*\(default: auto\)", text)
    visualize = _run("visualize", "--help").stdout
    assert re.search(r"--mask_strategy \{random,block,grid\}", visualize)
    features = _run("extract_features", "--help").stdout
    assert re.search(r"--pooling \{mean,cls\}", features)


def test_choice_lists_match_the_code_they_copy():
    from modeling_mae.configuration_mae import MAE_PRESETS, MASK_STRATEGIES, POOLING_MODES
    from modeling_mae.conversion import MODEL_CLASSES
    from modeling_mae_cli import choices

    assert choices.MODEL_PRESETS == tuple(MAE_PRESETS)
    assert choices.MASK_STRATEGIES == MASK_STRATEGIES and choices.POOLING_MODES == POOLING_MODES
    assert choices.CONVERSION_MODEL_CLASSES == tuple(sorted(MODEL_CLASSES))
    from modeling_mae.training.pixels import DEMO_PIXEL_KINDS

    assert choices.DEMO_PIXEL_KINDS == DEMO_PIXEL_KINDS


@pytest.mark.parametrize("script", sorted(RECIPE_DIRS))
def test_every_recipe_in_configs_loads_through_its_script(script, tmp_path, monkeypatch):
    cls = _config_class(script)
    monkeypatch.chdir(tmp_path)  # relative model paths of the demos (outputs/mae-demo) are not there yet
    recipes = sorted((REPO / "configs" / RECIPE_DIRS[script]).glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        values = yaml.safe_load(recipe.read_text())
        # recipes that leave the pretrained model to the command line (it is required) get a Hub id
        extra = [] if values.get("model_name_or_path") or values.get("model_preset") else ["--model_name_or_path", "you/mae"]
        cfg = parse_config(cls, ["--config", str(recipe), *extra])
        assert isinstance(cfg, cls)
        assert all(getattr(cfg, key) == value or key == "model_config" for key, value in values.items()
                   if not isinstance(value, (list, dict)) and value is not None), recipe


# --------------------------------------------------------------------------------------------------
# Usage errors: exit 2, one error line, "did you mean"
# --------------------------------------------------------------------------------------------------
def _usage_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("import time:")]
    assert len(lines) == 2 and lines[0].startswith("usage:"), lines
    return lines[1]


def test_unknown_flag_is_a_usage_error_with_a_suggestion():
    line = _usage_error(_run("pretrain", "--num_train_epoch", "3"))
    assert line == "pretrain.py: error: unrecognized arguments: --num_train_epoch 3 (did you mean --num_train_epochs?)"


def test_unknown_yaml_key_is_a_usage_error_with_a_suggestion(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("per_device_train_batch_size: 8\nnum_train_epoch: 3\n")
    line = _usage_error(_run("finetune", "--config", str(recipe)))
    assert line == f"finetune.py: error: {recipe}: unknown key(s): 'num_train_epoch' (did you mean num_train_epochs?)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "abc"], "argument --seed: expected an int, got 'abc'"),
        (["--blr", "fast"], "argument --blr: expected a float, got 'fast'"),
        (["--norm_pix_loss", "maybe"], "argument --norm_pix_loss: expected a bool (true/false), got 'maybe'"),
        (["--report_to", "tensorbord"], "argument --report_to: expected one of tensorboard, wandb, mlflow, comet_ml, "
                                        "all, none, got 'tensorbord' (did you mean tensorboard?)"),
        (["--mask_ratio", "1.5"], "invalid config: `mask_ratio` must be in [0, 1), got 1.5"),
    ],
)
def test_bad_values_are_usage_errors(args, message):
    assert _usage_error(_run("pretrain", *args)) == f"pretrain.py: error: {message}"


def test_wrong_type_in_yaml_names_the_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("seed: [1, 2]\n")
    line = _usage_error(_run("pretrain", "--config", str(recipe)))
    assert line == f"pretrain.py: error: {recipe}: key 'seed': expected an int, got [1, 2]"


def test_explicit_argv_raises_config_error_instead_of_exiting():
    cls = _config_class("pretrain")
    with pytest.raises(ConfigError, match=r"did you mean --seed\?"):
        parse_config(cls, ["--sed", "1"])
    # values from YAML and flags go through the same conversion
    cfg = parse_config(cls, ["--blr", "1e-3", "--crop_scale", "0.3,0.9", "--model_config", "{drop_path_rate: 0.1}",
                             "--norm_pix_loss", "--max_grad_norm", "none"])
    assert (cfg.blr, cfg.crop_scale, cfg.model_config) == (1e-3, [0.3, 0.9], {"drop_path_rate": 0.1})
    assert cfg.norm_pix_loss is True and cfg.max_grad_norm is None


# --------------------------------------------------------------------------------------------------
# Model paths: a local-looking path that does not exist fails at once
# --------------------------------------------------------------------------------------------------
def test_check_model_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "mae-demo").mkdir(parents=True)
    (tmp_path / "ckpt.pth").write_bytes(b"")
    assert check_model_location("outputs/mae-demo") is None
    assert check_model_location("./ckpt.pth") is None
    assert check_model_location("facebook/vit-mae-base") is None  # a Hub id: no local folder `facebook/`
    assert check_model_location("mae-tiny") is None  # a bare name is a Hub id
    assert check_model_location("outputs/mae-dem") == "no such directory or file: 'outputs/mae-dem' (did you mean outputs/mae-demo?)"
    for path in ("./nope", "/nonexistent/model", "~/no-such-mae-model", "a/b/c"):
        assert check_model_location(path).startswith(f"no such directory or file: {path!r}"), path


@pytest.mark.parametrize("script", ["pretrain", "finetune", "linprobe", "segment", "visualize", "extract_features"])
def test_model_path_typo_fails_at_once_in_every_script(script, tmp_path):
    (tmp_path / "outputs" / "mae-demo").mkdir(parents=True)
    result = _run(script, "--model_name_or_path", "outputs/mae-dem", cwd=tmp_path, importtime=True)
    line = _usage_error(result)
    assert line == (f"{script}.py: error: argument --model_name_or_path: no such directory or file: 'outputs/mae-dem' "
                    f"(did you mean outputs/mae-demo?)")
    assert _imported_heavy(result.stderr) == set()  # answered before torch (and any Hub request)


# --------------------------------------------------------------------------------------------------
# Expected errors: one line, exit 1; bugs keep their traceback; --debug shows it
# --------------------------------------------------------------------------------------------------
def test_run_main_prints_expected_errors_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog.py"])

    def data_error(argv):
        raise ValueError("`train_dir` holds no images: '/data/x'")

    assert run_main(data_error, []) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["prog.py: error: `train_dir` holds no images: '/data/x'  (--debug shows the traceback)"]

    def missing(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/labels.json")

    assert run_main(missing, []) == 1
    assert "No such file or directory: '/data/labels.json'" in capsys.readouterr().err
    assert run_main(lambda argv: parse_config(_config_class("pretrain"), ["--sed", "1"]), []) == 2
    assert "did you mean --seed?" in capsys.readouterr().err
    assert run_main(lambda argv: 3, []) == 3 and run_main(lambda argv: {"top1": 1.0}, []) == 0


def test_run_main_keeps_tracebacks_for_bugs_and_with_debug():
    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_main(bug, [])

    def data_error(argv):
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        run_main(data_error, ["--debug"])


def test_debug_flag_is_accepted_and_not_part_of_the_config():
    cfg = parse_config(_config_class("pretrain"), ["--debug", "--seed", "3"])
    assert cfg.seed == 3 and not hasattr(cfg, "debug")


# --------------------------------------------------------------------------------------------------
# --push_to_hub: login and repository checked before the first training step
# --------------------------------------------------------------------------------------------------
def _hub(monkeypatch, whoami=None, create_repo=None):
    import huggingface_hub

    calls = []

    def _whoami(self, *args, **kwargs):
        calls.append("whoami")
        if whoami:
            raise whoami
        return {"name": "me"}

    def _create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        if create_repo:
            raise create_repo
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def _upload_folder(self, **kwargs):
        calls.append("upload_folder")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", _whoami)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", _create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", _upload_folder)
    return calls


def test_hub_check_messages(monkeypatch):
    from modeling_mae.training.export import HubAccessError, check_hub_access

    calls = _hub(monkeypatch)
    assert check_hub_access("me/mae", token="hf_x") == "me"
    assert calls == ["whoami", ("create_repo", "me/mae")]

    _hub(monkeypatch, whoami=OSError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header"))
    with pytest.raises(HubAccessError) as err:
        check_hub_access("me/mae")
    assert "\n" not in str(err.value) and "cannot log in" in str(err.value) and "hf auth login" in str(err.value)

    _hub(monkeypatch, create_repo=OSError("403 Forbidden: You don't have the rights to create a model under this namespace"))
    with pytest.raises(HubAccessError) as err:
        check_hub_access("someone-else/mae")
    assert "logged in as 'me'" in str(err.value) and "'someone-else/mae'" in str(err.value) and "403" in str(err.value)


def test_push_to_hub_without_login_fails_before_training(tmp_path, monkeypatch, capsys):
    from pretrain_helpers import import_pretrain, tiny_args, write_dataset

    calls = _hub(monkeypatch, whoami=OSError("401 Client Error: Unauthorized"))
    data = write_dataset(tmp_path / "data", "parquet", count=16)
    out = tmp_path / "out"
    argv = tiny_args(data, out, max_train_steps=2) + ["--push_to_hub", "--hub_model_id", "me/mae-tiny"]
    monkeypatch.setattr(sys, "argv", ["pretrain.py"])
    assert run_main(import_pretrain().main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot log in to the Hub" in err[0] and "Nothing was trained yet" in err[0]
    assert calls == ["whoami"]
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# CI sees what a new machine sees
# --------------------------------------------------------------------------------------------------
def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    script = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    # the command CI extracts is the README's, and it is there
    pattern = re.search(r"grep -m1 -E '([^']+)' README\.md", script).group(1)
    commands = [line for line in readme.splitlines() if re.match(pattern.replace("\\(", "(").replace("\\)", ")"), line)]
    assert commands and commands[0] == 'pip install -e ".[dev]" && python -m pytest -q'
    # a fresh virtual environment per run (made, activated, removed), not this machine's Python
    assert 'venv="$(mktemp -d' in script and 'python3 -m venv "$venv"' in script and '. "$venv/bin/activate"' in script
    assert "trap 'rm -rf \"$venv\"' EXIT" in script and "unset PYTHONPATH" in script
    # pytest's "no tests collected" (exit 5) fails CI
    assert re.search(r'if \[ "\$status" -eq 5 \]; then\n.*\n\s+exit 1', script)
