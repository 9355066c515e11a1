"""spectrum's talk figures beside the random-rows control, against NumPy, with bootstrap intervals."""
import numpy as np
import pytest
import torch

from uapx.perturbations import PerturbationSet
from uapx_plugins.spectrum import controlled_figures


def _pset(D):
    n = D.shape[0]
    z = torch.zeros(n, dtype=torch.long)
    return PerturbationSet(D.float(), z, z, z, shape=(1, 1, D.shape[1]), eps=1.0)


def test_one_direction_against_its_control():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g)
    D = torch.randn(300, 1, generator=g) * u / u.norm() * 5 + 0.3 * torch.randn(300, 64, generator=g)
    out = controlled_figures(_pset(D), seed=0, top=10)
    s = np.linalg.svd(D.double().numpy(), compute_uv=False)
    f = out["figures"]
    assert f["sigma1_over_sigma2"] == pytest.approx(s[0] / s[1], rel=1e-4)
    assert f["sigma1_over_sigma10"] == pytest.approx(s[0] / s[9], rel=1e-4)
    assert f["energy_share"] == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-4)
    ev = out["eigenvalues_second_moment"]
    assert ev[0] == pytest.approx(s[0] ** 2 / 300, rel=1e-4)
    cov = np.linalg.eigvalsh(np.cov(D.double().numpy().T))[::-1]
    assert out["eigenvalues_covariance"][0] == pytest.approx(cov[0], rel=1e-4)
    b, c = out["bootstrap95"], out["control"]
    assert b["energy_share"]["low"] <= f["energy_share"] <= b["energy_share"]["high"]
    assert c["bootstrap95"]["energy_share"]["high"] < b["energy_share"]["low"]  # a dominant direction is not random
    assert c["sigma1_over_sigma2"] < 1.5 < f["sigma1_over_sigma2"]


def test_random_rows_match_their_control():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g)
    out = controlled_figures(_pset(D), seed=2, top=10)
    b, c = out["bootstrap95"]["energy_share"], out["control"]["bootstrap95"]["energy_share"]
    assert b["low"] < c["high"] and c["low"] < b["high"]  # the intervals overlap: no difference to claim
