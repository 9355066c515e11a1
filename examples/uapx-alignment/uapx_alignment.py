"""uapx-alignment: how well the mean perturbation explains each image's, against a random control."""
import matplotlib.pyplot as plt
import torch

import uapx
from uapx.diagnostics import Diagnostic, DiagnosticResult


class AlignmentDiagnostic(Diagnostic):
    """Cosine of each image's perturbation with the mean perturbation, and with a random direction."""

    name = "alignment"
    description = "cosine of each perturbation with the mean perturbation, against a random direction"

    def run(self, analysis):
        deltas = analysis.pset.matrix()                      # (N, d), one row per image
        mean = deltas.mean(dim=0)                            # (d,)
        control = torch.randn(deltas.shape[1], generator=torch.Generator().manual_seed(0))
        to_mean = torch.nn.functional.cosine_similarity(deltas, mean[None], dim=1)    # (N,)
        to_random = torch.nn.functional.cosine_similarity(deltas, control[None], dim=1)
        figures = {"mean_cosine": float(to_mean.mean()), "mean_cosine_sd": float(to_mean.std()),
                   "random_cosine": float(to_random.mean()), "random_cosine_sd": float(to_random.std())}
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist([to_mean.numpy(), to_random.numpy()], bins=30, label=["mean perturbation", "random direction"])
        ax.set_xlabel("cosine with the image's perturbation")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        summary = (f"Perturbations align with their mean at cosine {figures['mean_cosine']:.3f} "
                   f"(sd {figures['mean_cosine_sd']:.3f}); with a random direction at "
                   f"{figures['random_cosine']:.3f} (sd {figures['random_cosine_sd']:.3f}).")
        return DiagnosticResult(figures, [("cosines", fig, "Cosine of each image's perturbation with the "
                                           "mean perturbation and with one random direction (the control).")],
                                summary)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [AlignmentDiagnostic]
