"""Linear algebra on perturbation matrices: exact and randomized top-k SVD.

Exact: :func:`top_svd_gram` (one pass, ``d x d`` Gram matrix) and :func:`top_svd_lapack` (the
whole matrix in memory).  Randomized, for large ``N``: :func:`randomized_svd` (a few passes,
Halko, Martinsson and Tropp 2011) and :func:`single_pass_svd` (one pass, Tropp, Yurtsever, Udell
and Cevher 2017).

The streaming functions take row blocks ``(n_i, d)`` (an iterable of chunks, or a zero-argument
callable returning a fresh one per pass), so that a matrix kept on disk is never held whole.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import distributed
from .errors import UapxError

ChunksFn = Callable[[], Iterable[torch.Tensor]]
"""A zero-argument callable returning a fresh iterable of the ``(n_i, d)`` row blocks of a matrix."""

GRAM_MAX_DIM = 16384  # the exact SVD's d x d float64 Gram matrix above this (2 GiB) is not formed
EXACT_MAX_BYTES = 1 << 30  # ... nor is an (N, d) float64 matrix above this held for LAPACK instead


def exact_svd_fits(n: int, d: int) -> bool:
    """Whether the exact SVD of ``n`` rows of ``d`` values fits: a ``d x d`` Gram matrix with
    ``d <= GRAM_MAX_DIM``, or (fewer rows than columns, one process) the float64 rows themselves
    within ``EXACT_MAX_BYTES``.  Where it does not, :func:`randomized_svd` streams instead."""
    return d <= GRAM_MAX_DIM or (n <= d and n * d * 8 <= EXACT_MAX_BYTES and not distributed.active())


def check_exact_svd(n: int, d: int, who: str) -> None:
    """A one-line error suggesting ``rsvd`` where :func:`exact_svd_fits` says no."""
    if not exact_svd_fits(n, d):
        raise UapxError(f"{who}: the exact SVD of {n} x {d} perturbations would need a {d} x {d} Gram matrix "
                        f"(d > {GRAM_MAX_DIM}) or the whole matrix in memory ({n * d * 8 / 2**30:.1f} GiB)",
                        "use the randomized, streamed 'rsvd' method instead (--plugins rsvd)")


@dataclass
class TopSVD:
    """Top-k singular triplets of an ``(N, d)`` matrix ``A`` (optionally centred).

    Attributes:
        S: ``(k,)`` singular values, descending.
        V: ``(k, d)`` right singular vectors (rows), unit norm, sign arbitrary.
        n: number of rows of ``A``.
        mean: ``(d,)`` the row mean subtracted (zeros when not centred).
        total_energy: ``||A||_F^2`` (after centring): explained-variance ratios are ``S**2 / total``.
    """

    S: torch.Tensor
    V: torch.Tensor
    n: int
    mean: torch.Tensor
    total_energy: float


def gram(chunks: Iterable[torch.Tensor], d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over row blocks: ``(A^T A (d, d) float64, row sum (d,) float64, N)``; under
    torch.distributed, summed over every rank's rows (the d x d matrix is what travels)."""
    g = torch.zeros(d, d, dtype=torch.float64)
    s = torch.zeros(d, dtype=torch.float64)
    n = 0
    for block in chunks:
        b = block.reshape(block.shape[0], -1).to(torch.float64)
        g.addmm_(b.T, b)
        s += b.sum(0)
        n += b.shape[0]
    distributed.all_reduce_(g)
    distributed.all_reduce_(s)
    return g, s, int(distributed.all_reduce_scalar(n))


def column_sum(chunks: Iterable[torch.Tensor], d: int, *, normalize_rows: bool = False) -> tuple[torch.Tensor, int]:
    """One pass: the sum of the rows ``(d,)`` float64 (of the unit-normalised rows with
    ``normalize_rows``) and their number, summed over ranks under torch.distributed."""
    total = torch.zeros(d, dtype=torch.float64)
    n = 0
    for block in chunks:
        b = block.reshape(block.shape[0], -1).to(torch.float64)
        if normalize_rows:
            b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total += b.sum(0)
        n += b.shape[0]
    distributed.all_reduce_(total)
    return total, int(distributed.all_reduce_scalar(n))


def top_svd_gram(chunks: Iterable[torch.Tensor], d: int, k: int, *, center: bool = False) -> TopSVD:
    """Exact top-``k`` SVD in float64, in one pass over the rows.

    From the ``d x d`` Gram matrix (summed over ranks under torch.distributed).  In one process a
    matrix with fewer rows than columns (N < d: a class of CIFAR-10 perturbations, d = 3072) is
    small enough to hold, and LAPACK's SVD of it costs O(N^2 d) instead of the Gram's O(d^3).
    """
    if not distributed.active():
        held: list[torch.Tensor] = []
        rows = 0
        it = iter(chunks)
        for block in it:
            held.append(block.reshape(block.shape[0], -1))
            rows += held[-1].shape[0]
            if rows > d:  # the Gram matrix is the smaller one: stream the rest into it
                chunks = itertools.chain(held, it)
                break
        else:
            if rows:
                return top_svd_lapack(torch.cat(held), k, center=center)
            chunks = []
    g, s, n = gram(chunks, d)
    mean = s / max(n, 1)
    if center:
        g = g - n * torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = min(k, d, n)
    S = evals[:k].clamp_min(0).sqrt()
    return TopSVD(S.float(), evecs[:, :k].T.contiguous().float(), n,
                  (mean if center else torch.zeros(d, dtype=torch.float64)).float(), float(evals.clamp_min(0).sum()))


def row_gram(chunks: Iterable[torch.Tensor], n: int, d: int, rows: torch.Tensor) -> torch.Tensor:
    """One pass: the Gram matrix ``R R^T`` ``(P, P)`` float64 of the rows ``R`` at the ascending
    positions ``rows`` ``(P,)`` of a matrix streamed in row blocks (``n`` rows of ``d`` here); only
    those ``P`` rows are held.  A subset of them is a principal submatrix of it (no second look at
    the rows).  Under torch.distributed ``rows`` are global positions (rank 0's rows first,
    :func:`uapx.distributed.row_offset`): each rank takes its own and the ``P`` rows are gathered, so
    every rank gets the same matrix (a collective)."""
    start, _ = distributed.row_offset(n)
    mine = rows[(rows >= start) & (rows < start + n)] - start
    held = torch.empty(len(mine), d, dtype=torch.float64)
    at = 0
    for sl, b in _blocks(chunks, n, d):
        stop = at + int(torch.searchsorted(mine[at:], sl.stop))
        held[at:stop] = b[mine[at:stop] - sl.start].to(torch.float64)
        at = stop
    held = distributed.all_gather_rows(held)
    return held @ held.T


def top_svd_lapack(matrix: torch.Tensor, k: int, *, center: bool = False) -> TopSVD:
    """Exact top-``k`` SVD of an in-memory ``(N, d)`` matrix with LAPACK (float64)."""
    if distributed.active():
        raise UapxError("the LAPACK solver needs the whole matrix on one process",
                        "use the Gram solver (the default) under torchrun")
    a = matrix.to(torch.float64)
    mean = a.mean(0) if center else torch.zeros(a.shape[1], dtype=torch.float64)
    a = a - mean
    _, S, Vh = torch.linalg.svd(a, full_matrices=False)
    k = min(k, S.numel())
    return TopSVD(S[:k].float(), Vh[:k].float().contiguous(), a.shape[0], mean.float(), float((S ** 2).sum()))


# -- streaming helpers --------------------------------------------------------------------------


def _blocks(chunks: Iterable[torch.Tensor], n: int, d: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, block)``: ``block`` ``(n_i, d)`` is rows ``rows`` of the ``(n, d)`` matrix.

    A float32 or float64 block keeps its dtype (products with it are computed in that precision and
    accumulated in float64 by the callers); any other dtype becomes float32.  The blocks must make
    up exactly ``n`` rows of ``d`` columns, on every pass.
    """
    start = 0
    for block in chunks:
        b = block.flatten(1)
        if b.dtype not in (torch.float32, torch.float64):
            b = b.float()
        stop = start + b.shape[0]
        if b.shape[1] != d or stop > n:
            raise UapxError(f"a row block of shape {tuple(block.shape)} does not fit an ({n}, {d}) matrix "
                            f"at row {start}", "pass the matrix's true shape; every pass must yield the same rows")
        yield slice(start, stop), b
        start = stop
    if start != n:
        raise UapxError(f"the row blocks held {start} rows, expected {n}",
                        "pass the matrix's true number of rows; every pass must yield the same rows")


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for sub-stream ``stream`` of ``seed`` (streams are independent: NumPy SeedSequence)."""
    state = np.random.SeedSequence([int(seed) % 2 ** 64, *stream]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


class _GaussianRows:
    """Row ranges of an ``(N, width)`` standard Gaussian matrix that is never stored whole.

    Rows ``j*B ... (j+1)*B - 1`` (block ``j``, ``B = block_rows``) come from their own generator,
    seeded by ``(seed, stream, j)``: any split of the rows into chunks sees the same matrix, and
    it can be regenerated for a second look without storing it.
    """

    def __init__(self, seed: int, stream: int, width: int, block_rows: int = 1024) -> None:
        self.seed, self.stream, self.width, self.block_rows = seed, stream, width, block_rows
        self._cached: tuple[int, torch.Tensor] | None = None

    def _block(self, j: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != j:
            g = _generator(self.seed, self.stream, j)
            self._cached = (j, torch.randn(self.block_rows, self.width, generator=g, dtype=torch.float64))
        return self._cached[1]

    def rows(self, rows: slice) -> torch.Tensor:
        """Rows ``rows.start .. rows.stop - 1``: ``(rows.stop - rows.start, width)`` float64."""
        B = self.block_rows
        if rows.stop <= rows.start:
            return torch.zeros(0, self.width, dtype=torch.float64)
        parts = [self._block(j)[max(rows.start - j * B, 0):min(rows.stop - j * B, B)]
                 for j in range(rows.start // B, (rows.stop - 1) // B + 1)]
        return torch.cat(parts)


def _orth(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``(r, c)`` of the columns of ``m`` ``(r, c)``, ``c <= r`` (Householder QR)."""
    return torch.linalg.qr(m, mode="reduced").Q


def _orth_rows(m: torch.Tensor) -> torch.Tensor:
    """:func:`_orth` for an ``(n, c)`` matrix whose rows may be spread over ranks: Householder QR
    on one process; CholeskyQR2 (two rounds of ``m R^-1`` with ``R^T R = m^T m``, the ``c x c``
    Gram matrix all-reduced) under torch.distributed."""
    if not distributed.active():
        return _orth(m)
    for _ in range(2):
        g = distributed.all_reduce_(m.T @ m)
        r = torch.linalg.cholesky(g + 1e-300 * torch.eye(g.shape[0], dtype=g.dtype), upper=True)
        m = torch.linalg.solve_triangular(r, m, upper=True, left=False)
    return m


def _a_times(chunks: Iterable[torch.Tensor], n: int, d: int, z: torch.Tensor) -> torch.Tensor:
    """One pass: ``A @ z`` ``(n, l)`` float64, for ``z`` ``(d, l)``."""
    out = torch.empty(n, z.shape[1], dtype=torch.float64)
    for rows, b in _blocks(chunks, n, d):
        out[rows] = b @ z.to(b.dtype)
    return out


def _at_times(chunks: Iterable[torch.Tensor], n: int, d: int, q: torch.Tensor) -> torch.Tensor:
    """One pass: ``A.T @ q`` ``(d, l)`` float64, for ``q`` ``(n, l)``."""
    out = torch.zeros(q.shape[1], d, dtype=torch.float64)
    for rows, b in _blocks(chunks, n, d):
        out += q[rows].T.to(b.dtype) @ b  # (l, d): twice as fast as b.T @ q on row-major blocks
    return distributed.all_reduce_(out).T


@dataclass
class _FirstPass:
    """What one pass over ``A`` ``(N, d)`` collects for the sketches.

    Attributes:
        y: ``(N, l)`` range sketch ``A @ omega``.
        mean: ``(d,)`` the row mean (zeros when not centring).
        sq_norm: ``||A||_F^2``.
        w: ``(l', d)`` co-range sketch ``psi @ A`` (single pass only).
        psi_sum: ``(l',)`` ``psi @ 1`` (single pass only; zeros when not centring).
    """

    y: torch.Tensor
    mean: torch.Tensor
    sq_norm: float
    w: torch.Tensor | None = None
    psi_sum: torch.Tensor | None = None
    n_total: int | None = None  # rows over all ranks (None: y's rows)

    @property
    def total_energy(self) -> float:
        """``||A - 1 mean^T||_F^2 = ||A||_F^2 - N ||mean||^2``."""
        n = self.y.shape[0] if self.n_total is None else self.n_total
        return max(self.sq_norm - n * float(self.mean @ self.mean), 0.0)


def _first_pass(chunks: Iterable[torch.Tensor], n: int, d: int, omega: torch.Tensor, *, center: bool,
                psi: _GaussianRows | None = None) -> _FirstPass:
    """One pass: ``A @ omega`` (``omega`` ``(d, l)``), ``||A||_F^2``, the row mean when ``center``,
    and with ``psi`` (the rows of ``Psi^T``, ``(N, l')``) also ``Psi @ A`` and ``Psi @ 1``."""
    y = torch.empty(n, omega.shape[1], dtype=torch.float64)
    row_sum = torch.zeros(d, dtype=torch.float64)
    sq_norm = 0.0
    w = torch.zeros(psi.width, d, dtype=torch.float64) if psi is not None else None
    psi_sum = torch.zeros(psi.width, dtype=torch.float64) if psi is not None else None
    for rows, b in _blocks(chunks, n, d):
        y[rows] = b @ omega.to(b.dtype)
        sq_norm += float(torch.linalg.vector_norm(b)) ** 2  # float32 blocks: cascade sum, ~1e-7 relative
        if center:  # (a float32 sum over one block is accurate to ~1e-7 relative, and 6x faster than in float64)
            row_sum += b.sum(0)
        if psi is not None:
            p = psi.rows(rows)  # (n_i, l')
            w += p.T.to(b.dtype) @ b
            if center:
                psi_sum += p.sum(0)
    if distributed.active():  # the mean and the energy are over every rank's rows
        n_total = int(distributed.all_reduce_scalar(n))
        distributed.all_reduce_(row_sum)
        return _FirstPass(y, row_sum / n_total, distributed.all_reduce_scalar(sq_norm), w, psi_sum, n_total)
    return _FirstPass(y, row_sum / n, sq_norm, w, psi_sum)


def _check_sizes(n: int, d: int, k: int, **nonneg: int) -> None:
    """One-line errors for an empty matrix, ``k < 1`` or a negative sketch setting."""
    if n < 1 or d < 1:
        raise UapxError(f"cannot take the SVD of an empty ({n}, {d}) matrix", "pass at least one row and column")
    if int(k) != k or k < 1:
        raise UapxError(f"k must be a whole number >= 1, got {k}", "pass k >= 1")
    for name, value in nonneg.items():
        if int(value) != value or value < 0:
            raise UapxError(f"{name} must be a whole number >= 0, got {value}", f"pass {name} >= 0")


# -- randomized SVD: several passes -------------------------------------------------------------


def randomized_svd(chunks_fn: ChunksFn, n: int, d: int, k: int, *, oversample: int = 10, power_iters: int = 2,
                   center: bool = False, seed: int = 0) -> TopSVD:
    """Top-``k`` SVD of an ``(n, d)`` matrix ``A`` streamed in row blocks, by randomized subspace iteration.

    Halko, Martinsson and Tropp (2011), "Finding structure with randomness", Algorithm 4.4
    (randomized subspace iteration) followed by Algorithm 5.1 (direct SVD).  With a standard
    Gaussian test matrix ``Omega`` ``(d, l)``, ``l = k + oversample``::

        Q = orth(A Omega)                                  (n, l)
        repeat power_iters times:
            Z = orth(A^T Q)                                (d, l)
            Q = orth(A Z)                                  (n, l)
        B = Q^T A = U S V^T                                (l, d)
        return S[:k], V[:, :k]

    Every product with ``A`` or ``A^T`` is one pass over ``chunks_fn()``: ``2 * power_iters + 2``
    passes in all.  ``Q`` (``n x l``) is held in memory, ``A`` never is.  Orthonormalising after
    every product, not once after ``(A A^T)^q A Omega``, keeps the directions whose singular values
    are below ``eps_mach^(1/(2q+1)) * sigma_1`` from drowning in rounding error (their Remark 4.5).
    The iterations sharpen the spectrum the sketch sees to ``sigma_j^(2q+1)`` (it spans
    ``(A A^T)^q A Omega``), so the error in direction ``j`` shrinks roughly like
    ``(sigma_{l+1} / sigma_j)^(2q+1)``: slowly decaying spectra need more iterations or oversampling.

    Precision: products with a block are computed in the block's dtype (float32 for a float32
    perturbation set: rounding ~1e-7 relative to ``||A||``, far below the sketching error); sums
    over blocks, QR and SVD are float64.

    Centring (``center=True``) decomposes ``A - 1 mu^T``, ``mu`` the row mean ``(d,)``, without
    an extra pass: ``(A - 1 mu^T) Z = A Z - 1 (mu^T Z)`` and ``(A - 1 mu^T)^T Q = A^T Q - mu (1^T Q)``,
    with ``mu`` gathered in the first pass alongside ``A Omega``.

    Args:
        chunks_fn: zero-argument callable returning a fresh iterable of the ``(n_i, d)`` blocks
            of ``A``, in order (e.g. ``pset.chunks``); called once per pass.
        n, d: the shape of ``A``.
        k: number of singular triplets (at most ``min(n, d)`` are returned).
        oversample: extra sketch columns; ``l = min(k + oversample, n, d)``.
        power_iters: subspace iterations ``q``.
        center: decompose the centred matrix.
        seed: seed of ``Omega``; a fixed seed gives the same result however ``A`` is chunked
            (up to float rounding).
    Returns:
        :class:`TopSVD`: ``S`` ``(k,)``, ``V`` ``(k, d)``, ``mean`` ``(d,)``, ``total_energy``.
    """
    n_all = int(distributed.all_reduce_scalar(n))  # under torchrun, n is this rank's rows
    _check_sizes(n_all, d, k, oversample=oversample, power_iters=power_iters)
    l = min(k + oversample, n_all, d)
    omega = torch.randn(d, l, generator=_generator(seed, 0), dtype=torch.float64)
    first = _first_pass(chunks_fn(), n, d, omega, center=center)
    mu = first.mean

    def q_sum(q: torch.Tensor) -> torch.Tensor:  # 1^T Q over every rank's rows
        return distributed.all_reduce_(q.sum(0))

    q = _orth_rows(first.y - (mu @ omega))  # (A - 1 mu^T) Omega
    for _ in range(power_iters):
        z = _orth(_at_times(chunks_fn(), n, d, q) - torch.outer(mu, q_sum(q)))
        q = _orth_rows(_a_times(chunks_fn(), n, d, z) - (mu @ z))
    bt = _at_times(chunks_fn(), n, d, q) - torch.outer(mu, q_sum(q))  # B^T = (Q^T (A - 1 mu^T))^T  (d, l)
    _, S, Vh = torch.linalg.svd(bt.T, full_matrices=False)
    k = min(k, l)
    return TopSVD(S[:k].float(), Vh[:k].float().contiguous(), n_all, mu.float(), first.total_energy)


# -- single-pass sketch -------------------------------------------------------------------------


@dataclass
class SinglePassSketch:
    """A rank-``r`` approximation ``A_hat = Q X`` of an ``(N, d)`` matrix, from one pass.

    When centred, ``A_hat`` approximates ``A - 1 mean^T``.

    Attributes:
        Q: ``(N, r)`` orthonormal columns, float64: a basis of the range sketch.
        X: ``(r, d)`` float64.
        n: number of rows ``N``.
        mean: ``(d,)`` float64, the row mean subtracted (zeros when not centred).
        total_energy: ``||A||_F^2`` (after centring).
    """

    Q: torch.Tensor
    X: torch.Tensor
    n: int
    mean: torch.Tensor
    total_energy: float

    def matrix(self) -> torch.Tensor:
        """``A_hat = Q X`` ``(N, d)`` float64 (only for small matrices)."""
        return self.Q @ self.X

    def top(self, k: int) -> TopSVD:
        """The top-``k`` SVD of ``A_hat`` (from the SVD of ``X``: ``Q`` has orthonormal columns)."""
        _, S, Vh = torch.linalg.svd(self.X, full_matrices=False)
        k = min(k, S.numel())
        return TopSVD(S[:k].float(), Vh[:k].float().contiguous(), self.n, self.mean.float(), self.total_energy)


def single_pass_sketch(chunks: Iterable[torch.Tensor], n: int, d: int, *, range_dim: int, corange_dim: int,
                       center: bool = False, seed: int = 0) -> SinglePassSketch:
    """Sketch an ``(n, d)`` matrix ``A`` in one pass over its row blocks.

    Tropp, Yurtsever, Udell and Cevher (2017), "Practical sketching algorithms for low-rank matrix
    approximation", the simplest low-rank approximation from a range and a co-range sketch::

        Y = A Omega     (n, r)    Omega (d, r)  standard Gaussian, r = range_dim
        W = Psi A       (l, d)    Psi   (l, n)  standard Gaussian, l = corange_dim
        Q = orth(Y)     (n, r)
        X = (Psi Q)^+ W (r, d)    (least squares)
        A_hat = Q X

    ``Y`` gains rows and ``W`` accumulates ``Psi[:, rows] A[rows]`` block by block.  ``Psi`` is
    never stored: its columns are drawn in fixed blocks of rows from generators seeded by
    ``(seed, block)`` and drawn again to form ``Psi Q`` after the pass, without reading ``A``.

    Error (Gaussian ``Omega`` and ``Psi``, real ``A``, ``l >= r + 2``), with ``tau_j^2`` the tail
    energy ``sum_{i >= j} sigma_i(A)^2`` and ``f(s, t) = s / (t - s - 1)``::

        E ||A - A_hat||_F^2 <= (1 + f(r, l)) * min_{0 <= rho <= r-2} (1 + f(rho, r)) * tau_{rho+1}^2

    (their Theorem 4.3).  The first factor is exact: for a fixed ``Q``, ``E_Psi ||A - Q X||_F^2 =
    (1 + f(r, l)) ||A - Q Q^T A||_F^2``; the second is Halko, Martinsson and Tropp's bound for the
    range finder (their Theorem 10.5, squared).  With the defaults of :func:`single_pass_svd`
    (``r = 2k + 1``, ``l = 2r + 1``) it reads ``E ||A - A_hat||_F^2 <= 4 tau_{k+1}^2``.

    Centring (``center=True``) sketches ``A - 1 mu^T`` (``mu`` the row mean) exactly, folded in
    after the pass: ``Y - 1 (mu^T Omega)`` and ``W - (Psi 1) mu^T``.

    Args:
        chunks: the ``(n_i, d)`` row blocks of ``A``, in order (read once).
        n, d: the shape of ``A``.
        range_dim: ``r``, columns of the range sketch (capped at ``min(n, d)``).
        corange_dim: ``l >= r``, rows of the co-range sketch.
        center: sketch the centred matrix.
        seed: seed of ``Omega`` and ``Psi``; a fixed seed gives the same sketch however ``A`` is
            chunked (up to float rounding).
    Returns:
        :class:`SinglePassSketch` with ``Q`` ``(n, r)`` and ``X`` ``(r, d)``.
    """
    if distributed.active():
        raise UapxError("the single-pass sketch does not run under torchrun yet",
                        "use the multi-pass randomized SVD (rsvd without single_pass) or one process")
    _check_sizes(n, d, 1, range_dim=range_dim, corange_dim=corange_dim)
    r = min(range_dim, n, d)
    if r < 1 or corange_dim < r:
        raise UapxError(f"the sketch sizes must satisfy 1 <= range_dim <= corange_dim, got range_dim={range_dim}, "
                        f"corange_dim={corange_dim}", "pass corange_dim >= range_dim >= 1 (e.g. 2*range_dim + 1)")
    omega = torch.randn(d, r, generator=_generator(seed, 0), dtype=torch.float64)
    first = _first_pass(chunks, n, d, omega, center=center, psi=_GaussianRows(seed, 1, corange_dim))
    mu = first.mean
    q = _orth(first.y - (mu @ omega))
    w = first.w - torch.outer(first.psi_sum, mu)
    psi, psi_q = _GaussianRows(seed, 1, corange_dim), torch.zeros(corange_dim, r, dtype=torch.float64)
    for start in range(0, n, psi.block_rows):  # Psi Q (l, r), Psi drawn again
        rows = slice(start, min(start + psi.block_rows, n))
        psi_q += psi.rows(rows).T @ q[rows]
    x = torch.linalg.lstsq(psi_q, w).solution
    return SinglePassSketch(q, x, n, mu, first.total_energy)


def single_pass_svd(chunks: Iterable[torch.Tensor], n: int, d: int, k: int, *, range_dim: int | None = None,
                    corange_dim: int | None = None, center: bool = False, seed: int = 0) -> TopSVD:
    """Top-``k`` SVD of an ``(n, d)`` matrix read once: the top ``k`` of :func:`single_pass_sketch`.

    Defaults ``range_dim = 2k + 1`` and ``corange_dim = 2 range_dim + 1`` make both factors of the
    error bound 2: ``E ||A - A_hat||_F^2 <= 4 tau_{k+1}^2`` for the rank-``range_dim``
    approximation ``A_hat``; its best rank-``k`` part ``[A_hat]_k`` (whose SVD this returns)
    satisfies ``||A - [A_hat]_k||_F <= tau_{k+1} + 2 ||A - A_hat||_F`` (triangle inequality).
    When the tail energy ``tau_{k+1}^2`` is comparable to the top singular values squared (a flat
    spectrum), that error swamps them: the singular values come out inflated and the vectors
    unreliable unless ``range_dim`` approaches the numerical rank.  For ``d`` up to a few thousand,
    :func:`top_svd_gram` is one pass too, and exact.

    Args:
        chunks: the ``(n_i, d)`` row blocks of ``A``, in order (read once).
        n, d: the shape of ``A``.
        k: number of singular triplets.
        range_dim, corange_dim: sketch sizes (see :func:`single_pass_sketch`); ``k <= range_dim``.
        center: decompose the centred matrix.
        seed: seed of the test matrices.
    Returns:
        :class:`TopSVD`: ``S`` ``(k,)``, ``V`` ``(k, d)``, ``mean`` ``(d,)``, ``total_energy``.
    """
    _check_sizes(n, d, k)
    range_dim = 2 * k + 1 if range_dim is None else range_dim
    corange_dim = 2 * range_dim + 1 if corange_dim is None else corange_dim
    if range_dim < k:
        raise UapxError(f"range_dim={range_dim} is smaller than k={k}", "pass range_dim >= k (e.g. 2k + 1)")
    sketch = single_pass_sketch(chunks, n, d, range_dim=range_dim, corange_dim=corange_dim, center=center, seed=seed)
    return sketch.top(k)
