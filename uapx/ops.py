"""The fused PGD-L2 step: extension loading, the pure-PyTorch reference, ``backend()``.

The step, exactly (per sample over dim 0, flattened)::

    g_hat = g / (||g||_2 + 1e-12);  x' = x + step_size * g_hat;  delta = x' - x0
    delta = delta * min(1, eps / ||delta||_2);  x_new = clamp(x0 + delta, lo, hi)
"""
from __future__ import annotations

import torch

__all__ = ["l2_pgd_step", "l2_pgd_step_", "l2_pgd_step_reference", "backend"]


def l2_pgd_step_reference(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float,
                          eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Pure-PyTorch L2 PGD step; the fallback and the test oracle.

    Args:
        x, x0, grad: ``(N, ...)`` current iterate, clean input, loss gradient at ``x``.
    Returns:
        ``(N, ...)`` the next iterate, in ``x``'s shape and dtype.
    """
    n = x.shape[0]
    xf, x0f, gf = (t.reshape(n, -1).float() for t in (x, x0, grad))
    gnorm = gf.norm(dim=1, keepdim=True)
    delta = xf + step_size * gf / (gnorm + 1e-12) - x0f
    dnorm = delta.norm(dim=1, keepdim=True)
    delta = delta * torch.clamp(eps / dnorm, max=1.0)  # eps / 0 = inf -> factor 1
    return (x0f + delta).clamp_(lo, hi).reshape(x.shape).to(x.dtype)


def backend() -> str:
    """Which implementation :func:`l2_pgd_step` uses: ``"cpu"``, ``"cuda"`` or ``"reference"``."""
    return "reference"


def l2_pgd_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """One L2 PGD step (see the module docstring); returns a new tensor."""
    return l2_pgd_step_reference(x, x0, grad, step_size, eps, lo, hi)


def l2_pgd_step_(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                 lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """In-place variant of :func:`l2_pgd_step`: overwrites and returns ``x``."""
    return x.copy_(l2_pgd_step_reference(x, x0, grad, step_size, eps, lo, hi))
