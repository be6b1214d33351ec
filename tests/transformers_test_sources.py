"""transformers' own common model tests, taken from the source distribution of the INSTALLED version.

transformers checks every model it ships with `ModelTesterMixin` (tests/test_modeling_common.py),
`ConfigTester` (tests/test_configuration_common.py) and, for backbones, `BackboneTesterMixin`
(tests/test_backbone_common.py, tests/utils/ in older releases). These files are not in the wheel; the
sdist on PyPI has them. `load()` fetches the sdist once with pip, keeps its `tests/` folder in a cache and
imports the three mixins from there, so our models are held to exactly the checks of the transformers
release they run with. Nothing of transformers' test code is kept in this repository.

The sdist ships only the top-level `tests/*.py` files, not the sub-packages those import
(`tests/generation/`, `tests/exporters/`, `tests/utils/`). `_write_missing_modules` writes a small
stand-in for each missing import, labelled as such in the file:
- `generation.test_utils.GenerationTesterMixin`: an empty class. transformers only checks that a tester
  inherits it iff its models can generate; ours cannot, so the check keeps its meaning.
- `exporters.test_export.ExportTesterMixin`: an empty class, so its export tests (torch.export, ONNX,
  ...) are not run; `ModelTesterMixin` itself does not need them.
- `utils.test_configuration_utils.config_common_kwargs`: a non-default value for each common
  `PreTrainedConfig` attribute, which `ConfigTester.check_config_arguments_init` passes to the config
  and reads back.

Cache: `$MAE_TRANSFORMERS_TESTS_CACHE`, else `$XDG_CACHE_HOME/modeling_mae` (`~/.cache/modeling_mae`),
folder `transformers-tests-<version>/`. When the sdist cannot be fetched (offline, no pip) or the files
cannot be imported, `load()` raises `Unavailable` with a one-line reason, and the test module skips.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


PACKAGE = "transformers_tests"  # the sdist's tests/ folder is imported under this name (relative imports work)
DOWNLOAD_TIMEOUT_S = 300


class Unavailable(Exception):
    """transformers' test files cannot be had; the message is the skip reason."""


def cache_root() -> Path:
    if os.environ.get("MAE_TRANSFORMERS_TESTS_CACHE"):
        return Path(os.environ["MAE_TRANSFORMERS_TESTS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeling_mae"


def version_dir(version: str = transformers.__version__) -> Path:
    return cache_root() / f"transformers-tests-{version}"


# ----------------------------------------------------------------------------------------------------
# stand-ins for the modules the sdist lacks
# ----------------------------------------------------------------------------------------------------
_HEADER = (
    '"""Written by modeling_mae\'s tests (tests/transformers_test_sources.py): the transformers sdist does not\n'
    'ship this module, which tests/{importer} imports. {why}"""\n'
)

STAND_INS = {
    "generation/test_utils.py": _HEADER.format(
        importer="test_modeling_common.py",
        why="Only an issubclass check uses it; MAE models do not generate.",
    )
    + "\n\nclass GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": _HEADER.format(
        importer="test_modeling_common.py",
        why="Its export tests are not run.",
    )
    + "\n\nclass ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": _HEADER.format(
        importer="test_configuration_common.py",
        why="A non-default value for each common PreTrainedConfig attribute (ours, not transformers').",
    )
    + """
from transformers import PreTrainedConfig

_NON_DEFAULT = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 7,
    "architectures": ["MAEModel"],
    "id2label": {0: "cat"},
    "label2id": {"cat": 0},
    "problem_type": "regression",
}
_attributes = set(PreTrainedConfig().__dict__) | {"output_attentions"}
config_common_kwargs = {key: value for key, value in _NON_DEFAULT.items() if key in _attributes}
""",
}


def _write_missing_modules(tests_dir: Path) -> list[str]:
    """Make `tests_dir` an importable package and add a stand-in for each import the sdist lacks."""
    written = []
    for folder in [tests_dir, *{tests_dir / Path(rel).parent for rel in STAND_INS}]:
        init = folder / "__init__.py"
        if not init.exists():
            folder.mkdir(parents=True, exist_ok=True)
            init.write_text("")
    for rel, text in STAND_INS.items():
        path = tests_dir / rel
        if not path.exists():
            path.write_text(text)
            written.append(rel)
    return written


# ----------------------------------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------------------------------
def _download_sdist(version: str, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--quiet", f"transformers=={version}", "-d", str(into),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"`pip download transformers=={version}` (sdist) failed: {err}") from err
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if done.returncode != 0 or not archives:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"`pip download transformers=={version}` (sdist) failed: {last[0]}")
    return archives[0]


def _extract_tests(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1:2] == ["tests"]]
        if not members:
            raise Unavailable(f"{archive.name} has no tests/ folder")
        for member in members:
            member.name = "/".join(member.name.split("/")[2:])  # transformers-X/tests/a/b.py -> a/b.py
            tar.extract(member, into, filter="data")


def ensure_tests_dir(version: str = transformers.__version__) -> Path:
    """The cached tests/ folder of the transformers `version` sdist (fetched on first use)."""
    target = version_dir(version) / PACKAGE
    if (target / "test_modeling_common.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = _download_sdist(version, Path(tmp) / "sdist")
        staged = Path(tmp) / PACKAGE
        _extract_tests(archive, staged)
        if not (staged / "test_modeling_common.py").exists():
            raise Unavailable(f"{archive.name} has no tests/test_modeling_common.py")
        _write_missing_modules(staged)
        try:
            os.replace(staged, target)  # atomic: a concurrent session sees all of it or none
        except OSError:
            if not (target / "test_modeling_common.py").exists():
                raise
            shutil.rmtree(staged, ignore_errors=True)  # another session got there first
    return target


def load():
    """-> (ModelTesterMixin, ConfigTester, BackboneTesterMixin, test_modeling_common module).

    Raises `Unavailable` (its message is a one-line skip reason) when they cannot be had."""
    version = transformers.__version__
    tests_dir = ensure_tests_dir(version)
    _write_missing_modules(tests_dir)  # a cache filled by an older copy of this file
    root = str(tests_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
        backbone_module = f"{PACKAGE}.test_backbone_common"
        if not (tests_dir / "test_backbone_common.py").exists():
            backbone_module = f"{PACKAGE}.utils.test_backbone_common"
        backbone = importlib.import_module(backbone_module)
    except ImportError as err:
        raise Unavailable(
            f"transformers {version}'s test files from {tests_dir} do not import: {err} "
            f"(`pip install parameterized` if that is the missing module)"
        ) from err
    return modeling.ModelTesterMixin, configuration.ConfigTester, backbone.BackboneTesterMixin, modeling
