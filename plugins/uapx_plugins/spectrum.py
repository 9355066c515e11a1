"""Built-in diagnostic ``spectrum``: the singular values of the perturbation matrix.

Global and per class: singular values, explained-variance ratios, sigma1/sigma2, the effective
rank exp(H(p)) with p_i = sigma_i / sum(sigma) (Roy and Vetterli, 2007), and the number of
singular values above a fraction of sigma1.
"""
from __future__ import annotations

import math

import torch

import uapx
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.linalg import top_svd_gram
from uapx.plots import plt


def spectrum_figures(S: torch.Tensor, total_energy: float, *, fraction: float) -> dict:
    """Summary numbers of a full spectrum ``S`` (descending, ``(r,)``)."""
    s = S.double()
    p = s / s.sum().clamp_min(1e-300)
    nz = p[p > 0]
    return {
        "singular_values": s.tolist(),
        "explained_variance": (s ** 2 / max(total_energy, 1e-300)).tolist(),
        "sigma1_over_sigma2": float(s[0] / s[1]) if s.numel() > 1 and s[1] > 0 else math.inf,
        "effective_rank": float(torch.exp(-(nz * nz.log()).sum())),
        f"count_above_{fraction:g}_sigma1": int((s >= fraction * s[0]).sum()),
    }


class SpectrumDiagnostic(Diagnostic):
    """Singular-value spectrum of the perturbation matrix, global and per class."""

    name = "spectrum"
    supports_distributed = True
    description = "singular values of the perturbation matrix: decay, sigma1/sigma2, effective rank"

    def __init__(self, *, top: int = 20, fraction: float = 0.5, center: bool = False) -> None:
        self.top, self.fraction, self.center = top, fraction, center

    def _one(self, pset) -> dict:
        res = top_svd_gram(pset.chunks(), pset.d, pset.d, center=self.center)  # all of them: d x d eigh
        figs = spectrum_figures(res.S, res.total_energy, fraction=self.fraction)
        figs["singular_values"] = figs["singular_values"][: self.top]
        figs["explained_variance"] = figs["explained_variance"][: self.top]
        figs["n"] = res.n  # over every rank under torchrun
        return figs

    def run(self, analysis):
        pset = analysis.pset
        glob = self._one(pset)
        per_class = {str(c): self._one(pset.where(pset.labels == c)) for c in pset.classes}
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        k = len(glob["singular_values"])
        ax.semilogy(range(1, k + 1), glob["singular_values"], "o-", color="k", label="all images", zorder=3)
        for c, f in per_class.items():
            ax.semilogy(range(1, len(f["singular_values"]) + 1), f["singular_values"], alpha=0.4, lw=1,
                        label=f"class {c}")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{analysis.model_id}, eps {analysis.eps:g}", fontsize=9)
        s = glob["singular_values"]
        summary = (f"Top singular values {', '.join(f'{v:.3g}' for v in s[:5])}; sigma1/sigma2 = "
                   f"{glob['sigma1_over_sigma2']:.3g}; effective rank {glob['effective_rank']:.1f} of {pset.d}.")
        return DiagnosticResult({"global": glob, "per_class": per_class, "center": self.center},
                                [("singular-values", fig, "Singular values of the perturbation matrix (log scale), "
                                  "all images and each class.")], summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [SpectrumDiagnostic]
