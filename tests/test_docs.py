"""The documentation site: it builds with warnings as errors, its generated pages say what the
code does, the report schema agrees with a real report, and the example plugins it shows work."""
from __future__ import annotations

import argparse
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from uapx.cli import build_parser, main
from uapx.pipeline import AnalyzeConfig, analyze
from uapx.registry import Registry

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "report-schema.md"
BUILTIN_DIAGNOSTICS = ["spectrum", "trajectory", "interpretability", "landscape", "local-linearity", "gradalign",
                       "cure", "hessian", "subspace"]

if not os.environ.get("CI"):  # in CI the test extra installs the docs extra: a missing one must fail, not skip
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def test_site_builds_with_warnings_as_errors(site):
    for page in ("index", "study", "tutorial", "cli", "api", "plugins", "report-schema", "performance"):
        path = site / (f"{page}/index.html" if page != "index" else "index.html")
        assert path.is_file(), page
    assert not (site / "hooks.py").exists()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_cli_reference_lists_every_subcommand_and_option(site):
    page = (site / "cli" / "index.html").read_text()
    parser = build_parser()
    subs = _subparsers(parser)
    assert len(subs) >= 7
    for name, sub in subs.items():
        assert f"<code>uapx {name}</code>" in page, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"<code>{flag}</code>" in page, (name, flag)


def test_api_reference_documents_the_public_surface(site):
    page = (site / "api" / "index.html").read_text()
    for anchor in ("uapx.analyze", "uapx.plugin", "uapx.data.load", "uapx.models.load", "uapx.attacks.pgd",
                   "uapx.perturbations.PerturbationSet", "uapx.methods.UAPMethod", "uapx.diagnostics.Diagnostic",
                   "uapx.evaluate.evaluate_uap", "uapx.hookspecs"):
        assert f'id="{anchor}"' in page, anchor


def test_getting_started_shows_the_readme_commands(site):
    readme = (REPO / "README.md").read_text()
    page = (site / "index.html").read_text()
    install = re.search(r"^    (pip install .*)$", readme, re.M).group(1)
    assert "uapx analyze" in install
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert install in text and "python -m pytest tests" in text


def test_plugins_page_and_readme_show_both_complete_examples(site):
    page = (site / "plugins" / "index.html").read_text()
    readme = (REPO / "README.md").read_text()
    for example in ("uapx-median/uapx_median.py", "uapx-alignment/uapx_alignment.py"):
        src = (REPO / "examples" / example).read_text().strip()
        assert src in readme, f"README.md must show examples/{example} in full"
        cls = re.search(r"^class (\w+)", src, re.M).group(1)
        assert cls in page


def test_user_documents_name_nothing_outside_the_repository():
    # a user of the repository has neither the development workspace's shared/ folder nor its paths
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "tutorial.ipynb"]
    for path in pages:
        text = path.read_text()
        assert "shared/" not in text, f"{path.name} refers to shared/ (not in the repository)"
        assert "/work/" not in text, f"{path.name} refers to a /work path of the development machine"


# -- the report schema ------------------------------------------------------------------------


def documented_keys() -> list[tuple[tuple[str, ...], str]]:
    """``(path segments, present)`` for each row of docs/report-schema.md's tables."""
    rows = []
    for line in SCHEMA.read_text().splitlines():
        m = re.match(r"^\| `(/[^`]+)` \| ([^|]+) \|", line)
        if m:
            rows.append((tuple(m.group(1).strip("/").split("/")), m.group(2).strip()))
    return rows


def report_paths(obj, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf of a JSON document as path segments; lists of scalars are leaves."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in report_paths(v, (*prefix, str(k)))]
    if isinstance(obj, list) and any(isinstance(e, (dict, list)) for e in obj):
        return [p for i, v in enumerate(obj) for p in report_paths(v, (*prefix, str(i)))]
    return [prefix]


def _segment_regex(seg: str) -> str:
    """A documented segment as a regex: ``<name>`` parts stand for any text, the rest is literal."""
    return "".join(".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", seg) if part)


def matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    for i, seg in enumerate(pattern):
        if seg == "**":
            return len(path) > i
        if i >= len(path) or not re.fullmatch(_segment_regex(seg), path[i]):
            return False
    return len(path) == len(pattern)


def required(present: str, plugins: list[str]) -> bool:
    """Whether a documented key must appear in a report of a run with ``plugins``."""
    if present == "always":
        return True
    if present.startswith("plugin "):
        return present.split()[1] in plugins
    if present == "per diagnostic":
        return any(p in BUILTIN_DIAGNOSTICS for p in plugins)
    return False  # conditional: --transfer, torchrun, --set, some methods, bfloat16


def test_schema_parser_and_matcher():
    rows = documented_keys()
    assert len(rows) > 80
    assert matches(("uaps", "evaluations", "<uap>", "fooling_rate"), ("uaps", "evaluations", "svd:v1", "fooling_rate"))
    assert not matches(("uaps", "evaluations", "<uap>", "fooling_rate"), ("uaps", "evaluations", "svd:v1"))
    assert not matches(("uaps", "evaluations", "<uap>"), ("uaps", "evaluations", "svd:v1", "fooling_rate"))
    assert matches(("model", "**"), ("model", "config", "lr")) and not matches(("model", "**"), ("model",))
    assert not matches(("attack", "n_images"), ("attack", "n_images_x"))
    assert matches(("timing_seconds", "diagnostic:<name>"), ("timing_seconds", "diagnostic:spectrum"))
    assert not matches(("timing_seconds", "diagnostic:<name>"), ("timing_seconds", "attack"))


@pytest.fixture(scope="module")
def real_report(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("schema") / "rep"
    plugins = ["average", "svd", *BUILTIN_DIAGNOSTICS]
    small = ["landscape.images=8", "local-linearity.images=6", "local-linearity.steps=1", "gradalign.images=6",
             "cure.images=6", "hessian.images=6", "hessian.iters=2", "subspace.draws=1", "subspace.max_k=2"]
    assert main(["analyze", "--n-samples", "40", "--steps", "2", "--random-draws", "1", "--k", "2",
                 "--trajectory-samples", "4", *(a for kv in small for a in ("--set", kv)),
                 "--plugins", ",".join(plugins), "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), plugins


def test_every_key_of_a_real_report_is_documented(real_report):
    report, _ = real_report
    rows = documented_keys()
    undocumented = sorted({"/" + "/".join(p) for p in report_paths(report)
                           if not any(matches(pat, p) for pat, _ in rows)})
    assert not undocumented, ("keys of report.json missing from docs/report-schema.md (add a row each): "
                              + ", ".join(undocumented[:40]))


def test_every_documented_key_is_in_a_real_report(real_report):
    report, plugins = real_report
    paths = report_paths(report)
    stale = ["/" + "/".join(pat) for pat, present in documented_keys()
             if required(present, plugins) and not any(matches(pat, p) for p in paths)]
    assert not stale, "docs/report-schema.md documents keys a real report lacks: " + ", ".join(stale)


# -- the example diagnostic -------------------------------------------------------------------


def test_example_diagnostic_runs_and_measures_what_it_says(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "uapx_alignment", REPO / "examples" / "uapx-alignment" / "uapx_alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reg = Registry().load_entrypoints()
    reg.register(module, "alignment", distribution="uapx-alignment", version="0.1.0")
    res = analyze(AnalyzeConfig(plugins=["average", "alignment"], n_samples=60, steps=3, random_draws=1,
                                out=str(tmp_path / "rep")), registry=reg)
    figs = res.report["diagnostics"]["alignment"]
    deltas = res.analysis.pset.matrix().double().numpy()
    mean = deltas.mean(axis=0)
    cos = deltas @ mean / (np.linalg.norm(deltas, axis=1) * np.linalg.norm(mean))
    assert figs["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    assert figs["mean_cosine_sd"] == pytest.approx(cos.std(ddof=1), abs=1e-5)
    # the control: a random direction in d = 784 dimensions is nearly orthogonal to every perturbation
    d = deltas.shape[1]
    assert abs(figs["random_cosine"]) < 4 / np.sqrt(d) + 4 * figs["random_cosine_sd"] / np.sqrt(60)
    assert figs["mean_cosine"] > figs["random_cosine"] + 5 * figs["random_cosine_sd"]
    assert any(p["section"] == "alignment" for p in res.report["plots"])
    assert (res.out / "index.html").read_text().count("alignment") >= 1
    assert torch.is_tensor(res.analysis.pset.matrix())
