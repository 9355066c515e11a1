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

Under torchrun the class means come from all-reduced per-class sums and counts, and the principal
subspace from the all-reduced d x d covariance (``d <= 4096``) or, for larger images, from the
distributed randomized SVD (:func:`uapx.linalg.randomized_svd`); the N x d image matrix is never
gathered.  The images are read in blocks of about 16 MB (:func:`uapx.image_sources.blocks`), so a
streamed run (images read from their files) never holds them all: memory is the per-class sums
(classes x d) and the d x d covariance, or for larger images the randomized SVD's N x l and d x l
sketches (l = components + 10).
"""
from __future__ import annotations

import torch

import uapx
from uapx import distributed
from uapx.image_sources import blocks
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.stats import IMAGES_PER_CLASS, class_counts, mean_se
from uapx.linalg import gram, randomized_svd
from uapx.plots import figure_vs_control, image_grid, normal95

GRAM_MAX_DIM = 4096
"""Up to this many pixels the principal subspace comes from the d x d covariance (float64, exact);
above it, from the randomized SVD."""


def class_mean_differences(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> dict[int, torch.Tensor]:
    """``{c: mean(x[y == c]) - mean(x)}``, each ``(d,)``, for every class present; x ``(N, C, H, W)``
    (a tensor or an :class:`~uapx.image_sources.ImageRows`, read block by block).

    Under torch.distributed, over every rank's images (per-class sums and counts are all-reduced;
    ``num_classes``, by default one more than the largest label on any rank, sizes them)."""
    d = int(torch.Size(x.shape[1:]).numel())
    if num_classes is None:
        top = int(y.max()) if y.numel() else -1
        num_classes = int(distributed.all_reduce_scalar(top, "max")) + 1
    sums = torch.zeros(num_classes, d, dtype=torch.float64)
    start = 0
    for block in blocks(x):
        m = block.shape[0]
        sums.index_add_(0, y[start:start + m].long(), block.reshape(m, -1).double())
        start += m
    counts = torch.bincount(y.long(), minlength=num_classes).double()
    distributed.all_reduce_(sums)
    distributed.all_reduce_(counts)
    mu = sums.sum(0) / counts.sum().clamp_min(1)
    return {c: sums[c] / counts[c] - mu for c in range(num_classes) if counts[c] > 0}


def principal_subspace(x: torch.Tensor, k: int, *, max_gram_dim: int = GRAM_MAX_DIM, seed: int = 0) -> torch.Tensor:
    """Top-``k`` principal directions of the images (the centred rows), ``(k, d)`` orthonormal rows,
    float64; under torch.distributed, of every rank's images.  ``x`` ``(N, C, H, W)`` is a tensor or
    an :class:`~uapx.image_sources.ImageRows` (a streamed run's images), read block by block.

    ``d <= max_gram_dim``: eigenvectors of the covariance ``sum (x - mu)(x - mu)^T`` (d x d,
    float64, summed over ranks), exact.  Larger ``d``: for an in-memory tensor in one process the
    exact SVD of the centred ``(N, d)`` matrix; else (streamed images, or torch.distributed)
    randomized subspace iteration on the row blocks (:func:`uapx.linalg.randomized_svd`, centred,
    ``seed``), re-orthonormalised in float64.  Directions have no sign.
    """
    d = int(torch.Size(x.shape[1:]).numel())

    def chunks():
        return (b.reshape(b.shape[0], -1) for b in blocks(x))

    if d <= max_gram_dim:
        g, s, n = gram(chunks(), d)
        mu = s / max(n, 1)
        _, evecs = torch.linalg.eigh(g - n * torch.outer(mu, mu))  # ascending eigenvalues
        return evecs.flip(1)[:, :k].T.contiguous()
    if not distributed.active() and isinstance(x, torch.Tensor):  # in memory already: exact
        flat = x.reshape(x.shape[0], -1).double()
        return torch.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][:k]
    res = randomized_svd(chunks, int(x.shape[0]), d, k, oversample=10, power_iters=4, center=True, seed=seed)
    return torch.linalg.qr(res.V.double().T).Q.T.contiguous()


def _alignment_control(diffs: dict[int, torch.Tensor], d: int, *, seed: int, draws: int = 20) -> dict:
    """Signed cosines of random Gaussian directions with each class-mean difference ``(d,)``: the
    control of ``class_alignment`` (mean over classes of the per-class mean over ``draws``, its s.e.)."""
    g = torch.Generator().manual_seed(seed)
    per_class, absolute = [], []
    for ref in diffs.values():
        r = torch.randn(draws, d, generator=g, dtype=torch.float64)
        c = (r @ ref.double()) / (r.norm(dim=1) * ref.double().norm()).clamp_min(1e-300)
        per_class.append(float(c.mean()))
        absolute.append(float(c.abs().mean()))
    return {**mean_se(torch.tensor(per_class), seed=seed), "abs_mean": sum(absolute) / max(len(absolute), 1),
            "expected_sd_one_cosine": d ** -0.5, "what": "random Gaussian directions, any norm (cosine)"}


def subspace_energy(v: torch.Tensor, basis: torch.Tensor) -> float:
    """``||P v||^2 / ||v||^2`` for the orthonormal rows ``basis`` ``(k, d)``."""
    v = v.reshape(-1).double()
    return float((basis @ v).pow(2).sum() / v.pow(2).sum().clamp_min(1e-300))


class InterpretabilityDiagnostic(Diagnostic):
    """Alignment of UAPs with class structure and with the images' principal subspace."""

    name = "interpretability"
    supports_distributed = True
    description = "UAP images and scores: cosine to class-mean differences, energy in the images' top PCs"

    def __init__(self, *, components: int = 50, svd_vectors: int = 4) -> None:
        self.components, self.svd_vectors = components, svd_vectors

    def run(self, analysis):
        x, y = analysis.x, analysis.y
        d = int(torch.Size(x.shape[1:]).numel())
        n = analysis.n_images  # over every rank
        k = min(self.components, n - 1, d)
        basis = principal_subspace(x, k, seed=analysis.seed)
        diffs = class_mean_differences(x, y, analysis.num_classes)
        energy = {u.name: subspace_energy(u.vector, basis) for u in analysis.uaps}
        align = {}
        for u in analysis.uaps:
            if u.source_class is not None and u.source_class in diffs:
                ref = diffs[u.source_class]
                sign = analysis.evaluations[u.name].sign if u.name in analysis.evaluations else 1
                v = u.vector.reshape(-1).double() * sign
                align[u.name] = float(v @ ref / (v.norm() * ref.norm()).clamp_min(1e-300))
        g = torch.Generator().manual_seed(analysis.seed + 11)
        rand = [subspace_energy(torch.randn(d, generator=g, dtype=torch.float64), basis) for _ in range(20)]
        glob = {n: e for n, e in energy.items() if ":class-" not in n}
        by_method: dict[str, list[float]] = {}
        for name, a in align.items():
            by_method.setdefault(name.split(":class-")[0], []).append(a)
        figures = {
            "images": n, IMAGES_PER_CLASS: class_counts(y, over_ranks=True),  # the clean images: means, subspace
            "components": k,
            "data_subspace_energy": energy,
            "random_subspace_energy": {"mean": sum(rand) / len(rand), "expected": k / d},
            "class_alignment": align,
            "class_alignment_mean": {m: sum(v) / len(v) for m, v in by_method.items()},
            # signed: a class UAP pointing against its class-mean difference scores < 0; bootstrap s.e. over classes
            "class_alignment_stats": {m: mean_se(torch.tensor(v), seed=analysis.seed) for m, v in by_method.items()},
            "class_alignment_control": _alignment_control(diffs, d, seed=analysis.seed + 12),
            "random_subspace_energy_stats": mean_se(torch.tensor(rand), seed=analysis.seed),
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
        if glob:
            r = figures["random_subspace_energy_stats"]
            plots.append(("subspace-energy", figure_vs_control(
                list(glob), [(e, e, e) for e in glob.values()], [normal95(r["mean"], r["se"])] * len(glob),
                ylabel=f"energy share in the top {k} PCs", figure_label="global UAP",
                control_label="control: random directions (mean of 20, 95 % CI)"),
                f"Share of each global UAP's energy in the clean images' top {k} principal components, beside the "
                f"mean over random directions (expected {k}/{d} = {k / d:.3g})."))
        if figures["class_alignment_stats"]:
            st, ctl = figures["class_alignment_stats"], figures["class_alignment_control"]
            plots.append(("class-alignment", figure_vs_control(
                list(st), [normal95(v["mean"], v["se"]) for v in st.values()],
                [normal95(ctl["mean"], ctl["se"])] * len(st), ylabel="signed cosine with class-mean difference",
                figure_label="class-specific UAPs (mean over classes)", control_label="control: random directions"),
                "Signed cosine of each method's class-specific UAPs with their class-mean difference (mean over "
                "classes, 95 % interval from the bootstrap s.e. over classes) beside random directions."))
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
