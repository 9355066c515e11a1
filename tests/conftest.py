"""Shared fixtures: real data laid out by shared/data/prepare.py into a cache folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO.parent / "shared" / "data" / "prepare.py"


def _cache_dir() -> Path:
    base = os.environ.get("UAPX_TEST_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "uapx-test-data")
    return Path(base)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """A folder holding real MNIST (MNIST/raw) and CIFAR-10 (cifar10-jpeg/{train,test})."""
    if not PREPARE.is_file():
        pytest.skip(f"real data not available: {PREPARE} is missing")
    root = _cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(PREPARE), str(root)], check=True, capture_output=True)
    return root


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the user's UAPX_* settings; each test runs in its own temp folder."""
    for var in ("UAPX_DATA_ROOT", "UAPX_DISABLE_PLUGIN_AUTOLOAD", "UAPX_PLUGINS_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
