"""``uapx reproduce``: the whole study of the source talk in one command.

Runs ``analyze`` on the zoo's natural and L2-adversarially trained models for MNIST and CIFAR-10
on the real test sets, then writes one combined report whose first section states each of the
four findings of the talk, the numbers this run measured for it, and whether they support it.
The criteria are fixed here, in code, before any number is seen; a finding whose models are not
installed is reported as not measured.  Every robust zoo model of a data set (found in the zoo's
cards, :func:`robust_models`) is judged against the natural one.  Every model is also run at each
eps of :data:`uapx.defaults.STUDY_EPS_SWEEP`, and sigma1/sigma2, the energy share and the held-out
fooling rate of the best UAP are plotted against eps, natural against robust (:mod:`uapx.sweep`).

Each model's analysis is kept in ``<out>.parts/<model>/`` as it completes, so a killed run started
again with the same command resumes; the combined report folder is written atomically.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator

from . import atomic, defaults, models, stats
from .errors import UapxError
from .pipeline import AnalyzeConfig, analyze
from .plots import plt
from .registry import Registry, get_registry
from .report import Report, check_output_folder
from .sweep import CAPTION as SWEEP_CAPTION, _get, held_out_best, spectrum_figure, sweep_figures, sweep_plot
from .sweep import summary_lines as sweep_lines

STUDY = {  # dataset -> (natural model, adversarial model, the study's eps: the talk's L2 budget)
    "mnist": ("zoo:mnist-natural", "zoo:mnist-l2", defaults.EPS["l2"]["mnist"]),
    "cifar10": ("zoo:cifar10-natural", "zoo:cifar10-l2", defaults.EPS["l2"]["cifar10"]),
}
PLUGINS = ["average", "svd", "spectrum", "trajectory", "interpretability", "landscape",
           "local-linearity", "gradalign", "cure", "hessian", "subspace"]
SWEEP_PLUGINS = ["average", "svd", "spectrum"]
NATURAL = {nat for nat, _, _ in STUDY.values()}  # at the swept eps other than the study's: what the sweep plots
LANDSCAPE_MEASURES = ["local-linearity", "gradalign", "cure", "hessian"]  # per-image means, with control
# The criteria, fixed in advance.
MNIST_SLOW_DECAY = 0.5  # eigenvalue ratio lambda5 / lambda1 at least this: "several directions" (talk: 1.8/2.7 = 0.67)
CIFAR_DROP = 10.0 ** 0.5  # sigma1 / sigma2 at least this: an order-of-magnitude drop in eigenvalues (lambda1/lambda2 >= 10)


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
    sweep: bool = True  # also every eps of uapx.defaults.STUDY_EPS_SWEEP (average, svd, spectrum at each)


def _part(model: str, eps: float | None = None) -> str:
    """The folder of a model's run at the study's eps (``mnist-l2``) or at a swept one (``mnist-l2-eps4``)."""
    name = model.split(":", 1)[1]
    return name if eps is None else f"{name}-eps{eps:g}"


def _run_one(c: ReproduceConfig, dataset: str, model: str, eps: float, parts: Path, reg: Registry, *,
             swept: bool = False) -> dict | None:
    """Analyze one model at ``eps`` (or reuse its finished part); None when the zoo lacks the model.
    ``swept``: a swept eps other than the study's, with :data:`SWEEP_PLUGINS` only."""
    name = _part(model, eps if swept else None)
    try:
        models.zoo.path(model.split(":", 1)[1])
    except UapxError:
        return None
    cfg = AnalyzeConfig(dataset=dataset, data_root=c.data_root, model=model, plugins=SWEEP_PLUGINS if swept else PLUGINS,
                        eps=eps, split="train", eval_split="test", eval_n_samples=c.n_samples,  # held-out evaluation
                        steps=c.steps, n_samples=c.n_samples, batch_size=c.batch_size, device=c.device,
                        seed=c.seed, trajectory_samples=c.trajectory_samples, out=str(parts / name), overwrite=True)
    done = parts / name / "report.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        if rep.get("config") == asdict(cfg.resolved(reg.get(cfg.attack, "attack"))):
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
    sweeps: dict[str, dict[str, list[dict]]] = {}  # dataset -> model -> the sweep's figures per eps
    swept_parts: list[str] = []
    for dataset in c.datasets:
        natural, _, eps = STUDY[dataset]
        for model in (natural, *robust_models(dataset)):
            runs[model] = _run_one(c, dataset, model, eps, parts, reg)
            if not (c.sweep and runs[model]):
                continue
            figs = []
            for e in defaults.STUDY_EPS_SWEEP[dataset]:
                rep = runs[model] if e == eps else _run_one(c, dataset, model, e, parts, reg, swept=True)
                swept_parts += [] if e == eps else [_part(model, e)]
                figs.append(sweep_figures(rep))
            sweeps.setdefault(dataset, {})[model] = figs

    report = Report("uapx study: universal perturbations of natural and adversarially trained models",
                    order=["findings", "eps-sweep", "uap-images", "spectra", "trajectories", "landscape", "runs"])
    findings, summary_lines = judge(runs)
    report.data["findings"] = findings
    report.data["findings_table"] = table = findings_table(findings)
    report.summaries["findings"] = "\n".join(summary_lines + ["Finding x model: " + " | ".join(
        " ".join(row) if i == 0 else f"{row[0]}: " + ", ".join(f"{m} {v}" for m, v in zip(table[0][1:], row[1:]))
        for i, row in enumerate(table))])
    report.data["runs"] = {m: (_run_digest(r) if r else {"status": "not measured: model not installed",
                                                          "fix": "train it with 'uapx train' (see README)"})
                           for m, r in runs.items()}
    report.data["config"] = asdict(c)
    if sweeps:
        report.data["eps_sweep"] = {ds: {"eps": list(defaults.STUDY_EPS_SWEEP[ds]), "study_eps": STUDY[ds][2],
                                         "per_model": per} for ds, per in sweeps.items()}
        for ds, per in sweeps.items():
            report.add_plot("eps-sweep", ds, sweep_plot(per, title=f"{ds}: natural against robust"),
                            f"{ds}. " + SWEEP_CAPTION + " At the study's eps every diagnostic ran; at the others "
                            + ", ".join(SWEEP_PLUGINS) + ".")
        report.summaries["eps-sweep"] = "\n".join(line for per in sweeps.values() for m, figs in per.items()
                                                  for line in sweep_lines(m, figs))
    _comparison_plots(report, runs, parts)
    report.summaries["landscape"] = " ".join(
        f"{m}: " + "; ".join(f"{k} {v['mean']:.4g} ± {v['se']:.2g} (control {v['control_mean']:.4g})"
                             for k, v in _landscape_measures(r).items() if k != "subspace") + "."
        for m, r in runs.items() if r)
    with atomic.atomic_path(out, directory=True, replace=c.overwrite) as tmp:
        for model, rep in runs.items():
            if rep is not None:
                shutil.copytree(parts / model.split(":", 1)[1], tmp / model.split(":", 1)[1])
        for name in swept_parts:
            shutil.copytree(parts / name, tmp / name)
        report.write_into(tmp)
    atomic.release(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _run_digest(rep: dict) -> dict:
    sv = _get(rep, "diagnostics", "spectrum", "global", "singular_values", default=[])
    return {
        "report": f"{rep['config']['model'].split(':', 1)[1]}/index.html",
        "n_images": rep["attack"]["n_images"], "eps": rep["config"]["eps"],
        "clean_accuracy": rep["attack"]["clean_accuracy"],
        "adversarial_accuracy": rep["attack"]["adversarial_accuracy"],
        "top_singular_values": sv[:5],
        "sigma1_over_sigma2": _get(rep, "diagnostics", "spectrum", "global", "sigma1_over_sigma2"),
        "best_uap_fooling_rate_in_sample": max((e["fooling_rate"] for n, e in rep["uaps"]["evaluations"].items()
                                                if ":class-" not in n), default=None),
        "held_out": _held_out(rep),
        "random_fooling_rate_in_sample": rep["uaps"]["random_baseline"]["fooling_rate"]["mean"],
        "landscape_measures": _landscape_measures(rep),
    }


_held_out = held_out_best  # the best UAP on the held-out images (uapx.sweep)


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


def _class_uap_stats(rep: dict, key: str, control: str, seed: int = 0) -> dict | None:
    """Mean +- bootstrap s.e. (over classes) of interpretability's figure ``key`` of the class-specific
    average UAPs, with its random-direction control ``control``; None where either is missing."""
    e = _get(rep, "diagnostics", "interpretability", key, default={})
    vals = [v for k, v in e.items() if k.startswith("average:class-")]
    ctl = _get(rep, "diagnostics", "interpretability", control)
    if len(vals) < 2 or not ctl:
        return None
    return {**stats.mean_se(torch.tensor(vals), seed=seed), "control": ctl}


def _energy_stats(rep: dict, seed: int = 0) -> dict | None:
    """The data-subspace energy of the class-specific average UAPs and its random-direction control."""
    return _class_uap_stats(rep, "data_subspace_energy", "random_subspace_energy_stats", seed)


def _alignment_stats(rep: dict, seed: int = 0) -> dict | None:
    """Signed cosines of the class-specific average UAPs with their class-mean differences, and the
    random-direction control (signed; a sign is meaningful)."""
    return _class_uap_stats(rep, "class_alignment", "class_alignment_control", seed)


def _greater(a: dict, b: dict) -> dict:
    """``a.mean - b.mean`` with its 95 % interval; ``holds`` when the interval lies above 0."""
    d = stats.diff_interval(a["mean"], a["se"], b["mean"], b["se"])
    return {**d, "holds": d["low"] > 0}


def _differs(a: dict, ctl: dict) -> dict:
    """The figure against its control: the 95 % interval of the difference excludes 0."""
    return stats.diff_interval(a["mean"], a["se"], ctl["mean"], ctl.get("se", 0.0) or 0.0)


_spec = spectrum_figure  # (figure, control) of a spectrum talk figure (uapx.sweep)


CRITERIA = {
    "1_interpretability": {
        "claim": "Adversarial training induces more human-interpretable UAPs (MNIST: strokes vs noise); "
                 "judged on MNIST and CIFAR-10.",
        "criterion": "for the robust model against the natural one: the class-specific UAPs keep more energy in the "
                     "clean images' top principal components (95 % interval of the difference above 0) AND their "
                     "signed alignment with the class-mean differences is larger in magnitude (|mean|; interval of "
                     "the difference of the magnitudes above 0); and the robust model's energy and signed alignment "
                     "each differ from random directions (interval of the difference excludes 0)",
        "tests": "whether robust UAPs carry more of the data's structure than the natural model's and than noise",
        "could_fail_because": "UAPs of both models equally structured, or no more structured than random directions "
                              "(the control: random directions score energy K/d and alignment 0)",
    },
    "2_mnist_spectrum": {
        "claim": "MNIST: the top eigenvalues decay slowly (talk: 2.7, 2.5, 2.1, 2.0, 1.8): several directions.",
        "criterion": "for each MNIST model: the eigenvalue ratio lambda5/lambda1 = (sigma5/sigma1)^2 >= "
                     f"{MNIST_SLOW_DECAY} (talk 1.8/2.7 = 0.67) AND the spectrum is not that of random rows of the "
                     "same norms: the energy share sigma1^2/||D||_F^2 and sigma1/sigma10 each exceed the control's "
                     "(95 % intervals of the differences above 0)",
        "tests": "whether a few universal directions stand out of the perturbations, none of them alone",
        "could_fail_because": "random rows of equal norm pass the slow-decay test (sigma5/sigma1 >= 0.94) but not the "
                              "control comparison; a single dominant direction fails the slow decay",
    },
    "3_cifar_spectrum": {
        "claim": "CIFAR-10: one large singular value (talk: 54.4), then an order-of-magnitude drop.",
        "criterion": "for each CIFAR-10 model: an order-of-magnitude drop in eigenvalues, lambda1/lambda2 >= 10, "
                     f"i.e. sigma1/sigma2 >= sqrt(10) = {CIFAR_DROP:.3g}, with the 95 % interval's lower "
                     "end above it, AND the energy share sigma1^2/||D||_F^2 above the random-rows control's",
        "tests": "whether one direction dominates the perturbations",
        "could_fail_because": "no dominant direction (the control's sigma1/sigma2 is about 1)",
    },
    "4_trajectory": {
        "claim": "Adversarial training smooths the loss landscape: along a PGD trajectory the gradient has a high "
                 "cosine similarity to the average gradient at the final step.",
        "criterion": "for each robust model against its natural model, per reading of 'average gradient at the "
                     "final step' (universal: mean of the final-step unit gradients over images; own_final, "
                     "own_mean: the image's own, read over the steps before the last): the robust model's mean "
                     "cosine is higher (95 % interval of the difference above 0) AND differs from the cosines of "
                     "random unit vectors in d dimensions (interval excludes 0)",
        "tests": "whether robust models' gradients point more consistently along the trajectory",
        "could_fail_because": "equal cosines for both models, or cosines no different from random vectors (about 0, "
                              "sd 1/sqrt(d))",
    },
}


def _verdict(oks: list[bool]) -> str:
    return "supported" if oks and all(oks) else "not supported" if not any(oks) else "partly supported"


def _absent(model: str, runs: dict[str, dict | None]) -> str:
    """Why ``model`` has no run: its data set was not among those run, or the zoo lacks it."""
    return f"not installed: {model}" if model in runs else f"not run: {model} (its data set was not in --datasets)"


def _measured_pairs(pairs: dict, runs: dict[str, dict | None], per: dict):
    """``(natural model, robust model, natural run, robust run)`` for every pair whose runs both exist; a pair
    missing one is recorded in ``per`` as "not measured"."""
    for _ds, (nat, robs) in pairs.items():
        for rob in robs:
            n, r = runs.get(nat), runs.get(rob)
            if not (n and r):
                per[rob] = {"verdict": "not measured", "why": _absent(nat if not n else rob, runs)}
                continue
            yield nat, rob, n, r


def judge(runs: dict[str, dict | None]) -> tuple[dict, list[str]]:
    """Each finding on every robust model of a data set against its natural model (and, for the
    spectra, on every model): the claim, the criterion, what it tests and why it could fail, the
    measured figures with intervals beside their controls, a verdict per model and overall."""
    pairs = {ds: (STUDY[ds][0], [m for m in runs if m != STUDY[ds][0] and _dataset_of(m) == ds])
             for ds in STUDY}
    f: dict[str, dict] = {}

    per: dict[str, dict] = {}
    for nat, rob, n, r in _measured_pairs(pairs, runs, per):
        en, er = _energy_stats(n), _energy_stats(r)
        an, ar = _alignment_stats(n), _alignment_stats(r)
        if None in (en, er, an, ar):
            per[rob] = {"verdict": "not measured", "why": "interpretability figures missing"}
            continue
        mag = lambda a: {"mean": abs(a["mean"]), "se": a["se"]}  # noqa: E731
        checks = {"energy_higher_than_natural": _greater(er, en),
                  "energy_differs_from_random": _differs(er, er["control"]),
                  "alignment_magnitude_higher_than_natural": _greater(mag(ar), mag(an)),
                  "alignment_differs_from_random": _differs(ar, ar["control"])}
        ok = (checks["energy_higher_than_natural"]["holds"] and checks["energy_differs_from_random"]["excludes_zero"]
              and checks["alignment_magnitude_higher_than_natural"]["holds"]
              and checks["alignment_differs_from_random"]["excludes_zero"])
        per[rob] = {"against": nat, "energy": {"natural": en, "robust": er},
                    "signed_alignment": {"natural": an, "robust": ar}, "checks": checks,
                    "verdict": "supported" if ok else "not supported"}
    f["1_interpretability"] = _finding("1_interpretability", per)

    for key, ds in (("2_mnist_spectrum", "mnist"), ("3_cifar_spectrum", "cifar10")):
        nat, robs = pairs[ds]
        per = {}
        for m in (nat, *robs):
            rep = runs.get(m)
            share, s110, s12, s51 = (_spec(rep, k) if rep else None for k in (
                "energy_share", "sigma1_over_sigma10", "sigma1_over_sigma2", "sigma5_over_sigma1"))
            if None in (share, s110, s12, s51):
                per[m] = {"verdict": "not measured", "why": _absent(m, runs) if rep is None else "spectrum missing"}
                continue
            checks = {"energy_share_above_control": _greater(*share), "sigma1_over_sigma10_above_control": _greater(*s110)}
            structured = all(c["holds"] for c in checks.values())
            if key.startswith("2"):
                ev = s51[0]["mean"] ** 2
                checks["eigenvalue5_over_eigenvalue1"] = {"value": ev, "interval95": [s51[0]["low"] ** 2, s51[0]["high"] ** 2],
                                                          "control": s51[1]["mean"] ** 2, "holds": ev >= MNIST_SLOW_DECAY}
                ok = structured and ev >= MNIST_SLOW_DECAY
            else:
                checks["sigma1_over_sigma2"] = {"value": s12[0]["mean"], "interval95": [s12[0]["low"], s12[0]["high"]],
                                                "control": s12[1]["mean"], "holds": s12[0]["low"] >= CIFAR_DROP}
                ok = checks["energy_share_above_control"]["holds"] and s12[0]["low"] >= CIFAR_DROP
            per[m] = {"figures": {"energy_share": share[0], "sigma1_over_sigma2": s12[0], "sigma1_over_sigma10": s110[0],
                                  "sigma5_over_sigma1": s51[0]},
                      "control": {"energy_share": share[1], "sigma1_over_sigma2": s12[1], "sigma1_over_sigma10": s110[1]},
                      "eigenvalues_second_moment": _get(rep, "diagnostics", "spectrum", "global", "talk",
                                                        "eigenvalues_second_moment", default=[])[:5],
                      "checks": checks, "verdict": "supported" if ok else "not supported"}
        f[key] = _finding(key, per)

    per = {}
    for nat, rob, n, r in _measured_pairs(pairs, runs, per):
        readings = {}
        for ref in ("universal", "own_final", "own_mean"):
            bn = _get(n, "diagnostics", "trajectory", ref, "before_last")
            br = _get(r, "diagnostics", "trajectory", ref, "before_last")
            cr = _get(r, "diagnostics", "trajectory", ref, "control")
            if not (bn and br and cr):
                continue
            higher, vs_random = _greater(br, bn), _differs(br, cr)
            readings[ref] = {"natural": bn, "robust": br, "control": cr, "higher_than_natural": higher,
                             "differs_from_random": vs_random,
                             "verdict": "supported" if higher["holds"] and vs_random["excludes_zero"]
                             else "not supported"}
        if not readings:
            per[rob] = {"verdict": "not measured", "why": "trajectory figures missing"}
            continue
        v = _verdict([x["verdict"] == "supported" for x in readings.values()])
        per[rob] = {"against": nat, "readings": readings,
                    "verdict": v if v != "partly supported" else "mixed: " + ", ".join(
                        f"{k} {x['verdict']}" for k, x in readings.items())}
    f["4_trajectory"] = _finding("4_trajectory", per)

    lines = []
    for key, item in f.items():
        lines.append(f"Finding {key.split('_', 1)[0]}: {item['claim']} Verdict: {item['verdict'].upper()}. "
                     f"Criterion: {item['criterion']}. Per model: " + "; ".join(
                         f"{m} {v['verdict']}" for m, v in item["per_model"].items()) + ".")
    return f, lines


def _dataset_of(model: str) -> str | None:
    name = model.split(":", 1)[-1]
    return next((ds for ds in STUDY if name.startswith(ds + "-")), None)


def _finding(key: str, per: dict) -> dict:
    measured = {m: v for m, v in per.items() if v["verdict"] != "not measured"}
    if not measured:
        why = "; ".join(f"{m}: {v.get('why', '')}" for m, v in per.items()) or "no model of its data set"
        verdict = "not measured"
    else:
        verdict = _verdict([v["verdict"] == "supported" for v in measured.values()])
        missing = [m for m in per if m not in measured]
        if missing:
            verdict += f" (measured on {', '.join(measured)} only; not measured: {', '.join(missing)})"
    return {**CRITERIA[key], "per_model": per, "verdict": verdict, **({"why": why} if not measured else {})}


def findings_table(findings: dict) -> list[list[str]]:
    """The finding x model table of verdicts (first row: the header)."""
    models_ = list(dict.fromkeys(m for item in findings.values() for m in item["per_model"]))
    rows = [["finding", *models_]]
    for key, item in findings.items():
        rows.append([key, *(item["per_model"].get(m, {}).get("verdict", "-") for m in models_)])
    return rows


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
    studied = {ds: v for ds, v in STUDY.items() if any(_dataset_of(m) == ds for m in done)}
    fig, axes = plt.subplots(1, len(studied), figsize=(5 * len(studied), 3.4), squeeze=False)
    for ax, (ds, (nat, _, eps)) in zip(axes[0], studied.items()):  # the natural model and every robust one
        for model in [m for m in done if _dataset_of(m) == ds]:
            style = "o-" if model == nat else "s--"
            sv = _get(done.get(model), "diagnostics", "spectrum", "global", "singular_values")
            if sv:
                ax.semilogy(range(1, len(sv) + 1), sv, style, label=model)
        ax.set_title(f"{ds}, eps {eps:g}", fontsize=9)
        ax.set_xlabel("index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # indices are whole numbers
        ax.set_ylabel("singular value")
        ax.legend(fontsize=7)
    report.add_plot("spectra", "natural-vs-adversarial", fig,
                    "Singular values of the perturbation matrices: natural (solid) against every adversarially "
                    "trained zoo model (dashed), MNIST beside CIFAR-10.")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for ax, ref in zip(axes, ("universal", "own_final", "own_mean")):
        for model, rep in done.items():
            mu = _get(rep, "diagnostics", "trajectory", ref, "mean_per_step")
            if mu:
                sd = torch.tensor(_get(rep, "diagnostics", "trajectory", ref, "std_per_step"))
                t = torch.arange(1, len(mu) + 1)
                m = torch.tensor(mu)
                ax.plot(t, m, label=model, ls="-" if model in NATURAL else "--")
                ax.fill_between(t, m - sd, m + sd, alpha=0.15)
        ax.set_title(f"reference: {ref}", fontsize=9)
        ax.set_xlabel("PGD step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
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
    if ax.get_legend_handles_labels()[0]:  # no landscape profiles in any run: no legend to draw
        ax.legend(fontsize=6)
    report.add_plot("landscape", "natural-vs-adversarial", fig,
                    "Loss along the top singular direction (solid) and a random direction (dashed) per model.")
    _fooling_plot(report, done)
    _subspace_plot(report, done)
    _uap_images(report, done, parts)


def _fooling_plot(report: Report, done: dict[str, dict]) -> None:
    """The best global UAP's held-out fooling rate per model (Wilson 95 % error bars), its in-sample
    rate beside it, and random directions of the same norm on the same held-out images."""
    rows = [(m, h) for m, r in done.items() if (h := _held_out(r))]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.4))
    for i, (m, h) in enumerate(rows):
        fr, (lo, hi) = 100 * h["fooling_rate"], (100 * v for v in h["wilson95"])  # plotted in percent
        ax.errorbar(i - 0.15, fr, yerr=[[fr - lo], [hi - fr]], fmt="o",
                    color="k", capsize=4, label="held-out (the figure)" if i == 0 else None)
        ax.plot(i, 100 * h["in_sample_fooling_rate"], "^", color="tab:blue", label="in-sample" if i == 0 else None)
        rnd = 100 * h["random_fooling_rate"]
        r_lo, r_hi = (100 * v for v in h["random_wilson95"]) if h["random_wilson95"] else (rnd, rnd)
        ax.errorbar(i + 0.15, rnd, yerr=[[rnd - r_lo], [r_hi - rnd]],
                    fmt="x", color="grey", capsize=4, label="random directions (held-out)" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [m.split(":", 1)[1] for m, _ in rows], fontsize=7, rotation=20)
    ax.set_ylabel("fooling rate (%)")
    ax.legend(fontsize=7)
    report.add_plot("runs", "fooling-rates", fig,
                    "Best global UAP per model: held-out fooling rate with its Wilson 95 % interval (the figure), "
                    "the in-sample rate on the images it was fitted on, and random directions of the same norm.")


def _subspace_plot(report: Report, done: dict[str, dict]) -> None:
    """The subspace test per model (Moosavi-Dezfooli et al. 2017): held-out fooling rate of random
    vectors in the span of the top-k singular vectors against k (Wilson 95 % bars), and unconstrained
    random vectors of the same norm (dotted), one panel per data set."""
    subs = {m: s for m, r in done.items() if (s := _get(r, "diagnostics", "subspace"))}
    if not subs:
        return
    sets = list(dict.fromkeys(_dataset_of(m) for m in subs))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.4), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for i, (m, sub) in enumerate((m, s) for m, s in subs.items() if _dataset_of(m) == ds):
            ks, color = sub["k"], f"C{i}"
            fr = [100 * sub["subspace"][str(k)]["fooling_rate"] for k in ks]  # plotted in percent
            ci = [tuple(100 * v for v in sub["subspace"][str(k)]["wilson_95"]) for k in ks]
            ax.errorbar(ks, fr, yerr=[[max(0.0, f - lo) for f, (lo, _) in zip(fr, ci)],
                                      [max(0.0, hi - f) for f, (_, hi) in zip(fr, ci)]],
                        fmt="o-", color=color, capsize=3, label=f"{m}: top-k span")
            ax.axhline(100 * sub["random"]["fooling_rate"], color=color, ls=":", label=f"{m}: unconstrained random")
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("held-out fooling rate (%)")
        ax.set_title(str(ds), fontsize=9)
        ax.legend(fontsize=6)
    report.add_plot("landscape", "subspace-test", fig,
                    "Subspace test per model: held-out fooling rate of random vectors in the span of the top-k "
                    "right singular vectors of the fit images' perturbations (Wilson 95 % intervals) against k, and "
                    "unconstrained random vectors of the same norm (dotted).")


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
