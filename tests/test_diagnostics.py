"""Diagnostics on synthetic cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from uapx.attacks import pgd_trajectory
from uapx.registry import get_registry


def plugin_module(name):
    import importlib

    return importlib.import_module(get_registry().get(name, "diagnostic").cls.__module__)


def test_linear_model_trajectory_is_perfectly_straight():
    """A linear model's input gradient is constant: every cosine similarity is 1 at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    x = torch.rand(8, 1, 4, 4) * 0.5 + 0.25
    y = torch.zeros(8)
    loss = lambda out, t: out.squeeze(1)  # noqa: E731  the logit itself: gradient = weight
    _, traj = pgd_trajectory(model, x, y, eps=0.3, steps=6, step_size=0.05, loss_fn=loss, record=True)
    cos = plugin_module("trajectory").trajectory_cosines(traj.grads)
    for name in ("universal", "own_final", "own_mean"):
        np.testing.assert_allclose(cos[name].numpy(), 1.0, atol=1e-6)


def test_trajectory_cosines_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(5, 4, 10, generator=g)
    cos = plugin_module("trajectory").trajectory_cosines(grads)
    univ = grads[-1].mean(0)
    for t in range(5):
        for i in range(4):
            ref = {"universal": univ, "own_final": grads[-1, i], "own_mean": grads[:, i].mean(0)}
            for name, r in ref.items():
                expect = float(torch.nn.functional.cosine_similarity(grads[t, i], r, dim=0))
                assert float(cos[name][t, i]) == pytest.approx(expect, abs=1e-6)


def test_spectrum_of_a_planted_low_rank_set():
    """Rows spanned by 3 orthonormal directions with scales 8, 4, 1: the spectrum is known."""
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    coeff = torch.randn(400, 3, generator=g, dtype=torch.float64)
    coeff, _ = torch.linalg.qr(coeff)  # orthonormal columns: singular values exactly the scales
    a = coeff @ torch.diag(torch.tensor([8.0, 4.0, 1.0], dtype=torch.float64)) @ q.T
    mod = plugin_module("spectrum")
    from uapx.linalg import top_svd_gram

    res = top_svd_gram([a.float()], 20, 20)
    figs = mod.spectrum_figures(res.S, res.total_energy, fraction=0.3)
    np.testing.assert_allclose(figs["singular_values"][:3], [8.0, 4.0, 1.0], rtol=1e-4)
    assert max(figs["singular_values"][3:]) < 1e-2
    assert figs["sigma1_over_sigma2"] == pytest.approx(2.0, rel=1e-4)
    np.testing.assert_allclose(figs["explained_variance"][:3], np.array([64, 16, 1]) / 81, rtol=1e-4)
    assert figs["count_above_0.3_sigma1"] == 2
    p = np.array([8, 4, 1]) / 13
    assert figs["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-3)


def test_curvature_of_a_quadratic_is_exact():
    mod = plugin_module("landscape")
    ts = torch.linspace(-2, 2, 21)
    h = float(ts[1] - ts[0])
    assert mod.curvature([3.0 * float(t) ** 2 + 0.5 * float(t) + 1 for t in ts], h) == pytest.approx(6.0, rel=1e-5)


def test_landscape_profile_passes_through_the_clean_loss():
    from uapx import data, models

    mod = plugin_module("landscape")
    net = models.load("zoo:mnist-natural")
    imgs = data.load("mnist", "test").subset(50, seed=5)
    x, y = imgs.images(), imgs.y
    clean = float(torch.nn.functional.cross_entropy(net(x), y))
    assert mod.mean_loss(net, x, y, torch.zeros(1, 28, 28), batch_size=16) == pytest.approx(clean, rel=1e-5)
    v = torch.randn(1, 28, 28)
    direct = float(torch.nn.functional.cross_entropy(net((x + v).clamp(0, 1)), y))
    assert mod.mean_loss(net, x, y, v, batch_size=7) == pytest.approx(direct, rel=1e-5)


def test_interpretability_scores_on_known_cases():
    mod = plugin_module("interpretability")
    g = torch.Generator().manual_seed(6)
    x = torch.rand(40, 1, 5, 5, generator=g)
    y = torch.arange(40) % 4
    diffs = mod.class_mean_differences(x, y)
    flat = x.reshape(40, -1).double()
    torch.testing.assert_close(diffs[2], flat[y == 2].mean(0) - flat.mean(0))
    basis = mod.principal_subspace(x, 6)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    inside = basis[0] * 2 - basis[3]
    assert mod.subspace_energy(inside, basis) == pytest.approx(1.0, abs=1e-9)
    full = mod.principal_subspace(x, 25)
    outside = full[10]  # a principal direction not among the top 6
    assert mod.subspace_energy(outside, basis) == pytest.approx(0.0, abs=1e-9)
    rand = [mod.subspace_energy(torch.randn(25, generator=g, dtype=torch.float64), basis) for _ in range(400)]
    assert sum(rand) / len(rand) == pytest.approx(6 / 25, abs=0.03)  # E = k/d for isotropic directions


BUILTIN_DIAGNOSTICS = ["spectrum", "trajectory", "interpretability", "landscape", "local-linearity", "gradalign",
                       "cure", "hessian", "subspace"]


def test_every_diagnostic_states_how_many_images_of_each_class_it_used(tmp_path):
    import json

    from uapx.pipeline import AnalyzeConfig, analyze
    from uapx.stats import IMAGES_PER_CLASS

    measures = {n: {"images": 10} for n in ("local-linearity", "gradalign", "cure", "hessian")}
    cfg = AnalyzeConfig(plugins=["svd", *BUILTIN_DIAGNOSTICS], n_samples=40, steps=2, random_draws=1, k=2,
                        trajectory_samples=10, out=str(tmp_path / "r"),
                        plugin_settings=measures | {"landscape": {"images": 20, "points": 3, "grid": 3},
                                                    "local-linearity": {"images": 10, "steps": 1},
                                                    "hessian": {"images": 10, "iters": 2},
                                                    "trajectory": {"restarts": 1},
                                                    "subspace": {"draws": 1, "max_k": 2}})
    res = analyze(cfg)
    rep = json.loads((res.out / "report.json").read_text())
    fit = rep["data"]["n_images"]  # the fit images (the held-out ones are the other half of the 40)
    expected = {"spectrum": fit, "interpretability": fit, "trajectory": 10, "landscape": min(20, fit),
                "local-linearity": 10, "gradalign": 10, "cure": 10, "hessian": 10,
                "subspace": fit + rep["data"]["held_out"]["n_images"]}
    for name in BUILTIN_DIAGNOSTICS:
        fig = rep["diagnostics"][name]
        counts = fig[IMAGES_PER_CLASS]
        assert sum(counts.values()) == fig["images"] == expected[name], (name, counts, fig["images"])
        if name != "subspace":  # a class-stratified draw of a stratified sample: within 1 of a uniform share
            assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 10, (name, counts)
    page = (res.out / "index.html").read_text()
    assert page.count("images per class") == len(BUILTIN_DIAGNOSTICS)
    land = rep["diagnostics"]["landscape"]  # per-image curvatures: their mean is the mean profile's curvature
    for name, st in land["curvature_stats"].items():
        assert st["mean"] == pytest.approx(land["curvature_at_data"][name], rel=1e-6, abs=1e-9)
        assert st["n"] == land["images"] and st["se"] > 0
    plots = {p["file"] for p in rep["plots"]}  # figure beside control, with intervals
    assert {"spectrum-ratios.png", "trajectory-readings.png", "interpretability-subspace-energy.png",
            "landscape-curvature.png"} <= plots, plots


def test_figure_vs_control_draws_each_interval_as_given():
    from uapx.plots import figure_vs_control, normal95

    figs = [(1.0, 0.5, 2.0), normal95(3.0, 0.5)]
    ctl = [(0.2, 0.1, 0.4), None]
    fig = figure_vs_control(["a", "b"], figs, ctl, ylabel="y")
    ax = fig.axes[0]
    bars = [c for c in ax.containers]
    assert len(bars) == 2  # the figures and the controls
    for container, rows in zip(bars, ([r for r in figs], [r for r in ctl if r is not None])):
        segments = container.lines[2][0].get_segments()
        assert len(segments) == len(rows)
        for seg, (v, lo, hi) in zip(segments, rows):
            assert (seg[0][1], seg[1][1]) == pytest.approx((lo, hi))
    assert figs[1] == pytest.approx((3.0, 3.0 - 1.959963984540054 * 0.5, 3.0 + 1.959963984540054 * 0.5))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["figure", "random control"]
