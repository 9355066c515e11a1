"""Evaluation of universal perturbations: fooling rate, accuracy under x + v and x - v,
random directions of equal norm as the baseline, per-class breakdown.

The fooling verdict lives here and only here: a perturbed image is ``clamp(x + v, 0, 1)`` and it
fools the model when the prediction differs from the clean prediction.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import distributed
from .methods import UAP


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500, device: str = "cpu",
            v: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions ``(N,)`` for images ``x`` ``(N, C, H, W)``, perturbed by ``clamp(x + v, 0, 1)``.

    Under torch.distributed ``x`` is this rank's shard and the predictions of every rank's
    shard are returned, in rank order (N integers travel, never the images).
    """
    out = []
    vd = None if v is None else v.to(device)
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size].to(device)
        if vd is not None:
            xb = (xb + vd).clamp_(0.0, 1.0)
        out.append(model(xb).argmax(1).cpu())
    return distributed.all_gather_rows(torch.cat(out) if out else torch.empty(0, dtype=torch.long))


@dataclass
class SignEffect:
    """What one perturbation did to a set of images."""

    accuracy: float
    fooling_rate: float
    per_class_fooling: dict[int, float]
    pushed_to: list[float]  # fraction of changed predictions landing in each class

    @classmethod
    def measure(cls, pred: torch.Tensor, clean_pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> "SignEffect":
        fooled = pred != clean_pred
        per_class = {int(c): float(fooled[y == c].double().mean()) for c in y.unique()}
        hist = torch.bincount(pred[fooled], minlength=num_classes).float()
        pushed = (hist / hist.sum()).tolist() if hist.sum() > 0 else [0.0] * num_classes
        return cls(float((pred == y).double().mean()), float(fooled.double().mean()), per_class, pushed)


@dataclass
class UAPEvaluation:
    """A UAP's effect: +v and -v, which sign is kept, and class-specific on/off-class effect."""

    name: str
    eps: float
    plus: SignEffect
    minus: SignEffect
    sign: int  # +1 or -1: the sign reported as the UAP's effect
    source_class: int | None = None
    method: str = ""
    on_class_fooling: float | None = None
    off_class_fooling: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def best(self) -> SignEffect:
        return self.plus if self.sign > 0 else self.minus

    def __repr__(self) -> str:
        return (f"UAPEvaluation({self.name!r}, eps={self.eps:g}, fooling_rate={self.best.fooling_rate:.1%}, "
                f"accuracy={self.best.accuracy:.1%}, sign={'+' if self.sign > 0 else '-'})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fooling_rate"] = self.best.fooling_rate
        d["accuracy"] = self.best.accuracy
        return d


def evaluate_uap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uap: UAP, *, clean_pred: torch.Tensor,
                 num_classes: int, batch_size: int = 500, device: str = "cpu") -> UAPEvaluation:
    """Apply ``uap`` as +v and -v to ``x`` ``(N, C, H, W)`` with labels ``y`` ``(N,)``.

    For a signless UAP (singular vectors) the sign with the higher fooling rate is kept; for
    others the +v effect is the UAP's effect and -v is reported beside it.
    """
    v = uap.vector.reshape(x.shape[1:])
    effects = [SignEffect.measure(predict(model, x, batch_size=batch_size, device=device, v=s * v),
                                  clean_pred, y, num_classes) for s in (1.0, -1.0)]
    sign = -1 if uap.signless and effects[1].fooling_rate > effects[0].fooling_rate else 1
    ev = UAPEvaluation(uap.name, uap.eps, effects[0], effects[1], sign, uap.source_class, uap.method,
                       meta=dict(uap.meta))
    if uap.source_class is not None:
        best = ev.best.per_class_fooling
        on = best.get(uap.source_class)
        off = [f for c, f in best.items() if c != uap.source_class]
        ev.on_class_fooling = on
        ev.off_class_fooling = sum(off) / len(off) if off else None
    return ev


def random_baseline(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, clean_pred: torch.Tensor,
                    num_classes: int, draws: int = 5, seed: int = 0, batch_size: int = 500,
                    device: str = "cpu") -> dict:
    """Fooling rate and accuracy under random directions of L2 norm ``eps`` (Gaussian, normalised).

    Returns mean, standard deviation, min and max over ``draws`` directions.
    """
    g = torch.Generator().manual_seed(seed)
    fool, acc = [], []
    for _ in range(draws):
        v = torch.randn(x.shape[1:], generator=g)
        v = v * (eps / v.norm())
        eff = SignEffect.measure(predict(model, x, batch_size=batch_size, device=device, v=v), clean_pred, y,
                                 num_classes)
        fool.append(eff.fooling_rate)
        acc.append(eff.accuracy)

    def stats(vals: list[float]) -> dict:
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((a - m) ** 2 for a in vals) / max(len(vals) - 1, 1))
        return {"mean": m, "std": sd, "min": min(vals), "max": max(vals)}

    return {"eps": eps, "draws": draws, "fooling_rate": stats(fool), "accuracy": stats(acc)}


def evaluate_many(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uaps: list[UAP], *, num_classes: int,
                  draws: int = 5, seed: int = 0, batch_size: int = 500, device: str = "cpu",
                  clean_pred: torch.Tensor | None = None) -> tuple[dict[str, UAPEvaluation], dict]:
    """Evaluate every UAP on ``(x, y)`` and the random baseline at each eps they use.

    Returns ``(evaluations by UAP name, {"clean_accuracy", "random_baseline": {eps: baseline}})``.
    """
    if clean_pred is None:
        clean_pred = predict(model, x, batch_size=batch_size, device=device)
    evals = {u.name: evaluate_uap(model, x, y, u, clean_pred=clean_pred, num_classes=num_classes,
                                  batch_size=batch_size, device=device) for u in uaps}
    baselines = {f"{e:g}": random_baseline(model, x, y, e, clean_pred=clean_pred, num_classes=num_classes,
                                           draws=draws, seed=seed, batch_size=batch_size, device=device)
                 for e in sorted({u.eps for u in uaps})}
    return evals, {"clean_accuracy": float((clean_pred == y).double().mean()), "random_baseline": baselines}
