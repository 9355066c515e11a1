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


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium; the test that renders is skipped where there is none (the tests
    of the report folder's files run without it)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
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
    for name in glob:  # the held-out rate (the figure) with its interval, then the in-sample one
        held = data["uaps"]["held_out"]["evaluations"][name]
        fr, (lo, hi) = held["fooling_rate"], held["fooling_rate_wilson95"]
        ins = data["uaps"]["evaluations"][name]["fooling_rate"]
        assert (f"<tr><td>{name}</td><td>2</td><td>{100 * fr:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%]</td>"
                f"<td>{100 * ins:.1f}%</td>") in table  # rates as percentages


# Measures, in the rendered page, where the header, the best-UAP summary and each section's first
# plot are (getBoundingClientRect after the images loaded), and writes them into the DOM.
_PROBE = """<script>window.addEventListener('load', () => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
    return [r.left, r.top + window.scrollY, r.width, r.height]; };
  const out = {header: box(document.querySelector('header.run')),
               summary: box(document.querySelector('#uaps .summary')), sections: {}};
  document.querySelectorAll('section').forEach(s => {
    if (s.querySelector('img')) out.sections[s.id] = box(s.querySelector('img')); });
  out.height = document.documentElement.scrollHeight;
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre); });</script>"""


def test_header_summary_and_a_plot_per_section_are_visible(report, tmp_path):
    page = (report / "index.html").read_text()
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--window-size=1200,1000", "--dump-dom",
                   probe_page.as_uri()).stdout
    rects = json.loads(html.unescape(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1)))
    data = json.loads((report / "report.json").read_text())
    # every section that has plots: the UAP overview, one per method, one per diagnostic
    expected = {"uaps", *(f"method-{m}" for m in ("average", "svd")), *data["diagnostics"]}
    assert expected <= set(rects["sections"]), rects["sections"].keys()
    height = int(rects["height"]) + 10
    shot = tmp_path / "full.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size=1200,{height}", "--hide-scrollbars",
             page_uri := (report / "index.html").as_uri())
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[0] >= height - 10, (img.shape, height, page_uri)

    def visible(name: str, r) -> None:
        assert r is not None, f"{name} is missing from the page"
        x, y, w, h = (int(round(v)) for v in r)
        assert w > 50 and h > 20, f"{name} has no size: {r}"
        patch = img[y:y + h, x:x + w]
        assert patch.size and patch.std() > 10, f"{name} is blank in the screenshot ({patch.std():.1f})"

    visible("the header", rects["header"])
    visible("the best-UAP summary", rects["summary"])
    for section in sorted(expected):
        visible(f"the first plot of section {section!r}", rects["sections"][section])
    header_text = re.search(r"<header class=\"run\".*?</header>", dom, re.S).group(0)
    for fact in ("zoo:mnist-natural", "mnist (test), 25 images", "held-out images", "seed", data["environment"]["uapx"]):
        assert fact in html.unescape(header_text), fact
    best = max((e for e in data["uaps"]["evaluations"].values() if e["source_class"] is None),
               key=lambda e: e["fooling_rate"])  # chosen on the fit images, judged on the held-out ones
    held = data["uaps"]["held_out"]["evaluations"][best["name"]]
    summary = html.unescape(re.search(r"<p class=\"summary\">(Best global UAP.*?)</p>", dom).group(1))
    assert summary.startswith(f"Best global UAP (chosen on the fit images): {best['name']} fools "
                              f"{held['fooling_rate']:.1%}")
    assert "of 25 held-out images" in summary and f"in-sample: {best['fooling_rate']:.1%}" in summary


def test_full_tables_are_folded_under_names_a_reader_understands(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", (report / "index.html").as_uri()).stdout
    folds = [html.unescape(f) for f in re.findall(r"<summary>(.*?)</summary>", dom)]
    assert folds and not any(re.fullmatch(r"\d+ figures", f) for f in folds)
    assert any(f.startswith("Every evaluation of svd's UAPs") for f in folds)
    assert any(f.startswith("All numbers of the spectrum diagnostic") for f in folds)
    assert "<details open" not in dom  # the page shows the story; the tables wait until asked for
    # the page's sections in order: headline, one per method, the attack, the diagnostics, context
    titles = [html.unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", dom)]
    assert titles[:4] == ["Headline: UAPs against random directions", "UAP method: average", "UAP method: svd",
                          "Per-image attack"]
    assert titles[4:6] == ["Diagnostic: spectrum", "Diagnostic: trajectory"]


def test_uaps_export_as_npy_and_png_beside_uaps_pt(report):
    import numpy as np
    from PIL import Image

    from uapx.methods import load_uaps

    uaps = {u.name: u for u in load_uaps(report / "uaps.pt")}
    for name, u in uaps.items():
        stem = report / "uaps" / name.replace(":", "-")
        arr = np.load(stem.with_suffix(".npy"))
        np.testing.assert_array_equal(arr, u.vector.float().numpy())
        assert np.linalg.norm(arr) == pytest.approx(u.eps, rel=1e-4)
        png = np.asarray(Image.open(stem.with_suffix(".png")))
        assert png.shape[:2] == arr.shape[1:]


def test_headline_verdict_follows_the_wilson_criterion(report, tmp_path):
    dom = html.unescape(chromium(tmp_path, "--dump-dom", (report / "index.html").as_uri()).stdout)
    data = json.loads((report / "report.json").read_text())
    best = max((e for e in data["uaps"]["evaluations"].values() if e["source_class"] is None),
               key=lambda e: e["fooling_rate"])  # chosen on the fit images, judged on the held-out ones
    low = data["uaps"]["held_out"]["evaluations"][best["name"]]["fooling_rate_wilson95"][0]
    high_random = data["uaps"]["held_out"]["random_baseline"]["fooling_rate"]["wilson95"][1]
    verdict = re.search(r"<td>verdict</td><td><b>(.*?)</b>", dom).group(1)
    expected = ("fools more images than random directions" if low > high_random else
                "not distinguishable from random directions")
    assert expected in verdict and best["name"] in verdict
