"""The core's own plots of UAPs (images of the directions, their effect against random ones), and
the one place matplotlib's backend is chosen: uapx draws headless, into PNG files (Agg), and every
module that draws takes ``plt`` from here (``from uapx.plots import plt``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # before pyplot loads
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

nan = float("nan")

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import Analysis
    from .report import Report


def to_display(v: torch.Tensor) -> torch.Tensor:
    """A perturbation ``(C, H, W)`` as an image ``(H, W, C)`` or ``(H, W)`` in [0, 1], zero at 0.5,
    scaled symmetrically by its largest absolute value."""
    v = v.detach().float()
    m = float(v.abs().max()) or 1.0
    img = (v / (2 * m) + 0.5).clamp(0, 1)
    return img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)


def image_grid(vectors: list[torch.Tensor], titles: list[str], *, cols: int = 6, size: float = 1.6):
    """A figure of perturbation images ``(C, H, W)`` with titles, ``cols`` per row.

    Each row shares one colour scale, symmetric about zero (the row's largest absolute value),
    shown by a colour bar at its end: single-channel images in a diverging map (white is zero),
    colour images as RGB with mid-grey at zero (the bar gives the per-channel scale)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = max(len(vectors), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.9, size * rows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for r in range(rows):
        row = [v.detach().float() for v in vectors[r * cols:(r + 1) * cols]]
        if not row:
            continue
        m = max(float(v.abs().max()) for v in row) or 1.0
        gray = row[0].shape[0] == 1
        for ax, v, t in zip(axes[r], row, titles[r * cols:(r + 1) * cols]):
            if gray:
                ax.imshow(v[0].numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
            else:
                ax.imshow((v / (2 * m) + 0.5).clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_title(t, fontsize=7)
        bar = ScalarMappable(Normalize(-m, m), cmap="RdBu_r" if gray else "gray")
        cb = fig.colorbar(bar, ax=list(axes[r]), shrink=0.85, pad=0.01, aspect=12)
        cb.ax.tick_params(labelsize=6)
    return fig


Interval = tuple[float, float, float]
"""``(value, low, high)``: a plotted figure and its 95 % interval."""


def normal95(value: float, se: float) -> Interval:
    """``(value, low, high)`` of the normal 95 % interval ``value -+ 1.96 se`` (a bootstrap s.e.)."""
    from .stats import Z95

    return value, value - Z95 * se, value + Z95 * se


def figure_vs_control(labels: list[str], figures: list[Interval], controls: list[Interval | None], *,
                      ylabel: str, figure_label: str = "figure", control_label: str = "random control",
                      log: bool = False, width: float | None = None, ax=None):
    """One axis: for each of ``labels`` its figure (black circle) and, beside it, its random control
    (grey square), each with its 95 % interval as an error bar.  Draws into ``ax`` when given (a panel
    of a larger figure), else into a new figure; returns the matplotlib Figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(width or max(3.2, 1.1 * len(labels) + 1.6), 3.2))
    fig = ax.figure
    for shift, rows, style, name in ((-0.12, figures, dict(fmt="o", color="k"), figure_label),
                                     (0.12, controls, dict(fmt="s", color="grey", mfc="white"), control_label)):
        xs = [i + shift for i, r in enumerate(rows) if r is not None]
        vs = [r for r in rows if r is not None]
        if not vs:
            continue
        err = [[max(0.0, v - lo) for v, lo, _ in vs], [max(0.0, hi - v) for v, _, hi in vs]]
        ax.errorbar(xs, [v for v, _, _ in vs], yerr=err, capsize=4, label=name, **style)
    tilt = len(labels) > 3
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22 if tilt else -0.12), ncol=2,
              frameon=False)  # below the axis: never over the data
    fig.tight_layout()
    return fig


def _global(analysis: "Analysis"):
    return [u for u in analysis.uaps if u.source_class is None]


def method_of(uap_name: str) -> str:
    """The method part of a UAP name: ``"svd"`` for ``"svd:v1:class-3"``."""
    return uap_name.split(":", 1)[0]


def class_name(analysis: "Analysis", c: int) -> str:
    """The data set's name of class ``c`` (its index where the data set has none)."""
    names = getattr(analysis, "classes", None) or []
    return str(names[c]) if 0 <= c < len(names) else str(c)


def add_uap_plots(report: "Report", analysis: "Analysis", baseline: dict) -> None:
    """Per method (section ``uaps/<method>``): its global UAPs and its class-specific ones, titled
    by class name; and (section ``uaps``) the fooling rates of every global UAP against random."""
    glob = _global(analysis)
    if not glob:
        return
    evs = analysis.evaluations
    for method in dict.fromkeys(method_of(u.name) for u in analysis.uaps):
        mine = [u for u in glob if method_of(u.name) == method]
        if mine:
            report.add_plot(f"uaps/{method}", "global",
                            image_grid([u.vector * evs[u.name].sign for u in mine], [u.name for u in mine]),
                            f"Global UAPs of {method} (the sign kept for signless directions), one colour "
                            "scale for the row (colour bar), zero in the middle.")
        per_class = [u for u in analysis.uaps if method_of(u.name) == method and u.source_class is not None
                     and u.tag in ("", "v1")]
        if per_class:
            report.add_plot(f"uaps/{method}", "class-specific",
                            image_grid([u.vector for u in per_class],
                                       [class_name(analysis, int(u.source_class)) for u in per_class], cols=10),
                            f"Class-specific UAPs of {method}, each from the perturbations of one class's images "
                            "(titled by class), one colour scale for the row.")
    held = analysis.heldout
    shown = held.evaluations if held is not None else evs  # the figure: held-out where there is a held-out set
    base = held.random_baseline if held is not None and held.random_baseline else baseline
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(glob) + 2), 3.2))
    names = [u.name for u in glob] + ["random"]
    vals = [100 * shown[u.name].best.fooling_rate for u in glob] + [100 * base["fooling_rate"]["mean"]]
    ci = [shown[u.name].best.fooling_wilson95 for u in glob] + [tuple(base["fooling_rate"].get("wilson95", (nan, nan)))]
    err = [[max(0.0, v - 100 * lo) for v, (lo, _) in zip(vals, ci)], [max(0.0, 100 * hi - v) for v, (_, hi) in zip(vals, ci)]]
    ax.bar(range(len(vals)), vals, color=["#4c72b0"] * len(glob) + ["#999999"],
           label="held-out (the figure)" if held is not None else "in-sample")
    ax.errorbar(range(len(vals)), vals, yerr=err, fmt="none", color="k", capsize=3)
    if held is not None:
        ax.plot(range(len(glob)), [100 * evs[u.name].best.fooling_rate for u in glob], "^", color="tab:orange",
                label=f"in-sample ({analysis.n_images} fit images)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("fooling rate (%)")
    ax.set_title(f"Global UAPs vs random directions, {ball_words(analysis)} {analysis.eps:g}", fontsize=9)
    where = (f"on {held.n_images} held-out images ({held.split}, {HELD_OUT_WORDS[held.protocol]})"
             if held is not None else f"on the {analysis.n_images} images they were fitted on")
    report.add_plot("uaps", "fooling-rates", fig,
                    f"Fooling rate (prediction changed) {where} of each global UAP and of {base['draws']} random "
                    "directions of the same norm (pooled), with Wilson 95 % intervals"
                    + ("; triangles: the in-sample rate on the fit images." if held is not None else "."))
    add_targeted_plot(report, analysis, base)


def add_targeted_plot(report: "Report", analysis: "Analysis", baseline: dict) -> None:
    """Targeted UAPs (section ``uaps``): the targeted success rate of every global UAP against the
    random control of the same norm and target, Wilson 95 % error bars (held-out where there is a
    held-out set); nothing for untargeted UAPs."""
    glob = [u for u in _global(analysis) if getattr(u, "target_class", None) is not None]
    ts = baseline.get("targeted_success")
    if not glob or not ts:
        return
    held = analysis.heldout
    shown = held.evaluations if held is not None else analysis.evaluations
    effects = [shown[u.name].best for u in glob]
    vals = [100 * e.targeted_success for e in effects] + [100 * ts["mean"]]
    ci = [e.targeted_wilson95 for e in effects] + [tuple(ts["wilson95"])]
    err = [[max(0.0, v - 100 * lo) for v, (lo, _) in zip(vals, ci)], [max(0.0, 100 * hi - v) for v, (_, hi) in zip(vals, ci)]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(glob) + 2), 3.2))
    ax.bar(range(len(vals)), vals, color=["#c44e52"] * len(glob) + ["#999999"])
    ax.errorbar(range(len(vals)), vals, yerr=err, fmt="none", color="k", capsize=3)
    ax.set_xticks(range(len(vals)), [u.name for u in glob] + ["random"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("targeted success (%)")
    ax.set_title(f"Targeted UAPs vs random directions, {ball_words(analysis)} {analysis.eps:g}", fontsize=9)
    where = f"the {held.n_images} held-out images" if held is not None else f"the {analysis.n_images} fit images"
    report.add_plot("uaps", "targeted-success", fig,
                    f"Targeted success rate (share of {where} not already classified as the target that the UAP "
                    f"sends to it) of each global UAP and of {baseline['draws']} random directions of the same "
                    "norm (pooled), with Wilson 95 % intervals.")


HELD_OUT_WORDS = {"split": "another split than the fit images'",
                  "sample": "a class-stratified part of the sample, disjoint from the fit images"}


def best_global(analysis: "Analysis"):
    """The global UAP with the highest fooling rate (targeted UAPs: targeted success rate) on the
    images it was fitted on (so that choosing it does not peek at the held-out images); None
    without global UAPs."""
    glob = _global(analysis)

    def score(u) -> float:
        e = analysis.evaluations[u.name].best
        t = e.targeted_success
        return e.fooling_rate if t is None else (t if t == t else -1.0)  # NaN: no image to send

    return max(glob, key=score) if glob else None


def uap_summary(analysis: "Analysis", baseline: dict) -> str:
    best = best_global(analysis)
    if best is None:
        return "No UAP method was selected."
    fr = analysis.evaluations[best.name].best.fooling_rate
    rb = baseline["fooling_rate"]
    held = analysis.heldout
    if held is None:
        return (f"Best global UAP: {best.name} fools {fr:.1%} of {analysis.n_images} images (in-sample: the images it "
                f"was fitted on) at {ball_words(analysis)} {analysis.eps:g}; random directions of that norm fool {rb['mean']:.1%} "
                f"(sd {rb['std']:.1%}, {baseline['draws']} draws)." + targeted_words(analysis, best, baseline))
    h = held.evaluations[best.name].best
    hb = (held.random_baseline or baseline)["fooling_rate"]
    lo, hi = h.fooling_wilson95
    rlo, rhi = hb.get("wilson95", (nan, nan))
    return (f"Best global UAP (chosen on the fit images): {best.name} fools {h.fooling_rate:.1%} [{lo:.1%}, {hi:.1%}] "
            f"of {held.n_images} held-out images ({held.split}, {HELD_OUT_WORDS[held.protocol]}) at "
            f"{ball_words(analysis)} {analysis.eps:g} (in-sample: {fr:.1%} of the {analysis.n_images} fit images); random directions of that "
            f"norm fool {hb['mean']:.1%} [{rlo:.1%}, {rhi:.1%}] of the held-out images ({baseline['draws']} draws)."
            + targeted_words(analysis, best, held.random_baseline or baseline))


def targeted_words(analysis: "Analysis", best, baseline: dict) -> str:
    """For a targeted UAP ``best``: its targeted success rate (held-out where there is a held-out set)
    and the random control's, as a sentence (empty for an untargeted UAP)."""
    target = getattr(best, "target_class", None)
    ts = baseline.get("targeted_success")
    if target is None or not ts:
        return ""
    shown = analysis.heldout.evaluations if analysis.heldout is not None else analysis.evaluations
    e = shown[best.name].best
    return (f" It sends {e.targeted_success:.1%} {interval(e.targeted_wilson95)} of the images not already classified "
            f"{class_name(analysis, int(target))} to that class; random directions {ts['mean']:.1%} "
            f"{interval(ts['wilson95'])}.")


def comparison_table(analysis: "Analysis", baseline: dict) -> tuple[list[str], list[list]]:
    """One row per global UAP, then the random baseline: the effect of each at the same eps, on the
    held-out images (the figure; Wilson 95 % interval) with the in-sample rate beside it."""
    held = analysis.heldout
    if held is None:
        head = ["UAP", "eps", "fooling rate (in-sample)", "accuracy x+v", "accuracy x-v", "sign kept"]
    else:
        head = ["UAP", "eps", "held-out fooling rate [95 %]", "in-sample fooling rate", "held-out accuracy x+v",
                "held-out accuracy x-v", "sign kept (fit images)"]
    rows = []
    for u in _global(analysis):
        ev = analysis.evaluations[u.name]
        if held is None:
            rows.append([u.name, u.eps, percent(ev.best.fooling_rate), percent(ev.plus.accuracy),
                         percent(ev.minus.accuracy), "+" if ev.sign > 0 else "-"])
            continue
        h = held.evaluations[u.name]
        rows.append([u.name, u.eps, f"{percent(h.best.fooling_rate)} {interval(h.best.fooling_wilson95)}",
                     percent(ev.best.fooling_rate), percent(h.plus.accuracy), percent(h.minus.accuracy),
                     "+" if ev.sign > 0 else "-"])
    b = held.random_baseline if held is not None and held.random_baseline else baseline
    fr, acc = b["fooling_rate"], b["accuracy"]
    if held is None:
        rows.append([f"random ({b['draws']} draws)", b["eps"], f"{percent(fr['mean'])} ± {percent(fr['std'])}",
                     f"{percent(acc['mean'])} ± {percent(acc['std'])}", "", ""])
    else:
        ins = baseline["fooling_rate"]["mean"]
        rows.append([f"random ({b['draws']} draws)", b["eps"],
                     f"{percent(fr['mean'])} {interval(fr.get('wilson95', (nan, nan)))}", percent(ins),
                     f"{percent(acc['mean'])} ± {percent(acc['std'])}", "", ""])
    return with_targeted_success(analysis, b, head, rows)


def ball_words(analysis: "Analysis") -> str:
    """``"L2 norm"`` or ``"Linf norm"`` (the global UAPs' ball), ``"... towards class C"`` for targeted ones."""
    glob = _global(analysis)
    norm = getattr(glob[0], "norm", "l2") if glob else "l2"
    target = getattr(glob[0], "target_class", None) if glob else None
    aim = "" if target is None else f" towards class {class_name(analysis, int(target))}"
    return {"l2": "L2", "linf": "Linf"}.get(norm, norm) + " norm" + aim


def with_targeted_success(analysis: "Analysis", baseline: dict, head: list[str], rows: list[list]):
    """``(head, rows)`` of :func:`comparison_table` with a targeted-success column after the fooling
    rate (held-out where there is a held-out set; Wilson 95 % interval) where the UAPs are targeted."""
    glob = _global(analysis)
    if not glob or all(getattr(u, "target_class", None) is None for u in glob):
        return head, rows
    held = analysis.heldout
    shown = held.evaluations if held is not None else analysis.evaluations
    where = "held-out " if held is not None else ""
    cells = []
    for u in glob:
        e = shown[u.name].best
        cells.append("" if e.targeted_success is None else f"{percent(e.targeted_success)} {interval(e.targeted_wilson95)}")
    ts = baseline.get("targeted_success")
    cells.append(f"{percent(ts['mean'])} {interval(ts['wilson95'])}" if ts else "")
    target = next(u.target_class for u in glob if getattr(u, "target_class", None) is not None)
    head = head[:3] + [f"{where}targeted success -> {class_name(analysis, int(target))} [95 %]"] + head[3:]
    return head, [r[:3] + [c] + r[3:] for r, c in zip(rows, cells)]


def interval(ci) -> str:
    """A 95 % interval of rates as the report writes it: ``(0.01, 0.05)`` -> ``"[1.0%, 5.0%]"``."""
    return f"[{percent(ci[0])}, {percent(ci[1])}]"


def percent(rate: float) -> str:
    """A rate in [0, 1] as the report writes it: ``0.0625`` -> ``"6.2%"``."""
    return f"{100 * rate:.1f}%"


def uap_files(uaps: list) -> dict[str, bytes]:
    """Each UAP as ``uaps/<name>.npy`` (the ``(C, H, W)`` float32 array) and ``uaps/<name>.png`` (an
    image, zero at mid-grey, scaled by its largest absolute value), for the report folder."""
    import io

    import numpy as np

    files = {}
    for u in uaps:
        stem = "uaps/" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in u.name)
        buf = io.BytesIO()
        np.save(buf, u.vector.detach().float().cpu().numpy())
        files[stem + ".npy"] = buf.getvalue()
        buf = io.BytesIO()
        img = to_display(u.vector.detach().cpu()).numpy()
        plt.imsave(buf, img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, format="png")
        files[stem + ".png"] = buf.getvalue()
    return files
