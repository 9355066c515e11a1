"""Built-in diagnostic ``local-linearity``: the local linearity measure of Qin et al. (2019).

Qin, Martens, Gowal, Krishnan, Dvijotham, Fawzi, De, Stanforth, Kohli, "Adversarial Robustness
through Local Linearization", NeurIPS 2019, eq. (5)-(6)::

    g(delta; x)  = | l(x + delta) - l(x) - delta^T grad_x l(x) |
    gamma(eps, x) = max_{||delta|| <= eps} g(delta; x)

with l the cross-entropy.  gamma is maximised by a few steps of projected gradient ascent on
g from a uniformly random point of the eps-ball (normalised steps for L2, sign steps for
Linf; the ball is the attack's norm and eps, and ``x + delta`` stays in [0, 1]).  The best g
seen along the ascent is gamma.  Control: g at the ascent's random starting point, a uniformly
random point of the same ball (how non-linear the loss is in a typical, not the worst,
direction).  A loss that is exactly linear in x has gamma = 0; a quadratic
``l = x^T A x / 2 + b^T x`` has gamma = eps^2 max|eig(A)| / 2 (without the box).
"""
from __future__ import annotations

import torch
from torch import nn

import uapx
from uapx.defaults import default_step_size
from uapx.diagnostics import Diagnostic

from . import _measures as M


def linearity_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, loss0: torch.Tensor,
                  grad0: torch.Tensor, loss_fn: M.LossFn = M.cross_entropy) -> torch.Tensor:
    """``g(delta; x)`` ``(N,)``: the distance of ``l(x + delta)`` from its first-order Taylor
    expansion at x; ``loss0`` ``(N,)`` and ``grad0`` ``(N, C, H, W)`` are l and grad l at x."""
    return (M.losses(model, x + delta, y, loss_fn) - loss0 - M.flat_dot(delta, grad0)).abs()


def local_linearity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "l2",
                    steps: int = 10, step_size: float | None = None, generator: torch.Generator | None = None,
                    loss_fn: M.LossFn = M.cross_entropy, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, g_random)``, each ``(N,)``, for images ``x`` ``(N, C, H, W)`` with labels ``y``.

    ``gamma`` is the largest ``g(delta; x)`` over ``steps`` steps of projected ascent (step
    ``step_size``, default ``2.5 eps / steps``) from a uniformly random point of the ball, where
    ``g_random`` is taken."""
    generator = generator or torch.Generator().manual_seed(0)
    alpha = step_size if step_size is not None else default_step_size(eps, steps)
    loss0, grad0 = M.input_grad(model, x, y, loss_fn)
    loss0, grad0 = loss0.detach(), grad0.detach()
    delta = M.project(M.uniform_ball(tuple(x.shape), eps, norm, generator).to(x.device), x, eps, norm, clip=clip)
    best = g_random = None
    for t in range(steps + 1):
        delta = delta.detach().requires_grad_(True)
        g = linearity_gap(model, x, y, delta, loss0, grad0, loss_fn)
        best = g.detach() if best is None else torch.maximum(best, g.detach())
        if t == 0:
            g_random = g.detach()
        if t == steps:
            break
        (d,) = torch.autograd.grad(g.sum(), delta)
        step = d.sign() if norm == "linf" else M.unit(d)
        delta = M.project(delta.detach() + alpha * step, x, eps, norm, clip=clip)
    return best, g_random


class LocalLinearityDiagnostic(Diagnostic):
    """gamma(eps, x) of Qin et al. (2019) per image, beside g at a random point of the ball."""

    name = "local-linearity"
    description = "local linearity gamma(eps, x) of Qin et al. 2019 (PGD-maximised), vs a random point of the ball"

    def __init__(self, *, images: int = 100, steps: int = 10, batch_size: int = 100) -> None:
        if steps < 0:
            raise uapx.UapxError(f"local-linearity.steps must be >= 0, got {steps}",
                                 "pass --set local-linearity.steps=10")
        self.images, self.steps, self.batch_size = images, steps, batch_size

    def run(self, analysis):
        pos, x, y = M.selected_images(analysis, self.images)
        norm, eps = analysis.norm, analysis.eps
        g = torch.Generator().manual_seed(analysis.seed + 102)
        gam, rnd = M.per_image(lambda xb, yb: local_linearity(analysis.model, xb, yb, eps=eps, norm=norm,
                                                              steps=self.steps, generator=g),
                               x, y, batch_size=self.batch_size, device=analysis.device)
        return M.measure_result("gamma", "gamma(eps, x)", gam, rnd, "g at a uniform random point of the ball", y,
                                seed=analysis.seed,
                                extra={"positions": pos.tolist(), "eps": eps, "norm": norm, "steps": self.steps})


@uapx.hookimpl
def uapx_add_diagnostics():
    return [LocalLinearityDiagnostic]
