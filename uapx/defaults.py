"""Default attack budgets, per norm and data set, and the default model: the one place they are written.

L2 budgets are the talk's (MNIST 2.0, CIFAR-10 0.5); Linf budgets are the usual ones of Madry et
al. (MNIST 0.3, CIFAR-10 8/255).  The step size defaults to ``2.5 * eps / steps`` for either
norm (Madry et al.'s rule: enough steps of that size reach the ball's boundary from any start).
"""
from __future__ import annotations

from .errors import UapxError

EPS: dict[str, dict[str, float]] = {
    "l2": {"mnist": 2.0, "cifar10": 0.5},
    "linf": {"mnist": 0.3, "cifar10": 8 / 255},
}
OTHER_DATASET_EPS = {"l2": 1.0, "linf": 8 / 255}  # data sets without an entry above (e.g. ImageFolder trees)
STUDY_EPS_SWEEP: dict[str, tuple[float, ...]] = {"mnist": (1.0, 2.0, 4.0), "cifar10": (0.25, 0.5, 1.0, 2.0)}
"""The L2 budgets ``uapx reproduce`` sweeps per data set (the study's own, ``EPS["l2"]``, among them)."""


def default_model(dataset: str) -> str:
    """The model a command uses when none is named: the zoo's natural model of ``dataset``."""
    return f"zoo:{dataset}-natural"


def default_eps(norm: str, dataset: str) -> float:
    """The default budget for ``norm`` ("l2" or "linf") on ``dataset``."""
    return EPS.get(norm, EPS["l2"]).get(dataset, OTHER_DATASET_EPS.get(norm, 1.0))


def default_step_size(eps: float, steps: int) -> float:
    """The default PGD step size, ``2.5 * eps / steps``."""
    return 2.5 * eps / max(int(steps), 1)


def check_eps(norm: str, eps: float) -> None:
    """A Linf budget of 1 or more allows any image in [0, 1]: a one-line error."""
    if norm == "linf" and eps >= 1:
        raise UapxError(f"a Linf eps of {eps:g} allows every image in [0, 1] (pixels lie in [0, 1])",
                        "pass --eps below 1, e.g. 0.3 on MNIST or 0.0314 (8/255) on CIFAR-10")


def described() -> str:
    """The defaults in words, for help texts: ``"l2: mnist 2, cifar10 0.5; linf: ..."``."""
    return "; ".join(f"{norm}: " + ", ".join(f"{d} {e:.4g}" for d, e in table.items()) for norm, table in EPS.items())
