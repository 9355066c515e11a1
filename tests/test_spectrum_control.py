"""spectrum's talk figures beside the random-rows control, against NumPy, with bootstrap intervals."""
import numpy as np
import pytest
import torch

from uapx.perturbations import PerturbationSet
from uapx_plugins.spectrum import controlled_figures, ratio_intervals, talk_figures


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


def _planted(seed, n=200, d=400, a1=200.0, a2=50.0):
    """Rows ``a1^(1/2) z1 e1 + a2^(1/2) z2 e2 + noise`` (``z``, noise standard normal), ``n < d``: the
    population second moment has eigenvalues ``a1 + 1, a2 + 1, 1, ...``, so sigma1/sigma2 ->
    sqrt((a1 + 1) / (a2 + 1)) and the energy share -> (a1 + 1) / (a1 + a2 + d)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    D[:, 0] += a1 ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    D[:, 1] += a2 ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return D, {"sigma1_over_sigma2": ((a1 + 1) / (a2 + 1)) ** 0.5, "energy_share": (a1 + 1) / (a1 + a2 + d),
               "lambda": [a1 + 1, a2 + 1]}


def test_intervals_cover_a_planted_spectrum_and_contain_their_estimates():
    covered = {"sigma1_over_sigma2": 0, "energy_share": 0, "lambda1": 0, "lambda2": 0}
    for seed in range(40):
        D, population = _planted(seed)
        s = np.linalg.svd(D.numpy(), compute_uv=False)  # the estimate, by NumPy
        value = talk_figures(torch.from_numpy(s), float((s ** 2).sum()))
        b = ratio_intervals(D.split(64), *D.shape, value, singular_values=s[:5].tolist(), seed=seed)
        lam, sv = b["eigenvalues_second_moment"], b["singular_values"]
        for i in range(5):  # the second-moment eigenvalues s_i^2 / N and the singular values s_i
            assert lam["low"][i] <= s[i] ** 2 / len(D) <= lam["high"][i] and sv["low"][i] <= s[i] <= sv["high"][i]
        for i, p in enumerate(population.pop("lambda")):  # the population second moment's eigenvalues
            covered[f"lambda{i + 1}"] += lam["low"][i] <= p <= lam["high"][i]
        for key, p in population.items():
            assert b[key]["low"] <= value[key] <= b[key]["high"], (seed, key)
            covered[key] += b[key]["low"] <= p <= b[key]["high"]
    assert min(covered.values()) >= 34, covered  # >= 85 % of 40 at the nominal 95 %
    for seed in range(3):  # through the plugin: the figure's and the random-rows control's intervals
        out = controlled_figures(_pset(_planted(seed)[0]), seed=seed, top=10)
        for src, fig in ((out["bootstrap95"], out["figures"]), (out["control"]["bootstrap95"], out["control"])):
            for key in ("sigma1_over_sigma2", "sigma1_over_sigma10", "energy_share"):
                assert src[key]["low"] <= fig[key] <= src[key]["high"], (seed, key)


def test_interval_contains_its_estimate_near_the_noise_floor():
    """A weak direction in N < d rows (CIFAR-10-like energy share): resampling rows with replacement
    put the whole interval above the estimate; half-sampling keeps the estimate inside and reports
    the shift of the figure with the number of rows."""
    g = torch.Generator().manual_seed(5)
    D = torch.randn(200, 600, generator=g, dtype=torch.float64)
    D[:, 0] += 2 * torch.randn(200, generator=g, dtype=torch.float64)
    out = controlled_figures(_pset(D), seed=0, top=10)
    for src, fig in ((out["bootstrap95"], out["figures"]), (out["control"]["bootstrap95"], out["control"])):
        b = src["energy_share"]
        assert b["low"] <= fig["energy_share"] <= b["high"]
        assert b["shift"] > 0  # the noise floor's share grows at fewer rows
    m = out["bootstrap95"]["method"]
    assert (m["rows"], m["pool"], m["n"]) == (100, 200, 200) and m["scale"] == pytest.approx(1.0)


def test_intervals_from_a_streamed_set_match_the_in_memory_ones(tmp_path, monkeypatch):
    D, _ = _planted(0, n=300, d=50)
    mem = controlled_figures(_pset(D), seed=1, top=10)
    disk = PerturbationSet.load(_pset(D).save(tmp_path / "set", chunk_size=64))
    monkeypatch.setattr(PerturbationSet, "matrix", lambda self: pytest.fail("the streamed set was loaded whole"))
    streamed = controlled_figures(disk, seed=1, top=10)
    for key in ("sigma1_over_sigma2", "energy_share"):
        for stat in ("low", "high", "se"):
            assert streamed["bootstrap95"][key][stat] == pytest.approx(mem["bootstrap95"][key][stat], rel=1e-6)
