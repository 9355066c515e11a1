"""The CLI end to end, in-process: plugins, info, analyze on the embedded default, errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from uapx.cli import main

SMALL = ["--n-samples", "60", "--steps", "5", "--batch-size", "30", "--random-draws", "3", "--k", "3"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plugins_lists_builtins_with_distribution(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows["average"][1:4] == ["method", "uapx", "0.1.0"]
    assert rows["svd"][1] == "method" and rows["pgd-l2"][1] == "attack"


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    info = dict(line.split(": ", 1) for line in out.splitlines())
    assert info["torch"] == torch.__version__
    assert info["kernel backend"].split()[0] in ("cpu", "cuda", "reference")
    assert "average" in info["plugins loaded"]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    assert main(["analyze", *SMALL, "--out", str(out)]) == 0
    return out


def test_analyze_embedded_default_writes_a_complete_report(small_report):
    files = {p.name for p in small_report.iterdir()}
    assert {"report.json", "index.html", "uaps.pt"} <= files
    rep = json.loads((small_report / "report.json").read_text())
    assert rep["config"]["model"] == "zoo:mnist-natural" and rep["config"]["seed"] == 0
    assert rep["data"]["source"] == "embedded MNIST test split" and rep["data"]["n_images"] == 60
    assert rep["environment"]["torch"] == torch.__version__
    # every perturbation respects the budget
    assert rep["attack"]["perturbation_norm"]["max"] <= 2.0 + 1e-4
    evs = rep["uaps"]["evaluations"]
    assert {"average", "svd:v1", "svd:v2", "svd:v3"} <= set(evs)
    assert any(k.startswith("average:class-") for k in evs)
    pngs = [p for p in files if p.endswith(".png")]
    assert len(pngs) >= 3 and {p["file"] for p in rep["plots"]} == set(pngs)
    page = (small_report / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"""src=['"](?!data:)""", page)  # self-contained


def test_same_seed_same_numbers(small_report, tmp_path):
    again = tmp_path / "again"
    assert main(["analyze", *SMALL, "--out", str(again)]) == 0
    a, b = (json.loads((d / "report.json").read_text()) for d in (small_report, again))
    for key in ("attack", "uaps", "diagnostics"):
        assert a[key] == b[key]


def test_existing_report_is_refused_without_overwrite(small_report, capsys):
    before = (small_report / "report.json").read_text()
    code, _, err = run(capsys, "analyze", *SMALL, "--out", str(small_report))
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (small_report / "report.json").read_text() == before


@pytest.mark.parametrize("argv, needle", [
    (["--eps", "0"], "--eps: must be a positive"),
    (["--eps", "-1"], "--eps: must be a positive"),
    (["--eps", "inf"], "--eps: must be a positive finite"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--step-size", "0"], "--step-size: must be a positive"),
    (["--k", "abc"], "--k: expected a whole number, got 'abc'"),
    (["--random-draws", "0"], "--random-draws: must be >= 1"),
    (["--device", "tpu:0"], "unknown device 'tpu:0'"),
    (["--plugins", "svd,bogus"], "unknown plugin 'bogus'"),
    (["--attack", "bogus"], "unknown attack 'bogus'"),
    (["--n-samples", "20000"], "--n-samples 20000 is out of range"),
    (["--model", "zoo:nope"], "no zoo model 'nope'"),
    (["--data-root", "/nonexistent/uapx-data"], "does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, "analyze", *SMALL, *argv, "--out", str(tmp_path / "r"))
    assert code != 0
    assert needle in err and err.startswith("uapx: error: ") and err.count("\n") == 1 and "fix:" in err
    assert not (tmp_path / "r").exists()


def test_plugin_settings_reach_the_plugin(tmp_path):
    out = tmp_path / "r"
    assert main(["analyze", *SMALL, "--plugins", "svd", "--set", "svd.k=2", "--set", "svd.center=true",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    glob = [k for k in rep["uaps"]["evaluations"] if ":class-" not in k]
    assert glob == ["svd:v1", "svd:v2"]
    assert rep["uaps"]["evaluations"]["svd:v1"]["method"] == "SVDUAP(k=2, center=True, solver='gram', per_class=True)"


def test_saved_uaps_apply_to_another_run_and_transfer(small_report, tmp_path, capsys):
    from uapx.methods import load_uaps

    uaps = load_uaps(small_report / "uaps.pt")
    rep = json.loads((small_report / "report.json").read_text())
    assert {u.name for u in uaps} == set(rep["uaps"]["evaluations"])
    assert all(abs(float(u.vector.norm()) - 2.0) < 1e-4 for u in uaps)
    out = tmp_path / "applied.json"
    code, stdout, _ = run(capsys, "apply", str(small_report / "uaps.pt"), "--only", "average,svd:v1",
                          "--n-samples", "60", "--out", str(out))
    assert code == 0 and "svd:v1" in stdout and "random" in stdout
    applied = json.loads(out.read_text())
    # the same UAPs on the same images and model: the same numbers as the report
    for name in ("average", "svd:v1"):
        assert applied["evaluations"][name]["fooling_rate"] == rep["uaps"]["evaluations"][name]["fooling_rate"]
    code, _, err = run(capsys, "apply", str(small_report / "uaps.pt"), "--only", "nope")
    assert code == 2 and "no UAP named 'nope'" in err


def test_transfer_to_another_model(tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert main(["analyze", *SMALL, "--plugins", "average", "--transfer", "zoo:mnist-natural",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["uaps"]["transfer"]["zoo:mnist-natural"]
    # transferring to the very same model reproduces the model's own numbers
    assert t["evaluations"]["average"]["fooling_rate"] == rep["uaps"]["evaluations"]["average"]["fooling_rate"]
    assert set(t["evaluations"]) == {"average"}


def test_trajectory_samples_sets_how_many_trajectories_are_recorded(capsys, tmp_path):
    out = tmp_path / "r"
    code, _, _ = run(capsys, "analyze", "--plugins", "trajectory", "--n-samples", "20", "--steps", "3",
                     "--trajectory-samples", "7", "--set", "trajectory.restarts=2", "--out", str(out))
    assert code == 0
    traj = json.loads((out / "report.json").read_text())["diagnostics"]["trajectory"]
    assert traj["images"] == 7 and traj["steps"] == 3
    code, _, err = run(capsys, "analyze", "--trajectory-samples", "0", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--trajectory-samples" in err and not (tmp_path / "bad").exists()
