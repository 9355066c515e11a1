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
