"""The report page as a reader sees it: rendered by headless Chromium, not blank, every figure shown."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from uapx.cli import main
from uapx.report import _rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "rep"
    assert main(["analyze", "--n-samples", "50", "--steps", "4", "--random-draws", "2", "--k", "2",
                 "--plugins", "average,svd,spectrum,trajectory", "--out", str(out)]) == 0
    return out


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    res = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", (report / "index.html").as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2400, 1200)
    dark = (img < 128).mean()
    assert 0.01 < dark < 0.6, f"page looks blank or broken: {dark:.3%} dark pixels"
    assert img.std() > 20


def test_every_figure_appears_in_the_rendered_page(report, tmp_path):
    res = chromium(tmp_path, "--dump-dom", (report / "index.html").as_uri())
    dom = res.stdout
    assert "<img" in dom, res.stderr[-2000:]
    shown = {html.unescape(k): html.unescape(v) for k, v in
             re.findall(r"<tr><td><code>(.*?)</code></td><td>(.*?)</td></tr>", dom)}
    data = json.loads((report / "report.json").read_text())
    expected = {html.unescape(k): html.unescape(v) for k, v in _rows({k: v for k, v in data.items() if k != "plots"})}
    assert len(expected) > 100
    missing = {k: v for k, v in expected.items() if shown.get(k) != v}
    assert not missing, list(missing.items())[:5]
    for key in ("uaps.evaluations.svd:v1.fooling_rate", "diagnostics.spectrum.global.effective_rank",
                "diagnostics.trajectory.universal.mean_over_trajectory"):
        assert key in shown
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", dom, re.S)]
    assert captions == [p["caption"] for p in data["plots"]] or sorted(captions) == sorted(
        p["caption"] for p in data["plots"])
    assert dom.count("<img") == len(data["plots"])


def test_comparison_table_lists_every_global_uap_and_the_baseline(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", (report / "index.html").as_uri()).stdout
    table = re.search(r"<table class=\"compare\">(.*?)</table>", dom, re.S).group(1)
    data = json.loads((report / "report.json").read_text())
    glob = [k for k in data["uaps"]["evaluations"] if ":class-" not in k]
    rows = re.findall(r"<tr><td>(.*?)</td>", table)
    assert rows == [*glob, "random (2 draws)"]
    for name in glob:
        fr = data["uaps"]["evaluations"][name]["fooling_rate"]
        assert f"<tr><td>{name}</td><td>2</td><td>{fr:.6g}</td>" in table
