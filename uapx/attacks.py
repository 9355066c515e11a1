"""PGD attacks (L2 and Linf), with optional trajectory recording, and the attack plugin base.

The one PGD loop in uapx is :func:`pgd_trajectory`; :func:`pgd` is it without recording.  What
differs per norm (the random start, the step with its projection) is one entry of
:data:`NORM_STEPS`; the L2 entry is the fused op :func:`uapx.ops.l2_pgd_step_`.  Attack plugins
subclass the abstract :class:`Attack`; :class:`PGD` implements it.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import norms, ops
from .defaults import check_eps, default_step_size
from .errors import UapxError
from .settings import Configurable

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_budget(eps: float, steps: int, step_size: float) -> None:
    """One-line errors for an impossible attack budget."""
    if not (eps > 0) or eps != eps or eps == float("inf"):
        raise UapxError(f"eps must be a positive finite number, got {eps}", "pass --eps > 0, e.g. --eps 2.0")
    if not isinstance(steps, (int, float)) or steps != steps or steps in (float("inf"), float("-inf")) \
            or int(steps) != steps or steps < 1:
        raise UapxError(f"steps must be a whole number >= 1, got {steps}", "pass --steps 1 or more")
    if not (step_size > 0) or step_size == float("inf"):
        raise UapxError(f"step size must be positive, got {step_size}", "pass --step-size > 0")


@dataclass
class Trajectory:
    """What PGD did, per step, for the recorded samples.

    Attributes:
        index: ``(m,)`` positions in the batch of the recorded samples.
        grads: ``(steps, m, d)`` loss gradient w.r.t. the input at each step's iterate.
        deltas: ``(steps, m, d)`` perturbation *after* each step.
        losses: ``(steps, m)`` loss at each step's iterate (before the step).
    """

    index: torch.Tensor
    grads: torch.Tensor
    deltas: torch.Tensor
    losses: torch.Tensor


def _trajectory_buffer(folder: str | os.PathLike | None, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape``: in memory, or memory-mapped from ``folder/name.npy``."""
    if folder is None:
        return torch.empty(shape)
    path = Path(folder) / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                      shape=shape))


# ----------------------------------------------------------------------------- per norm: start, step

def _l2_noise(x0: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """``(N, ...)`` points uniform in the L2 ball of radius ``eps`` (on the CPU)."""
    n, d = x0.shape[0], x0[0].numel()
    dirs = torch.randn(n, d, generator=generator, device="cpu")
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    radius = torch.rand(n, 1, generator=generator, device="cpu") ** (1.0 / d) * eps
    return (dirs * radius).view_as(x0)


def _linf_noise(x0: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """``(N, ...)`` points uniform in the Linf ball of radius ``eps`` (on the CPU)."""
    return (torch.rand(x0.shape, generator=generator, device="cpu") * 2 - 1) * eps


def _l2_step_(xa: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor:
    """Normalised-gradient step, projection onto the L2 ball and the [0, 1] box: the fused op."""
    return ops.l2_pgd_step_(xa, x0, grad, step_size, eps, 0.0, 1.0)


def _linf_step_(xa: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor:
    """Signed-gradient step, projection onto the Linf ball (:mod:`uapx.norms`) and the [0, 1] box."""
    return (x0 + norms.project(xa + norms.steepest(grad, step_size, "linf") - x0, eps, "linf")).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class NormSteps:
    """How PGD moves under one threat model.

    Attributes:
        noise: ``noise(x0, eps, generator)``: ``x0``-shaped points uniform in the eps-ball (random start).
        step: ``step(x, x0, grad, step_size, eps)``: the next iterate from ``x`` (which it may
            overwrite): a step along ``grad``, then projection onto the eps-ball around ``x0``
            and the [0, 1] box.
    """

    noise: Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


NORM_STEPS: dict[str, NormSteps] = {  # one entry per norm of uapx.norms.NORMS
    "l2": NormSteps(_l2_noise, _l2_step_),
    "linf": NormSteps(_linf_noise, _linf_step_),
}


def _random_start(x0: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    return (x0 + NORM_STEPS[norm].noise(x0, eps, generator).to(x0.device)).clamp_(0.0, 1.0)


def pgd_trajectory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "l2", eps: float,
                   steps: int, step_size: float, random_start: bool = False, targeted: bool = False,
                   loss_fn: LossFn | None = None, record: bool | torch.Tensor = False,
                   generator: torch.Generator | None = None,
                   record_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, Trajectory | None]:
    """Batched PGD; returns ``(x_adv, trajectory)``.

    Args:
        model: classifier taking ``(N, C, H, W)`` images in [0, 1].
        x: ``(N, C, H, W)`` clean images in [0, 1].
        y: ``(N,)`` labels (the target labels when ``targeted``).
        norm: ``"l2"`` or ``"linf"``.
        eps, steps, step_size: the budget.
        random_start: start from a uniform point of the eps-ball.
        targeted: minimise the loss towards ``y`` instead of maximising it away from ``y``.
        loss_fn: ``loss_fn(logits, y) -> (N,)`` per-sample loss; cross-entropy by default.
        record: False, True (all samples) or a ``(m,)`` index tensor of samples to record.
        generator: CPU generator for the random start.
        record_dir: stream the recorded tensors to ``grads.npy``, ``deltas.npy`` and
            ``losses.npy`` in this folder (NumPy files, memory-mapped) instead of holding them in memory,
            for trajectories too large for RAM; the returned tensors are views of those files.
    Returns:
        ``x_adv`` ``(N, C, H, W)`` and a :class:`Trajectory` (or None without ``record``).
    """
    norms.check_norm(norm)
    check_budget(eps, steps, step_size)
    steps_of = NORM_STEPS[norm]
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
    x0 = x.detach().float().contiguous()
    xa = _random_start(x0, norm, eps, generator) if random_start else x0.clone()
    n = x0.shape[0]
    if record is True:
        rec_idx = torch.arange(n)
    elif record is False or record is None:
        rec_idx = None
    else:
        rec_idx = torch.as_tensor(record, dtype=torch.long).reshape(-1)
        if rec_idx.numel() and (int(rec_idx.min()) < 0 or int(rec_idx.max()) >= n):
            raise UapxError(f"record indices must lie in [0, {n}), got {rec_idx.tolist()[:5]}",
                            "pass positions of samples in the batch")
    if rec_idx is not None:
        m, d = rec_idx.numel(), x0[0].numel()
        grads = _trajectory_buffer(record_dir, "grads", (steps, m, d))
        deltas = _trajectory_buffer(record_dir, "deltas", (steps, m, d))
        losses = _trajectory_buffer(record_dir, "losses", (steps, m))
    sign = -1.0 if targeted else 1.0
    for t in range(steps):
        xa.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(xa), y)
            if loss.shape != (n,):
                raise UapxError(f"loss_fn must return per-sample losses of shape ({n},), got {tuple(loss.shape)}",
                                "use reduction='none' in the loss")
            (grad,) = torch.autograd.grad(loss.sum() * sign, xa)
        xa = xa.detach()
        if not torch.isfinite(grad).all():
            raise UapxError(f"the loss gradient became NaN or Inf at PGD step {t + 1}",
                            "check the model and inputs for NaN/Inf, or lower --step-size")
        if rec_idx is not None:
            grads[t] = (grad[rec_idx] * sign).reshape(m, -1).cpu()
            losses[t] = loss.detach()[rec_idx].cpu()
        xa = steps_of.step(xa, x0, grad, step_size, eps)
        if rec_idx is not None:
            deltas[t] = (xa[rec_idx] - x0[rec_idx]).reshape(m, -1).cpu()
    traj = Trajectory(rec_idx, grads, deltas, losses) if rec_idx is not None else None
    return xa.detach(), traj


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "l2", eps: float, steps: int,
        step_size: float, random_start: bool = False, targeted: bool = False, loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched PGD (see :func:`pgd_trajectory`); returns ``x_adv`` ``(N, C, H, W)`` in [0, 1]."""
    return pgd_trajectory(model, x, y, norm=norm, eps=eps, steps=steps, step_size=step_size,
                          random_start=random_start, targeted=targeted, loss_fn=loss_fn,
                          generator=generator)[0]


class Attack(Configurable, ABC):
    """Base of attack plugins: configuration in the constructor, data at call time.

    Subclasses set ``name``, ``description`` and ``norm``, keep their constructor settings as
    attributes of the same name (``repr`` and :meth:`settings` read them) with at least ``eps``,
    and implement :meth:`__call__`.  :class:`PGD` is the built-in implementation.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    norm: ClassVar[str] = "l2"
    eps: float

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, record: bool | torch.Tensor = False,
                 generator: torch.Generator | None = None, random_start: bool | None = None,
                 record_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, Trajectory | None]:
        """Attack ``x`` ``(N, C, H, W)`` in [0, 1] with labels ``y`` ``(N,)``.

        Args:
            record: False, True (every sample) or ``(m,)`` positions whose trajectory to record.
            generator: CPU generator for random starts.
            random_start: start from a random point of the eps-ball (``None``: the attack's setting).
            record_dir: stream recorded trajectories to this folder (see :func:`pgd_trajectory`).
        Returns:
            ``x_adv`` ``(N, C, H, W)`` and a :class:`Trajectory` of the recorded samples (or None).
        """


class PGD(Attack):
    """Projected gradient descent in the attack's ``norm`` (:func:`pgd_trajectory`); the step size
    defaults to :func:`uapx.defaults.default_step_size`.  With ``target_class=C`` the attack is
    targeted: every image descends the loss of class ``C`` (its label is ignored)."""

    def __init__(self, *, eps: float, steps: int, step_size: float | None = None, random_start: bool = False,
                 target_class: int | None = None) -> None:
        if step_size is None:
            step_size = default_step_size(eps, steps)
        check_budget(eps, steps, step_size)
        check_eps(self.norm, float(eps))
        self.eps, self.steps, self.step_size, self.random_start = float(eps), int(steps), float(step_size), random_start
        self.target_class = norms.check_target_class(target_class)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, record: bool | torch.Tensor = False,
                 generator: torch.Generator | None = None, random_start: bool | None = None,
                 record_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, Trajectory | None]:
        start = self.random_start if random_start is None else random_start
        targeted = self.target_class is not None
        if targeted:
            y = torch.full_like(y, self.target_class)
        return pgd_trajectory(model, x, y, norm=self.norm, eps=self.eps, steps=self.steps,
                              step_size=self.step_size, random_start=start, targeted=targeted, record=record,
                              generator=generator, record_dir=record_dir)
