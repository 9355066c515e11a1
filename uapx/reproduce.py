"""``uapx reproduce``: the whole study of the source talk in one command.

Runs ``analyze`` on the zoo's natural and L2-adversarially trained models for MNIST and CIFAR-10
on the real test sets, then writes one combined report whose first section states each of the
four findings of the talk, the numbers this run measured for it, and whether they support it.
The criteria are fixed here, in code, before any number is seen; a finding whose models are not
installed is reported as not measured.

Each model's analysis is kept in ``<out>.parts/<model>/`` as it completes, so a killed run started
again with the same command resumes; the combined report folder is written atomically.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import atomic, models
from .errors import UapxError
from .pipeline import AnalyzeConfig, analyze
from .plots import plt
from .registry import Registry, get_registry
from .report import Report, check_output_folder

STUDY = {  # dataset -> (natural model, adversarial model, eps)
    "mnist": ("zoo:mnist-natural", "zoo:mnist-l2", 2.0),
    "cifar10": ("zoo:cifar10-natural", "zoo:cifar10-l2", 0.5),
}
PLUGINS = ["average", "svd", "spectrum", "trajectory", "interpretability", "landscape",
           "local-linearity", "gradalign", "cure", "hessian", "subspace"]
LANDSCAPE_MEASURES = ["local-linearity", "gradalign", "cure", "hessian"]  # per-image means, with control
# The criteria, fixed in advance.
MNIST_SLOW_DECAY = 0.5  # sigma5 / sigma1 at least this: "several universal directions" (talk: 1.8/2.7 = 0.67)
CIFAR_DROP = 10.0  # sigma1 / sigma2 at least this: "an order-of-magnitude drop"


def robust_models(dataset: str) -> list[str]:
    """Every robust model of ``dataset`` the study judges against its natural model: the study's own
    (``STUDY``) and every adversarially trained zoo model of the data set (discovered from the zoo)."""
    found = [f"zoo:{n}" for n in models.zoo.robust_names(dataset)]
    return list(dict.fromkeys([STUDY[dataset][1], *found]))


@dataclass
class ReproduceConfig:
    """The study's settings; ``n_samples`` images per model (more on a GPU)."""

    data_root: str | None = None
    n_samples: int = 1000
    steps: int = 20
    trajectory_samples: int = 100
    batch_size: int = 250
    device: str = "cpu"
    seed: int = 0
    out: str = "uapx-study"
    overwrite: bool = False
    datasets: list[str] = field(default_factory=lambda: ["mnist", "cifar10"])


def _run_one(c: ReproduceConfig, dataset: str, model: str, eps: float, parts: Path, reg: Registry) -> dict | None:
    """Analyze one model (or reuse its finished part); None when the zoo lacks the model."""
    name = model.split(":", 1)[1]
    try:
        models.zoo.path(name)
    except UapxError:
        return None
    cfg = AnalyzeConfig(dataset=dataset, data_root=c.data_root, model=model, plugins=PLUGINS, eps=eps,
                        split="train", eval_split="test", eval_n_samples=c.n_samples,  # held-out evaluation
                        steps=c.steps, n_samples=c.n_samples, batch_size=c.batch_size, device=c.device,
                        seed=c.seed, trajectory_samples=c.trajectory_samples, out=str(parts / name), overwrite=True)
    done = parts / name / "report.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        if rep.get("config") == asdict(cfg.resolved()):
            return rep
    return analyze(cfg, registry=reg).report


def reproduce(config: ReproduceConfig, *, registry: Registry | None = None) -> Path:
    """Run the study and write the combined report folder; returns its path."""
    reg = registry or get_registry()
    c = config
    out = check_output_folder(c.out, overwrite=c.overwrite, claim=True)  # released once written
    reg.check_names(PLUGINS)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict | None] = {}
    for dataset in c.datasets:
        natural, _, eps = STUDY[dataset]
        for model in (natural, *robust_models(dataset)):
            runs[model] = _run_one(c, dataset, model, eps, parts, reg)

    report = Report("uapx study: universal perturbations of natural and adversarially trained models",
                    order=["findings", "uap-images", "spectra", "trajectories", "landscape", "runs"])
    findings, summary_lines = judge(runs)
    report.data["findings"] = findings
    report.summaries["findings"] = "\n".join(summary_lines)
    report.data["runs"] = {m: (_run_digest(r) if r else {"status": "not measured: model not installed",
                                                          "fix": "train it with 'uapx train' (see README)"})
                           for m, r in runs.items()}
    report.data["config"] = asdict(c)
    _comparison_plots(report, runs, parts)
    report.summaries["landscape"] = " ".join(
        f"{m}: " + "; ".join(f"{k} {v['mean']:.4g} ± {v['se']:.2g} (control {v['control_mean']:.4g})"
                             for k, v in _landscape_measures(r).items() if k != "subspace") + "."
        for m, r in runs.items() if r)
    with atomic.atomic_path(out, directory=True, replace=c.overwrite) as tmp:
        for model, rep in runs.items():
            if rep is not None:
                shutil.copytree(parts / model.split(":", 1)[1], tmp / model.split(":", 1)[1])
        report.write_into(tmp)
    atomic.release(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _get(rep: dict | None, *path, default=None):
    cur = rep
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return default
        cur = cur[p]
    return cur


def _run_digest(rep: dict) -> dict:
    sv = _get(rep, "diagnostics", "spectrum", "global", "singular_values", default=[])
    return {
        "report": f"{rep['config']['model'].split(':', 1)[1]}/index.html",
        "n_images": rep["attack"]["n_images"], "eps": rep["config"]["eps"],
        "clean_accuracy": rep["attack"]["clean_accuracy"],
        "adversarial_accuracy": rep["attack"]["adversarial_accuracy"],
        "top_singular_values": sv[:5],
        "sigma1_over_sigma2": _get(rep, "diagnostics", "spectrum", "global", "sigma1_over_sigma2"),
        "best_uap_fooling_rate": max((e["fooling_rate"] for n, e in rep["uaps"]["evaluations"].items()
                                      if ":class-" not in n), default=None),
        "random_fooling_rate": rep["uaps"]["random_baseline"]["fooling_rate"]["mean"],
        "landscape_measures": _landscape_measures(rep),
    }


def _landscape_measures(rep: dict) -> dict:
    """Mean +- bootstrap s.e. of each landscape measure beside its control, and the subspace test's
    held-out fooling rate at the largest k against random vectors (Wilson 95 % intervals)."""
    out = {}
    for name in LANDSCAPE_MEASURES:
        m = _get(rep, "diagnostics", name)
        if m:
            out[name] = {"mean": m["measure"]["mean"], "se": m["measure"]["se"],
                         "control_mean": m["control"]["mean"], "control_se": m["control"]["se"]}
    sub = _get(rep, "diagnostics", "subspace")
    if sub:
        k = str(sub["k"][-1])
        out["subspace"] = {"k": int(k), **{f"subspace_{a}": sub["subspace"][k][a] for a in ("fooling_rate", "wilson_95")},
                           **{f"random_{a}": sub["random"][a] for a in ("fooling_rate", "wilson_95")}}
    return out


def _energy(rep: dict) -> float:
    e = _get(rep, "diagnostics", "interpretability", "data_subspace_energy", default={})
    glob = [v for k, v in e.items() if ":class-" not in k]
    return sum(glob) / len(glob) if glob else float("nan")


def _alignment(rep: dict) -> float:
    a = _get(rep, "diagnostics", "interpretability", "class_alignment", default={})
    return sum(abs(v) for v in a.values()) / len(a) if a else float("nan")


def judge(runs: dict[str, dict | None]) -> tuple[dict, list[str]]:
    """Each finding: the claim, the criterion, what was measured, and the verdict."""
    f: dict[str, dict] = {}
    nat_m, adv_m = runs.get(STUDY["mnist"][0]), runs.get(STUDY["mnist"][1])
    nat_c, adv_c = runs.get(STUDY["cifar10"][0]), runs.get(STUDY["cifar10"][1])

    def missing(*names):
        return {"verdict": "not measured",
                "why": f"zoo model(s) not installed: {', '.join(n for n, r in names if r is None)}"}

    claim1 = "Adversarial training induces more human-interpretable UAPs (MNIST: strokes vs noise)."
    crit1 = ("robust MNIST UAPs keep more energy in the images' top principal components AND align more "
             "(|cosine|) with their class-mean differences than the natural model's")
    if nat_m and adv_m:
        m = {"energy_natural": _energy(nat_m), "energy_adversarial": _energy(adv_m),
             "class_alignment_natural": _alignment(nat_m), "class_alignment_adversarial": _alignment(adv_m),
             "energy_random": _get(nat_m, "diagnostics", "interpretability", "random_subspace_energy", "mean")}
        ok = m["energy_adversarial"] > m["energy_natural"] and m["class_alignment_adversarial"] > m[
            "class_alignment_natural"]
        f["1_interpretability"] = {"claim": claim1, "criterion": crit1, "measured": m,
                                   "verdict": "supported" if ok else "not supported"}
    else:
        f["1_interpretability"] = {"claim": claim1, "criterion": crit1,
                                   **missing((STUDY["mnist"][0], nat_m), (STUDY["mnist"][1], adv_m))}

    claim2 = "MNIST: the top singular values decay slowly (talk: 2.7, 2.5, 2.1, 2.0, 1.8): several directions."
    crit2 = f"sigma5 / sigma1 >= {MNIST_SLOW_DECAY} for each MNIST model"
    f["2_mnist_spectrum"] = _spectrum_finding(claim2, crit2, [(STUDY["mnist"][0], nat_m), (STUDY["mnist"][1], adv_m)],
                                              lambda sv: sv[4] / sv[0] >= MNIST_SLOW_DECAY, "sigma5_over_sigma1",
                                              lambda sv: sv[4] / sv[0])
    claim3 = "CIFAR-10: one large singular value (talk: 54.4), then an order-of-magnitude drop."
    crit3 = f"sigma1 / sigma2 >= {CIFAR_DROP:g} for each CIFAR-10 model"
    f["3_cifar_spectrum"] = _spectrum_finding(claim3, crit3, [(STUDY["cifar10"][0], nat_c),
                                                              (STUDY["cifar10"][1], adv_c)],
                                              lambda sv: sv[0] / sv[1] >= CIFAR_DROP, "sigma1_over_sigma2",
                                              lambda sv: sv[0] / sv[1])

    claim4 = ("Adversarial training smooths the loss landscape: along a PGD trajectory the gradient has a high "
              "cosine similarity to the average gradient at the final step.")
    crit4 = ("for each data set with both models, the adversarial model's mean cosine similarity over the "
             "trajectory is higher than the natural model's; judged separately for the three readings of "
             "'average gradient at the final step'")
    readings = {}
    for ref in ("universal", "own_final", "own_mean"):
        per = {}
        for ds in STUDY:
            nat, adv = runs.get(STUDY[ds][0]), runs.get(STUDY[ds][1])
            if nat and adv:
                a = _get(adv, "diagnostics", "trajectory", ref, "mean_over_trajectory")
                n = _get(nat, "diagnostics", "trajectory", ref, "mean_over_trajectory")
                per[ds] = {"natural": n, "adversarial": a, "higher_for_adversarial": a > n}
        readings[ref] = {"per_dataset": per, "verdict": ("not measured" if not per else "supported" if all(
            v["higher_for_adversarial"] for v in per.values()) else "not supported")}
    if not any(r["per_dataset"] for r in readings.values()):
        pairs = [(m, runs.get(m)) for ds in STUDY for m in STUDY[ds][:2]]
        readings = {"why": "no data set has both its natural and adversarial zoo model installed (missing: "
                           + ", ".join(m for m, r in pairs if r is None) + ")", **readings}
    verdicts = {r["verdict"] for k, r in readings.items() if k != "why"}
    f["4_trajectory"] = {"claim": claim4, "criterion": crit4, "readings": readings,
                         "verdict": ("not measured" if verdicts == {"not measured"} else
                                     "supported" if verdicts == {"supported"} else
                                     "not supported" if verdicts == {"not supported"} else
                                     "mixed: " + ", ".join(f"{k} {v['verdict']}" for k, v in readings.items()
                                                           if k != "why"))}

    lines = []
    for key, item in f.items():
        num = key.split("_", 1)[0]
        what = item.get("measured") or item.get("readings") or item.get("why")
        lines.append(f"Finding {num}: {item['claim']} Verdict: {item['verdict'].upper()}. "
                     f"Criterion: {item['criterion']}. Measured: {_short(what)}")
    return f, lines


def _spectrum_finding(claim, crit, pairs, test, label, value) -> dict:
    measured, oks = {}, []
    for model, rep in pairs:
        sv = _get(rep, "diagnostics", "spectrum", "global", "singular_values")
        if rep is None or not sv or len(sv) < 5:
            continue
        measured[model] = {"top5": sv[:5], label: value(sv)}
        oks.append(test(sv))
    if not measured:
        return {"claim": claim, "criterion": crit, "verdict": "not measured",
                "why": f"zoo model(s) not installed: {', '.join(m for m, r in pairs if r is None)}"}
    verdict = "supported" if all(oks) else "not supported" if not any(oks) else "partly supported"
    missing = [m for m, r in pairs if r is None]
    if missing:
        verdict += f" (measured on {', '.join(measured)} only; not installed: {', '.join(missing)})"
    return {"claim": claim, "criterion": crit, "measured": measured, "verdict": verdict,
            **({"not_measured": missing} if missing else {})}


def _short(obj) -> str:
    if isinstance(obj, float):
        return f"{obj:.3g}"
    if isinstance(obj, bool):
        return str(obj).lower()
    if isinstance(obj, list):
        return "[" + ", ".join(_short(v) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + "; ".join(f"{k}: {_short(v)}" for k, v in obj.items()) + "}"
    return str(obj)


def _comparison_plots(report: Report, runs: dict[str, dict | None], parts: Path) -> None:
    done = {m: r for m, r in runs.items() if r}
    if not done:
        return
    studied = {ds: v for ds, v in STUDY.items() if v[0] in done or v[1] in done}
    fig, axes = plt.subplots(1, len(studied), figsize=(5 * len(studied), 3.4), squeeze=False)
    for ax, (ds, (nat, adv, eps)) in zip(axes[0], studied.items()):
        for model, style in ((nat, "o-"), (adv, "s--")):
            sv = _get(done.get(model), "diagnostics", "spectrum", "global", "singular_values")
            if sv:
                ax.semilogy(range(1, len(sv) + 1), sv, style, label=model)
        ax.set_title(f"{ds}, eps {eps:g}", fontsize=9)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=7)
    report.add_plot("spectra", "natural-vs-adversarial", fig,
                    "Singular values of the perturbation matrices: natural (solid) against adversarial (dashed), "
                    "MNIST beside CIFAR-10.")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for ax, ref in zip(axes, ("universal", "own_final", "own_mean")):
        for model, rep in done.items():
            mu = _get(rep, "diagnostics", "trajectory", ref, "mean_per_step")
            if mu:
                sd = torch.tensor(_get(rep, "diagnostics", "trajectory", ref, "std_per_step"))
                t = torch.arange(1, len(mu) + 1)
                m = torch.tensor(mu)
                ax.plot(t, m, label=model, ls="--" if model.endswith("-l2") else "-")
                ax.fill_between(t, m - sd, m + sd, alpha=0.15)
        ax.set_title(f"reference: {ref}", fontsize=9)
        ax.set_xlabel("PGD step")
        ax.set_ylim(-1.05, 1.05)
    axes[0].set_ylabel("cosine similarity")
    axes[0].legend(fontsize=7)
    report.add_plot("trajectories", "natural-vs-adversarial", fig,
                    "Cosine similarity of the gradient at each PGD step to the three references (mean ± sd over "
                    "images): natural (solid) against adversarial (dashed) models.")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for model, rep in done.items():
        prof = _get(rep, "diagnostics", "landscape", "profiles", default={})
        t = _get(rep, "diagnostics", "landscape", "t")
        for name in ("svd:v1", "random-1"):
            if name in prof:
                ax.plot(t, prof[name], ls="--" if name.startswith("random") else "-", label=f"{model} {name}")
    ax.set_xlabel("t")
    ax.set_ylabel("mean cross-entropy")
    ax.legend(fontsize=6)
    report.add_plot("landscape", "natural-vs-adversarial", fig,
                    "Loss along the top singular direction (solid) and a random direction (dashed) per model.")
    _uap_images(report, done, parts)


def _uap_images(report: Report, done: dict[str, dict], parts: Path) -> None:
    """The global UAPs and the class-specific averages of every model, one row per model."""
    from .methods import load_uaps
    from .plots import image_grid

    vecs, titles = [], []
    cols = 4 + 10
    for model, rep in done.items():
        uaps = {u.name: u for u in load_uaps(parts / model.split(":", 1)[1] / "uaps.pt")}
        evs = rep["uaps"]["evaluations"]
        names = ["average", "svd:v1", "svd:v2", "svd:v3"] + [f"average:class-{k}" for k in range(10)]
        for n in names:
            if n in uaps:
                vecs.append(uaps[n].vector * evs[n]["sign"])
                titles.append(f"{model.split(':', 1)[1]} {n.replace('average:', '')}")
            else:
                vecs.append(torch.zeros_like(next(iter(uaps.values())).vector))
                titles.append("")
    if vecs:
        report.add_plot("uap-images", "natural-vs-adversarial", image_grid(vecs, titles, cols=cols, size=1.2),
                        "Each row a model: the global average UAP, the top three singular vectors (sign kept), "
                        "and the class-specific average UAPs of classes 0-9.")
