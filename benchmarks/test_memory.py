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


FLAT_RATIO, FLAT_LIMIT_MB = 1.25, 2048  # issue 14: analyze's peak memory flat in N


def tiny_cnn(num_classes: int = 10):
    """A small random-weight CNN for the memory runs (``--model test_memory:tiny_cnn``): what grows
    with N is then uapx's, not the activations of a large model."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, num_classes))


def test_analyze_memory_flat_in_n(setup_dir, tmp_path, monkeypatch):
    """``analyze --plugins average,rsvd,spectrum`` (1 PGD step, random-weight model built by its
    factory) at N = 2,000 and N = 20,000 CIFAR-10 training images: the larger run streams (images
    read per chunk, the perturbations in an on-disk set) and its peak RSS stays within 1.25x of the
    smaller's and below 2 GB. Methods and spectrum run globally and per class."""
    root, _ = setup_dir
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    peaks = {}
    for n in (2000, 20000):
        argv = ["analyze", "--dataset", "cifar10", "--split", "train", "--data-root", str(root), "--model",
                "test_memory:tiny_cnn", "--n-samples", str(n), "--steps", "1", "--batch-size", "250", "--plugins",
                "average,rsvd,spectrum", "--k", "2", "--random-draws", "1", "--eval-precision", "float32",
                "--out", f"rep-{n}"]
        peaks[n] = peak_rss_mb(argv, tmp_path)
        PEAKS[f"analyze average,rsvd,spectrum n={n}"] = peaks[n]
        print(f"\nanalyze --plugins average,rsvd,spectrum on {n} CIFAR-10 training images: peak RSS {peaks[n]:.0f} MiB")
    assert peaks[20000] <= FLAT_RATIO * peaks[2000], peaks
    assert peaks[20000] < FLAT_LIMIT_MB, peaks
