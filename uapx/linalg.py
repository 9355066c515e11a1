"""Linear algebra on perturbation matrices: exact top-k SVD by Gram matrix or LAPACK.

All functions take row blocks ``(n_i, d)`` (an iterable of chunks), so that a matrix kept on disk
is read once and never held whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


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
    """One pass over row blocks: ``(A^T A (d, d) float64, row sum (d,) float64, N)``."""
    g = torch.zeros(d, d, dtype=torch.float64)
    s = torch.zeros(d, dtype=torch.float64)
    n = 0
    for block in chunks:
        b = block.reshape(block.shape[0], -1).to(torch.float64)
        g.addmm_(b.T, b)
        s += b.sum(0)
        n += b.shape[0]
    return g, s, n


def top_svd_gram(chunks: Iterable[torch.Tensor], d: int, k: int, *, center: bool = False) -> TopSVD:
    """Exact top-``k`` SVD from the Gram matrix, in float64 (one pass over the rows)."""
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


def top_svd_lapack(matrix: torch.Tensor, k: int, *, center: bool = False) -> TopSVD:
    """Exact top-``k`` SVD of an in-memory ``(N, d)`` matrix with LAPACK (float64)."""
    a = matrix.to(torch.float64)
    mean = a.mean(0) if center else torch.zeros(a.shape[1], dtype=torch.float64)
    a = a - mean
    _, S, Vh = torch.linalg.svd(a, full_matrices=False)
    k = min(k, S.numel())
    return TopSVD(S[:k].float(), Vh[:k].float().contiguous(), a.shape[0], mean.float(), float((S ** 2).sum()))
