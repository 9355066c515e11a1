"""The core's own plots of UAPs: images of the directions and their effect against random ones."""
from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import Analysis
    from .report import Report


def to_display(v: torch.Tensor) -> torch.Tensor:
    """A perturbation ``(C, H, W)`` as an image ``(H, W, C)`` or ``(H, W)`` in [0, 1], zero at 0.5,
    scaled symmetrically by its largest absolute value."""
    v = v.detach().float()
    m = float(v.abs().max()) or 1.0
    img = (v / (2 * m) + 0.5).clamp(0, 1)
    return img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)


def image_grid(vectors: list[torch.Tensor], titles: list[str], *, cols: int = 6, size: float = 1.6):
    """A figure of perturbation images with titles."""
    n = max(len(vectors), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, v, t in zip(axes.flat, vectors, titles):
        img = to_display(v)
        ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1)
        ax.set_title(t, fontsize=7)
    fig.tight_layout()
    return fig


def _global(analysis: "Analysis"):
    return [u for u in analysis.uaps if u.source_class is None]


def add_uap_plots(report: "Report", analysis: "Analysis", baseline: dict) -> None:
    """Images of the global and class-specific UAPs and a fooling-rate comparison."""
    glob = _global(analysis)
    if not glob:
        return
    evs = analysis.evaluations
    vecs = [u.vector * evs[u.name].sign for u in glob]
    report.add_plot("uaps", "global", image_grid(vecs, [u.name for u in glob]),
                    "Global UAPs (the sign kept for signless directions); grey is zero, "
                    "each image scaled by its largest absolute value.")
    classes = [u for u in analysis.uaps if u.source_class is not None and u.tag in ("", "v1")]
    if classes:
        report.add_plot("uaps", "class-specific", image_grid([u.vector for u in classes], [u.name for u in classes],
                                                             cols=10),
                        "Class-specific UAPs of each method (from the perturbations of one class's images).")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(glob) + 2), 3.2))
    names = [u.name for u in glob] + ["random"]
    vals = [evs[u.name].best.fooling_rate for u in glob] + [baseline["fooling_rate"]["mean"]]
    ax.bar(range(len(vals)), vals, color=["#4c72b0"] * len(glob) + ["#999999"])
    ax.errorbar([len(glob)], [vals[-1]], yerr=[baseline["fooling_rate"]["std"]], color="k", capsize=3)
    ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("fooling rate")
    ax.set_title(f"Global UAPs vs random directions, L2 norm {analysis.eps:g}", fontsize=9)
    report.add_plot("uaps", "fooling-rates", fig,
                    f"Fooling rate (prediction changed) of each global UAP and of {baseline['draws']} random "
                    "directions of the same norm (mean, error bar one standard deviation).")


def uap_summary(analysis: "Analysis", baseline: dict) -> str:
    glob = _global(analysis)
    if not glob:
        return "No UAP method was selected."
    best = max(glob, key=lambda u: analysis.evaluations[u.name].best.fooling_rate)
    fr = analysis.evaluations[best.name].best.fooling_rate
    rb = baseline["fooling_rate"]
    return (f"Best global UAP: {best.name} fools {fr:.1%} of {analysis.n_images} images at "
            f"L2 norm {analysis.eps:g}; random directions of that norm fool {rb['mean']:.1%} "
            f"(sd {rb['std']:.1%}, {baseline['draws']} draws).")


def comparison_table(analysis: "Analysis", baseline: dict) -> tuple[list[str], list[list]]:
    """One row per global UAP, then the random baseline: the effect of each at the same eps."""
    head = ["UAP", "eps", "fooling rate", "accuracy x+v", "accuracy x-v", "sign kept"]
    rows = []
    for u in _global(analysis):
        ev = analysis.evaluations[u.name]
        rows.append([u.name, u.eps, ev.best.fooling_rate, ev.plus.accuracy, ev.minus.accuracy,
                     "+" if ev.sign > 0 else "-"])
    fr, acc = baseline["fooling_rate"], baseline["accuracy"]
    rows.append([f"random ({baseline['draws']} draws)", baseline["eps"], f"{fr['mean']:.4g} ± {fr['std']:.2g}",
                 f"{acc['mean']:.4g} ± {acc['std']:.2g}", "", ""])
    return head, rows
