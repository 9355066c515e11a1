"""Built-in diagnostic ``gradalign``: the gradient alignment of Andriushchenko & Flammarion (2020).

Andriushchenko, Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS
2020, eq. (6)::

    GA(x) = cos( grad_x l(x), grad_x l(x + eta) ),   eta ~ uniform on the eps-ball

with l the cross-entropy (the paper draws eta from the Linf ball; here the ball is the
attack's norm and eps, and ``x + eta`` is clipped to [0, 1]).  A loss linear in x has GA = 1
everywhere; a low GA means the gradient turns within the ball, i.e. local non-linearity.
Control: the cosine of grad_x l(x) with an isotropic random direction (mean 0, s.d. about
1/sqrt(d)), the value that carries no alignment at all.
"""
from __future__ import annotations

import torch
from torch import nn

import uapx
from uapx.diagnostics import Diagnostic

from . import _measures as M


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity ``(N,)`` of two ``(N, ...)`` tensors."""
    return M.flat_dot(a, b) / (M.flat_norm(a) * M.flat_norm(b)).clamp_min(1e-30)


def gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "l2",
                       generator: torch.Generator | None = None, loss_fn: M.LossFn = M.cross_entropy,
                       clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GA, control)``, each ``(N,)``: cos(grad l(x), grad l(x + eta)) with eta uniform in the
    eps-ball, and cos(grad l(x), r) with r an isotropic random direction; x ``(N, C, H, W)``."""
    generator = generator or torch.Generator().manual_seed(0)
    _, g0 = M.input_grad(model, x, y, loss_fn)
    eta = M.project(M.uniform_ball(tuple(x.shape), eps, norm, generator).to(x.device), x, eps, norm, clip=clip)
    _, g1 = M.input_grad(model, x + eta, y, loss_fn)
    r = M.random_unit(tuple(x.shape), generator).to(x.device)
    return cosine(g0, g1).detach(), cosine(g0, r).detach()


class GradAlignDiagnostic(Diagnostic):
    """GradAlign cosine of Andriushchenko & Flammarion (2020) per image, beside a random direction."""

    name = "gradalign"
    description = "GradAlign cosine of Andriushchenko & Flammarion 2020: grad at x vs at a random point of the ball"

    def __init__(self, *, images: int = 100, batch_size: int = 100) -> None:
        self.images, self.batch_size = images, batch_size

    def run(self, analysis):
        pos, x, y = M.selected_images(analysis, self.images)
        norm, eps = analysis.norm, analysis.eps
        g = torch.Generator().manual_seed(analysis.seed + 202)
        ga, ctl = M.per_image(lambda xb, yb: gradient_alignment(analysis.model, xb, yb, eps=eps, norm=norm,
                                                                generator=g), x, y, batch_size=self.batch_size, device=analysis.device)
        return M.measure_result("gradalign", "GradAlign cosine", ga, ctl, "cosine with a random direction", y,
                                seed=analysis.seed, extra={"positions": pos.tolist(), "eps": eps, "norm": norm})


@uapx.hookimpl
def uapx_add_diagnostics():
    return [GradAlignDiagnostic]
