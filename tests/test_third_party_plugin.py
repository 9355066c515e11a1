"""The README's example plugin, installed by pip as a separate distribution, found and run by uapx."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "uapx-median"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src") / "uapx-median"
    shutil.copytree(EXAMPLE, src)  # build outside the repository: setuptools writes build/ beside it
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True)
    assert (site / "uapx_median-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


def uapx(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "uapx", *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_readme_shows_the_example_verbatim():
    readme = (REPO / "README.md").read_text()
    assert (EXAMPLE / "uapx_median.py").read_text().strip() in readme
    assert "[project.entry-points.uapx]" in readme


def test_uapx_plugins_lists_it(plugin_site, tmp_path):
    res = uapx(plugin_site, "plugins", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = next(line.split() for line in res.stdout.splitlines() if line.startswith("median "))
    assert row[1:5] == ["method", "uapx-median", "0.1.0", "median"]


def test_analyze_runs_it(plugin_site, tmp_path):
    res = uapx(plugin_site, "analyze", "--plugins", "median,average", "--n-samples", "40", "--steps", "3",
               "--random-draws", "2", "--out", "rep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    ev = rep["uaps"]["evaluations"]["median"]
    assert ev["method"].startswith("MedianUAP(") and ev["eps"] == 2.0
    assert "median:class-0" in rep["uaps"]["evaluations"]


def test_without_it_the_name_is_unknown(tmp_path):
    res = subprocess.run([sys.executable, "-m", "uapx", "analyze", "--plugins", "median"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown plugin 'median'" in res.stderr
