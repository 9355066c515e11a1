"""`uapx reproduce`: the verdicts follow the fixed criteria, and the study runs end to end."""
from __future__ import annotations

import json

import pytest

from uapx.cli import main
from uapx.reproduce import STUDY, judge


def fake_run(sv, energy, align, traj):
    return {"diagnostics": {
        "spectrum": {"global": {"singular_values": sv}},
        "interpretability": {"data_subspace_energy": {"average": energy, "svd:v1": energy,
                                                      "average:class-0": 0.0},
                             "class_alignment": {"average:class-0": -align, "average:class-1": align},
                             "random_subspace_energy": {"mean": 0.06}},
        "trajectory": {r: {"mean_over_trajectory": v} for r, v in traj.items()}}}


def test_verdicts_follow_the_criteria():
    mn, ma, cn, ca = (m for ds in STUDY for m in STUDY[ds][:2])
    runs = {
        mn: fake_run([5, 4.9, 4.5, 4.0, 3.9], 0.2, 0.1, {"universal": 0.1, "own_final": 0.9, "own_mean": 0.9}),
        ma: fake_run([5, 4.0, 3.0, 2.0, 1.0], 0.5, 0.4, {"universal": 0.3, "own_final": 0.95, "own_mean": 0.8}),
        cn: fake_run([50, 4, 3, 2, 1], 0.1, 0.1, {"universal": 0.2, "own_final": 0.8, "own_mean": 0.9}),
        ca: fake_run([50, 10, 3, 2, 1], 0.1, 0.1, {"universal": 0.4, "own_final": 0.9, "own_mean": 0.7}),
    }
    f, lines = judge(runs)
    assert f["1_interpretability"]["verdict"] == "supported"
    assert f["2_mnist_spectrum"]["verdict"] == "partly supported"  # 3.9/5 passes, 1/5 fails
    assert f["3_cifar_spectrum"]["verdict"] == "partly supported"  # 50/4 passes, 50/10 = 5 fails
    r = f["4_trajectory"]["readings"]
    assert r["universal"]["verdict"] == "supported" and r["own_final"]["verdict"] == "supported"
    assert r["own_mean"]["verdict"] == "not supported"
    assert f["4_trajectory"]["verdict"].startswith("mixed")
    assert len(lines) == 4 and all(line.startswith("Finding ") for line in lines)
    runs[ma] = fake_run([5, 4, 3, 2, 1], 0.1, 0.4, {"universal": 0, "own_final": 0, "own_mean": 0})
    assert judge(runs)[0]["1_interpretability"]["verdict"] == "not supported"  # energy lower
    f = judge({mn: runs[mn], ma: None, cn: None, ca: None})[0]
    assert f["1_interpretability"]["verdict"] == "not measured" and ma in f["1_interpretability"]["why"]
    assert f["2_mnist_spectrum"]["verdict"].startswith("supported (measured on zoo:mnist-natural only")
    assert f["4_trajectory"]["verdict"] == "not measured"


@pytest.mark.slow
def test_reproduce_end_to_end_on_mnist(tmp_path):
    out = tmp_path / "study"
    assert main(["reproduce", "--datasets", "mnist", "--n-samples", "60", "--steps", "3",
                 "--trajectory-samples", "10", "--batch-size", "30", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["findings"]) == ["1_interpretability", "2_mnist_spectrum", "3_cifar_spectrum", "4_trajectory"]
    assert rep["runs"]["zoo:mnist-natural"]["n_images"] == 60
    assert (out / "mnist-natural" / "index.html").is_file()
    assert not (tmp_path / "study.parts").exists()
    page = (out / "index.html").read_text()
    assert page.index("Finding 1:") < page.index("Finding 4:") < page.index("<h2>runs</h2>")
    assert page.count("data:image/png;base64,") == len(rep["plots"])
