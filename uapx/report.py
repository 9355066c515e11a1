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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import atomic  # noqa: E402
from .errors import UapxError  # noqa: E402


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
        probe.unlink()
    except OSError as exc:
        raise UapxError(f"cannot write to {str(parent)!r} ({exc.strerror or exc})",
                        "pass an --out in a folder you can write to") from None
    return out


# -- HTML -------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and all(not isinstance(e, (dict, list)) for e in v):
        return ", ".join(_fmt(e) for e in v)
    return html.escape(str(v))


def _rows(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested JSON into (path, value) rows; scalar lists stay one row."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _rows(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and any(isinstance(e, (dict, list)) for e in obj):
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
border-left:4px solid #5577aa}details{margin:.5em 0}.compare th{background:#eef;padding:2px 8px;
border:1px solid #ccd}.compare td{text-align:right}"""


def _plain_table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='compare'><tr>{th}</tr>{body}</table>"


def _section_html(title: str, prefix: str, summary: str, plots: list[Plot], body: Any, *, open_: bool,
                  table: tuple[list[str], list[list[Any]]] | None = None) -> str:
    parts = [f"<section><h2>{html.escape(title)}</h2>"]
    for line in summary.splitlines():
        if line.strip():
            parts.append(f"<p class='summary'>{html.escape(line)}</p>")
    if table is not None:
        parts.append(_plain_table(*table))
    for p in plots:
        b64 = base64.b64encode(p.png).decode()
        parts.append(f"<figure><img alt='{html.escape(p.name)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(p.caption)}</figcaption></figure>")
    if body is not None:
        n = len(_rows(body, prefix))
        parts.append(f"<details{' open' if open_ else ''}><summary>{n} figures</summary>"
                     f"{_table(body, prefix)}</details>")
    parts.append("</section>")
    return "".join(parts)


RESULTS_FIRST = ("findings", "attack", "uaps")  # then diagnostics, then the run's context
CONTEXT_LAST = ("data", "model", "config", "environment", "timing_seconds")


def render_html(self: Report) -> str:
    """The self-contained page: results first (summary, plots embedded, figures), then context."""
    sections: list[str] = []
    plot_sections = {p.section for p in self.plots}
    done: set[str] = set()

    def add(key: str, prefix: str, body: Any, *, open_: bool) -> None:
        done.add(key)
        plots = [p for p in self.plots if p.section == key]
        sections.append(_section_html(key, prefix, self.summaries.get(key, ""), plots, body, open_=open_,
                                      table=self.tables.get(key)))

    for key in [*self.order, *(k for k in RESULTS_FIRST if k not in self.order)]:
        if key in self.data:
            add(key, key, self.data[key], open_=key != "uaps")
        elif key in plot_sections:
            add(key, key, None, open_=False)
    for name, body in self.data.get("diagnostics", {}).items():
        add(name, f"diagnostics.{name}", body, open_=False)
    rest = [k for k in self.data if k not in (*RESULTS_FIRST, *CONTEXT_LAST, "diagnostics", "plots")]
    for key in [*rest, *(k for k in CONTEXT_LAST if k in self.data)]:
        add(key, key, self.data[key], open_=False)
    for key in sorted(plot_sections - done):
        add(key, key, None, open_=False)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(sections)}"
            "</body></html>\n")

