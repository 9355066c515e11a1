"""Built-in diagnostic ``subspace``: the subspace test of Moosavi-Dezfooli et al. (2017).

Moosavi-Dezfooli, Fawzi, Fawzi, Frossard, "Universal adversarial perturbations", CVPR 2017,
Sec. 4: random vectors drawn from the span of the top singular vectors of a matrix of
per-image adversarial directions fool far more images than unconstrained random vectors of the
same norm (38 % vs 10 % on ImageNet for k = 100): the decision boundaries share a low-dimensional
subspace of positive curvature, which is why universal perturbations exist.

Here the matrix is the analysis' per-image perturbations D ``(N_fit, d)`` -- every row of the
pipeline's perturbation set, the images the UAPs are fitted on -- and V_k its top-k right singular
vectors; fooling is measured on the pipeline's held-out images (``analysis.heldout``, disjoint from
the fit images).  Only where an analysis has no held-out set (one built by hand) are the analysed
images split instead (a seeded class-stratified half: SVD on one half, fooling on the other); the
figures say which (``split``).  For each
k of a log grid (1, 2, 5, 10, 20, 50, 100, capped at the rank) ``draws`` vectors
``v = eps V_k^T c / ||c||`` with ``c ~ N(0, I_k)`` are applied to the *held-out* images, and the
fooling rate (prediction of ``clamp(x + v, 0, 1)`` differs from the clean one) is pooled over
draws and images, with a Wilson 95 % interval (trials treated as independent) and the s.d.
over draws.  Control: ``draws`` isotropic random vectors of the same norm on the same
held-out images.  The norm is the run's eps unless ``radius`` is set: the paper compares at the
norm of a universal perturbation that fools most images, which can be several times the
per-image budget.  The paper's test is L2; in a Linf run every vector (in the span and the
control alike) is scaled along itself to ``||v||_inf = eps`` instead, the run's threat model.
"""
from __future__ import annotations

import torch
from torch import nn

import uapx
from uapx import distributed
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.evaluate import predict
from uapx.linalg import exact_svd_fits, randomized_svd, top_svd_gram
from uapx.norms import onto_sphere
from uapx.plots import plt
from uapx.stats import IMAGES_PER_CLASS

from . import _measures as M

K_GRID = (1, 2, 5, 10, 20, 50, 100)


def top_right_singular_vectors(d, k: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``d`` -- an ``(N, dim)`` tensor or a PerturbationSet, read
    chunk by chunk -- as orthonormal rows ``(k, dim)``: exact (:func:`uapx.linalg.top_svd_gram`)
    where it fits, else by randomized subspace iteration (:func:`uapx.linalg.randomized_svd`)."""
    if isinstance(d, torch.Tensor):
        n, dim, chunks = d.shape[0], d.shape[1], (lambda: d.split(4096))
    else:
        n, dim, chunks = len(d), d.d, d.chunks
    if exact_svd_fits(n, dim):
        return top_svd_gram(chunks(), dim, k).V.float()
    return randomized_svd(chunks, n, dim, k, oversample=10, power_iters=4).V.float()


def subspace_vectors(basis: torch.Tensor, draws: int, eps: float, generator: torch.Generator, *,
                     norm: str = "l2") -> torch.Tensor:
    """``draws`` random vectors of size ``eps`` in ``norm`` in the span of the orthonormal rows
    ``basis`` ``(k, dim)`` (isotropic within the span, then scaled), ``(draws, dim)``."""
    c = torch.randn(draws, basis.shape[0], generator=generator)
    return onto_sphere(c @ basis, eps, norm)


def fooled_counts(model: nn.Module, x: torch.Tensor, clean_pred: torch.Tensor, vectors: torch.Tensor, *,
                  batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """For each vector ``(D, dim)``, how many images of ``x`` ``(N, C, H, W)`` change prediction
    under ``clamp(x + v, 0, 1)``; ``(D,)`` integers."""
    return torch.tensor([int((predict(model, x, batch_size=batch_size, device=device, v=v.reshape(x.shape[1:]))
                              != clean_pred).sum()) for v in vectors])


def rate(counts: torch.Tensor, n: int) -> dict:
    """Pooled fooling rate of ``counts`` ``(D,)`` out of ``n`` images each, Wilson 95 % interval."""
    k, total = int(counts.sum()), n * counts.numel()
    lo, hi = M.wilson(k, total)
    per = counts.double() / max(n, 1)
    return {"fooling_rate": k / max(total, 1), "wilson_95": [lo, hi],
            "sd_over_draws": float(per.std()) if per.numel() > 1 else 0.0, "draws": int(counts.numel())}


class SubspaceDiagnostic(Diagnostic):
    """Held-out fooling rate of random vectors in the top-k singular subspace vs unconstrained ones."""

    name = "subspace"
    description = "subspace test of Moosavi-Dezfooli et al. 2017: held-out fooling of random vectors in the top-k singular span"

    def __init__(self, *, draws: int = 10, max_k: int = 100, radius: float | None = None) -> None:
        if draws < 1 or max_k < 1:
            raise uapx.UapxError(f"subspace.draws and subspace.max_k must be >= 1, got {draws} and {max_k}",
                                 "pass --set subspace.draws=10 --set subspace.max_k=100")
        if radius is not None and not radius > 0:
            raise uapx.UapxError(f"subspace.radius must be > 0, got {radius}", "pass --set subspace.radius=4 (a size in the run's norm)")
        self.draws, self.max_k, self.radius = draws, max_k, radius

    def run(self, analysis):
        c = analysis  # eps, device, batch_size, seed: the run's (uapx.analysis.Analysis)
        if distributed.active():
            raise uapx.UapxError("subspace runs in one process only", "run it without torchrun")
        if analysis.heldout is not None:  # the pipeline's: SVD of every fit image's perturbation
            d, fit_y = analysis.pset, analysis.y  # read chunk by chunk
            ho = analysis.heldout
            x, clean, held_y = ho.x, ho.clean_pred, ho.y
            split = (f"the pipeline's held-out images ({ho.split}, protocol {ho.protocol!r}); SVD of the "
                     "perturbations of every fit image")
        else:  # fallback: no held-out set in this analysis
            fit, held = M.half_split(analysis.y, seed=c.seed + 501)
            if len(fit) < 1 or len(held) < 1:
                raise uapx.UapxError("subspace needs at least 2 analysed images", "pass --n-samples 2 or more")
            keep = torch.zeros(len(analysis.y), dtype=torch.bool)
            keep[fit] = True
            d, fit_y = analysis.pset.where(keep), analysis.y[fit]
            x, clean, held_y = analysis.x[held], analysis.clean_pred[held], analysis.y[held]
            split = ("fallback (the analysis has no held-out images): seeded class-stratified half of the analysed "
                     "images (fit: SVD; held out: fooling)")
        ks = [k for k in K_GRID if k <= min(self.max_k, len(d), d.d)]
        basis = top_right_singular_vectors(d, max(ks))
        eps, n = float(self.radius if self.radius is not None else c.eps), int(x.shape[0])  # the vectors' size
        norm = c.norm  # in the run's norm: Linf runs scale each vector to ||v||_inf = eps
        g = torch.Generator().manual_seed(c.seed + 502)
        kw = dict(batch_size=c.batch_size, device=c.device)
        by_k = {}
        for k in ks:
            by_k[str(k)] = rate(fooled_counts(analysis.model, x, clean,
                                              subspace_vectors(basis[:k], self.draws, eps, g, norm=norm), **kw), n)
        rnd = onto_sphere(torch.randn(self.draws, d.d, generator=g), eps, norm)
        control = rate(fooled_counts(analysis.model, x, clean, rnd, **kw), n)
        figures = {"radius": eps, "norm": norm, "eps": float(c.eps), "fit_images": len(d), "held_out_images": n,
                   "images": len(d) + n, IMAGES_PER_CLASS: M.class_counts(torch.cat([fit_y, held_y])),
                   "fit_images_per_class": M.class_counts(fit_y),
                   "held_out_images_per_class": M.class_counts(held_y),
                   "split": split,
                   "k": ks, "subspace": by_k, "random": control}

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        fr = [100 * by_k[str(k)]["fooling_rate"] for k in ks]  # plotted in percent
        # error-bar lengths; max(0, .): at a rate of 0 or 1 the interval's end equals it up to rounding
        lo = [max(0.0, fr[i] - 100 * by_k[str(k)]["wilson_95"][0]) for i, k in enumerate(ks)]
        hi = [max(0.0, 100 * by_k[str(k)]["wilson_95"][1] - fr[i]) for i, k in enumerate(ks)]
        ax.errorbar(ks, fr, yerr=[lo, hi], fmt="o-", capsize=3, label="random in span of top-k singular vectors")
        ax.axhline(100 * control["fooling_rate"], color="gray", ls="--", label="unconstrained random (same norm)")
        ax.axhspan(*(100 * v for v in control["wilson_95"]), color="gray", alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("held-out fooling rate (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plots = [("subspace", fig, f"Held-out fooling rate ({n} images) of random vectors of norm {eps:g} in the span "
                                   f"of the top-k right singular vectors of {len(d)} fit images' perturbations, "
                                   "against unconstrained random vectors; Wilson 95 % intervals.")]
        best = max(ks, key=lambda k: by_k[str(k)]["fooling_rate"])
        b = by_k[str(best)]
        summary = (f"Random vectors in the top-{best} singular subspace fool {b['fooling_rate']:.1%} "
                   f"[{b['wilson_95'][0]:.1%}, {b['wilson_95'][1]:.1%}] of {n} held-out images; unconstrained random "
                   f"vectors of the same norm {control['fooling_rate']:.1%} [{control['wilson_95'][0]:.1%}, "
                   f"{control['wilson_95'][1]:.1%}].")
        return DiagnosticResult(figures, plots, summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [SubspaceDiagnostic]
