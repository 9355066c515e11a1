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
from uapx.diagnostics import Diagnostic, DiagnosticResult  # noqa: E402

REFERENCES = ("universal", "own_final", "own_mean")


def trajectory_cosines(grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine similarities ``(steps, m)`` of each gradient to the three references.

    Args:
        grads: ``(steps, m, d)`` input gradients along the trajectories of ``m`` images.
    """
    g = grads.double()
    unit = g / g.norm(dim=2, keepdim=True).clamp_min(1e-30)
    refs = {
        "universal": g[-1].mean(0, keepdim=True).expand_as(g[-1]),
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

    def run(self, analysis):
        traj = analysis.trajectories()
        cos = trajectory_cosines(traj.grads)
        steps, m = traj.grads.shape[:2]
        figures = {"images": m, "steps": steps}
        for name, c in cos.items():
            figures[name] = {"mean_per_step": c.mean(1).tolist(), "std_per_step": c.std(1, unbiased=False).tolist(),
                             "mean_over_trajectory": float(c.mean())}
        figures["single_image"] = {"index": int(traj.index[0]),
                                   **{name: c[:, 0].tolist() for name, c in cos.items()}}
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
            ax2.hist(c[:, 0].numpy(), bins=20, range=(-1, 1), alpha=0.5, label=name)
        ax2.set_xlabel("cosine similarity over the steps of one image")
        ax2.set_ylabel("steps")
        ax2.legend(fontsize=8)
        u = figures["universal"]["mean_over_trajectory"]
        f = figures["own_final"]["mean_over_trajectory"]
        return DiagnosticResult(figures, [
            ("curves", fig, "Cosine similarity of the gradient at each PGD step to the average final-step "
                            "gradient over images (universal), the image's own final-step gradient and its own "
                            "trajectory-average gradient."),
            ("single-image", fig2, f"Distribution over steps for image {figures['single_image']['index']}."),
        ], summary=f"Over {m} trajectories of {steps} steps, the mean cosine similarity to the universal "
                   f"final-step gradient is {u:.3f} and to each image's own final-step gradient {f:.3f}.")


@uapx.hookimpl
def uapx_add_diagnostics():
    return [TrajectoryDiagnostic]
