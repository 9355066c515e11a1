"""Shared pieces of the landscape-measure diagnostics (local-linearity, gradalign, cure, hessian,
subspace): the per-image loss and its input gradient, points of the eps-ball, a seeded
class-stratified image draw, bootstrap standard errors, Wilson intervals, and the one figure
layout and plot every per-image measure reports.

Not a plugin (no entry point).  The statistics here are minimal local versions until
``uapx.stats`` provides them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import uapx
from uapx import distributed, stats
from uapx.stats import bootstrap_se, class_counts, wilson  # noqa: F401  (M.wilson)
from uapx.plots import figure_vs_control, normal95, plt

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(model_output, y) -> (N,)`` per-image loss; the default is cross-entropy."""


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy ``(N,)``."""
    return F.cross_entropy(out, y, reduction="none")


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = cross_entropy) -> torch.Tensor:
    """Per-image loss ``(N,)`` of images ``x`` ``(N, C, H, W)``."""
    return loss_fn(model(x), y)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = cross_entropy, *,
               create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image losses ``(N,)`` and their input gradients ``(N, C, H, W)``.

    Images are independent in an eval-mode model, so the gradient of the summed loss is the
    stack of per-image gradients."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    loss = losses(model, x, y, loss_fn)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return loss, g


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products ``(N,)`` of two ``(N, ...)`` tensors."""
    return (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(1)


def flat_norm(a: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 norms ``(N,)``."""
    return a.reshape(a.shape[0], -1).norm(dim=1)


def unit(a: torch.Tensor) -> torch.Tensor:
    """Each row scaled to L2 norm 1."""
    return a / flat_norm(a).clamp_min(1e-12).reshape(-1, *([1] * (a.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str, *, clip: bool = True) -> torch.Tensor:
    """``delta`` ``(N, C, H, W)`` projected onto the eps-ball of ``norm`` (``"l2"`` or ``"linf"``)
    and, with ``clip``, onto the box: ``clamp(x + delta, 0, 1) - x`` (which stays in the ball)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale.reshape(-1, *([1] * (delta.dim() - 1)))
    return (x + delta).clamp(0, 1) - x if clip else delta


def uniform_ball(shape: tuple[int, ...], eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """``shape[0]`` points drawn uniformly from the eps-ball of ``norm`` in ``prod(shape[1:])``
    dimensions: for L2 a Gaussian direction times ``eps * U^(1/d)``; for Linf ``U(-eps, eps)^d``."""
    n, d = shape[0], math.prod(shape[1:])
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    z = unit(torch.randn(shape, generator=generator))
    r = eps * torch.rand(n, generator=generator).pow(1.0 / d)
    return z * r.reshape(-1, *([1] * (len(shape) - 1)))


def random_unit(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``shape[0]`` isotropic random directions of L2 norm 1."""
    return unit(torch.randn(shape, generator=generator))


# -- selection and statistics ---------------------------------------------------------------------


def stratified_draw(y: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """Sorted positions of :func:`uapx.stats.stratified_draw` (a seeded class-stratified draw of
    ``min(n, len(y))`` rows of labels ``y`` ``(N,)``)."""
    return stats.stratified_draw(y, n, seed=seed).sort().values


def half_split(y: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded class-stratified half split of rows ``(N,)``: positions (fit, held-out)."""
    fit = stratified_draw(y, y.numel() // 2, seed=seed)
    mask = torch.ones(y.numel(), dtype=torch.bool)
    mask[fit] = False
    return fit, mask.nonzero().flatten()


def summary(values: torch.Tensor, *, seed: int) -> dict:
    """``{"mean", "se" (bootstrap over images), "median", "per_image"}`` of ``values`` ``(N,)``."""
    v = values.double().flatten()
    return {"mean": float(v.mean()), "se": bootstrap_se(v, seed=seed), "median": float(v.median()),
            "per_image": [float(a) for a in v]}


# -- the pipeline side ----------------------------------------------------------------------------


IMAGE_SEED_OFFSET = 101
"""The four per-image measures draw with the same seed, so with equal ``images`` they measure the
same images (paired comparisons across measures)."""


def selected_images(analysis, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, images ``(m, C, H, W)`` and labels ``(m,)`` of a seeded class-stratified draw of
    ``n`` of the analysed images (one process only)."""
    if distributed.active():
        raise uapx.UapxError("the landscape measures run in one process only", "run them without torchrun")
    if n < 1:
        raise uapx.UapxError(f"images must be >= 1, got {n}", "pass --set NAME.images=1 or more")
    pos = stratified_draw(analysis.y, n, seed=analysis.seed + IMAGE_SEED_OFFSET)
    return pos, analysis.x[pos], analysis.y[pos]


def batches(m: int, size: int):
    """Slices of ``range(m)`` of at most ``size`` rows."""
    for s in range(0, m, max(size, 1)):
        yield slice(s, min(s + size, m))


def per_image(fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
              y: torch.Tensor, *, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-image measure and its control over batches: ``fn(xb, yb) -> (measure (b,), control (b,))``
    on ``device`` for batches of ``x`` ``(m, C, H, W)`` and ``y`` ``(m,)``; both ``(m,)`` on the CPU."""
    values, controls = [], []
    for b in batches(len(y), batch_size):
        a, r = fn(x[b].to(device), y[b].to(device))
        values.append(a.cpu())
        controls.append(r.cpu())
    return torch.cat(values), torch.cat(controls)


def measure_result(name: str, label: str, values: torch.Tensor, control: torch.Tensor | None, control_label: str,
                   y: torch.Tensor, *, seed: int, extra: dict | None = None):
    """The figures, plot and summary of a per-image measure beside its random control.

    ``values`` and ``control`` are ``(m,)`` per-image numbers on the images with labels ``y``."""
    from uapx.diagnostics import DiagnosticResult

    figures = {"images": int(values.numel()), stats.IMAGES_PER_CLASS: class_counts(y),
               "measure": summary(values, seed=seed)}
    if control is not None:
        figures["control"] = {"what": control_label, **summary(control, seed=seed + 1)}
    figures.update(extra or {})
    m, se = figures["measure"]["mean"], figures["measure"]["se"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax1.hist(values.numpy(), bins=30, alpha=0.7, label=label)
    if control is not None:
        ax1.hist(control.numpy(), bins=30, alpha=0.5, label=f"control: {control_label}")
    ax1.set_xlabel(label)
    ax1.set_ylabel("images")
    ax1.legend(fontsize=7)
    ctl = normal95(figures["control"]["mean"], figures["control"]["se"]) if control is not None else None
    figure_vs_control([label], [normal95(m, se)], [ctl], ylabel="mean over images (95 % CI)", figure_label=label,
                      control_label="control", ax=ax2)
    text = f"{label}: {m:.4g} ± {se:.2g} (mean ± bootstrap s.e. over {values.numel()} images)"
    if control is not None:
        text += f"; control ({control_label}): {figures['control']['mean']:.4g} ± {figures['control']['se']:.2g}"
    caption = (f"Per-image {label} on {values.numel()} images (seeded class-stratified draw) beside its control; "
               "right: means with 95 % bootstrap intervals.")
    return DiagnosticResult(figures, [(name, fig, caption)], text + ".")
