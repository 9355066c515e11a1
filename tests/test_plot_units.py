"""Report figures state rates in percent and put whole-number ticks on step and index axes.

Each plot is read back from its matplotlib artists and compared with the figures it was drawn
from (given here, or returned beside the plot): a rate r is drawn at 100 r, its 95 % interval's
ends at 100 lo and 100 hi, on an axis labelled in %.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import uapx
from uapx import reproduce, sweep
from uapx.perturbations import PerturbationSet


class _Report:
    """Keeps the figures a plotting function adds (``uapx.report.Report.add_plot``'s signature)."""

    def __init__(self):
        self.figures = {}

    def add_plot(self, section, name, fig, caption=""):
        self.figures[f"{section}-{name}"] = fig
        return name


def _bars_of(container):
    """(y values, [(low, high)]) of an errorbar container's points and vertical bars."""
    y = np.asarray(container.lines[0].get_ydata(), dtype=float)
    segs = container.lines[2][0].get_segments()
    return y, [(float(s[0][1]), float(s[1][1])) for s in segs]


def _held_out_report(rate, ci, random_rate, random_ci, in_sample):
    return {"uaps": {"evaluations": {"svd:v1": {"source_class": None, "fooling_rate": in_sample}},
                     "held_out": {"n_images": 200, "split": "test",
                                  "evaluations": {"svd:v1": {"fooling_rate": rate, "fooling_rate_wilson95": ci}},
                                  "random_baseline": {"fooling_rate": {"mean": random_rate,
                                                                       "wilson95": random_ci}}}}}


def test_the_eps_sweep_plots_held_out_rates_in_percent():
    runs = [{"eps": 1.0, "held_out": sweep.held_out_best(_held_out_report(0.25, [0.2, 0.31], 0.02, [0.01, 0.04], 0.3))},
            {"eps": 2.0, "held_out": sweep.held_out_best(_held_out_report(0.5, [0.43, 0.57], 0.05, [0.03, 0.08], 0.6))}]
    fig = sweep.sweep_plot({"zoo:mnist-natural": runs})
    ax = fig.axes[2]
    assert "(%)" in ax.get_ylabel()
    best, rnd = ax.containers
    y, bars = _bars_of(best)
    np.testing.assert_allclose(y, [25.0, 50.0])
    np.testing.assert_allclose(bars, [(20.0, 31.0), (43.0, 57.0)])
    y, bars = _bars_of(rnd)
    np.testing.assert_allclose(y, [2.0, 5.0])
    np.testing.assert_allclose(bars, [(1.0, 4.0), (3.0, 8.0)])


def test_the_study_plots_rates_in_percent_and_steps_as_whole_numbers(monkeypatch):
    rep = _held_out_report(0.4, [0.35, 0.46], 0.03, [0.02, 0.05], 0.45)
    rep["diagnostics"] = {
        "spectrum": {"global": {"singular_values": [3.0, 2.0, 1.5]}},
        "trajectory": {ref: {"mean_per_step": [0.1, 0.5, 0.9], "std_per_step": [0.1, 0.1, 0.1]}
                       for ref in ("universal", "own_final", "own_mean")},
        "subspace": {"k": [1, 2, 5], "random": {"fooling_rate": 0.01},
                     "subspace": {"1": {"fooling_rate": 0.1, "wilson_95": [0.08, 0.13]},
                                  "2": {"fooling_rate": 0.2, "wilson_95": [0.17, 0.24]},
                                  "5": {"fooling_rate": 0.3, "wilson_95": [0.26, 0.35]}}}}
    monkeypatch.setattr(reproduce, "_uap_images", lambda *a, **k: None)  # needs the runs' uaps.pt files
    report = _Report()
    reproduce._comparison_plots(report, {"zoo:mnist-natural": rep}, parts=None)

    ax = report.figures["runs-fooling-rates"].axes[0]
    assert "(%)" in ax.get_ylabel()
    held, rnd = ax.containers
    y, bars = _bars_of(held)
    np.testing.assert_allclose(y, [40.0])
    np.testing.assert_allclose(bars, [(35.0, 46.0)])
    y, bars = _bars_of(rnd)
    np.testing.assert_allclose(y, [3.0])
    np.testing.assert_allclose(bars, [(2.0, 5.0)])
    in_sample = [line for line in ax.lines if line.get_marker() == "^"]
    np.testing.assert_allclose(in_sample[0].get_ydata(), [45.0])

    ax = report.figures["landscape-subspace-test"].axes[0]
    assert "(%)" in ax.get_ylabel()
    y, bars = _bars_of(ax.containers[0])
    np.testing.assert_allclose(y, [10.0, 20.0, 30.0])
    np.testing.assert_allclose(bars, [(8.0, 13.0), (17.0, 24.0), (26.0, 35.0)])
    control = [line for line in ax.lines if line.get_linestyle() == ":"]
    np.testing.assert_allclose(control[0].get_ydata(), [1.0, 1.0])

    for name in ("trajectories-natural-vs-adversarial", "spectra-natural-vs-adversarial"):
        for ax in report.figures[name].axes:  # 3 steps / 3 indices: matplotlib alone would tick at halves
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_the_subspace_diagnostic_plots_its_rates_in_percent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(40, 1, 4, 4)
    y = torch.arange(40) % 3
    with torch.no_grad():
        clean = model(x).argmax(1)
    pset = PerturbationSet(torch.randn(40, 16), y, clean, clean, (1, 4, 4), 1.5)
    analysis = uapx.Analysis(model, x, y, pset=pset, eps=1.5, classes=["a", "b", "c"])
    res = uapx.plugin("subspace")(draws=3, max_k=5).run(analysis)
    (_, fig, _), = res.plots
    ax = fig.axes[0]
    assert "(%)" in ax.get_ylabel()
    ks = res.figures["k"]
    y, bars = _bars_of(ax.containers[0])
    sub = res.figures["subspace"]
    np.testing.assert_allclose(y, [100 * sub[str(k)]["fooling_rate"] for k in ks])
    np.testing.assert_allclose(bars, [tuple(100 * v for v in sub[str(k)]["wilson_95"]) for k in ks], atol=1e-9)
    control = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert control[0].get_ydata()[0] == pytest.approx(100 * res.figures["random"]["fooling_rate"])
