"""torchrun with 2 CPU processes (gloo) gives the answers of one process, without gathering N x d."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from uapx.methods import load_uaps

ARGS = ["analyze", "--plugins", "average,svd,rsvd,spectrum", "--n-samples", "150", "--steps", "3",
        "--batch-size", "50", "--random-draws", "2", "--k", "4",
        "--set", "rsvd.oversample=20", "--set", "rsvd.power_iters=4"]


def run(tmp_path, out, *, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                "-m", "uapx"] if ranks > 1 else [sys.executable, "-m", "uapx"]
    return subprocess.run([*launcher, *ARGS, "--out", str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    one, two = tmp / "one", tmp / "two"
    for out, ranks in ((one, 1), (two, 2)):
        res = run(tmp, out, ranks=ranks)
        assert res.returncode == 0, res.stderr[-3000:]
    return [(json.loads((d / "report.json").read_text()), {u.name: u for u in load_uaps(d / "uaps.pt")})
            for d in (one, two)]


def test_two_ranks_give_the_singular_values_of_one_process(reports):
    (a, _), (b, _) = reports
    assert b["data"]["ranks"] == 2 and b["data"]["n_images"] == a["data"]["n_images"] == 150
    sa = a["diagnostics"]["spectrum"]["global"]["singular_values"]
    sb = b["diagnostics"]["spectrum"]["global"]["singular_values"]
    torch.testing.assert_close(torch.tensor(sb), torch.tensor(sa), rtol=1e-4, atol=0)
    for method in ("svd", "rsvd"):
        for i in range(1, 5):
            name = f"{method}:v{i}"
            va, vb = (r["uaps"]["evaluations"][name]["meta"]["singular_value"] for r in (a, b))
            assert vb == pytest.approx(va, rel=1e-4), name
    for c in ("0", "7"):  # per class too
        torch.testing.assert_close(torch.tensor(b["diagnostics"]["spectrum"]["per_class"][c]["singular_values"]),
                                   torch.tensor(a["diagnostics"]["spectrum"]["per_class"][c]["singular_values"]),
                                   rtol=1e-4, atol=0)


def test_two_ranks_give_the_same_uaps_and_evaluation(reports):
    (a, ua), (b, ub) = reports
    assert set(ua) == set(ub)
    for name in ("average", "average:class-2"):
        torch.testing.assert_close(ub[name].vector, ua[name].vector, rtol=1e-4, atol=1e-6)
    for name in ("svd:v1", "rsvd:v1"):  # singular vectors up to sign
        assert abs(float(ua[name].vector.flatten() @ ub[name].vector.flatten())) / 4.0 > 1 - 1e-4
    assert b["attack"]["adversarial_accuracy"] == a["attack"]["adversarial_accuracy"]
    assert b["uaps"]["evaluations"]["average"]["fooling_rate"] == a["uaps"]["evaluations"]["average"]["fooling_rate"]


def test_plugins_that_need_the_whole_set_are_refused_up_front(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "uapx", "analyze", "--plugins", "svd,trajectory", "--out", "r"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "uapx: error: plugin(s) trajectory cannot run on sharded data under torchrun yet" in res.stderr
    # torchrun reports the failed worker with its own traceback; none comes from uapx's code
    assert not re.search(r'File ".*/(uapx|uapx_plugins)/', res.stderr) and not (tmp_path / "r").exists()


def test_attack_with_two_ranks_writes_the_set_one_process_writes(tmp_path):
    from uapx.perturbations import PerturbationSet

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["attack", "--n-samples", "90", "--steps", "2", "--batch-size", "20", "--chunk-size", "25"]
    for out, launcher in (("one", [sys.executable, "-m", "uapx"]),
                          ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2", "-m", "uapx"])):
        res = subprocess.run([*launcher, *args, "--out", out], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    one = PerturbationSet.load(tmp_path / "one", in_memory=True)
    two = PerturbationSet.load(tmp_path / "two", in_memory=True)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["manifest.json", "rank-00000", "rank-00001"]
    assert torch.equal(one.indices, two.indices) and torch.equal(one.labels, two.labels)
    torch.testing.assert_close(two.deltas, one.deltas, rtol=0, atol=1e-5)
    streamed = PerturbationSet.load(tmp_path / "two")
    torch.testing.assert_close(torch.cat(list(streamed.chunks(7))), two.deltas, rtol=0, atol=0)
