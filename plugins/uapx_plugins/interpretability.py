"""Built-in diagnostic ``interpretability``: do the UAPs look like the data?

Pictures: the top singular vectors with both signs (the core report already shows the global
and class-specific UAPs).  Numbers:

- ``class_alignment``: for each class-specific UAP of class c, the cosine similarity with
  (mean image of class c - mean image of all classes): does the perturbation of a class's
  images draw (or erase) that class's typical strokes?
- ``data_subspace_energy`` (this project's perceptual-alignment score): the fraction of a UAP's
  energy that lies in the span of the top-K principal components of the clean images,
  ``||P_K v||^2 / ||v||^2``.  Natural images concentrate their variance in few components; a
  direction that is built from image-like structure (strokes, edges, blobs) does too, while a
  noise-like direction spreads its energy evenly, so a random direction scores K/d on average.
  The score is therefore reported beside that random baseline; it is a statement about
  alignment with the data's structure, not a human rating.
"""
from __future__ import annotations

import torch

import uapx
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.plots import image_grid


def class_mean_differences(x: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{c: mean(x[y == c]) - mean(x)}``, each ``(d,)``; x ``(N, C, H, W)``."""
    flat = x.reshape(x.shape[0], -1).double()
    mu = flat.mean(0)
    return {int(c): flat[y == c].mean(0) - mu for c in y.unique()}


def principal_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal directions of the images, ``(k, d)`` orthonormal rows."""
    flat = x.reshape(x.shape[0], -1).double()
    flat = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return vh[:k]


def subspace_energy(v: torch.Tensor, basis: torch.Tensor) -> float:
    """``||P v||^2 / ||v||^2`` for the orthonormal rows ``basis`` ``(k, d)``."""
    v = v.reshape(-1).double()
    return float((basis @ v).pow(2).sum() / v.pow(2).sum().clamp_min(1e-300))


class InterpretabilityDiagnostic(Diagnostic):
    """Alignment of UAPs with class structure and with the images' principal subspace."""

    name = "interpretability"
    description = "UAP images and scores: cosine to class-mean differences, energy in the images' top PCs"
    needs_model = False

    def __init__(self, *, components: int = 50, svd_vectors: int = 4) -> None:
        super().__init__(components=components, svd_vectors=svd_vectors)
        self.components, self.svd_vectors = components, svd_vectors

    def run(self, analysis):
        x, y = analysis.x, analysis.y
        d = x[0].numel()
        k = min(self.components, x.shape[0] - 1, d)
        basis = principal_subspace(x, k)
        diffs = class_mean_differences(x, y)
        energy = {u.name: subspace_energy(u.vector, basis) for u in analysis.uaps}
        align = {}
        for u in analysis.uaps:
            if u.source_class is not None and u.source_class in diffs:
                ref = diffs[u.source_class]
                sign = analysis.evaluations[u.name].sign if u.name in analysis.evaluations else 1
                v = u.vector.reshape(-1).double() * sign
                align[u.name] = float(v @ ref / (v.norm() * ref.norm()).clamp_min(1e-300))
        g = torch.Generator().manual_seed(analysis.config.seed + 11)
        rand = [subspace_energy(torch.randn(d, generator=g, dtype=torch.float64), basis) for _ in range(20)]
        glob = {n: e for n, e in energy.items() if ":class-" not in n}
        by_method: dict[str, list[float]] = {}
        for name, a in align.items():
            by_method.setdefault(name.split(":class-")[0], []).append(a)
        figures = {
            "components": k,
            "data_subspace_energy": energy,
            "random_subspace_energy": {"mean": sum(rand) / len(rand), "expected": k / d},
            "class_alignment": align,
            "class_alignment_mean": {m: sum(v) / len(v) for m, v in by_method.items()},
        }
        plots = []
        svd = [u for u in analysis.uaps if u.source_class is None and u.tag.startswith("v")][: self.svd_vectors]
        if svd:
            vecs, titles = [], []
            for u in svd:
                vecs += [u.vector, -u.vector]
                titles += [f"+{u.name}", f"-{u.name}"]
            plots.append(("singular-vectors", image_grid(vecs, titles, cols=8),
                          "Top singular vectors with both signs (singular vectors have no sign)."))
        mean_glob = sum(glob.values()) / len(glob) if glob else float("nan")
        summary = (f"Global UAPs keep on average {mean_glob:.1%} of their energy in the images' top {k} principal "
                   f"components (random directions: {figures['random_subspace_energy']['mean']:.1%}).")
        if figures["class_alignment_mean"]:
            summary += " Mean cosine of class-specific UAPs with their class-mean difference: " + ", ".join(
                f"{m} {v:.3f}" for m, v in figures["class_alignment_mean"].items()) + "."
        return DiagnosticResult(figures, plots, summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [InterpretabilityDiagnostic]
