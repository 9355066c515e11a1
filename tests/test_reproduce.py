"""`uapx reproduce`: the verdicts follow the fixed criteria, and the study runs end to end."""
from __future__ import annotations

import json

import pytest

from uapx.cli import main
import torch

from uapx.reproduce import STUDY, findings_table, judge


def _report(deltas, y, x, grads, *, seed):
    """A run's report.json diagnostics made by the real spectrum, interpretability and trajectory
    diagnostics from perturbations ``deltas`` ``(N, d)``, labels, images ``x`` and PGD gradients."""
    from types import SimpleNamespace

    from uapx.attacks import Trajectory
    from uapx.methods import UAP
    from uapx.perturbations import PerturbationSet
    from uapx_plugins.interpretability import InterpretabilityDiagnostic
    from uapx_plugins.spectrum import SpectrumDiagnostic
    from uapx_plugins.trajectory import TrajectoryDiagnostic

    n, d = deltas.shape
    pset = PerturbationSet(deltas.float(), y, y, y, shape=(1, 1, d), eps=1.0)
    uaps = []
    for c in range(10):
        v = deltas[y == c].mean(0)
        uaps.append(UAP(f"average:class-{c}", (v / v.norm()).reshape(1, 1, d).float(), "average", 1.0, source_class=c))
    steps, m = grads.shape[:2]
    traj = Trajectory(torch.arange(m), grads.float(), torch.zeros_like(grads).float(), torch.zeros(steps, m))
    a = SimpleNamespace(pset=pset, x=x.reshape(n, 1, 1, d).float(), y=y, n_images=n, num_classes=10, uaps=uaps,
                        evaluations={}, seed=seed, model_id="noise", eps=1.0, device="cpu",
                        trajectories=lambda: traj)
    diags = {"spectrum": SpectrumDiagnostic(), "interpretability": InterpretabilityDiagnostic(components=10),
             "trajectory": TrajectoryDiagnostic(restarts=0)}
    return {"diagnostics": {k: diag.run(a).figures for k, diag in diags.items()}}


def _noise_run(seed, *, n=400, d=256, steps=6, m=40):
    """The random-direction control: a 'model' whose PGD perturbations and gradients are random noise
    of norm eps (images with class structure, so the interpretability figures have a reference)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat(n // 10)
    x = torch.randn(n, d, generator=g) * 0.2 + torch.randn(10, d, generator=torch.Generator().manual_seed(7))[y]
    deltas = torch.randn(n, d, generator=g)
    deltas = deltas / deltas.norm(dim=1, keepdim=True)
    return _report(deltas, y, x, torch.randn(steps, m, d, generator=g), seed=seed)


def _structured_run(seed, *, n=400, d=256, steps=6, m=40):
    """A 'robust model' with the findings built in: perturbations along a shared direction plus
    their class-mean difference (strokes), gradients that keep their direction over the steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat(n // 10)
    centres = torch.randn(10, d, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, d, generator=g) * 0.2 + centres[y]
    diffs = centres - centres.mean(0)
    u = torch.randn(d, generator=torch.Generator().manual_seed(8))
    deltas = 3 * u / u.norm() * torch.randn(n, 1, generator=g) - diffs[y] / diffs[y].norm(dim=1, keepdim=True) \
        + 0.05 * torch.randn(n, d, generator=g)
    base = torch.randn(1, m, d, generator=g)
    grads = base + 0.1 * torch.randn(steps, m, d, generator=g)
    return _report(deltas, y, x, grads, seed=seed)


def _study(natural, robust):
    mn, ma = STUDY["mnist"][:2]
    cn, ca = STUDY["cifar10"][:2]
    return {mn: natural(1), ma: robust(2), cn: natural(3), ca: robust(4)}


def test_the_random_direction_control_supports_nothing():
    f, lines = judge(_study(_noise_run, _noise_run))
    for key in ("1_interpretability", "2_mnist_spectrum", "4_trajectory"):
        assert f[key]["verdict"] == "not supported", (key, f[key]["per_model"])
    assert f["3_cifar_spectrum"]["verdict"] == "not supported"
    assert len(lines) == 4 and all(line.startswith("Finding ") for line in lines)
    for item in f.values():
        assert item["tests"] and item["could_fail_because"]


def test_built_in_findings_are_found_and_a_missing_model_is_not_measured():
    f, _ = judge(_study(_noise_run, _structured_run))
    ma, ca = STUDY["mnist"][1], STUDY["cifar10"][1]
    assert f["1_interpretability"]["per_model"][ma]["verdict"] == "supported"
    align = f["1_interpretability"]["per_model"][ma]["signed_alignment"]["robust"]["mean"]
    assert align < -0.3  # the sign is kept: these UAPs point against their class-mean differences
    assert f["3_cifar_spectrum"]["per_model"][ca]["verdict"] == "supported"  # one dominant direction
    assert f["2_mnist_spectrum"]["per_model"][ma]["verdict"] == "not supported"  # ... is not slow decay
    assert f["4_trajectory"]["per_model"][ma]["verdict"] == "supported"
    runs = _study(_noise_run, _structured_run)
    runs[ma] = None
    f, _ = judge(runs)
    assert f["1_interpretability"]["per_model"][ma]["verdict"] == "not measured"
    assert "not measured: " + ma in f["1_interpretability"]["verdict"]
    table = findings_table(f)
    assert table[0][0] == "finding" and ma in table[0] and len(table) == 5
    assert f["1_interpretability"]["per_model"][ma]["why"] == f"not installed: {ma}"


def test_a_data_set_left_out_is_not_run_rather_than_not_installed():
    mn, ma = STUDY["mnist"][:2]
    cn = STUDY["cifar10"][0]
    f, _ = judge({mn: _noise_run(1), ma: _structured_run(2)})  # as `--datasets mnist` leaves it
    why = f["3_cifar_spectrum"]["per_model"][cn]["why"]
    assert why.startswith(f"not run: {cn}") and "--datasets" in why
    assert f["3_cifar_spectrum"]["verdict"] == "not measured" and "not run" in f["3_cifar_spectrum"]["why"]


@pytest.mark.slow
def test_reproduce_end_to_end_on_mnist(tmp_path, data_root):
    out = tmp_path / "study"  # fitted on the training split, judged on as many held-out test images
    assert main(["reproduce", "--data-root", str(data_root), "--datasets", "mnist", "--n-samples", "60", "--steps", "3",
                 "--trajectory-samples", "10", "--batch-size", "30", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["findings"]) == ["1_interpretability", "2_mnist_spectrum", "3_cifar_spectrum", "4_trajectory"]
    assert rep["runs"]["zoo:mnist-natural"]["n_images"] == 60
    held = rep["runs"]["zoo:mnist-natural"]["held_out"]
    assert held["split"] == "test" and held["n_images"] == 60 and held["wilson95"][0] <= held["fooling_rate"]
    assert rep["findings_table"][0][0] == "finding"
    sweep = rep["eps_sweep"]["mnist"]  # every model at each eps of uapx.defaults.STUDY_EPS_SWEEP
    assert sweep["eps"] == [1.0, 2.0, 4.0] and sweep["study_eps"] == 2.0
    for model, figs in sweep["per_model"].items():
        assert [f["eps"] for f in figs] == [1.0, 2.0, 4.0] and all(f["held_out"] and f["sigma1_over_sigma2"] for f in figs)
        assert figs[1]["held_out"] == rep["runs"][model]["held_out"]  # the study's eps is the study's run
    assert (out / "mnist-l2-eps4" / "index.html").is_file()
    assert any(p["section"] == "eps-sweep" for p in rep["plots"])
    assert any(p["file"] == "landscape-subspace-test.png" for p in rep["plots"])  # the subspace test per model
    assert (out / "mnist-natural" / "index.html").is_file()
    assert not (tmp_path / "study.parts").exists()
    page = (out / "index.html").read_text()
    assert page.index("Finding 1:") < page.index("Finding 4:") < page.index("<h2>runs</h2>")
    assert page.count("data:image/png;base64,") == len(rep["plots"])
