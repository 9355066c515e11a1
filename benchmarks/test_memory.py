"""Peak resident memory of `uapx attack` and `uapx analyze` on CIFAR-10 training images, for two N.

Each run is a fresh process; its peak RSS (ru_maxrss of the child) is recorded in the benchmark's
extra_info and printed. The issue's bound: under 4 GB whatever N, up to all 50,000 images.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uapx.models import build, save_model

PREPARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "prepare.py"
LIMIT_MB = 4096
PEAKS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    if not PREPARE.is_file():
        pytest.skip("real data not available")
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(PREPARE), str(root), "--only", "cifar10"], check=True, capture_output=True)
    model = root / "resnet-small.pt"
    save_model(model, build("resnet-small"), "resnet-small")  # random weights: memory does not depend on them
    return root, model


def peak_rss_mb(argv: list[str], cwd: Path) -> float:
    """Run ``python -m uapx ARGV`` in a fresh process; its peak RSS in MiB."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "uapx", *argv], cwd=cwd,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.parametrize("command", ["attack", "analyze"])
@pytest.mark.parametrize("n", [2000, pytest.param(50000, marks=pytest.mark.large)])  # large: opt-in
def test_peak_memory(benchmark, setup_dir, tmp_path, command, n):
    root, model = setup_dir
    common = ["--dataset", "cifar10", "--split", "train", "--data-root", str(root), "--model", str(model),
              "--n-samples", str(n), "--steps", "1", "--batch-size", "250"]
    if command == "attack":
        argv = ["attack", *common, "--out", "set"]
    else:
        argv = ["analyze", *common, "--plugins", "average", "--set", "average.per_class=false",
                "--random-draws", "1", "--out", "rep"]
    peak = benchmark.pedantic(peak_rss_mb, args=(argv, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mb"] = round(peak, 1)
    PEAKS[f"{command} n={n}"] = peak
    print(f"\n{command} on {n} CIFAR-10 training images: peak RSS {peak:.0f} MiB")
    assert peak < LIMIT_MB


def teardown_module(module):
    if PEAKS:
        print("\npeak RSS (MiB): " + json.dumps({k: round(v) for k, v in PEAKS.items()}))
