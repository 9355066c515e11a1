"""Built-in diagnostic ``landscape``: the loss around the data along UAPs and random directions.

For a unit direction u (a global UAP, or a random direction) and t in [-2 eps, 2 eps], the mean
cross-entropy over images of ``clamp(x + t u, 0, 1)``; unit and t in the run's norm (L2: u on the
unit sphere, random directions isotropic; Linf: u scaled to ``||u||_inf = 1``, random directions
random vertices of the unit cube, the shape of a sign-projected UAP); a 2-D surface over (UAP, random); and the
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
from uapx.norms import onto_sphere
from uapx.plots import figure_vs_control, normal95, plt
from uapx.stats import IMAGES_PER_CLASS, class_counts, mean_se


@torch.no_grad()
def image_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
                 batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """Per-image cross-entropy ``(N,)`` float64 of ``clamp(x + v, 0, 1)``; x ``(N, C, H, W)`` (N may be
    0), v ``(C, H, W)``."""
    out = [F.cross_entropy(model((x[s:s + batch_size].to(device) + v.to(device)).clamp(0, 1)),
                           y[s:s + batch_size].to(device), reduction="none").double().cpu()
           for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
             batch_size: int = 500, device: str = "cpu") -> float:
    """Summed cross-entropy of ``clamp(x + v, 0, 1)``; x ``(N, C, H, W)`` (N may be 0), v ``(C, H, W)``."""
    return float(image_losses(model, x, y, v, batch_size=batch_size, device=device).sum())


def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
              batch_size: int = 500, device: str = "cpu") -> float:
    """Mean cross-entropy of ``clamp(x + v, 0, 1)`` over this process's ``x``."""
    return loss_sum(model, x, y, v, batch_size=batch_size, device=device) / x.shape[0]


def unit(v: torch.Tensor, norm: str) -> torch.Tensor:
    """``v`` (any shape, one direction) scaled to size 1 in ``norm``."""
    return onto_sphere(v.reshape(1, -1), 1.0, norm).reshape(v.shape)


def random_direction(shape: torch.Size, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random unit direction of ``norm``: isotropic (L2) or a random vertex of the cube (Linf)."""
    r = torch.randn(shape, generator=generator)
    return unit(r if norm == "l2" else r.sign(), norm)


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

        def image_profile(vs: list[torch.Tensor]) -> torch.Tensor:
            """Per-image losses ``(len(vs), this rank's images)`` along the perturbations ``vs``."""
            return torch.stack([image_losses(model, x, y, v, batch_size=bs, device=dev) for v in vs])

        def means(per: torch.Tensor) -> list[float]:
            """Global mean losses of per-image losses ``(k, images)`` (one all-reduce for all of them)."""
            return (distributed.all_reduce_(per.sum(1)) / n).tolist()

        def losses(vs: list[torch.Tensor]) -> list[float]:
            return means(image_profile(vs))

        eps, norm = analysis.eps, analysis.norm
        ts = torch.linspace(-2 * eps, 2 * eps, self.points)
        h = float(ts[1] - ts[0])
        g = torch.Generator().manual_seed(analysis.seed + 7)
        dirs: dict[str, torch.Tensor] = {}
        for u in analysis.uaps:
            if u.source_class is None and u.tag in ("", "v1"):
                sign = analysis.evaluations[u.name].sign if u.name in analysis.evaluations else 1
                dirs[u.name] = unit(u.vector * sign, norm)
        for i in range(self.random_dirs):
            dirs[f"random-{i + 1}"] = random_direction(analysis.x.shape[1:], norm, g)
        per_image = {name: image_profile([float(t) * d for t in ts]) for name, d in dirs.items()}
        profiles = {name: means(per) for name, per in per_image.items()}
        curv = {name: curvature(p, h) for name, p in profiles.items()}
        # per image, the same second difference (its mean over images is curv): bootstrap s.e. over images
        c = self.points // 2
        curv_i = {name: distributed.all_gather_rows((per[c + 1] - 2 * per[c] + per[c - 1]) / h ** 2)
                  for name, per in per_image.items()}
        rand_curv = [curv[k] for k in curv if k.startswith("random-")]
        rand_i = [curv_i[k] for k in curv_i if k.startswith("random-")]
        figures = {"t": ts.tolist(), "norm": norm, "images": n, IMAGES_PER_CLASS: class_counts(y, over_ranks=True),
                   "profiles": profiles, "curvature_at_data": curv,
                   "curvature_stats": {k: mean_se(v, seed=analysis.seed) for k, v in curv_i.items()},
                   "random_curvature_mean": sum(rand_curv) / len(rand_curv) if rand_curv else None,
                   "random_curvature_stats": mean_se(torch.stack(rand_i).mean(0), seed=analysis.seed + 1)
                   if rand_i else None}

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for name, p in profiles.items():
            ax.plot(ts.numpy(), p, ls="--" if name.startswith("random") else "-", label=name)
        ax.set_xlabel(f"t ({'L2' if norm == 'l2' else 'Linf'} distance along the direction)")
        ax.set_ylabel("mean cross-entropy")
        ax.legend(fontsize=7)
        plots = [("profiles", fig, f"Mean loss of {n} images along each global UAP (solid) and random "
                                   "directions (dashed), t in [-2 eps, 2 eps].")]
        uap_names = [k for k in dirs if not k.startswith("random-")]
        if uap_names:
            st, rc = figures["curvature_stats"], figures["random_curvature_stats"]
            plots.append(("curvature", figure_vs_control(
                uap_names, [normal95(st[k]["mean"], st[k]["se"]) for k in uap_names],
                [normal95(rc["mean"], rc["se"]) if rc else None] * len(uap_names),
                ylabel="curvature of the loss at the data", figure_label="along the global UAP",
                control_label=f"control: {self.random_dirs} random directions (mean)"),
                f"Second difference of the loss at the data along each global UAP, mean over {n} images with its "
                "95 % interval (1.96 bootstrap s.e. over images), beside the same along random directions of equal "
                "norm (per image averaged over the random directions)."))
        if uap_names and self.random_dirs:
            a, b = dirs[uap_names[0]], dirs["random-1"]
            a2 = a / a.norm()
            b = b - (b.reshape(-1) @ a2.reshape(-1)) * a2  # orthogonalise the random axis (in L2)
            b = unit(b, norm)
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
            st, rc = figures["curvature_stats"][best], figures["random_curvature_stats"]
            summary = (f"Curvature of the loss at the data along {best}: {curv[best]:.4g} ± {st['se']:.2g}; along "
                       f"random directions of equal norm: {figures['random_curvature_mean']:.4g} ± {rc['se']:.2g} "
                       f"(mean ± bootstrap s.e. over {n} images).")
        return DiagnosticResult(figures, plots, summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [LandscapeDiagnostic]
