"""UAP methods (average, svd) and the base class, against hand computations and NumPy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uapx.linalg import top_svd_gram, top_svd_lapack
from uapx.perturbations import PerturbationSet
from uapx.registry import get_registry


def make_set(deltas: torch.Tensor, labels: torch.Tensor | None = None, shape=(1, 4, 4)) -> PerturbationSet:
    n = deltas.shape[0]
    labels = labels if labels is not None else torch.zeros(n, dtype=torch.long)
    return PerturbationSet(deltas.float(), labels, labels.clone(), labels.clone(), shape, eps=1.0)


def method(name, **kw):
    return get_registry().get(name, "method").cls(**kw)


def test_average_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, 16, generator=g)
    labels = torch.arange(50) % 2
    uaps = method("average")(make_set(d, labels), eps=[0.5, 2.0])
    byname = {u.name: u for u in uaps}
    m = d.double().mean(0)
    np.testing.assert_allclose(byname["average@2"].vector.reshape(-1).numpy(), (m / m.norm() * 2.0).numpy(), rtol=1e-5)
    m1 = d[labels == 1].double().mean(0)
    np.testing.assert_allclose(byname["average:class-1@0.5"].vector.reshape(-1).numpy(),
                               (m1 / m1.norm() * 0.5).numpy(), rtol=1e-5)
    assert byname["average:class-1@0.5"].source_class == 1
    for u in uaps:  # the base class puts every UAP exactly on its eps-sphere
        assert float(u.vector.norm()) == pytest.approx(u.eps, rel=1e-6)
    norm = method("average", normalize=True)(make_set(d), eps=1.0)[0]
    mn = (d / d.norm(dim=1, keepdim=True)).double().mean(0)
    np.testing.assert_allclose(norm.vector.reshape(-1).numpy(), (mn / mn.norm()).numpy(), rtol=1e-5)


@pytest.mark.parametrize("center", [False, True])
def test_svd_matches_numpy(center):
    g = torch.Generator().manual_seed(1)
    d = torch.randn(200, 16, generator=g) @ torch.randn(16, 16, generator=g)
    a = d.double().numpy()
    if center:
        a = a - a.mean(0)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    for res in (top_svd_gram(d.split(37), 16, 4, center=center), top_svd_lapack(d, 4, center=center)):
        np.testing.assert_allclose(res.S.numpy(), s[:4], rtol=1e-5)
        # singular vectors have no sign: compare |<v, v_ref>|
        np.testing.assert_allclose(np.abs(np.sum(res.V.double().numpy() * vt[:4], axis=1)), 1.0, atol=1e-5)
        assert res.total_energy == pytest.approx(float((s ** 2).sum()), rel=1e-9)


def test_svd_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(16, generator=g)
    v /= v.norm()
    coeff = 3.0 * torch.sign(torch.randn(300, 1, generator=g))  # +/- v: the average cancels
    d = coeff * v + 0.05 * torch.randn(300, 16, generator=g)
    uaps = method("svd", k=2, per_class=False)(make_set(d), eps=1.0)
    assert [u.name for u in uaps] == ["svd:v1", "svd:v2"] and uaps[0].signless
    assert abs(float(uaps[0].vector.reshape(-1) @ v)) > 0.999
    assert uaps[0].meta["singular_value"] > 10 * uaps[1].meta["singular_value"]
    avg = method("average", per_class=False)(make_set(d), eps=1.0)[0]
    assert abs(float(avg.vector.reshape(-1) @ v)) < 0.999  # averaging cannot see a +/- direction


def test_repr_names_the_settings():
    assert repr(method("svd", k=3, center=True)) == "SVDUAP(k=3, center=True, solver='gram', per_class=True, norm=None)"
