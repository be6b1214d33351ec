"""How transformers' common tests are fetched (tests/transformers_test_sources.py), without the network."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from transformers import PreTrainedConfig

import transformers_test_sources as sources


def write_sdist(path, version, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"transformers-{version}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unreachable_index_gives_a_one_line_skip_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_TRANSFORMERS_TESTS_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="WARNING: retrying\nERROR: No matching distribution found\n")
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(sources.Unavailable) as err:
        sources.ensure_tests_dir("9.9.9")
    assert str(err.value) == "`pip download transformers==9.9.9` (sdist) failed: ERROR: No matching distribution found"
    assert not (tmp_path / "transformers-tests-9.9.9" / sources.PACKAGE).exists()  # nothing half-written


def test_sdist_tests_are_cached_as_a_package_with_the_missing_modules(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_TRANSFORMERS_TESTS_CACHE", str(tmp_path))
    calls = []

    def fake_pip(cmd, **kwargs):  # what `pip download` leaves: the sdist archive in the -d folder
        calls.append(cmd)
        into = Path(cmd[cmd.index("-d") + 1])
        into.mkdir(parents=True, exist_ok=True)
        write_sdist(f"{into}/transformers-9.9.8.tar.gz", "9.9.8", {
            "tests/test_modeling_common.py": "from .generation.test_utils import GenerationTesterMixin\n",
            "tests/test_configuration_common.py": "from .utils.test_configuration_utils import config_common_kwargs\n",
            "src/transformers/__init__.py": "",
            "setup.py": "",
        })
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    tests_dir = sources.ensure_tests_dir("9.9.8")
    assert tests_dir == tmp_path / "transformers-tests-9.9.8" / "transformers_tests"
    assert "transformers==9.9.8" in calls[0] and "--no-binary" in calls[0]
    names = sorted(p.relative_to(tests_dir).as_posix() for p in tests_dir.rglob("*.py"))
    assert names == [
        "__init__.py", "exporters/__init__.py", "exporters/test_export.py", "generation/__init__.py",
        "generation/test_utils.py", "test_configuration_common.py", "test_modeling_common.py",
        "utils/__init__.py", "utils/test_configuration_utils.py",
    ]  # only tests/ is kept, src/ and setup.py are not
    assert sources.ensure_tests_dir("9.9.8") == tests_dir and len(calls) == 1  # cached: no second download

    # the stand-in modules import, and the config kwargs are all non-default values of real attributes
    monkeypatch.syspath_prepend(str(tests_dir.parent))
    for name in list(sys.modules):
        if name.startswith(sources.PACKAGE):
            monkeypatch.delitem(sys.modules, name)
    modeling = importlib.import_module(f"{sources.PACKAGE}.test_modeling_common")
    assert modeling.GenerationTesterMixin.__mro__[1:] == (object,)
    kwargs = importlib.import_module(f"{sources.PACKAGE}.test_configuration_common").config_common_kwargs
    default = PreTrainedConfig()
    assert {"return_dict", "output_hidden_states", "dtype", "id2label", "problem_type"} <= set(kwargs)
    for key, value in kwargs.items():
        assert getattr(default, key) != value, key
        config = PreTrainedConfig(**kwargs)
        assert str(getattr(config, key)).removeprefix("torch.") == str(value), key
