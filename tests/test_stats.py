"""uapx.stats against SciPy and analytic references; selection unbiased on a class-sorted layout."""
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from uapx import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (50, 100), (999, 1000), (1000, 1000)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_bootstrap_se_of_mean_matches_sd_over_sqrt_n():
    v = torch.from_numpy(np.random.default_rng(0).normal(size=2000))
    analytic = float(v.std(unbiased=False)) / math.sqrt(len(v))
    assert stats.bootstrap_se(v, seed=0, reps=2000) == pytest.approx(analytic, rel=0.08)


def test_subsample_interval_of_a_mean_matches_the_analytic_standard_error():
    # rows ~ N(mu, 1): the half-sampling s.e. of the column mean is s / sqrt(N) (SciPy's sem), the interval
    # contains the estimate, and over seeds it covers mu at about the nominal rate
    covered = 0
    for seed in range(40):
        D = torch.from_numpy(np.random.default_rng(seed).normal(2.0, 1.0, size=(400, 1)))
        r = stats.subsample_rows(D, lambda m: m.mean(0), seed=seed, reps=200)
        assert r["se"][0] == pytest.approx(float(sps.sem(D[:, 0].numpy())), rel=0.2)
        assert r["low"][0] <= r["value"][0] <= r["high"][0]
        covered += r["low"][0] <= 2.0 <= r["high"][0]
    assert covered >= 34  # 85 % of 40 (nominal 95 %)


def test_subsample_pool_bounds_the_rows_and_rescales_to_all_of_them():
    D = torch.from_numpy(np.random.default_rng(0).normal(size=(20_000, 1)))
    r = stats.subsample_rows(D, lambda m: m.mean(0), seed=0, reps=300)
    assert (r["pool"], r["rows"]) == (stats.SUBSAMPLE_POOL_ROWS, stats.SUBSAMPLE_MAX_ROWS)
    assert r["se"][0] == pytest.approx(1 / math.sqrt(20_000), rel=0.2)  # the s.e. at N, not at the pool's size
    pool = stats.subsample_pool(20_000, seed=3)
    assert len(set(pool.tolist())) == len(pool) == stats.SUBSAMPLE_POOL_ROWS and torch.equal(pool, pool.sort().values)


def test_diff_interval_analytic():
    d = stats.diff_interval(1.0, 0.3, 0.2, 0.4)
    assert d["difference"] == pytest.approx(0.8)
    assert d["high"] - d["low"] == pytest.approx(2 * 1.959963984540054 * 0.5)
    assert not d["excludes_zero"]
    assert stats.diff_interval(1.0, 0.1, 0.2, 0.1)["excludes_zero"]


def test_stratified_draw_on_class_sorted_labels():
    y = torch.arange(10).repeat_interleave(1000)  # the class-sorted CIFAR-10 ImageFolder layout
    idx = stats.stratified_draw(y, 200, seed=3)
    assert len(set(idx.tolist())) == 200
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.min() == counts.max() == 20
    for m in (20, 50, 100):  # every prefix is class-mixed too: within 2x of a uniform share
        c = torch.bincount(y[idx[:m]], minlength=10).double() / m
        assert c.max() <= 2 * 0.1 + 1e-9, (m, c)
    assert not torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, stats.stratified_draw(y, 200, seed=3))


def _prefix_deviation(labels: torch.Tensor, share: torch.Tensor) -> float:
    """The largest ``|count of class c in the first t - t * share_c|`` over every prefix and class."""
    onehot = torch.nn.functional.one_hot(labels, len(share)).double()
    t = torch.arange(1, len(labels) + 1, dtype=torch.float64)[:, None]
    return float((onehot.cumsum(0) - t * share[None]).abs().max())


@pytest.mark.parametrize("n", [10, 97, 200, 1000])
def test_every_prefix_of_a_draw_is_stratified(n):
    y = torch.arange(10).repeat_interleave(1000)  # class-sorted
    for seed in range(3):
        idx = stats.stratified_draw(y, n, seed=seed)
        assert _prefix_deviation(y[idx], torch.full((10,), 0.1)) <= 1 + 1e-9
        counts = torch.bincount(y[idx], minlength=10)
        assert len(set(idx.tolist())) == n and int(counts.max() - counts.min()) <= 1
    # unequal classes (MNIST-like shares): each prefix within about 1 of the class's proportional share
    y = torch.cat([torch.full((k,), c) for c, k in enumerate([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])])
    idx = stats.stratified_draw(y, 500, seed=1)
    take = torch.bincount(y[idx], minlength=10).double()
    assert _prefix_deviation(y[idx], take / take.sum()) <= 1.5
    # a class with too few images: all of them, the others keep their share in every prefix
    y = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(500, dtype=torch.long)])
    idx = stats.stratified_draw(y, 100, seed=0)
    assert len(set(idx.tolist())) == 100 and _prefix_deviation(y[idx], torch.tensor([0.01, 0.99])) <= 1 + 1e-9


def test_every_prefix_of_a_draw_is_stratified_on_real_cifar10(data_root):
    from uapx import data

    full = data.load("cifar10", "test", data_root)
    for n in (100, 400):
        y = full.subset(n, seed=0).y
        share = torch.bincount(full.y, minlength=10).double() / len(full)
        assert _prefix_deviation(y, share) <= 1 + 1e-9, n
        assert _prefix_deviation(full.y[stats.stratified_draw(full.y, n, seed=4)], share) <= 1 + 1e-9


def test_no_diagnostic_sees_a_class_sorted_sample_on_real_cifar10(data_root):
    """CIFAR-10's ImageFolder is sorted by class: the analysed sample, its prefix (the trajectory
    images), each torchrun rank's contiguous shard and the landscape measures' draw must each be
    within 2x of a uniform class share."""
    from uapx import data, distributed
    from uapx_plugins._measures import stratified_draw as landscape_draw

    full = data.load("cifar10", "test", data_root)
    assert torch.equal(full.y[:50], torch.zeros(50, dtype=torch.long))  # the layout is class-sorted
    sample = full.subset(400, seed=0)

    def within_2x(y, what):
        share = torch.bincount(y, minlength=10).double() / len(y)
        assert share.max() <= 2 * 0.1 + 1e-9 and share.min() >= 0.1 / 2 - 1e-9, (what, share.tolist())

    within_2x(sample.y, "sample")
    within_2x(sample.y[:100], "trajectory images (the first 100)")
    for world in (2, 4):
        for rank in range(world):
            within_2x(sample.y[distributed.shard(len(sample), rank=rank, world=world)], f"shard {rank}/{world}")
    within_2x(sample.y[landscape_draw(sample.y, 200, seed=0)], "landscape images")
    within_2x(full.y[stats.stratified_draw(full.y, 100, seed=0)], "method fit images")
