"""Built-in diagnostic ``trajectory``: how straight PGD's optimisation trajectories are.

For every recorded image i and step t, the cosine similarity between its input gradient g_i(t)
and three references -- the talk's "cos sim to avg grad at final step" admits all three:

- ``universal``: the average over images of the final-step *unit* gradients, mean_j g_j(T)/||g_j(T)||
  (so a few images with large gradients cannot dominate it);
- ``own_final``: the image's own final-step gradient g_i(T);
- ``own_mean``: the image's own trajectory-average gradient mean_t g_i(t).

Under torchrun each rank records its part of the global first ``trajectory_samples`` images
(:meth:`uapx.analysis.Analysis.trajectories`); the universal reference is the global mean of the
final-step gradients (all-reduced sum and count) and the per-image cosines ``(m, steps)`` are
gathered, so every figure is the single-process one.  The restarts of the single image (global
image 0) run on the rank that holds it; only rank 0 writes the report.
"""
from __future__ import annotations

from matplotlib.ticker import MaxNLocator
import torch

import uapx
from uapx import distributed
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx.stats import IMAGES_PER_CLASS, class_counts, mean_se
from uapx.plots import figure_vs_control, normal95, plt

REFERENCES = ("universal", "own_final", "own_mean")


def trajectory_cosines(grads: torch.Tensor, universal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cosine similarities ``(steps, m)`` of each gradient to the three references.

    Args:
        grads: ``(steps, m, d)`` input gradients along the trajectories of ``m`` images.
        universal: ``(d,)`` the universal reference; by default the mean of ``grads[-1]``.
    """
    g = grads.double()
    unit = g / g.norm(dim=2, keepdim=True).clamp_min(1e-30)
    u = g[-1].mean(0) if universal is None else universal.double()
    refs = {
        "universal": u.expand_as(g[-1]),
        "own_final": g[-1],
        "own_mean": g.mean(0),
    }
    out = {}
    for name, ref in refs.items():
        r = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[name] = (unit * r.unsqueeze(0)).sum(2)
    return out


class TrajectoryDiagnostic(Diagnostic):
    """Cosine similarity of PGD gradients along the trajectory to three reference directions."""

    name = "trajectory"
    supports_distributed = True
    description = "cosine similarity of PGD gradients along trajectories to universal/own final/own mean gradient"
    needs_trajectories = True

    def __init__(self, *, restarts: int = 20) -> None:
        self.restarts = restarts

    def _restarts(self, analysis, universal: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Cosines ``(steps, restarts)`` for one image (``index`` into this rank's ``x``) attacked
        from random starts in the eps-ball."""
        dev = analysis.device
        x = analysis.x[index:index + 1].expand(self.restarts, *analysis.x.shape[1:]).to(dev)
        y = analysis.y[index:index + 1].expand(self.restarts).to(dev)
        g = torch.Generator().manual_seed(analysis.seed + 13)
        _, traj = analysis.attack(analysis.model, x, y, record=True, generator=g, random_start=True)
        return trajectory_cosines(traj.grads, universal)

    def run(self, analysis):
        traj = analysis.trajectories()  # this rank's part of the global first trajectory_samples images
        final = traj.grads[-1].double()
        final = final / final.norm(dim=1, keepdim=True).clamp_min(1e-30)  # unit gradients: no image dominates
        if distributed.active():  # the universal reference over every rank's trajectories
            count = distributed.all_reduce_scalar(final.shape[0])
            universal = distributed.all_reduce_(final.sum(0)) / max(count, 1)
        else:
            universal = final.mean(0)
        local = trajectory_cosines(traj.grads, universal)
        def gather(t: torch.Tensor) -> torch.Tensor:  # (steps, m_rank) on each rank -> (steps, m) of all
            return distributed.all_gather_rows(t.T.contiguous().cpu()).T.contiguous()

        cos = {name: gather(c) for name, c in local.items()}
        losses = gather(traj.losses)
        steps, m = cos["universal"].shape
        figures = {"images": m, "steps": steps}
        for name, c in cos.items():
            figures[name] = {"mean_per_step": c.mean(1).tolist(), "std_per_step": c.std(1, unbiased=False).tolist(),
                             "mean_over_trajectory": float(c.mean())}
        d = int(traj.grads.shape[2])
        g_ctl = torch.Generator().manual_seed(analysis.seed + 29)
        for name, c in cos.items():  # per image: the mean over the steps before the last (the last is 1 for own_final)
            per_image = (c[:-1] if steps > 1 else c).mean(0)
            r = torch.randn(steps, m, d, generator=g_ctl, dtype=torch.float64)  # random unit vectors in d dims
            ref = torch.randn(m, d, generator=g_ctl, dtype=torch.float64)
            ctl = ((r / r.norm(dim=2, keepdim=True)) * (ref / ref.norm(dim=1, keepdim=True))).sum(2)
            ctl = (ctl[:-1] if steps > 1 else ctl).mean(0)
            figures[name].update(
                per_image_before_last=per_image.tolist(),
                before_last=mean_se(per_image, seed=analysis.seed),
                control={**mean_se(ctl, seed=analysis.seed + 1), "expected_sd_one_cosine": d ** -0.5,
                         "what": "cosines of random unit vectors in d dimensions, same steps and images"})
        local = traj.index.cpu() - distributed.shard(analysis.n_images).start  # this rank's positions
        figures[IMAGES_PER_CLASS] = class_counts(analysis.y[local], over_ranks=True)
        index = 0  # the single image: global image 0 (the first trajectory), on rank 0
        figures["single_image"] = {"index": index, **{name: c[:, 0].tolist() for name, c in cos.items()}}
        held = (traj.index == index).nonzero().flatten()  # on the rank that holds it: no collective below
        restart_cos = {}
        if self.restarts and held.numel():
            first_row = distributed.shard(analysis.n_images).start
            restart_cos = self._restarts(analysis, universal, index - first_row)
            figures["single_image"]["restarts"] = {
                "count": self.restarts,
                **{name: {"mean": float(c.mean()), "std": float(c.std(unbiased=False)), "min": float(c.min())}
                   for name, c in restart_cos.items()}}
        figures["loss_per_step"] = losses.double().mean(1).tolist()

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        t = torch.arange(1, steps + 1).numpy()
        for name, c in cos.items():
            mu, sd = c.mean(1).numpy(), c.std(1, unbiased=False).numpy()
            ax.plot(t, mu, label=name)
            ax.fill_between(t, mu - sd, mu + sd, alpha=0.2)
        ax.set_xlabel("PGD step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel("cosine similarity")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"{m} trajectories, mean ± sd", fontsize=9)
        fig2, ax2 = plt.subplots(figsize=(5.5, 3.2))
        for name, c in cos.items():
            values = torch.cat([c[:, 0], restart_cos[name].reshape(-1)]) if restart_cos else c[:, 0]
            ax2.hist(values.numpy(), bins=40, range=(-1, 1), alpha=0.5, label=name)
        ax2.set_xlabel("cosine similarity (all steps, all starts)")
        ax2.set_ylabel("count")
        ax2.legend(fontsize=8)
        fig3 = figure_vs_control(
            list(cos), [normal95(figures[n]["before_last"]["mean"], figures[n]["before_last"]["se"]) for n in cos],
            [normal95(figures[n]["control"]["mean"], figures[n]["control"]["se"]) for n in cos],
            ylabel="mean cosine, steps before the last", figure_label=f"PGD gradients ({m} images)",
            control_label=f"control: random unit vectors in {d} dims")
        u = figures["universal"]["before_last"]["mean"]
        f = figures["own_final"]["before_last"]["mean"]
        return DiagnosticResult(figures, [
            ("curves", fig, "Cosine similarity of the gradient at each PGD step to the average final-step "
                            "gradient over images (universal), the image's own final-step gradient and its own "
                            "trajectory-average gradient."),
            ("readings", fig3, "Each reading's mean cosine over the steps before the last (per image, then over "
                               "images) beside the cosines of random unit vectors at the same steps and images; "
                               "95 % intervals (1.96 bootstrap s.e. over images)."),
            ("single-image", fig2, f"Image {index}: distribution of the cosine similarities over the steps of its "
                                   f"trajectory and of {self.restarts} more from random starts in the eps-ball."),
        ], summary=f"Over {m} trajectories of {steps} steps, the mean cosine similarity to the universal "
                   f"final-step unit gradient is {u:.3f} and to each image's own final-step gradient {f:.3f} "
                   f"(steps before the last; random unit vectors in {d} dimensions: "
                   f"{figures['own_final']['control']['mean']:.3f}).")


@uapx.hookimpl
def uapx_add_diagnostics():
    return [TrajectoryDiagnostic]
