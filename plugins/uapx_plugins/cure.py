"""Built-in diagnostic ``cure``: the finite-difference curvature of CURE (Moosavi-Dezfooli et al. 2019).

Moosavi-Dezfooli, Fawzi, Uesato, Frossard, "Robustness via curvature regularization, and vice
versa", CVPR 2019, eq. (4)-(5): the regulariser ``||grad l(x + h z) - grad l(x)||^2`` with
``z = sign(grad l(x)) / ||sign(grad l(x))||``, a finite-difference estimate of ``h^2 ||H z||^2``
(H the input Hessian of the cross-entropy l), the curvature along the direction the attack
takes.  Reported here as a curvature, per image::

    c(x) = || grad l(x + h z) - grad l(x) ||_2 / h      (-> ||H z|| as h -> 0)

``z`` is the unit gradient direction for L2 attacks (``direction="gradient"``) and the
normalised gradient sign for Linf, as in the paper (``direction="sign"``); ``h`` defaults to
the attack's eps.  ``x + h z`` is clipped to [0, 1] and the actual step length is used.
Control: the same difference along an isotropic random unit direction (curvature in a
typical direction; the paper's point is that curvature along the gradient is larger).
A loss linear in x gives 0; a quadratic ``x^T A x / 2 + b^T x`` gives exactly ``||A z||``.
"""
from __future__ import annotations

import torch
from torch import nn

import uapx
from uapx.diagnostics import Diagnostic

from . import _measures as M


def finite_difference_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, h: float, *,
                                loss_fn: M.LossFn = M.cross_entropy, clip: bool = True,
                                grad0: torch.Tensor | None = None) -> torch.Tensor:
    """``||grad l(x + h z) - grad l(x)|| / ||x' - x||`` ``(N,)`` with ``x' = x + h z`` (clipped to
    [0, 1] with ``clip``); z ``(N, C, H, W)`` unit directions."""
    if grad0 is None:
        _, grad0 = M.input_grad(model, x, y, loss_fn)
    xh = (x + h * z).clamp(0, 1) if clip else x + h * z
    _, g1 = M.input_grad(model, xh, y, loss_fn)
    return (M.flat_norm(g1 - grad0) / M.flat_norm(xh - x).clamp_min(1e-30)).detach()


def cure_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, h: float, direction: str = "gradient",
                   generator: torch.Generator | None = None, loss_fn: M.LossFn = M.cross_entropy,
                   clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, control)``, each ``(N,)``: the CURE curvature along z (unit gradient or normalised
    gradient sign, ``direction``) and along an isotropic random unit direction."""
    if direction not in ("gradient", "sign"):
        raise uapx.UapxError(f"unknown CURE direction {direction!r}", "choose gradient or sign")
    generator = generator or torch.Generator().manual_seed(0)
    _, g0 = M.input_grad(model, x, y, loss_fn)
    g0 = g0.detach()
    z = M.unit(g0.sign() if direction == "sign" else g0)
    r = M.random_unit(tuple(x.shape), generator).to(x.device)
    kw = dict(loss_fn=loss_fn, clip=clip, grad0=g0)
    return finite_difference_curvature(model, x, y, z, h, **kw), finite_difference_curvature(model, x, y, r, h, **kw)


class CureDiagnostic(Diagnostic):
    """CURE finite-difference curvature per image along the gradient, beside a random direction."""

    name = "cure"
    description = "CURE curvature of Moosavi-Dezfooli et al. 2019: ||grad l(x + h z) - grad l(x)|| / h, z along the gradient"

    def __init__(self, *, images: int = 100, h: float | None = None, direction: str | None = None,
                 batch_size: int = 100) -> None:
        if h is not None and h <= 0:
            raise uapx.UapxError(f"cure.h must be > 0, got {h}", "pass --set cure.h=0.5 (an L2 distance)")
        if direction not in (None, "gradient", "sign"):
            raise uapx.UapxError(f"unknown cure.direction {direction!r}", "choose gradient or sign")
        self.images, self.h, self.direction, self.batch_size = images, h, direction, batch_size

    def run(self, analysis):
        pos, x, y = M.selected_images(analysis, self.images)
        norm = analysis.norm
        direction = self.direction or ("sign" if norm == "linf" else "gradient")
        h = float(self.h if self.h is not None else analysis.eps)
        g = torch.Generator().manual_seed(analysis.seed + 302)
        cur, ctl = M.per_image(lambda xb, yb: cure_curvature(analysis.model, xb, yb, h=h, direction=direction,
                                                             generator=g),
                               x, y, batch_size=self.batch_size, device=analysis.device)
        return M.measure_result("cure", "CURE curvature", cur, ctl, "along a random direction", y,
                                seed=analysis.seed, extra={"positions": pos.tolist(), "h": h, "direction": direction})


@uapx.hookimpl
def uapx_add_diagnostics():
    return [CureDiagnostic]
