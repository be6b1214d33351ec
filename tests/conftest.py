"""Shared test set-up: no network, small threads, deterministic seeds."""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# datasets' Arrow caches of the tests' generated data go to a throw-away folder, not ~/.cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mae-tests-datasets-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # marks of transformers' common tests (tests/test_modeling_transformers_common.py runs them); transformers
    # registers them in its own conftest, which is not part of what we fetch
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common model tests")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one process-wide AcceleratorState: a script run in-process after another with a
    different `mixed_precision` (e.g. "auto" resolving to bf16 after an explicit "no") would be refused.
    Each test starts from none, as each script run does in its own process."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and most predictably, on one thread (the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
