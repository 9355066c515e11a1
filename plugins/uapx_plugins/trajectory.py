"""Built-in diagnostic ``trajectory``: how straight PGD's optimisation trajectories are.

For every recorded image i and step t, the cosine similarity between its input gradient g_i(t)
and three references -- the talk's "cos sim to avg grad at final step" admits all three:

- ``universal``: the average over images of the final-step gradients, mean_j g_j(T);
- ``own_final``: the image's own final-step gradient g_i(T);
- ``own_mean``: the image's own trajectory-average gradient mean_t g_i(t).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import uapx  # noqa: E402
from uapx.attacks import pgd_trajectory  # noqa: E402
from uapx.diagnostics import Diagnostic, DiagnosticResult  # noqa: E402

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
    description = "cosine similarity of PGD gradients along trajectories to universal/own final/own mean gradient"
    needs_trajectories = True

    def __init__(self, *, restarts: int = 20) -> None:
        super().__init__(restarts=restarts)
        self.restarts = restarts

    def _restarts(self, analysis, universal: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Cosines ``(steps, restarts)`` for one image attacked from random starts in the eps-ball."""
        a, c = analysis.attack, analysis.config
        x = analysis.x[index:index + 1].expand(self.restarts, *analysis.x.shape[1:]).to(c.device)
        y = analysis.y[index:index + 1].expand(self.restarts).to(c.device)
        g = torch.Generator().manual_seed(c.seed + 13)
        _, traj = pgd_trajectory(analysis.model, x, y, norm=a.norm, eps=a.eps, steps=a.steps,
                                 step_size=a.step_size, random_start=True, record=True, generator=g)
        return trajectory_cosines(traj.grads, universal)

    def run(self, analysis):
        traj = analysis.trajectories()
        cos = trajectory_cosines(traj.grads)
        steps, m = traj.grads.shape[:2]
        figures = {"images": m, "steps": steps}
        for name, c in cos.items():
            figures[name] = {"mean_per_step": c.mean(1).tolist(), "std_per_step": c.std(1, unbiased=False).tolist(),
                             "mean_over_trajectory": float(c.mean())}
        index = int(traj.index[0])
        figures["single_image"] = {"index": index, **{name: c[:, 0].tolist() for name, c in cos.items()}}
        restart_cos = self._restarts(analysis, traj.grads[-1].double().mean(0), index) if self.restarts else {}
        if restart_cos:
            figures["single_image"]["restarts"] = {
                "count": self.restarts,
                **{name: {"mean": float(c.mean()), "std": float(c.std(unbiased=False)), "min": float(c.min())}
                   for name, c in restart_cos.items()}}
        figures["loss_per_step"] = traj.losses.double().mean(1).tolist()

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        t = torch.arange(1, steps + 1).numpy()
        for name, c in cos.items():
            mu, sd = c.mean(1).numpy(), c.std(1, unbiased=False).numpy()
            ax.plot(t, mu, label=name)
            ax.fill_between(t, mu - sd, mu + sd, alpha=0.2)
        ax.set_xlabel("PGD step")
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
        u = figures["universal"]["mean_over_trajectory"]
        f = figures["own_final"]["mean_over_trajectory"]
        return DiagnosticResult(figures, [
            ("curves", fig, "Cosine similarity of the gradient at each PGD step to the average final-step "
                            "gradient over images (universal), the image's own final-step gradient and its own "
                            "trajectory-average gradient."),
            ("single-image", fig2, f"Image {index}: distribution of the cosine similarities over the steps of its "
                                   f"trajectory and of {self.restarts} more from random starts in the eps-ball."),
        ], summary=f"Over {m} trajectories of {steps} steps, the mean cosine similarity to the universal "
                   f"final-step gradient is {u:.3f} and to each image's own final-step gradient {f:.3f}.")


@uapx.hookimpl
def uapx_add_diagnostics():
    return [TrajectoryDiagnostic]
