"""Built-in diagnostic ``hessian``: the top eigenvalue of the input Hessian of the loss.

For each image, the dominant eigenvalue of ``H(x) = grad_x^2 l(x)`` (l the cross-entropy),
found by power iteration on Hessian-vector products (double backward, never forming H)::

    v <- H v / ||H v||,    lambda = v^T H v

as used to measure input-space curvature in e.g. Moosavi-Dezfooli et al., "Robustness via
curvature regularization, and vice versa", CVPR 2019 (Fig. 2), and Yao et al., "Hessian-based
analysis of large batch training and robustness to adversaries", NeurIPS 2018.  Power
iteration converges to the eigenvalue of largest magnitude (reported with its sign; for ReLU
networks H = J^T (diag p - p p^T) J is positive semi-definite, so it is the top eigenvalue).
Control: the Rayleigh quotient ``r^T H r`` of an isotropic random unit direction r (the
curvature in a typical direction, tr(H)/d in expectation).  Images in an eval-mode model are
independent, so the Hessian of the summed loss is block-diagonal and one double backward gives
every image's ``H v`` at once.
"""
from __future__ import annotations

import torch
from torch import nn

import uapx
from uapx.diagnostics import Diagnostic

from . import _measures as M


def hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
        loss_fn: M.LossFn = M.cross_entropy) -> torch.Tensor:
    """Per-image Hessian-vector products ``H(x_i) v_i``, ``(N, C, H, W)``; x and v ``(N, C, H, W)``."""
    x = x.detach().requires_grad_(True)
    _, g = M.input_grad(model, x, y, loss_fn, create_graph=True)
    if not g.requires_grad:  # the gradient does not depend on x: a loss linear in x
        return torch.zeros_like(x)
    (hv,) = torch.autograd.grad(M.flat_dot(g, v).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if hv is None else hv.detach()


def top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int = 20,
                   generator: torch.Generator | None = None, loss_fn: M.LossFn = M.cross_entropy,
                   tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, control)``, each ``(N,)``: the dominant eigenvalue of each image's input Hessian by
    at most ``iters`` power iterations (stopping when every image's estimate changes by less
    than ``tol`` relative), and the Rayleigh quotient of an isotropic random unit direction."""
    generator = generator or torch.Generator().manual_seed(0)
    r = M.random_unit(tuple(x.shape), generator).to(x.device)
    control = M.flat_dot(r, hvp(model, x, y, r, loss_fn))
    v, lam = r, control
    for _ in range(iters):
        hv = hvp(model, x, y, v, loss_fn)
        norm = M.flat_norm(hv)
        if bool((norm == 0).all()):
            return torch.zeros_like(lam), control
        v = M.unit(hv)
        new = M.flat_dot(v, hvp(model, x, y, v, loss_fn))
        done = bool(((new - lam).abs() <= tol * new.abs().clamp_min(1e-12)).all())
        lam = new
        if done:
            break
    return lam, control


class HessianDiagnostic(Diagnostic):
    """Dominant eigenvalue of each image's input Hessian, beside a random direction's curvature."""

    name = "hessian"
    description = "top eigenvalue of the input Hessian (power iteration on Hessian-vector products) vs a random direction"

    def __init__(self, *, images: int = 100, iters: int = 20, batch_size: int = 100) -> None:
        if iters < 1:
            raise uapx.UapxError(f"hessian.iters must be >= 1, got {iters}", "pass --set hessian.iters=20")
        self.images, self.iters, self.batch_size = images, iters, batch_size

    def run(self, analysis):
        pos, x, y = M.selected_images(analysis, self.images)
        g = torch.Generator().manual_seed(analysis.seed + 402)
        lam, ctl = M.per_image(lambda xb, yb: top_eigenvalue(analysis.model, xb, yb, iters=self.iters, generator=g),
                               x, y, batch_size=self.batch_size, device=analysis.device)
        return M.measure_result("hessian", "top Hessian eigenvalue", lam, ctl,
                                "curvature r^T H r of a random direction", y, seed=analysis.seed, extra={"positions": pos.tolist(), "iters": self.iters})


@uapx.hookimpl
def uapx_add_diagnostics():
    return [HessianDiagnostic]
