"""Landscape measures (local-linearity, gradalign, cure, hessian, subspace) on models whose
answer is known analytically, power iteration against the dense Hessian, and a short end-to-end
run on the bundled model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from uapx.registry import get_registry


def mod(name):
    import importlib

    return importlib.import_module(get_registry().get(name, "diagnostic").cls.__module__)


D = 12  # pixels of the 1 x 3 x 4 test images


class Quadratic(nn.Module):
    """Outputs W x (no bias); with ``half_sq`` the loss is ||W x - t||^2 / 2, Hessian W^T W."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.w.T


def half_sq(out, y):
    return 0.5 * (out - 1.0).pow(2).sum(1)


def linear_loss(out, y):
    return out[:, 0] * 2.0 - out[:, 1]  # linear in x


def setup(seed=0, m=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, D, generator=g, dtype=torch.float64)
    x = 0.4 + 0.2 * torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64)  # box never binds at eps <= 0.3
    return Quadratic(w), x, torch.zeros(6, dtype=torch.long), w.T @ w


def test_linear_loss_gives_the_flat_answers():
    model, x, y, _ = setup()
    ll, ga, cu, he = mod("local-linearity"), mod("gradalign"), mod("cure"), mod("hessian")
    gam, rnd = ll.local_linearity(model, x, y, eps=0.3, loss_fn=linear_loss)
    assert float(gam.max()) < 1e-12 and float(rnd.max()) < 1e-12
    cos, ctl = ga.gradient_alignment(model, x, y, eps=0.3, loss_fn=linear_loss)
    np.testing.assert_allclose(cos.numpy(), 1.0, atol=1e-12)
    assert float(ctl.abs().max()) < 0.99  # a random direction is not the gradient
    c, _ = cu.cure_curvature(model, x, y, h=0.3, loss_fn=linear_loss)
    assert float(c.max()) < 1e-12
    lam, _ = he.top_eigenvalue(model, x, y, loss_fn=linear_loss)
    assert float(lam.abs().max()) == 0.0


def test_quadratic_loss_gives_the_known_curvatures():
    model, x, y, a = setup()
    lam_max = float(torch.linalg.eigvalsh(a)[-1])
    eps = 0.3
    # local linearity: g(delta) = delta^T A delta / 2, maximal eps^2 lam_max / 2 along the top eigenvector
    ll = mod("local-linearity")
    gam, rnd = ll.local_linearity(model, x, y, eps=eps, steps=100, step_size=eps, loss_fn=half_sq, clip=False)
    np.testing.assert_allclose(gam.numpy(), 0.5 * eps ** 2 * lam_max, rtol=1e-6)
    few, _ = ll.local_linearity(model, x, y, eps=eps, steps=5, loss_fn=half_sq, clip=False)  # a lower bound
    assert float(few.max()) <= 0.5 * eps ** 2 * lam_max * (1 + 1e-9) and float((few > rnd).double().mean()) == 1.0
    assert float(rnd.max()) < 0.5 * eps ** 2 * lam_max * (1 + 1e-9)
    # hessian: the top eigenvalue of W^T W, and the random control r^T A r <= lam_max
    lam, ctl = mod("hessian").top_eigenvalue(model, x, y, iters=200, loss_fn=half_sq, tol=0)
    np.testing.assert_allclose(lam.numpy(), lam_max, rtol=1e-6)
    assert float(ctl.max()) <= lam_max + 1e-9
    # cure: ||A z|| exactly (the gradient difference of a quadratic is A (h z)), z the unit gradient
    grad = (x.reshape(6, -1) @ a.T) - (torch.ones(6, 5, dtype=torch.float64) @ model.w)
    z = grad / grad.norm(dim=1, keepdim=True)
    c, _ = mod("cure").cure_curvature(model, x, y, h=0.2, loss_fn=half_sq, clip=False)
    np.testing.assert_allclose(c.numpy(), (z @ a.T).norm(dim=1).numpy(), rtol=1e-9)
    # gradalign: cos(g(x), g(x) + A eta) for the eta drawn by the same generator
    cos, _ = mod("gradalign").gradient_alignment(model, x, y, eps=eps, loss_fn=half_sq, clip=False,
                                                 generator=torch.Generator().manual_seed(9))
    from uapx_plugins import _measures as M

    eta = M.uniform_ball((6, 1, 3, 4), eps, "l2", torch.Generator().manual_seed(9)).double().reshape(6, -1)
    ref = torch.nn.functional.cosine_similarity(grad, grad + eta @ a.T, dim=1)
    np.testing.assert_allclose(cos.numpy(), ref.numpy(), rtol=1e-9)


def test_power_iteration_matches_the_dense_hessian_of_a_cross_entropy_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    lam, _ = mod("hessian").top_eigenvalue(net, x, y, iters=500, tol=0)
    for i in range(3):
        f = lambda xi: torch.nn.functional.cross_entropy(net(xi.reshape(1, 1, 3, 4)), y[i:i + 1])  # noqa: E731
        h = torch.autograd.functional.hessian(f, x[i].reshape(-1)).numpy()
        ev = np.linalg.eigvalsh(h)
        dominant = ev[np.argmax(np.abs(ev))]
        assert float(lam[i]) == pytest.approx(dominant, rel=1e-4)


def test_uniform_ball_and_stratified_draw():
    from uapx_plugins import _measures as M

    g = torch.Generator().manual_seed(0)
    p = M.uniform_ball((4000, 3), 2.0, "l2", g)
    r = p.norm(dim=1)
    assert float(r.max()) <= 2.0 + 1e-6
    assert float((r <= 1.0).double().mean()) == pytest.approx(1 / 8, abs=0.02)  # volume share of radius 1 in 3-D
    y = torch.arange(1000) // 100  # class-sorted, like the CIFAR-10 ImageFolder
    pos = M.stratified_draw(y, 50, seed=3)
    assert len(pos) == 50 and len(set(pos.tolist())) == 50
    assert torch.bincount(y[pos], minlength=10).tolist() == [5] * 10
    fit, held = M.half_split(y, seed=1)
    assert len(set(fit.tolist()) & set(held.tolist())) == 0 and len(fit) + len(held) == 1000
    lo, hi = M.wilson(10, 100)
    assert (lo, hi) == pytest.approx((0.05523, 0.17437), abs=1e-4)  # reference: statsmodels proportion_confint


def test_subspace_vectors_lie_in_the_span_and_have_norm_eps():
    s = mod("subspace")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(30, 20, generator=g)
    basis = s.top_right_singular_vectors(d, 4)
    ref = np.linalg.svd(d.numpy().astype(np.float64))[2][:4]
    np.testing.assert_allclose(np.abs(basis.numpy() @ ref.T), np.eye(4), atol=1e-5)
    v = s.subspace_vectors(basis, 7, 1.5, g)
    np.testing.assert_allclose(v.norm(dim=1).numpy(), 1.5, rtol=1e-5)
    resid = v - (v @ basis.T) @ basis
    assert float(resid.norm()) < 1e-4


def test_subspace_test_separates_a_planted_direction():
    """A model that only looks at one pixel direction u: random vectors in span{u} fool it, random
    vectors in 784 dimensions almost never do."""
    s = mod("subspace")
    u = torch.zeros(1, 1, 4, 4)
    u[0, 0, 1, 2] = 1.0

    class OneDirection(nn.Module):
        def forward(self, x):
            t = (x * u).sum((1, 2, 3)) - 0.5
            return torch.stack([t, -t], 1)

    x = torch.full((40, 1, 4, 4), 0.5)
    x[:, 0, 1, 2] = 0.45 + 0.1 * torch.rand(40, generator=torch.Generator().manual_seed(0))
    clean = OneDirection()(x).argmax(1)
    basis = u.reshape(1, -1)
    fooled = s.fooled_counts(OneDirection(), x, clean, s.subspace_vectors(basis, 20, 0.3, torch.Generator()))
    rnd = torch.randn(20, 16)
    rnd = 0.3 * rnd / rnd.norm(dim=1, keepdim=True)
    fooled_rnd = s.fooled_counts(OneDirection(), x, clean, rnd)
    assert s.rate(fooled, 40)["fooling_rate"] > 0.45  # a step of 0.3 along +-u flips every image on that side
    assert s.rate(fooled, 40)["fooling_rate"] > s.rate(fooled_rnd, 40)["wilson_95"][1]


def test_analyze_runs_the_measures_and_reports_them(tmp_path):
    from uapx.pipeline import AnalyzeConfig, analyze

    names = ["local-linearity", "gradalign", "cure", "hessian", "subspace"]
    cfg = AnalyzeConfig(plugins=["svd", *names], n_samples=60, steps=5, out=str(tmp_path / "r"),
                        plugin_settings={n: {"images": 20} for n in names[:4]} | {"subspace": {"draws": 3}})
    res = analyze(cfg)
    rep = json.loads((res.out / "report.json").read_text())
    for n in names[:4]:
        fig = rep["diagnostics"][n]
        assert fig["images"] == 20 and len(fig["measure"]["per_image"]) == 20
        assert sum(fig["images_per_class"].values()) == 20 and max(fig["images_per_class"].values()) <= 4
        assert fig["measure"]["se"] > 0 and "control" in fig
    sub = rep["diagnostics"]["subspace"]
    assert sub["fit_images"] + sub["held_out_images"] == 60 and sub["k"][-1] <= 30 and sub["radius"] == sub["eps"]
    assert sum(sub["held_out_images_per_class"].values()) == sub["held_out_images"]
    positions = [rep["diagnostics"][n]["positions"] for n in names[:4]]
    assert all(p == positions[0] for p in positions) and len(set(positions[0])) == 20  # one draw for all
    sections = {p["section"] for p in rep["plots"]}
    assert set(names) <= sections
    assert all((res.out / p["file"]).is_file() for p in rep["plots"])
