"""Uncertainty and unbiased selection: the statistics every uapx figure carries.

- :func:`stratified_draw`: a seeded random draw of rows, stratified by class, class-interleaved
  (so any prefix or contiguous shard of it is itself a stratified draw);
- :func:`wilson`: the Wilson score interval of a binomial rate (fooling rates);
- :func:`bootstrap_se` / :func:`bootstrap_means`: bootstrap over images of a per-image mean;
- :func:`subsample_interval` / :func:`subsample_rows`: half-sampling (subsamples without
  replacement) over the rows of a matrix of any statistic of it (e.g. singular-value ratios of the
  perturbation matrix), at a cost bounded independently of the number of rows;
- :func:`diff_interval`: the normal 95 % interval of a difference of two independent estimates.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Z95 = 1.959963984540054  # the two-sided 95 % standard-normal quantile
BOOTSTRAP_REPS = 1000


def stratified_draw(y: torch.Tensor, n: int | None = None, *, seed: int) -> torch.Tensor:
    """Positions of a seeded random draw of ``min(n, N)`` rows of labels ``y`` ``(N,)``, stratified
    by class (each class its proportional share, largest remainders first, drawn at random within
    the class), returned class-interleaved so that every prefix is itself stratified.

    Order: class ``c`` with ``k_c`` picks gives its ``j``-th pick (random within the class) the key
    ``(j + 1/2) / k_c``; positions are sorted by key, ties in a seeded random class order.  With equal
    shares this is a round-robin over the classes in that order, and every prefix of length ``t``
    holds ``t / C`` of each class to within 1; with unequal shares each class's count in any prefix
    is within about 1 of ``t k_c / n``.  Any prefix (the trajectory images) and any contiguous shard
    (a torchrun rank's) is then a class-stratified draw -- never sorted by class or position."""
    N = int(y.numel())
    n = N if n is None else min(int(n), N)
    g = torch.Generator().manual_seed(seed)
    if n == 0:
        return torch.arange(0)
    classes, counts = y.unique(return_counts=True)
    share = counts.double() * n / N
    take = share.floor().long()
    rest = n - int(take.sum())
    if rest > 0:
        jitter = 1e-9 * torch.rand(len(classes), generator=g, dtype=torch.float64)
        order = torch.argsort(share - take.double() + jitter, descending=True)
        take[order[:rest]] += 1
    picks = [rows[torch.randperm(len(rows), generator=g)[:k]]
             for c, k in zip(classes.tolist(), take.tolist()) for rows in [(y == c).nonzero().flatten()]]
    class_order = torch.randperm(len(classes), generator=g).tolist()
    idx = torch.cat([picks[i] for i in class_order])
    keys = torch.cat([(torch.arange(len(picks[i]), dtype=torch.float64) + 0.5) / max(len(picks[i]), 1)
                      for i in class_order])
    return idx[torch.sort(keys, stable=True).indices]


IMAGES_PER_CLASS = "images_per_class"
"""The key every diagnostic's report entry states its images under: ``{class: count}`` of the images
it used (summing to its ``"images"``), shown on the report page."""


def class_counts(y: torch.Tensor, *, over_ranks: bool = False) -> dict[str, int]:
    """``{class: count}`` of labels ``y`` ``(N,)``; with ``over_ranks``, summed over every torchrun
    rank's labels (a collective: every rank calls it)."""
    from . import distributed

    if over_ranks and distributed.active():
        top = int(distributed.all_reduce_scalar(int(y.max()) if y.numel() else -1, "max"))
        k = distributed.all_reduce_(torch.bincount(y.long(), minlength=top + 1).double())
        return {str(c): int(v) for c, v in enumerate(k.tolist()) if v > 0}
    c, k = y.unique(return_counts=True)
    return {str(int(a)): int(b) for a, b in zip(c, k)}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a binomial rate ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_means(values: torch.Tensor, *, seed: int, reps: int = BOOTSTRAP_REPS) -> torch.Tensor:
    """``(reps,)`` bootstrap replicates of the mean of ``values`` ``(N,)`` (resampled images)."""
    v = values.double().flatten()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (reps, v.numel()), generator=g)
    return v[idx].mean(1)


def bootstrap_se(values: torch.Tensor, *, seed: int, reps: int = BOOTSTRAP_REPS) -> float:
    """Bootstrap standard error over images of the mean of ``values`` ``(N,)`` (nan for N < 2)."""
    if values.numel() < 2:
        return float("nan")
    return float(bootstrap_means(values, seed=seed, reps=reps).std())


def mean_se(values: torch.Tensor, *, seed: int) -> dict:
    """``{"mean", "se", "n"}``: the mean of ``values`` ``(N,)`` with its bootstrap s.e. over images."""
    v = values.double().flatten()
    return {"mean": float(v.mean()) if v.numel() else float("nan"), "se": bootstrap_se(v, seed=seed),
            "n": int(v.numel())}


SUBSAMPLE_MAX_ROWS = 500  # m: the rows of one subsample, at most (an m x m eigendecomposition per replicate)
SUBSAMPLE_POOL_ROWS = 2000  # P: the rows the subsamples are drawn from, at most (their P x P Gram is built once)
SUBSAMPLE_REPS = 200


def subsample_pool(n: int, *, seed: int) -> torch.Tensor:
    """Ascending positions ``(P,)`` of a seeded uniform draw without replacement of
    ``P = min(n, SUBSAMPLE_POOL_ROWS)`` of ``n`` rows (all of them when ``n <= P``)."""
    if n <= SUBSAMPLE_POOL_ROWS:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:SUBSAMPLE_POOL_ROWS].sort().values


def subsample_interval(stat: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor, pool: int, *,
                       n: int | None = None, m: int | None = None, seed: int, reps: int = SUBSAMPLE_REPS,
                       level: float = 0.95) -> dict:
    """Half-sampling interval of a statistic of rows: subsamples WITHOUT replacement (Politis, Romano
    and Wolf 1999, "Subsampling"; the delete-d jackknife of Shao and Wu 1989), never the
    with-replacement bootstrap, whose duplicated rows inflate spectral ratios when rows < columns.

    ``value`` ``(k,)`` is the estimate on all ``n`` rows; ``stat(idx) -> (k,)`` the same statistic on
    the rows ``idx`` ``(m,)`` (positions in ``range(pool)``) of a pool of ``pool`` of those rows
    (``pool = n`` by default; a seeded uniform draw of them otherwise, :func:`subsample_pool`).
    With ``theta_b`` the statistic on ``reps`` subsamples of ``m = min(pool // 2,
    SUBSAMPLE_MAX_ROWS)`` rows, ``med`` their median and ``q_lo, q_hi`` their ``(1 -+ level) / 2``
    quantiles, the interval is the reflected (basic) one, centred on the estimate::

        f = sqrt(m pool / (n (pool - m)))            (= 1 for m = n / 2)
        low = value - f (q_hi - med),  high = value + f (med - q_lo),  se = f sd(theta_b)

    ``f`` is exact for a mean: ``Var(theta_m - theta_pool) = s^2 (1/m - 1/pool)`` for draws without
    replacement against ``Var(theta_n) = s^2 / n`` (Politis-Romano's ``sqrt(m / n)`` omits the
    finite-population factor and would be too narrow by ``sqrt(2)`` at ``m = n/2``).  Centring on
    ``med`` rather than on ``value`` keeps the estimate inside its interval; ``shift = med - value``
    is reported beside it: how much the figure moves at ``m`` rows (a statistic that depends on the
    number of rows, e.g. a spectrum's noise floor when rows < columns, has a bias of that order,
    which no resampling interval removes).

    Returns lists ``{"se", "low", "high", "shift"}`` ``(k,)`` and ``{"rows": m, "pool", "reps",
    "scale": f}``."""
    n = pool if n is None else int(n)
    m = min(pool // 2, SUBSAMPLE_MAX_ROWS) if m is None else int(m)
    if not 1 <= m < pool <= n:
        raise ValueError(f"need 1 <= m < pool <= n, got m={m}, pool={pool}, n={n}")
    g = torch.Generator().manual_seed(seed)
    reps_ = torch.stack([stat(torch.randperm(pool, generator=g)[:m]).double() for _ in range(reps)])
    a = (1 - level) / 2
    q = torch.quantile(reps_, torch.tensor([a, 0.5, 1 - a], dtype=torch.float64), dim=0)
    f = math.sqrt(m * pool / (n * (pool - m)))
    v = value.double()
    return {"se": (f * reps_.std(0)).tolist(), "low": (v - f * (q[2] - q[1])).tolist(),
            "high": (v + f * (q[1] - q[0])).tolist(), "shift": (q[1] - v).tolist(),
            "rows": m, "pool": pool, "reps": reps, "scale": f}


def subsample_rows(D: torch.Tensor, stat: Callable[[torch.Tensor], torch.Tensor], *, seed: int,
                   reps: int = SUBSAMPLE_REPS, level: float = 0.95) -> dict:
    """:func:`subsample_interval` of ``stat(D) -> (k,)`` over the rows of an in-memory ``D`` ``(N, d)``;
    also returns ``"value"`` ``(k,)`` (the estimate on every row)."""
    pool = subsample_pool(D.shape[0], seed=seed)
    Dp = D[pool]
    value = stat(D).double()
    return {"value": value.tolist(),
            **subsample_interval(lambda idx: stat(Dp[idx]), value, len(pool), n=D.shape[0], seed=seed + 1, reps=reps,
                                 level=level)}


def diff_interval(a: float, se_a: float, b: float, se_b: float, z: float = Z95) -> dict:
    """``a - b`` of two independent estimates with standard errors, and its normal 95 % interval;
    ``excludes_zero`` when the interval lies strictly on one side of 0."""
    d = a - b
    half = z * math.sqrt(se_a ** 2 + se_b ** 2)
    lo, hi = d - half, d + half
    return {"difference": d, "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0)}


def se_from_interval(low: float, high: float, z: float = Z95) -> float:
    """The standard error a normal 95 % interval ``[low, high]`` implies."""
    return (high - low) / (2 * z)
