"""eps sweeps: ``analyze --eps 1,2`` runs one attack per eps and reports the figures against eps;
the list is checked before any work; ``reproduce`` picks up every robust zoo model from the zoo's
cards and sweeps eps over uapx.defaults.STUDY_EPS_SWEEP."""
from __future__ import annotations

import json
import shutil

import pytest

from uapx.cli import main

TINY = ["--n-samples", "40", "--steps", "1", "--random-draws", "2", "--k", "2", "--batch-size", "40",
        "--eval-precision", "float32"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "r"
    assert main(["analyze", "--eps", "1,2", "--plugins", "average,svd,spectrum", *TINY, "--out", str(out)]) == 0
    return out


def test_one_attack_per_eps_each_a_full_report(sweep):
    rep = json.loads((sweep / "report.json").read_text())
    assert rep["eps_sweep"]["eps"] == [1.0, 2.0] and rep["config"]["eps"] == [1.0, 2.0]
    for e in ("1", "2"):
        sub = json.loads((sweep / f"eps-{e}" / "report.json").read_text())
        assert sub["config"]["eps"] == float(e)
        assert sub["attack"]["perturbation_norm"]["max"] <= float(e) + 1e-4  # each run at its own budget
        assert all(abs(ev["eps"] - float(e)) < 1e-9 for ev in sub["uaps"]["evaluations"].values())
    assert not (sweep.parent / "r.parts").exists()


def test_each_figure_against_eps_is_the_one_its_run_measured(sweep):
    """The sweep's per-eps figures, recomputed from each eps's own report.json: the best global UAP
    by its in-sample rate, judged on the held-out images; spectrum's sigma1/sigma2 and energy share
    with their bootstrap intervals beside the random-rows control."""
    rep = json.loads((sweep / "report.json").read_text())
    for e, fig in rep["eps_sweep"]["per_eps"].items():
        sub = json.loads((sweep / f"eps-{e}" / "report.json").read_text())
        fit = {n: v for n, v in sub["uaps"]["evaluations"].items() if v["source_class"] is None}
        best = max(fit, key=lambda n: fit[n]["fooling_rate"])
        held = sub["uaps"]["held_out"]["evaluations"][best]
        assert fig["held_out"]["best_uap"] == best and fig["held_out"]["fooling_rate"] == held["fooling_rate"]
        assert fig["held_out"]["wilson95"] == held["fooling_rate_wilson95"]
        assert fig["held_out"]["random_fooling_rate"] == sub["uaps"]["held_out"]["random_baseline"]["fooling_rate"]["mean"]
        talk = sub["diagnostics"]["spectrum"]["global"]["talk"]
        for key in ("sigma1_over_sigma2", "energy_share"):
            assert fig[key]["figure"]["mean"] == talk["figures"][key]
            assert fig[key]["control"]["mean"] == talk["control"][key]
            lo, hi = fig[key]["figure"]["low"], fig[key]["figure"]["high"]
            assert lo <= hi and fig[key]["figure"]["low"] == talk["bootstrap95"][key]["low"]
        s = sub["diagnostics"]["spectrum"]["global"]["singular_values"]
        assert fig["sigma1_over_sigma2"]["figure"]["mean"] == pytest.approx(s[0] / s[1])


def test_the_page_plots_the_figures_against_eps(sweep):
    rep = json.loads((sweep / "report.json").read_text())
    plots = [p for p in rep["plots"] if p["section"] == "eps-sweep"]
    assert len(plots) == 1 and (sweep / plots[0]["file"]).is_file()
    page = (sweep / "index.html").read_text()
    assert "eps-1/index.html" in page and "sigma1_over_sigma2" in page and "held-out images" in page


@pytest.mark.parametrize("argv, message", [
    (["--eps", "0.1,1.5", "--attack", "pgd-linf"], "Linf eps of 1.5"),
    (["--eps", "1,1"], "appears twice"),
    (["--eps", "1,-2"], "must be a positive finite number"),
    (["--eps", "1,,2"], "separated by commas"),
])
def test_a_bad_eps_list_is_refused_in_one_line_before_any_work(capsys, tmp_path, argv, message):
    code = main(["analyze", *argv, *TINY, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.parts").exists()


def test_one_eps_stays_a_plain_analysis(tmp_path):
    out = tmp_path / "r"
    assert main(["analyze", "--eps", "1.5", "--plugins", "average", *TINY, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["eps"] == 1.5 and "eps_sweep" not in rep and not (out / "eps-1.5").exists()


def test_reproduce_finds_every_robust_zoo_model_from_the_cards(tmp_path, monkeypatch):
    """A new robust model's weights and card in the zoo folder are picked up (no list to edit), and the
    judge gives it a column of the finding x model table."""
    from uapx.models import zoo
    from uapx.reproduce import STUDY, findings_table, judge, robust_models

    for name in zoo.names():
        for suffix in (".pt", ".json"):
            shutil.copy(zoo.ZOO_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    card = json.loads((tmp_path / "mnist-l2.json").read_text())
    card["config"]["adversarial"] = "linf"
    (tmp_path / "mnist-linf.json").write_text(json.dumps(card))
    shutil.copy(tmp_path / "mnist-l2.pt", tmp_path / "mnist-linf.pt")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert robust_models("mnist") == ["zoo:mnist-l2", "zoo:mnist-linf"]
    assert "zoo:mnist-linf" not in robust_models("cifar10")
    from test_reproduce import _noise_run, _structured_run

    runs = {STUDY["mnist"][0]: _noise_run(1), "zoo:mnist-l2": _structured_run(2), "zoo:mnist-linf": _noise_run(3)}
    f, _ = judge(runs)
    table = findings_table(f)
    assert {"zoo:mnist-l2", "zoo:mnist-linf"} <= set(table[0])
    assert f["1_interpretability"]["per_model"]["zoo:mnist-linf"]["verdict"] == "not supported"
    assert f["1_interpretability"]["per_model"]["zoo:mnist-l2"]["verdict"] == "supported"


def test_the_study_sweeps_the_budgets_of_one_place():
    from uapx import defaults
    from uapx.reproduce import STUDY

    assert defaults.STUDY_EPS_SWEEP == {"mnist": (1.0, 2.0, 4.0), "cifar10": (0.25, 0.5, 1.0, 2.0)}
    for ds, (_, _, eps) in STUDY.items():  # the study's eps is one of the swept ones, and the L2 default
        assert eps in defaults.STUDY_EPS_SWEEP[ds] and eps == defaults.default_eps("l2", ds)
