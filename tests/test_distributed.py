"""torchrun with 2 CPU processes (gloo) gives the answers of one process, without gathering N x d;
the two iterative methods (iterate averaging, distributed mini-batch) give UAPs of their own."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from uapx import distributed
from uapx.methods import load_uaps

from plugin_dists import write_distribution

ARGS = ["analyze", "--plugins", "average,svd,rsvd,spectrum", "--n-samples", "300", "--steps", "3",
        "--batch-size", "50", "--random-draws", "2", "--k", "4",
        "--set", "rsvd.oversample=20", "--set", "rsvd.power_iters=4"]


# (a sample of 2N images: the UAPs are fitted on N, judged on the other N held out)
# every other built-in: 120 images, 60 per rank; the first 50 (landscape) lie on rank 0 alone (rank 1
# takes part with none), the first 100 (trajectory, the default --trajectory-samples) straddle both
OTHERS = ["analyze", "--plugins", "average,landscape,trajectory,interpretability,sgd-uap,deepfool-uap",
          "--n-samples", "240", "--steps", "3", "--batch-size", "40", "--random-draws", "2",
          "--set", "landscape.images=50", "--set", "landscape.points=5", "--set", "landscape.grid=3",
          "--set", "trajectory.restarts=3", "--set", "sgd-uap.epochs=1", "--set", "sgd-uap.batch_size=32",
          "--set", "deepfool-uap.max_images=20"]


def run(tmp_path, out, *, ranks: int, args=ARGS, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                "-m", "uapx"] if ranks > 1 else [sys.executable, "-m", "uapx"]
    return subprocess.run([*launcher, *args, "--out", str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


def one_and_two(tmp, args):
    one, two = tmp / "one", tmp / "two"
    for out, ranks in ((one, 1), (two, 2)):
        res = run(tmp, out, ranks=ranks, args=args)
        assert res.returncode == 0, res.stderr[-3000:]
    return [(json.loads((d / "report.json").read_text()), {u.name: u for u in load_uaps(d / "uaps.pt")})
            for d in (one, two)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return one_and_two(tmp_path_factory.mktemp("dist"), ARGS)


@pytest.fixture(scope="module")
def other_reports(tmp_path_factory):
    return one_and_two(tmp_path_factory.mktemp("dist-others"), OTHERS)


def test_two_ranks_give_the_singular_values_of_one_process(reports):
    (a, _), (b, _) = reports
    assert b["data"]["ranks"] == 2 and b["data"]["n_images"] == a["data"]["n_images"] == 150
    sa = a["diagnostics"]["spectrum"]["global"]["singular_values"]
    sb = b["diagnostics"]["spectrum"]["global"]["singular_values"]
    torch.testing.assert_close(torch.tensor(sb), torch.tensor(sa), rtol=1e-4, atol=0)
    ca, cb = (r["diagnostics"]["spectrum"]["images_per_class"] for r in (a, b))  # summed over both ranks
    assert ca == cb and sum(cb.values()) == 150
    ia, ib = (r["diagnostics"]["spectrum"]["global"]["talk"]["bootstrap95"] for r in (a, b))  # pool rows gathered
    for key in ("sigma1_over_sigma2", "energy_share"):
        for stat in ("low", "high", "se"):
            assert ib[key][stat] == pytest.approx(ia[key][stat], rel=1e-4), (key, stat)
    assert ia["method"]["n"] == ib["method"]["n"] == 150
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
    ha, hb = a["uaps"]["held_out"], b["uaps"]["held_out"]  # the held-out images, sharded over the ranks
    assert ha["n_images"] == hb["n_images"] == 150 and ha["class_counts"] == hb["class_counts"]
    assert hb["evaluations"]["average"]["fooling_rate"] == ha["evaluations"]["average"]["fooling_rate"]
    assert hb["random_baseline"]["fooling_rate"]["mean"] == ha["random_baseline"]["fooling_rate"]["mean"]


def test_landscape_and_trajectory_use_the_global_first_images(other_reports):
    (a, _), (b, _) = other_reports
    assert b["data"]["ranks"] == 2 and b["data"]["n_images"] == a["data"]["n_images"] == 120
    la, lb = a["diagnostics"]["landscape"], b["diagnostics"]["landscape"]
    assert la["images"] == lb["images"] == 50
    assert set(la["profiles"]) == set(lb["profiles"]) and "average" in la["profiles"]
    same = [n for n in la["profiles"] if n == "average" or n.startswith("random-")]  # the iterative UAPs differ
    assert len(same) == 4 and la["surface"]["uap"] == lb["surface"]["uap"] == "average"
    for name in same:
        torch.testing.assert_close(torch.tensor(lb["profiles"][name]), torch.tensor(la["profiles"][name]),
                                   rtol=1e-4, atol=0)
        assert lb["curvature_at_data"][name] == pytest.approx(la["curvature_at_data"][name], rel=1e-3, abs=1e-4)
    torch.testing.assert_close(torch.tensor(lb["surface"]["loss"]), torch.tensor(la["surface"]["loss"]),
                               rtol=1e-4, atol=0)
    ta, tb = a["diagnostics"]["trajectory"], b["diagnostics"]["trajectory"]
    assert ta["images"] == tb["images"] == 100 and ta["steps"] == tb["steps"] == 3
    for ref in ("universal", "own_final", "own_mean"):
        for key in ("mean_per_step", "std_per_step"):
            torch.testing.assert_close(torch.tensor(tb[ref][key]), torch.tensor(ta[ref][key]), rtol=1e-4, atol=1e-4)
        assert tb[ref]["mean_over_trajectory"] == pytest.approx(ta[ref]["mean_over_trajectory"], rel=1e-4, abs=1e-4)
    torch.testing.assert_close(torch.tensor(tb["loss_per_step"]), torch.tensor(ta["loss_per_step"]),
                               rtol=1e-4, atol=1e-4)
    for name in same:  # per-image curvatures gathered over both ranks, in the global order
        assert lb["curvature_stats"][name]["se"] == pytest.approx(la["curvature_stats"][name]["se"], rel=1e-3, abs=1e-6)
    for name in ("landscape", "trajectory", "interpretability"):  # class counts over both ranks
        ca, cb = a["diagnostics"][name]["images_per_class"], b["diagnostics"][name]["images_per_class"]
        assert ca == cb and sum(cb.values()) == b["diagnostics"][name]["images"], name
    sa, sb = ta["single_image"], tb["single_image"]  # global image 0, restarts on rank 0
    assert sa["index"] == sb["index"] == 0 and sa["restarts"]["count"] == sb["restarts"]["count"] == 3
    torch.testing.assert_close(torch.tensor(sb["universal"]), torch.tensor(sa["universal"]), rtol=1e-4, atol=1e-4)
    assert sb["restarts"]["own_final"]["mean"] == pytest.approx(sa["restarts"]["own_final"]["mean"], abs=1e-4)


def test_interpretability_reduces_class_means_and_the_covariance(other_reports):
    (a, _), (b, _) = other_reports
    ia, ib = a["diagnostics"]["interpretability"], b["diagnostics"]["interpretability"]
    assert ia["components"] == ib["components"] == 50
    same = [n for n in ia["data_subspace_energy"] if n.startswith("average")]  # the iterative UAPs differ
    assert same and set(ia["class_alignment"]) == set(ib["class_alignment"])
    for n in same:
        assert ib["data_subspace_energy"][n] == pytest.approx(ia["data_subspace_energy"][n], abs=1e-4), n
    for n, v in ia["class_alignment"].items():
        assert ib["class_alignment"][n] == pytest.approx(v, abs=1e-4), n
    assert ib["random_subspace_energy"]["mean"] == pytest.approx(ia["random_subspace_energy"]["mean"], abs=1e-4)


def test_iterative_methods_run_on_every_rank(other_reports):
    """sgd-uap (distributed mini-batch) and deepfool-uap (iterate averaging): UAPs of norm eps, finite
    histories; deepfool-uap need not match one process."""
    (a, ua), (b, ub) = other_reports
    for rep, uaps in ((a, ua), (b, ub)):
        for name, key in (("sgd-uap", "loss_per_epoch"), ("deepfool-uap", "fooling_rate_per_pass")):
            assert float(uaps[name].vector.norm()) == pytest.approx(2.0, rel=1e-5)
            ev = rep["uaps"]["evaluations"][name]
            assert 0 <= ev["fooling_rate"] <= 1
            history = ev["meta"][key]
            assert history and all(h == h and abs(h) < float("inf") for h in history)
    torch.testing.assert_close(ub["average"].vector, ua["average"].vector, rtol=1e-4, atol=1e-6)
    # the distributed mini-batch draws one process's batches: the same steps up to rounding (4 steps here)
    torch.testing.assert_close(ub["sgd-uap"].vector, ua["sgd-uap"].vector, rtol=0, atol=1e-4)


SUBSPACE_SCRIPT = '''
import importlib, json, sys
import torch
from uapx import distributed
distributed.init_from_env()
mod = importlib.import_module("uapx_plugins.interpretability")
g = torch.Generator().manual_seed(0)
x = torch.rand(90, 1, 6, 6, generator=g) * torch.linspace(0.1, 1, 36).reshape(1, 1, 6, 6)  # a decaying spectrum
y = torch.arange(90) % 3
rows = distributed.shard(90)
flat = x.reshape(90, -1).double()
exact = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][:5]
out = {}
for name, kw in (("covariance", {}), ("randomized", {"max_gram_dim": 0})):
    basis = mod.principal_subspace(x[rows], 5, **kw)
    out[name] = [float(torch.linalg.svdvals(basis @ exact.T).min()), float((basis @ basis.T - torch.eye(5)).abs().max())]
diffs = mod.class_mean_differences(x[rows], y[rows])
out["class_means"] = max(float((diffs[c] - (flat[y == c].mean(0) - flat.mean(0))).abs().max()) for c in range(3))
if distributed.is_main():
    print(json.dumps(out))
distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_interpretability_subspace_and_class_means_across_two_ranks(tmp_path):
    """Both routes to the principal subspace (covariance; randomized SVD, taken for large images)
    and the class means, on shards of a matrix, against the whole matrix in one process."""
    (tmp_path / "subspace.py").write_text(SUBSPACE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "subspace.py"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for route, tol in (("covariance", 1e-9), ("randomized", 1e-3)):  # the same 5-dim subspace, orthonormal
        cos_min, orth_err = out[route]
        assert cos_min > 1 - tol and orth_err < 1e-10, (route, out[route])
    assert out["class_means"] < 1e-12


UNDECLARED = '''
import uapx
from uapx.methods import Direction, UAPMethod

class FirstRow(UAPMethod):
    name = "first-row"
    description = "the first perturbation row (does not declare supports_distributed)"
    def directions(self, pset):
        return [Direction(pset.matrix()[0])]

@uapx.hookimpl
def uapx_add_uap_methods():
    return [FirstRow]
'''


def test_plugins_that_do_not_declare_distribution_are_refused_up_front(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "firstrow", "0.1", {"firstrow": UNDECLARED}, {"firstrow": "firstrow"})
    res = run(tmp_path, "r", ranks=2, args=["analyze", "--plugins", "svd,first-row,trajectory"],
              env={"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))})
    assert res.returncode != 0
    assert ("uapx: error: plugin(s) first-row do not declare supports_distributed and cannot run on sharded data "
            "under torchrun; fix: run them in one process, or use only: ") in res.stderr
    # torchrun reports the failed worker with its own traceback; none comes from uapx's code
    assert not re.search(r'File ".*/(uapx|uapx_plugins)/', res.stderr) and not (tmp_path / "r").exists()


def test_every_built_in_plugin_runs_under_torchrun():
    from uapx.registry import get_registry

    reg = get_registry()
    built_in = [c for c in reg.components.values() if c.kind in ("method", "diagnostic")
                and c.cls.__module__.startswith("uapx_plugins.")]
    single = {"local-linearity", "gradalign", "cure", "hessian", "subspace"}  # one process only (README)
    assert len(built_in) >= 14
    assert {c.name for c in built_in if not c.cls.supports_distributed} == single


@pytest.mark.parametrize("n, world", [(120, 2), (7, 3), (2, 4), (10, 1)])
def test_local_prefix_covers_the_global_first_rows(n, world):
    for m in range(0, n + 3):
        rows = []
        for r in range(world):
            shard = distributed.shard(n, rank=r, world=world)
            part = distributed.local_prefix(m, n, rank=r, world=world)
            assert part.start == 0 and 0 <= part.stop <= shard.stop - shard.start
            rows += list(range(shard.start, shard.stop))[part]  # this rank's rows, in global numbering
        assert rows == list(range(min(m, n))), (m, n, world)


def test_local_prefix_in_one_process_and_for_the_process_group(monkeypatch):
    assert distributed.local_prefix(50, 120) == slice(0, 50)
    assert distributed.local_prefix(500, 120) == slice(0, 120)
    assert distributed.local_prefix(0, 120) == slice(0, 0)
    monkeypatch.setattr(distributed, "_process_rank", lambda: 1)
    monkeypatch.setattr(distributed, "_process_world", lambda: 2)
    assert distributed.shard(120) == slice(60, 120)
    assert distributed.local_prefix(50, 120) == slice(0, 0)  # rank 1 starts at row 60
    assert distributed.local_prefix(100, 120) == slice(0, 40)
    assert distributed.local_prefix(1000, 120) == slice(0, 60)


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


def test_a_class_held_by_one_rank_only_pairs_up_the_reductions(tmp_path):
    """12 fit images (of a sample of 24, the other 12 held out), 6 per rank: some classes lie on rank 0
    only, others on rank 1 only.  Every rank must still take part in every class's reduction, or the
    per-class reductions of different classes pair up across ranks and mix silently."""
    from uapx.pipeline import AnalyzeConfig, draw_images

    y = draw_images(AnalyzeConfig(n_samples=24))[0].y  # the fit images, as analyze draws them
    only_rank0 = set(y[:6].tolist()) - set(y[6:].tolist())
    only_rank1 = set(y[6:].tolist()) - set(y[:6].tolist())
    assert only_rank0 and only_rank1  # the case this test is about
    args = ["analyze", "--plugins", "average,svd,sgd-uap", "--set", "sgd-uap.per_class=true",
            "--set", "sgd-uap.epochs=2", "--n-samples", "24", "--steps", "2", "--random-draws", "1", "--k", "2"]
    uaps = []
    for ranks in (1, 2):
        res = run(tmp_path, tmp_path / f"r{ranks}", ranks=ranks, args=args)
        assert res.returncode == 0, res.stderr[-3000:]
        uaps.append({u.name: u for u in load_uaps(tmp_path / f"r{ranks}" / "uaps.pt")})
    one, two = uaps
    assert set(one) == set(two)
    for c in sorted(only_rank0 | only_rank1):
        for name in (f"average:class-{c}", f"sgd-uap:class-{c}"):
            torch.testing.assert_close(two[name].vector, one[name].vector, rtol=1e-4, atol=1e-5)
        a, b = one[f"svd:v1:class-{c}"].vector.flatten(), two[f"svd:v1:class-{c}"].vector.flatten()
        assert abs(float(a @ b / (a.norm() * b.norm()))) > 0.9999
