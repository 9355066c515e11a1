"""Built-in diagnostic ``landscape``: the loss around the data along UAPs and random directions.

For a unit direction u (a global UAP, or a random direction) and t in [-2 eps, 2 eps], the mean
cross-entropy over images of ``clamp(x + t u, 0, 1)``; a 2-D surface over (UAP, random); and the
curvature at t = 0 from second differences, (L(h) - 2 L(0) + L(-h)) / h^2.

Under torchrun each rank evaluates its part of the global first ``images`` images
(:func:`uapx.distributed.local_prefix`) and the loss sums and counts are all-reduced: the
profiles are those of one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import uapx
from uapx import distributed
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.plots import plt
from uapx.stats import IMAGES_PER_CLASS, class_counts


@torch.no_grad()
def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
             batch_size: int = 500, device: str = "cpu") -> float:
    """Summed cross-entropy of ``clamp(x + v, 0, 1)``; x ``(N, C, H, W)`` (N may be 0), v ``(C, H, W)``."""
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        xb = (x[s:s + batch_size].to(device) + v.to(device)).clamp(0, 1)
        total += float(F.cross_entropy(model(xb), y[s:s + batch_size].to(device), reduction="sum"))
    return total


def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
              batch_size: int = 500, device: str = "cpu") -> float:
    """Mean cross-entropy of ``clamp(x + v, 0, 1)`` over this process's ``x``."""
    return loss_sum(model, x, y, v, batch_size=batch_size, device=device) / x.shape[0]


def curvature(losses: list[float], h: float) -> float:
    """Second difference at the centre of an odd-length profile sampled with spacing ``h``."""
    c = len(losses) // 2
    return (losses[c + 1] - 2 * losses[c] + losses[c - 1]) / h ** 2


class LandscapeDiagnostic(Diagnostic):
    """Loss profiles and curvature along the global UAPs and random directions of equal norm."""

    name = "landscape"
    supports_distributed = True
    description = "loss along UAPs vs random directions (curves, 2-D surface, curvature at the data)"

    def __init__(self, *, points: int = 21, grid: int = 11, random_dirs: int = 3, images: int = 200) -> None:
        self.points, self.grid, self.random_dirs, self.images = points | 1, grid | 1, random_dirs, images

    def run(self, analysis):
        model, dev, bs = analysis.model, analysis.device, analysis.batch_size
        part = distributed.local_prefix(self.images, analysis.n_images)
        x, y = analysis.x[part], analysis.y[part]  # this rank's part of the global first `images`
        n = int(distributed.all_reduce_scalar(x.shape[0]))
        if n == 0:
            raise uapx.UapxError("landscape: no images to evaluate the loss on", "pass landscape.images >= 1")

        def losses(vs: list[torch.Tensor]) -> list[float]:
            """Global mean losses along the perturbations ``vs`` (one all-reduce for all of them)."""
            sums = torch.tensor([loss_sum(model, x, y, v, batch_size=bs, device=dev) for v in vs],
                                dtype=torch.float64)
            return (distributed.all_reduce_(sums) / n).tolist()

        eps = analysis.eps
        ts = torch.linspace(-2 * eps, 2 * eps, self.points)
        h = float(ts[1] - ts[0])
        g = torch.Generator().manual_seed(analysis.seed + 7)
        dirs: dict[str, torch.Tensor] = {}
        for u in analysis.uaps:
            if u.source_class is None and u.tag in ("", "v1"):
                sign = analysis.evaluations[u.name].sign if u.name in analysis.evaluations else 1
                dirs[u.name] = u.vector * sign / u.vector.norm()
        for i in range(self.random_dirs):
            r = torch.randn(analysis.x.shape[1:], generator=g)
            dirs[f"random-{i + 1}"] = r / r.norm()
        profiles = {name: losses([float(t) * d for t in ts]) for name, d in dirs.items()}
        curv = {name: curvature(p, h) for name, p in profiles.items()}
        rand_curv = [curv[k] for k in curv if k.startswith("random-")]
        figures = {"t": ts.tolist(), "images": n, IMAGES_PER_CLASS: class_counts(y, over_ranks=True),
                   "profiles": profiles, "curvature_at_data": curv,
                   "random_curvature_mean": sum(rand_curv) / len(rand_curv) if rand_curv else None}

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for name, p in profiles.items():
            ax.plot(ts.numpy(), p, ls="--" if name.startswith("random") else "-", label=name)
        ax.set_xlabel("t (L2 distance along the direction)")
        ax.set_ylabel("mean cross-entropy")
        ax.legend(fontsize=7)
        plots = [("profiles", fig, f"Mean loss of {n} images along each global UAP (solid) and random "
                                   "directions (dashed), t in [-2 eps, 2 eps].")]
        uap_names = [k for k in dirs if not k.startswith("random-")]
        if uap_names and self.random_dirs:
            a, b = dirs[uap_names[0]], dirs["random-1"]
            b = b - (b.reshape(-1) @ a.reshape(-1)) * a  # orthogonalise the random axis
            b = b / b.norm()
            gt = torch.linspace(-2 * eps, 2 * eps, self.grid)
            surface = [losses([float(s) * a + float(t) * b for t in gt]) for s in gt]
            figures["surface"] = {"uap": uap_names[0], "axis": gt.tolist(), "loss": surface}
            fig2, ax2 = plt.subplots(figsize=(4.6, 3.8))
            im = ax2.contourf(gt.numpy(), gt.numpy(), torch.tensor(surface).numpy(), levels=20, cmap="viridis")
            fig2.colorbar(im, ax=ax2, label="mean cross-entropy")
            ax2.set_xlabel("random direction")
            ax2.set_ylabel(uap_names[0])
            plots.append(("surface", fig2, f"Loss surface over ({uap_names[0]}, an orthogonal random direction)."))
        best = max(uap_names, key=lambda k: curv[k]) if uap_names else None
        summary = ""
        if best is not None and rand_curv:
            summary = (f"Curvature of the loss at the data along {best}: {curv[best]:.4g}; along random "
                       f"directions of equal norm: {figures['random_curvature_mean']:.4g} (mean).")
        return DiagnosticResult(figures, plots, summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [LandscapeDiagnostic]
