"""The benchmarks' summary: per group, the fused step's speedup over the reference and the compiled
reference, and its time against the ``copy`` yardstick (the time to stream its bytes: three reads
and one write); uapx's end-to-end runs against the plain torchattacks script and ART. "slower"
where ours takes longer. Printed after pytest-benchmark's tables and added to its JSON
(``uapx_summary``).

Cases marked ``large`` (the 50,000-image memory runs) are opt-in: ``UAPX_BENCH_LARGE=1``."""
from __future__ import annotations

import os
from typing import Callable

import pytest

_SUMMARY = pytest.StashKey[list]()


def _medians(benchmarks: list[dict], median: Callable[[dict], float]) -> dict[str, dict[str, float]]:
    """``{group: {implementation: median seconds}}``."""
    out: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        if "impl" in bench["extra_info"]:
            out.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = median(bench)
    return out


def speedup(ours: float, theirs: float, name: str) -> str:
    """``"3.1x faster than NAME"`` or, when ours takes longer, ``"1.2x slower than NAME"``."""
    if ours <= theirs:
        return f"{theirs / ours:.1f}x faster than {name}"
    return f"{ours / theirs:.1f}x slower than {name}"


def summary(medians: dict[str, dict[str, float]]) -> list[str]:
    """One line per group: the fused step against the others (and its time against ``copy``), or
    uapx (``uapx``, ``uapx-*``) against the third-party implementations of the same work."""
    lines = []
    for group, times in sorted(medians.items()):
        fused = times.get("fused")
        if fused is not None:
            parts = [f"fused {fused * 1e3:.3g} ms"]
            parts += [speedup(fused, times[other], other) for other in ("reference", "compiled") if other in times]
            if "copy" in times:
                parts.append(f"{fused / times['copy']:.2f}x the time to stream its bytes (copy)")
            lines.append(f"{group}: {', '.join(parts)}")
            continue
        ours = {k: t for k, t in times.items() if k == "uapx" or k.startswith("uapx-")}
        others = {k: t for k, t in times.items() if k not in ours}
        for name, t in sorted(ours.items()):
            if others:
                lines.append(f"{group}: {name} {t:.3g} s, " + ", ".join(speedup(t, o, k) for k, o in sorted(others.items())))
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list[dict], group_by: str):
    yield  # benchmarks from --benchmark-compare files have a path; this run's have none
    config.stash[_SUMMARY] = summary(_medians([b for b in benchmarks if b.get("path") is None],
                                              lambda b: b["median"]))


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["uapx_summary"] = summary(_medians(output_json["benchmarks"], lambda b: b["stats"]["median"]))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("uapx: speedups (medians)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "large: opt-in benchmark cases (minutes, GBs): set UAPX_BENCH_LARGE=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if os.environ.get("UAPX_BENCH_LARGE") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in large case: set UAPX_BENCH_LARGE=1")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
