"""The benchmarks' summary: per group, the fused step's speedup over the reference and the compiled
reference, and its time against the ``copy`` yardstick (the time to stream its bytes: three reads
and one write). Printed after pytest-benchmark's tables and added to its JSON (``uapx_summary``)."""
from __future__ import annotations

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


def summary(medians: dict[str, dict[str, float]]) -> list[str]:
    """One line per group that timed the fused step."""
    lines = []
    for group, times in sorted(medians.items()):
        fused = times.get("fused")
        if fused is None:
            continue
        parts = [f"fused {fused * 1e3:.3g} ms"]
        parts += [f"{times[other] / fused:.1f}x faster than {other}" for other in ("reference", "compiled")
                  if other in times]
        if "copy" in times:
            parts.append(f"{fused / times['copy']:.2f}x the time to stream its bytes (copy)")
        lines.append(f"{group}: {', '.join(parts)}")
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
        terminalreporter.section("fused PGD-L2 step: speedups (medians)")
        for line in lines:
            terminalreporter.write_line(line)
