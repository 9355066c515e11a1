"""The spectrum's 95 % interval (half-sampling over rows) at N = 2,000 rows, MNIST and CIFAR-10 sizes.

    OMP_NUM_THREADS=1 pytest benchmarks/test_spectrum_interval.py --benchmark-only

One interval of the four talk ratios (:func:`uapx_plugins.spectrum.ratio_intervals`): one pass
gathering a pool of at most 2,000 rows into its row Gram matrix, then 200 eigendecompositions of
500 x 500 principal submatrices -- a cost bounded whatever N (the report computes two: the figure's
and its random-rows control's).  Timings are not asserted; the interval is checked to contain the
estimate after timing.
"""
from __future__ import annotations

import pytest
import torch

from uapx_plugins.spectrum import ratio_intervals, talk_figures

N = 2_000


@pytest.mark.parametrize("d", [784, 3072], ids=["mnist-784", "cifar10-3072"])
def test_ratio_interval(benchmark, d):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(N, d, generator=g) * 0.3 + torch.randn(N, 1, generator=g) * torch.randn(d, generator=g) / d ** 0.5
    s = torch.linalg.svdvals(D.double())
    value = talk_figures(s, float((s ** 2).sum()))
    benchmark.group = "spectrum interval"
    benchmark.extra_info.update(n=N, d=d)
    out = benchmark.pedantic(lambda: ratio_intervals(D.split(4096), N, d, value, seed=0), rounds=1, iterations=1)
    b = out["energy_share"]
    assert b["low"] <= value["energy_share"] <= b["high"]
    assert (out["method"]["rows"], out["method"]["pool"]) == (500, 2000)
