"""Evaluation of universal perturbations: fooling rate, accuracy under x + v and x - v,
random directions of equal norm as the baseline, per-class breakdown, and for targeted UAPs the
targeted success rate.

The fooling verdict lives here and only here: a perturbed image is ``clamp(x + v, 0, 1)`` and it
fools the model when the prediction differs from the clean prediction.  A targeted UAP (one with
a ``target_class`` C) succeeds on an image when the perturbed prediction is C; its targeted
success rate counts the images whose clean prediction is not already C.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .methods import UAP
from .norms import check_norm, steepest
from .stats import wilson


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
    n: int = 0  # images evaluated
    fooling_wilson95: tuple[float, float] = (float("nan"), float("nan"))  # Wilson 95 % interval of fooling_rate
    targeted_success: float | None = None  # targeted UAPs: share of images not clean-classified C sent to C
    targeted_n: int = 0  # the images that share counts (clean prediction not C)
    targeted_wilson95: tuple[float, float] | None = None  # its Wilson 95 % interval

    @classmethod
    def measure(cls, pred: torch.Tensor, clean_pred: torch.Tensor, y: torch.Tensor, num_classes: int,
                target: int | None = None) -> "SignEffect":
        """The effect of the predictions ``pred`` ``(N,)`` against ``clean_pred`` and labels ``y``
        (``(N,)`` each); with ``target``, also the targeted success rate towards class ``target``."""
        fooled = pred != clean_pred
        per_class = {int(c): float(fooled[y == c].double().mean()) for c in y.unique()}
        hist = torch.bincount(pred[fooled], minlength=num_classes).float()
        pushed = (hist / hist.sum()).tolist() if hist.sum() > 0 else [0.0] * num_classes
        k, n = int(fooled.sum()), int(fooled.numel())
        eff = cls(float((pred == y).double().mean()), float(fooled.double().mean()), per_class, pushed, n,
                  wilson(k, n))
        if target is not None:
            eligible = clean_pred != target
            kt, nt = int((pred[eligible] == target).sum()), int(eligible.sum())
            eff.targeted_success = kt / nt if nt else float("nan")
            eff.targeted_n, eff.targeted_wilson95 = nt, wilson(kt, nt)
        return eff


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
    norm: str = "l2"
    target_class: int | None = None

    @property
    def best(self) -> SignEffect:
        return self.plus if self.sign > 0 else self.minus

    def __repr__(self) -> str:
        return (f"UAPEvaluation({self.name!r}, eps={self.eps:g}, fooling_rate={self.best.fooling_rate:.1%}, "
                f"accuracy={self.best.accuracy:.1%}, sign={'+' if self.sign > 0 else '-'})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fooling_rate"] = self.best.fooling_rate
        d["fooling_rate_wilson95"] = list(self.best.fooling_wilson95)
        d["accuracy"] = self.best.accuracy
        if self.target_class is not None:
            d["targeted_success"] = self.best.targeted_success
            d["targeted_success_wilson95"] = list(self.best.targeted_wilson95 or ())
        return d


def evaluate_uap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uap: UAP, *, clean_pred: torch.Tensor,
                 num_classes: int, batch_size: int = 500, device: str = "cpu") -> UAPEvaluation:
    """Apply ``uap`` as +v and -v to ``x`` ``(N, C, H, W)`` with labels ``y`` ``(N,)``.

    For a signless UAP (singular vectors) the sign with the higher fooling rate (targeted UAPs:
    targeted success rate) is kept; for others the +v effect is the UAP's effect and -v is
    reported beside it.
    """
    v = uap.vector.reshape(x.shape[1:])
    preds = [predict(model, x, batch_size=batch_size, device=device, v=s * v) for s in (1.0, -1.0)]
    return uap_evaluation(uap, preds[0], preds[1], clean_pred=clean_pred, y=y, num_classes=num_classes)


def uap_evaluation(uap: UAP, pred_plus: torch.Tensor, pred_minus: torch.Tensor, *, clean_pred: torch.Tensor,
                   y: torch.Tensor, num_classes: int, sign: int | None = None) -> UAPEvaluation:
    """The :class:`UAPEvaluation` of ``uap`` from the predictions ``(N,)`` under +v and -v; ``sign``
    (+1/-1) fixes the sign reported (held-out images keep the sign chosen on the fit images)."""
    target = getattr(uap, "target_class", None)
    effects = [SignEffect.measure(p, clean_pred, y, num_classes, target) for p in (pred_plus, pred_minus)]
    if sign is None:
        score = [e.fooling_rate if target is None else e.targeted_success for e in effects]
        sign = -1 if uap.signless and score[1] > score[0] else 1
    ev = UAPEvaluation(uap.name, uap.eps, effects[0], effects[1], sign, uap.source_class, uap.method,
                       meta=dict(uap.meta), norm=getattr(uap, "norm", "l2"), target_class=target)
    if uap.source_class is not None:
        best = ev.best.per_class_fooling
        on = best.get(uap.source_class)
        off = [f for c, f in best.items() if c != uap.source_class]
        ev.on_class_fooling = on
        ev.off_class_fooling = sum(off) / len(off) if off else None
    return ev


def random_baseline(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, clean_pred: torch.Tensor,
                    num_classes: int, draws: int = 5, seed: int = 0, batch_size: int = 500,
                    device: str = "cpu", norm: str = "l2", target: int | None = None) -> dict:
    """Fooling rate and accuracy (and, with ``target``, targeted success rate) under random
    directions of size ``eps`` in ``norm`` (:func:`random_directions`).

    Returns mean, standard deviation, min and max over ``draws`` directions.
    """
    vs = random_directions(x.shape[1:], eps, draws=draws, seed=seed, norm=norm)
    preds = [predict(model, x, batch_size=batch_size, device=device, v=v) for v in vs]
    return baseline_stats(eps, preds, clean_pred=clean_pred, y=y, num_classes=num_classes, norm=norm, target=target)


def random_directions(shape: tuple[int, ...] | torch.Size, eps: float, *, draws: int, seed: int,
                      norm: str = "l2") -> torch.Tensor:
    """``(draws, *shape)`` random directions of size ``eps`` in ``norm``, made from Gaussian draws
    the way a UAP is made from a direction (:func:`uapx.norms.steepest`): scaled to L2 norm ``eps``,
    or ``eps * sign`` (a uniformly random vertex of the Linf ball).  The same draws for every eps."""
    check_norm(norm)
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(shape, generator=g) for _ in range(draws)]
    return torch.stack([steepest(v.reshape(-1), eps, norm).reshape(shape) for v in vs]) if vs \
        else torch.empty(0, *shape)


def baseline_key(eps: float, norm: str = "l2", target: int | None = None) -> str:
    """The key of a random baseline in ``random_baseline`` sections: ``"2"`` (L2, untargeted),
    ``"0.3:linf"``, ``"0.3:linf:target-3"``."""
    return f"{eps:g}" + ("" if norm == "l2" else f":{norm}") + ("" if target is None else f":target-{target}")


def baseline_stats(eps: float, preds: list[torch.Tensor] | torch.Tensor, *, clean_pred: torch.Tensor,
                   y: torch.Tensor, num_classes: int, norm: str = "l2", target: int | None = None) -> dict:
    """Mean, sd, min and max fooling rate and accuracy over the predictions ``(N,)`` of each draw
    (pooled Wilson interval beside them); with ``target``, the same of the targeted success rate."""
    fool, acc, hit, k, n, kt, nt = [], [], [], 0, 0, 0, 0
    for p in preds:
        eff = SignEffect.measure(p, clean_pred, y, num_classes, target)
        fool.append(eff.fooling_rate)
        acc.append(eff.accuracy)
        k, n = k + round(eff.fooling_rate * eff.n), n + eff.n
        if target is not None:
            hit.append(eff.targeted_success)
            if eff.targeted_n:  # else every image is the target already: nothing to count
                kt, nt = kt + round(eff.targeted_success * eff.targeted_n), nt + eff.targeted_n

    def stats(vals: list[float]) -> dict:
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((a - m) ** 2 for a in vals) / max(len(vals) - 1, 1))
        return {"mean": m, "std": sd, "min": min(vals), "max": max(vals)}

    out = {"eps": eps, "draws": len(fool), "fooling_rate": {**stats(fool), "wilson95": list(wilson(k, n))},
           "accuracy": stats(acc)}
    if norm != "l2":
        out["norm"] = norm
    if target is not None and hit:
        out["target_class"] = int(target)
        out["targeted_success"] = {**stats(hit), "wilson95": list(wilson(kt, nt))}
    return out


# the prefix of a cheaper precision's entries in the evaluation info
_TAGS = {"bfloat16": "bf16", "int8": "int8"}


def evaluate_many(model: nn.Module, x: torch.Tensor, y: torch.Tensor, uaps: list[UAP], *, num_classes: int,
                  draws: int = 5, seed: int = 0, batch_size: int = 500, device: str = "cpu",
                  clean_pred: torch.Tensor | None = None, precision: str = "float32", compile: bool = False,
                  progress: bool = True, signs: dict[str, int] | None = None,
                  checked: dict | None = None) -> tuple[dict[str, UAPEvaluation], dict]:
    """Evaluate every UAP on ``(x, y)`` and the random baseline at each eps they use.

    Every perturbation (+v and -v of each UAP, the random draws) goes through one batched
    :func:`uapx.inference.predict_many` (many perturbations per forward pass, channels-last,
    inference mode); the clean predictions are computed once (or passed in).  ``precision``:
    ``"float32"`` (eager float32 numbers); ``"auto"``: refined evaluation (:mod:`uapx.inference`)
    on a ladder of the cheaper precisions the device has, cheapest first (int8 where the CPU has
    VNNI, :mod:`uapx.quantized`, its copy calibrated on the first of ``x``; bfloat16 where it has
    bfloat16 arithmetic), float32 on top: a prediction whose top-two margin on a rung is under
    :func:`~uapx.inference.refine_margin` of that rung's largest logit-error spread in the check
    is made again on the next, so that the predictions are float32's; a rung is kept where at most
    ``INT8_MAX_REFINED`` (int8) or ``BF16_MAX_REFINED`` (bfloat16) of the checked predictions
    would go up from it, and with no rung the evaluation is float32; ``"bfloat16"``: plain
    bfloat16 autocast where its predictions agree with float32 on at least 99.9 % of the checked
    ones, else float32 with a warning.  The check computes the clean images and the first UAPs'
    +v and -v images in float32 and in every cheaper precision (as many UAPs as it takes for
    :data:`uapx.inference.BF16_MIN_CHECKED` predictions).  ``batch_size`` is only used for the
    clean predictions when they are not given.  ``signs`` (UAP name -> +1/-1) fixes the sign
    reported for those UAPs instead of choosing it on these images (held-out evaluation).
    ``checked``: the ``"evaluation"`` entry of an earlier call on the same model and UAPs (the fit
    images); where it chose a ladder, its rungs and margins are used here without a check of their
    own (held-out images: one check per run), recorded as ``check_reused``.

    The random directions have each UAP's size, norm and target: one set of ``draws`` per
    ``(eps, norm, target)`` the UAPs use, keyed by :func:`baseline_key`.

    Returns ``(evaluations by UAP name, {"clean_accuracy", "random_baseline": {key: baseline},
    "evaluation": {"precision", "bf16_agreement", ...}})``.
    """
    from . import inference

    if precision not in inference.PRECISIONS:
        from .errors import UapxError

        raise UapxError(f"unknown evaluation precision {precision!r}", f"choose from: {', '.join(inference.PRECISIONS)}")
    if clean_pred is None:
        clean_pred = predict(model, x, batch_size=batch_size, device=device)
    shape = x.shape[1:]
    balls = sorted({(u.eps, getattr(u, "norm", "l2"), getattr(u, "target_class", None)) for u in uaps},
                   key=lambda b: (b[0], b[1], -1 if b[2] is None else b[2]))
    stacks = [torch.stack([s * u.vector.reshape(shape).float() for u in uaps for s in (1.0, -1.0)])] if uaps else []
    stacks += [random_directions(shape, e, draws=draws, seed=seed, norm=nm) for e, nm, _ in balls]
    vs = torch.cat(stacks) if stacks else torch.empty(0, *shape)
    n_all = int(clean_pred.shape[0])
    info: dict = {"precision": "float32", "rows_per_forward": inference.rows_per_forward(shape),
                  "compiled": bool(compile)}
    run = dict(device=device, compile=compile)
    # the cheaper precisions to check, cheapest first: int8 only for refined evaluation
    here = {"int8": precision == "auto" and inference.int8_supported(device),
            "bfloat16": precision != "float32" and inference.bf16_supported(device)}
    cheap = [p for p in inference.RUNGS if here[p]]
    ladder: list[tuple[str, float]] = []
    earlier = [tuple(r) for r in (checked or {}).get("ladder", [])]
    if precision == "auto" and earlier and all(p in cheap for p, _ in earlier) \
            and ("int8" not in dict(earlier) or inference.has_int8(model)):
        ladder, cheap = earlier, []  # the earlier check's rungs and margins; no check here
        info.update(precision=checked["precision"], check_reused=True,
                    **{k: v for k, v in checked.items() if k == "ladder" or "max_" in k or "refine_margin" in k})
    if "int8" in cheap and not inference.calibrate_int8(model, x):
        cheap.remove("int8")  # cannot be quantized: no int8 rung
    n_check = inference.bf16_check_count(n_all, vs.shape[0]) if cheap else 0
    with tqdm(total=(vs.shape[0] + len(cheap) * (n_check + 1) + (1 if cheap else 0)) * n_all, desc="evaluate",
              unit="img", disable=not (progress and distributed.is_main()), leave=False) as bar:
        preds = torch.empty(vs.shape[0], n_all, dtype=torch.long)
        done = 0
        if cheap:  # the clean images and the first UAPs' +v and -v, in float32 and every cheaper precision
            check = torch.cat([torch.zeros(1, *shape), vs[:n_check]])
            res = inference.logit_errors(model, x, check, precisions=cheap, bar=bar, **run)
            for p, rung in res.rungs.items():
                tag = _TAGS[p]
                info.update({f"{tag}_max_logit_error": rung.error, f"{tag}_max_spread": rung.spread})
            if "bfloat16" in res.rungs:
                ok, rate = inference.bf16_agrees(res.rungs["bfloat16"].pred,
                                                 torch.cat([clean_pred.view(1, -1), res.f32[1:]]))
                info.update(bf16_agreement=rate, bf16_checked_on=int(res.f32.numel()))
                if precision == "bfloat16" and ok:
                    info["precision"] = "bfloat16"
            if precision == "auto":
                for p, rung in res.rungs.items():
                    margin = inference.refine_margin(rung.spread)
                    share = float((rung.margins < margin).double().mean())
                    key = "refine_margin" if p == "bfloat16" else f"{_TAGS[p]}_refine_margin"
                    info.update({key: margin, key.replace("margin", "share_in_check"): share})
                    if share <= (inference.INT8_MAX_REFINED if p == "int8" else inference.BF16_MAX_REFINED):
                        ladder.append((p, margin))
                if ladder:
                    info.update(precision=f"{ladder[0][0]}-refined", ladder=[list(r) for r in ladder])
            preds[:n_check] = res.f32[1:]
            done = n_check
        if precision == "bfloat16" and info["precision"] != "bfloat16":
            import warnings

            warnings.warn("uapx: bfloat16 evaluation is unsupported here or disagrees with float32 "
                          f"(agreement {info.get('bf16_agreement', 'n/a')}); evaluating in float32", stacklevel=2)
        stats: dict = {}
        preds[done:] = inference.predict_many(model, x, vs[done:], precision=info["precision"].split("-")[0],
                                              ladder=ladder, bar=bar, stats=stats, **run)
        if ladder:
            remade = {p: int(distributed.all_reduce_scalar(float(n))) for p, n in stats["remade"].items()}
            predicted = distributed.all_reduce_scalar(float(stats["predicted"]))
            info.update(refined=remade["float32"], refined_share=remade["float32"] / max(predicted, 1.0),
                        remade=remade)
    evals = {u.name: uap_evaluation(u, preds[2 * i], preds[2 * i + 1], clean_pred=clean_pred, y=y,
                                    num_classes=num_classes, sign=(signs or {}).get(u.name))
             for i, u in enumerate(uaps)}
    start = 2 * len(uaps)
    baselines = {}
    for j, (e, nm, t) in enumerate(balls):
        baselines[baseline_key(e, nm, t)] = baseline_stats(e, preds[start + j * draws:start + (j + 1) * draws],
                                                           clean_pred=clean_pred, y=y, num_classes=num_classes,
                                                           norm=nm, target=t)
    return evals, {"clean_accuracy": float((clean_pred == y).double().mean()), "random_baseline": baselines,
                   "evaluation": info}
