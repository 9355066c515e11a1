"""eps sweeps: one attack per budget, and the study's figures as functions of eps.

``uapx analyze --eps 1,2,4`` runs one analysis per eps (each a full report in ``<out>/eps-<e>/``)
and writes a combined report whose ``eps_sweep`` section gives, per eps, the figures that answer
the talk's questions -- sigma1/sigma2 and the energy share sigma1^2/||D||_F^2 of the perturbation
matrix (``spectrum``: 95 % bootstrap intervals, random-rows control) and the held-out fooling rate
of the best global UAP (Wilson 95 % interval, random directions of the same norm) -- plotted
against eps.  ``uapx reproduce`` sweeps eps the same way (:data:`uapx.defaults.STUDY_EPS_SWEEP`)
and plots these figures natural against robust, through :func:`sweep_figures` and
:func:`sweep_plot`.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from typing import Any

from . import atomic, distributed
from .plots import plt
from .report import Report, check_output_folder

SWEPT = ("sigma1_over_sigma2", "energy_share")  # the spectrum figures of a sweep (spectrum's talk figures)


def _get(rep: dict | None, *path, default=None):
    cur = rep
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return default
        cur = cur[p]
    return cur


def held_out_best(rep: dict) -> dict | None:
    """The best global UAP of a report -- chosen by its fooling rate on the fit images, so the choice
    does not peek at the held-out ones -- on the held-out images (the figure), with its Wilson 95 %
    interval, its in-sample rate beside it, and the held-out random-direction control."""
    h = _get(rep, "uaps", "held_out")
    if not h:
        return None
    fit = {n: e for n, e in rep["uaps"]["evaluations"].items()
           if e.get("source_class") is None and n in h["evaluations"]}
    if not fit:
        return None
    name = max(fit, key=lambda n: fit[n]["fooling_rate"])
    ev = h["evaluations"][name]
    return {"best_uap": name, "fooling_rate": ev["fooling_rate"], "wilson95": ev["fooling_rate_wilson95"],
            "n_images": h["n_images"], "split": h["split"], "in_sample_fooling_rate": fit[name]["fooling_rate"],
            "random_fooling_rate": h["random_baseline"]["fooling_rate"]["mean"],
            "random_wilson95": h["random_baseline"]["fooling_rate"].get("wilson95")}


def spectrum_figure(rep: dict | None, key: str) -> tuple[dict, dict] | None:
    """``(figure, control)`` of spectrum's talk figure ``key`` (e.g. ``"sigma1_over_sigma2"``), each
    ``{"mean", "se", "low", "high"}`` (95 % half-sampling interval over rows,
    :func:`uapx.stats.subsample_interval`); None without the spectrum figures."""
    t = _get(rep, "diagnostics", "spectrum", "global", "talk")
    if not t or "bootstrap95" not in t:
        return None
    b, cb = t["bootstrap95"][key], t["control"]["bootstrap95"][key]
    return {"mean": t["figures"][key], **b}, {"mean": t["control"][key], **cb}


def sweep_figures(rep: dict) -> dict:
    """The figures of one run of a sweep: its eps, the held-out best UAP (:func:`held_out_best`) and,
    with ``spectrum``, sigma1/sigma2 and the energy share beside their random-rows control."""
    out: dict[str, Any] = {"eps": rep["config"]["eps"], "n_images": rep["attack"]["n_images"],
                           "held_out": held_out_best(rep)}
    for key in SWEPT:
        fc = spectrum_figure(rep, key)
        out[key] = None if fc is None else {"figure": fc[0], "control": fc[1]}
    return out


def _bars(values: list[tuple[float, float, float]]):
    """``(y, yerr)`` for errorbar from ``(value, low, high)`` triples."""
    y = [v for v, _, _ in values]
    return y, [[max(0.0, v - lo) for v, lo, _ in values], [max(0.0, hi - v) for v, _, hi in values]]


def sweep_plot(series: dict[str, list[dict]], title: str = ""):
    """Three panels against eps -- sigma1/sigma2, energy share, held-out fooling rate of the best
    global UAP -- one line per series (a model) of :func:`sweep_figures` dicts, with 95 % intervals,
    and the random control of each (dotted)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for i, (label, runs) in enumerate(series.items()):
        color = f"C{i}"
        for ax, key in zip(axes[:2], SWEPT):
            pts = [(r["eps"], r[key]) for r in runs if r.get(key)]
            if not pts:
                continue
            eps = [e for e, _ in pts]
            for part, style, lab in (("figure", "o-", label), ("control", "x:", f"{label}: random rows")):
                y, err = _bars([(f[part]["mean"], f[part]["low"], f[part]["high"]) for _, f in pts])
                ax.errorbar(eps, y, yerr=err, fmt=style, color=color, capsize=3, label=lab,
                            alpha=1.0 if part == "figure" else 0.6)
        pts = [(r["eps"], r["held_out"]) for r in runs if r.get("held_out")]
        if pts:
            eps = [e for e, _ in pts]
            # rates in percent
            y, err = _bars([tuple(100 * v for v in (h["fooling_rate"], *h["wilson95"])) for _, h in pts])
            axes[2].errorbar(eps, y, yerr=err, fmt="o-", color=color, capsize=3, label=f"{label}: best UAP")
            rnd = [tuple(100 * v for v in (h["random_fooling_rate"], *(h["random_wilson95"] or
                                                                       (h["random_fooling_rate"],) * 2)))
                   for _, h in pts]
            y, err = _bars(rnd)
            axes[2].errorbar(eps, y, yerr=err, fmt="x:", color=color, capsize=3, alpha=0.6,
                             label=f"{label}: random directions")
    ticks = sorted({r["eps"] for runs in series.values() for r in runs})
    for ax, name in zip(axes, ("sigma1 / sigma2", "energy share sigma1^2 / ||D||_F^2", "held-out fooling rate (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.minorticks_off()
        ax.set_xlabel("eps (L2)")
        ax.set_ylabel(name)
        if ax.has_data():
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not measured (select the spectrum diagnostic)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


CAPTION = ("Against eps: sigma1/sigma2 and the energy share of the perturbation matrix (95 % bootstrap intervals "
           "over rows; dotted: random rows of the same norms), and the held-out fooling rate of the best global UAP "
           "(chosen on the fit images; Wilson 95 % intervals; dotted: random directions of the same norm).")


def summary_lines(label: str, runs: list[dict]) -> list[str]:
    """One line per eps of a series: the three figures with their intervals and controls."""
    lines = []
    for r in runs:
        parts = [f"{label}, eps {r['eps']:g}:"]
        for key in SWEPT:
            if r.get(key):
                f, c = r[key]["figure"], r[key]["control"]
                parts.append(f"{key} {f['mean']:.3g} [{f['low']:.3g}, {f['high']:.3g}] (random rows {c['mean']:.3g});")
        h = r.get("held_out")
        if h:
            parts.append(f"best UAP {h['best_uap']} fools {h['fooling_rate']:.1%} [{h['wilson95'][0]:.1%}, "
                         f"{h['wilson95'][1]:.1%}] of {h['n_images']} held-out images (in-sample "
                         f"{h['in_sample_fooling_rate']:.1%}; random directions {h['random_fooling_rate']:.1%}).")
        lines.append(" ".join(parts))
    return lines


def eps_folder(eps: float) -> str:
    """The folder name of one eps's report in a sweep: ``eps-0.5``."""
    return f"eps-{eps:g}"


def analyze_sweep(config, eps_list: list[float], *, registry=None, model=None, data=None):
    """``uapx analyze --eps e1,e2,...``: one :func:`uapx.pipeline.analyze` per eps (each eps's
    report in ``<out>/eps-<e>/``, kept in ``<out>.parts/`` until all are done, so that a killed sweep
    resumes), then the combined report at ``<out>``.  Every eps's config is resolved and checked
    before the first attack.  Returns the :class:`~uapx.pipeline.AnalyzeResult` of the combined report
    (its ``analysis`` is the last eps's)."""
    import json

    from .pipeline import AnalyzeResult, analyze, plan
    from .registry import get_registry

    reg = registry or get_registry()
    p = plan(config, reg)
    configs = [replace(config, eps=e) for e in eps_list]
    resolved = [cfg.resolved(p.attack) for cfg in configs]  # every budget checked before any work
    main = distributed.is_main()  # under torchrun every rank attacks its shard; rank 0 writes
    out = check_output_folder(config.out, overwrite=config.overwrite, claim=main)  # released once written
    parts = out.with_name(out.name + ".parts")
    if main:
        parts.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    reports, last = {}, None
    for cfg, res_cfg in zip(configs, resolved):
        folder = parts / eps_folder(res_cfg.eps)
        done = folder / "report.json"
        if done.is_file() and model is None and data is None:
            rep = json.loads(done.read_text())
            if rep.get("config") == json.loads(json.dumps(asdict(replace(res_cfg, out=str(folder), overwrite=True)),
                                                          default=atomic.json_default)):
                reports[res_cfg.eps] = rep
                continue
        last = analyze(replace(cfg, out=str(folder), overwrite=True), registry=reg, model=model, data=data)
        reports[res_cfg.eps] = last.report
    figures = [sweep_figures(reports[e]) for e in sorted(reports)]
    first = reports[min(reports)]
    report = Report(f"uapx eps sweep: {first['config']['model']} on {first['config']['dataset']}, eps "
                    + ", ".join(f"{e:g}" for e in sorted(reports)), order=["eps-sweep"])
    label = str(first["config"]["model"])
    report.data.update({
        "config": {**first["config"], "eps": sorted(reports)},
        "eps_sweep": {"eps": sorted(reports), "per_eps": {f"{r['eps']:g}": r for r in figures},
                      "reports": {f"{e:g}": f"{eps_folder(e)}/index.html" for e in sorted(reports)}},
    })
    report.add_plot("eps-sweep", "figures-vs-eps", sweep_plot({label: figures}), CAPTION)
    report.summaries["eps-sweep"] = "\n".join(summary_lines(label, figures) + [
        "Each eps's full report: " + ", ".join(f"{eps_folder(e)}/index.html" for e in sorted(reports)) + "."])
    if main:
        with atomic.atomic_path(out, directory=True, replace=config.overwrite) as tmp:
            for e in sorted(reports):
                shutil.copytree(parts / eps_folder(e), tmp / eps_folder(e))
            report.write_into(tmp)
        atomic.release(out)
        shutil.rmtree(parts, ignore_errors=True)
    distributed.barrier()
    return AnalyzeResult(out, report.data, last.analysis if last is not None else None)
