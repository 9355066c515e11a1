"""The report folder: ``report.json``, PNG plots and a self-contained ``index.html``.

Everything is assembled in memory and written at once through :func:`uapx.atomic.atomic_path`
(a temporary folder renamed onto the target), so a report folder is either complete or absent.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic
from .errors import UapxError
from .plots import plt


@dataclass
class Plot:
    section: str
    name: str  # file name without .png
    png: bytes
    caption: str


@dataclass
class Report:
    """A report being assembled: JSON content plus plots, grouped in sections."""

    title: str
    data: dict[str, Any] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    summaries: dict[str, str] = field(default_factory=dict)
    extra_files: dict[str, bytes] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # sections to show first, in this order
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)  # section -> (head, rows)

    def add_plot(self, section: str, name: str, fig, caption: str = "") -> str:
        """Render a matplotlib figure to PNG (and close it); returns the file name."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in f"{section}-{name}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        self.plots.append(Plot(section, safe, buf.getvalue(), caption))
        return safe + ".png"

    def html(self) -> str:
        return render_html(self)

    def write(self, out: str | os.PathLike, *, replace: bool = True) -> Path:
        """Write the folder atomically (a folder with files at ``out`` is replaced only with
        ``replace``) and release this process's claim on it; returns its path."""
        out = Path(out)
        try:
            with atomic.atomic_path(out, directory=True, replace=replace) as tmp:
                self.write_into(tmp)
        finally:
            atomic.release(out)
        return out

    def write_into(self, folder: Path) -> None:
        """Write report.json, the PNGs, extra files and index.html into an existing folder."""
        self.data["plots"] = [{"file": p.name + ".png", "section": p.section, "caption": p.caption}
                              for p in self.plots]
        for p in self.plots:
            (folder / f"{p.name}.png").write_bytes(p.png)
        for name, blob in self.extra_files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(blob)
        text = json.dumps(self.data, indent=2, default=atomic.json_default) + "\n"
        (folder / "report.json").write_bytes(text.encode("utf-8"))
        (folder / "index.html").write_bytes(self.html().encode("utf-8"))


def check_output_folder(out: str | os.PathLike, *, overwrite: bool, claim: bool = False) -> Path:
    """Refuse a folder holding another run (unless ``overwrite``) or one that cannot be written.

    With ``claim`` the folder is first claimed for this run (:func:`uapx.atomic.claim`: a second
    run on it is refused until :meth:`Report.write` or :func:`uapx.atomic.release` frees it), and
    the temporary copies dead runs left beside it are removed."""
    out = Path(out)
    if claim:
        atomic.claim(out)
    try:
        return _check_output_folder(out, overwrite=overwrite)
    except BaseException:
        if claim:
            atomic.release(out)
        raise


def _check_output_folder(out: Path, *, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UapxError(f"output {str(out)!r} exists and is not a folder", "pass another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "another run's report" if (out / "report.json").exists() else "other files"
        raise UapxError(f"output folder {str(out)!r} already holds {what}",
                        "pass --overwrite to replace it, or another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # under torchrun the main rank's claim may have swept it already
    except OSError as exc:
        raise UapxError(f"cannot write to {str(parent)!r} ({exc.strerror or exc})",
                        "pass an --out in a folder you can write to") from None
    return out


# -- HTML -------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and all(not isinstance(e, (dict, list, tuple)) for e in v):  # JSON arrays
        return ", ".join(_fmt(e) for e in v)
    return html.escape(str(v))


def _rows(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested JSON into (path, value) rows; scalar lists stay one row."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _rows(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(e, (dict, list, tuple)) for e in obj):
        out = []
        for i, v in enumerate(obj):
            out += _rows(v, f"{prefix}[{i}]")
        return out
    return [(prefix, _fmt(obj))]


def _table(obj: Any, prefix: str) -> str:
    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{v}</td></tr>" for k, v in _rows(obj, prefix))
    return f"<table>{rows}</table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td{border:1px solid #ddd;padding:2px 8px;
vertical-align:top}figure{display:inline-block;margin:.5em;max-width:100%}img{max-width:100%}
figcaption{font-size:.85em;color:#555;max-width:520px}.summary{background:#f4f7fb;padding:.6em 1em;
border-left:4px solid #5577aa}details{margin:.5em 0}summary{cursor:pointer;color:#335}
.compare th{background:#eef;padding:2px 8px;border:1px solid #ccd}.compare td{text-align:right}
header.run{background:#fafafa;border:1px solid #ddd;padding:.4em 1em 1em}header.run td:first-child{color:#555}
.keys{font-size:1em}.keys td{border:none;padding:1px 10px 1px 0}.verdict{font-weight:bold}"""


def _plain_table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='compare'><tr>{th}</tr>{body}</table>"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "n/a"


# What the folded full table of each section is called, and each section's heading.
FOLD_NAMES = {"uaps": "Random baseline and evaluation settings", "attack": "Attack settings and figures",
              "findings": "Every finding in full: claims, criteria, numbers", "data": "Data set",
              "model": "Model card", "config": "Settings of this run (resolved)", "defaults_applied":
              "Defaults that applied", "environment": "Software and machine", "timing_seconds": "Time taken (s)"}
TITLES = {"findings": "Findings", "attack": "Per-image attack", "uaps": "Headline: UAPs against random directions",
          "data": "Data", "model": "Model", "config": "Settings", "defaults_applied": "Defaults applied",
          "environment": "Environment", "timing_seconds": "Timing"}


def _plots_html(plots: list[Plot]) -> str:
    return "".join(f"<figure><img alt='{html.escape(p.name)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.png).decode()}'><figcaption>{html.escape(p.caption)}</figcaption></figure>"
                   for p in plots)


def _section_html(title: str, prefix: str, summary: str, plots: list[Plot], body: Any, *, open_: bool,
                  table: tuple[list[str], list[list[Any]]] | None = None, fold: str = "",
                  key_numbers: list[tuple[str, str]] | None = None, anchor: str = "") -> str:
    """A section: heading, summary, the few numbers that matter, table, plots, then the full
    numbers folded under ``fold``."""
    ident = f" id='{html.escape(anchor)}'" if anchor else ""
    parts = [f"<section{ident}><h2>{html.escape(title)}</h2>"]
    for line in summary.splitlines():
        if line.strip():
            parts.append(f"<p class='summary'>{html.escape(line)}</p>")
    if key_numbers:
        parts.append("<table class='keys'>" + "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b>"
                                                     "</td></tr>" for k, v in key_numbers) + "</table>")
    if table is not None:
        parts.append(_plain_table(*table))
    parts.append(_plots_html(plots))
    if body is not None:
        n = len(_rows(body, prefix))
        parts.append(f"<details{' open' if open_ else ''}><summary>{html.escape(fold or 'All numbers')} "
                     f"({n} values)</summary>{_table(body, prefix)}</details>")
    parts.append("</section>")
    return "".join(parts)


def _header_html(title: str, data: dict) -> str:
    """What ran: model, data, eps, sizes, seed, attack, plugins, uapx version."""
    c, d, env, att = (data.get(k) or {} for k in ("config", "data", "environment", "attack"))
    rows = []
    if c.get("model"):
        rows.append(("model", str(c["model"])))
    if d:
        shape = "x".join(str(v) for v in d.get("shape", []))
        rows.append(("data", f"{d.get('dataset', '?')} ({d.get('split', '?')}), {d.get('n_images', '?')} images"
                             + (f" of {shape}" if shape else "")))
        h = d.get("held_out") or {}
        if h:
            rows.append(("held-out images", f"{h.get('n_images', '?')} of {d.get('dataset', '?')} ({h.get('split', '?')}"
                         + ("; the other part of the sample" if h.get("protocol") == "sample" else "")
                         + "): the UAPs are judged on these, fitted on the images above"))
    if c.get("eps") is not None:
        eps = ", ".join(f"{e:g}" for e in c["eps"]) if isinstance(c["eps"], list) else f"{c['eps']:g}"  # a sweep: a list
        rows.append(("eps", f"{eps} ({c.get('attack', '')})"))
    if att.get("plugin"):
        rows.append(("attack", str(att["plugin"])))
    if c.get("plugins"):
        rows.append(("plugins", ", ".join(map(str, c["plugins"]))))
    if c.get("seed") is not None:
        rows.append(("seed", str(c["seed"])))
    if "total" in data.get("timing_seconds", {}):
        rows.append(("time", f"{data['timing_seconds']['total']:.1f} s"))
    rows.append(("uapx", str(env.get("uapx") or _version())))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<header class='run' id='run'><h1>{html.escape(title)}</h1><table class='keys'>{body}</table></header>"


def _version() -> str:
    from . import __version__

    return __version__


def _method_sections(self: "Report") -> list[str]:
    """One section per UAP method: its best global UAP against random, its plots, its evaluations folded."""
    evs = (self.data.get("uaps") or {}).get("evaluations") or {}
    base = ((self.data.get("uaps") or {}).get("random_baseline") or {}).get("fooling_rate", {}).get("mean")
    methods = list(dict.fromkeys(n.split(":", 1)[0] for n in evs))
    out = []
    for m in methods:
        mine = {n: e for n, e in evs.items() if n.split(":", 1)[0] == m}
        glob = {n: e for n, e in mine.items() if e.get("source_class") is None}
        keys = []
        if glob:
            best = max(glob, key=lambda n: glob[n]["fooling_rate"])
            keys.append(("best global UAP", f"{best}: fools {_pct(glob[best]['fooling_rate'])} "
                                            f"(random directions {_pct(base)})"))
            keys.append(("accuracy under it", _pct(glob[best]["accuracy"])))
        on = [e["on_class_fooling"] for e in mine.values() if e.get("on_class_fooling") is not None]
        off = [e["off_class_fooling"] for e in mine.values() if e.get("off_class_fooling") is not None]
        if on and off:
            keys.append(("class-specific UAPs", f"fool {_pct(sum(on) / len(on))} of their own class's images, "
                                                f"{_pct(sum(off) / len(off))} of the others' (mean over classes)"))
        keys.append(("UAPs", f"{len(glob)} global, {len(mine) - len(glob)} class-specific"))
        plots = [p for p in self.plots if p.section == f"uaps/{m}"]
        out.append(_section_html(f"UAP method: {m}", f"uaps.evaluations", "", plots, None, open_=False,
                                 key_numbers=keys, anchor=f"method-{m}"))
        rows = "".join(_table(e, f"uaps.evaluations.{n}")[len("<table>"):-len("</table>")] for n, e in mine.items())
        n_vals = sum(len(_rows(e)) for e in mine.values())
        out[-1] = out[-1][:-len("</section>")] + (
            f"<details><summary>Every evaluation of {html.escape(m)}'s UAPs: both signs, per class, where the "
            f"fooled images went ({n_vals} values)</summary><table>{rows}</table></details></section>")
    return out


def _headline_verdict(uaps: dict) -> list[tuple[str, str]]:
    """The headline's verdict, by a criterion fixed here: the best global UAP (chosen on the images it
    was fitted on) beats random directions of the same norm when, on the held-out images (in-sample
    where a report has none), the lower end of its Wilson 95% interval lies above the upper end of the
    random directions' (pooled over draws)."""
    glob = [e for e in uaps.get("evaluations", {}).values() if e.get("source_class") is None]
    held = uaps.get("held_out") or {}
    judged = held if held.get("evaluations") else uaps
    rand = (judged.get("random_baseline") or {}).get("fooling_rate", {}).get("wilson95")
    if not glob or not rand:
        return []
    best = judged["evaluations"].get(max(glob, key=lambda e: e["fooling_rate"])["name"])
    ci = (best or {}).get("fooling_rate_wilson95")
    if not ci:
        return []
    beats = ci[0] > rand[1]
    where = f"on {held['n_images']} held-out images" if judged is held else "in-sample"
    return [("verdict", ("the best UAP fools more images than random directions" if beats else
                         "the best UAP is not distinguishable from random directions")
             + f" {where} ({best['name']}: 95% interval {_pct(ci[0])} to {_pct(ci[1])}; random: {_pct(rand[0])} "
               f"to {_pct(rand[1])})")]


def _attack_keys(att: dict) -> list[tuple[str, str]]:
    keys = []
    if "clean_accuracy" in att:
        keys.append(("clean accuracy", _pct(att["clean_accuracy"])))
    if "adversarial_accuracy" in att:
        keys.append(("accuracy under the per-image attack", _pct(att["adversarial_accuracy"])))
    if "attack_success_rate" in att:
        keys.append(("predictions changed by it", _pct(att["attack_success_rate"])))
    for key, label in (("perturbation_norm", "perturbation L2 norm"), ("perturbation_norm_linf", "perturbation Linf norm")):
        norm = att.get(key) or {}
        if "mean" in norm:
            keys.append((label, f"mean {norm['mean']:.3g} (min {norm.get('min', float('nan')):.3g}, "
                                f"max {norm.get('max', float('nan')):.3g})"))
    return keys


RESULTS_FIRST = ("findings", "uaps", "attack")  # the headline, the methods, the attack; then diagnostics, context
CONTEXT_LAST = ("data", "model", "config", "defaults_applied", "environment", "timing_seconds")


def _images_keys(body: Any) -> list[tuple[str, str]] | None:
    """The key line of a diagnostic's section: how many images of each class it used."""
    from .stats import IMAGES_PER_CLASS

    counts = body.get(IMAGES_PER_CLASS) if isinstance(body, dict) else None
    if not counts:
        return None
    return [("images per class", ", ".join(f"{c}: {k}" for c, k in counts.items())
             + f" ({sum(counts.values())} images)")]


def render_html(self: Report) -> str:
    """The self-contained page that tells the story: a header with what ran, the headline (the
    best UAP against random directions, the findings' verdicts), one section per UAP method and
    per diagnostic with its plots and key numbers first, the full numbers folded, then context."""
    sections: list[str] = []
    plot_sections = {p.section for p in self.plots}
    done: set[str] = set()

    def add(key: str, prefix: str, body: Any, *, open_: bool, title: str | None = None, fold: str = "",
            key_numbers: list[tuple[str, str]] | None = None) -> None:
        done.add(key)
        plots = [p for p in self.plots if p.section == key]
        sections.append(_section_html(title or TITLES.get(key, key), prefix, self.summaries.get(key, ""), plots,
                                      body, open_=open_, table=self.tables.get(key), fold=fold or FOLD_NAMES.get(
                                          key, f"All numbers of {key}"), key_numbers=key_numbers, anchor=key))

    for key in [*self.order, *(k for k in RESULTS_FIRST if k not in self.order)]:
        if key in self.data:
            body = self.data[key]
            if key == "uaps" and isinstance(body, dict) and "evaluations" in body:
                add(key, key, {k: v for k, v in body.items() if k != "evaluations"}, open_=False,
                    key_numbers=_headline_verdict(body))
                sections.extend(_method_sections(self))
                done.update(f"uaps/{m}" for m in {p.section[5:] for p in self.plots if p.section.startswith("uaps/")})
            else:
                add(key, key, body, open_=False, key_numbers=_attack_keys(body) if key == "attack" else None)
        elif key in plot_sections:
            add(key, key, None, open_=False)
    for name, body in self.data.get("diagnostics", {}).items():
        add(name, f"diagnostics.{name}", body, open_=False, title=f"Diagnostic: {name}",
            fold=f"All numbers of the {name} diagnostic", key_numbers=_images_keys(body))
    rest = [k for k in self.data if k not in (*RESULTS_FIRST, *CONTEXT_LAST, "diagnostics", "plots") and k not in done]
    for key in [*rest, *(k for k in CONTEXT_LAST if k in self.data)]:
        add(key, key, self.data[key], open_=False)
    for key in sorted(plot_sections - done):
        add(key, key, None, open_=False)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body>{_header_html(self.title, self.data)}{''.join(sections)}"
            "</body></html>\n")
