import os
import shutil
import tempfile

import pytest
import torch

_CACHE = None


def pytest_configure(config):
    """The suite's reference statistics go to a cache of its own, removed at the end: not into the user's
    ~/.cache/switch-dit (15 MB a file, new ones every run). pytest calls this once, before any test module imports
    switch_dit (a module-level mkdtemp would run again wherever a test module imports tests.conftest)."""
    global _CACHE
    _CACHE = tempfile.mkdtemp(prefix="switch-dit-test-cache-")
    os.environ["SWITCH_DIT_CACHE"] = _CACHE


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-zero random values (zero-initialised layers would hide bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module
