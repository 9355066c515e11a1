"""Linf and targeted UAPs: the norm geometry against plain torch, UAP methods against the analytic
Linf optimum of a linear model, DeepFool's Linf and targeted steps against their closed forms, the
targeted success rate against a hand count, a targeted UAP on real MNIST against the random Linf
control, and the one-line errors of --norm / --target-class."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from uapx import norms
from uapx.cli import main
from uapx.evaluate import SignEffect, baseline_key, evaluate_many, predict, random_directions
from uapx.methods import MethodData
from uapx.perturbations import PerturbationSet
from uapx.registry import get_registry

EPS = 0.1


def method(name, **kw):
    return get_registry().get(name, "method").cls(**kw)


def deepfool_module():
    return importlib.import_module("uapx_plugins.deepfool_uap")


# -- the geometry against plain torch ------------------------------------------------------------


def test_projection_and_steepest_point_against_plain_torch():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 3, 4, 4, generator=g)
    torch.testing.assert_close(norms.project(v, 0.3, "linf"), torch.clamp(v, -0.3, 0.3), rtol=0, atol=0)
    rows = v.flatten(1)
    ref = rows * torch.clamp(0.3 / rows.norm(dim=1, keepdim=True), max=1.0)
    torch.testing.assert_close(norms.project(v, 0.3, "l2").flatten(1), ref)
    inside = 0.01 * v  # points inside either ball stay where they are
    for norm in norms.NORMS:
        torch.testing.assert_close(norms.project(inside, 10.0, norm), inside, rtol=0, atol=0)
    w = torch.randn(40, generator=g)
    torch.testing.assert_close(norms.steepest(w, 0.3, "linf"), 0.3 * torch.sign(w), rtol=0, atol=0)
    torch.testing.assert_close(norms.steepest(w, 0.3, "l2"), 0.3 * w / torch.linalg.vector_norm(w))
    # the steepest point maximises <w, v> over the ball: <w, v*> is the dual norm times eps
    assert float(w @ norms.steepest(w, 0.3, "linf")) == pytest.approx(0.3 * float(w.abs().sum()), rel=1e-6)
    ball = norms.project(torch.randn(500, 40, generator=g), 0.3, "linf")  # other points of the ball do worse
    assert float((ball @ w).max()) < float(w @ norms.steepest(w, 0.3, "linf"))
    assert float(norms.size(norms.onto_sphere(v, 0.3, "linf"), "linf").max()) == pytest.approx(0.3)


def test_linf_pgd_step_is_the_textbook_step():
    from uapx.attacks import NORM_STEPS

    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 1, 6, 6, generator=g)
    xa = (x0 + 0.2 * torch.randn(5, 1, 6, 6, generator=g)).clamp(0, 1)
    grad = torch.randn(5, 1, 6, 6, generator=g)
    ref = torch.min(torch.max(xa + 0.05 * grad.sign(), x0 - 0.1), x0 + 0.1).clamp(0, 1)
    torch.testing.assert_close(NORM_STEPS["linf"].step(xa.clone(), x0, grad, 0.05, 0.1), ref, rtol=0, atol=1e-7)


# -- the analytic Linf optimum of a linear model -------------------------------------------------


def linear_two_class():
    """Logits ``W x + b`` with two classes; 60 images of class 0 in the middle of the box, so
    ``clamp`` never bites at eps 0.1.  The UAP of the Linf ball that raises the margin of class 1
    most on every image is ``eps * sign(W[1] - W[0])``."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 16, generator=g)
    x = (0.5 + 0.05 * torch.randn(60, 1, 4, 4, generator=g)).clamp(0.3, 0.7)
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        diff = (x.flatten(1) @ (w[1] - w[0]))
        lin.bias.copy_(torch.tensor([float(diff.max()) + 0.2, 0.0]))  # every image is class 0, 0.2 from the boundary
    model = nn.Sequential(nn.Flatten(), lin).eval()
    y = torch.zeros(60, dtype=torch.long)
    return model, x, y, EPS * torch.sign(w[1] - w[0])


@pytest.mark.parametrize("name", ["average", "svd", "rsvd"])
def test_set_based_linf_uaps_are_the_analytic_optimum(name):
    """L2 PGD perturbations of a linear model all point along W[1] - W[0]; under norm linf the
    methods turn that direction into eps * sign(W[1] - W[0]), the Linf optimum."""
    from uapx.attacks import pgd

    model, x, y, best = linear_two_class()
    adv = pgd(model, x, y, norm="l2", eps=0.5, steps=3, step_size=0.2)
    deltas = (adv - x).flatten(1)
    pset = PerturbationSet(deltas, y, y.clone(), y.clone(), (1, 4, 4), 0.5, "l2")
    kw = {"k": 1} if name != "average" else {}
    uap = method(name, norm="linf", per_class=False, **kw)(pset, eps=EPS)[0]
    assert uap.norm == "linf" and uap.eps == EPS
    got = uap.vector.reshape(-1)
    sign = 1.0 if uap.signless is False or float(got @ best) > 0 else -1.0
    torch.testing.assert_close(sign * got, best, rtol=0, atol=0)
    l2 = method(name, per_class=False, **kw)(pset, eps=EPS)[0]  # the L2 UAP of the same set is unchanged
    assert l2.norm == "l2" and float(l2.vector.norm()) == pytest.approx(EPS, rel=1e-5)


@pytest.mark.parametrize("name, kw", [("sgd-uap", {"epochs": 3, "batch_size": 20}),
                                      ("deepfool-uap", {"passes": 3, "delta": 0.0})])
def test_model_based_linf_uaps_are_the_analytic_optimum(name, kw):
    model, x, y, best = linear_two_class()
    pset = PerturbationSet(torch.zeros(60, 16), y, y.clone(), y.clone(), (1, 4, 4), EPS, "linf")
    uap = method(name, **kw)(pset, eps=EPS, data=MethodData(model, x, y, batch_size=30))[0]
    assert uap.norm == "linf"  # the perturbation set's norm, by default
    torch.testing.assert_close(uap.vector.reshape(-1), best, rtol=0, atol=1e-6)
    assert uap.meta["found_norm"] <= EPS + 1e-6  # the method stayed in the Linf ball


def affine(classes: int = 4, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, d, generator=g), torch.randn(classes, generator=g) * 0.1
    lin = nn.Linear(d, classes)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = 0.5 + 0.01 * torch.randn(1, 1, 4, 4, generator=g)
    return nn.Sequential(nn.Flatten(), lin).eval(), w, x


def test_linf_deepfool_reaches_the_nearest_hyperplane_in_linf():
    """For an affine classifier the Linf-nearest boundary of class k is |f_k - f_o| / ||w_k - w_o||_1
    away, reached along sign(w_k - w_o) (Moosavi-Dezfooli et al. 2016, p = inf)."""
    model, w, x = affine()
    f = model(x)[0].detach()
    o = int(f.argmax())
    dists = {k: abs(float(f[k] - f[o])) / float((w[k] - w[o]).abs().sum()) for k in range(4) if k != o}
    k = min(dists, key=dists.get)
    r = deepfool_module().deepfool(model, x, overshoot=0.02, norm="linf")
    expected = 1.02 * (dists[k] + 1e-4) * torch.sign(w[k] - w[o])
    torch.testing.assert_close(r.reshape(-1), expected, rtol=1e-4, atol=1e-7)
    assert int(model(x + r).argmax()) == k


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_deepfool_reaches_the_target(norm):
    model, w, x = affine(classes=5, seed=3)
    f = model(x)[0].detach()
    o = int(f.argmax())
    target = int(f.argsort()[0])  # the least likely class: the hardest target
    r = deepfool_module().deepfool(model, x, norm=norm, target=target, max_iter=50)
    assert int(model(x + r).argmax()) == target
    if norm == "linf":  # each step is along sign(w_C - w_current): the first one is that of w_C - w_o
        assert float(torch.sign(r.reshape(-1)) @ torch.sign(w[target] - w[o])) > 0


# -- the targeted success rate -------------------------------------------------------------------


def test_targeted_success_rate_against_a_hand_count():
    clean = torch.tensor([0, 1, 2, 3, 3, 1, 0, 2])
    pred = torch.tensor([3, 3, 2, 3, 1, 3, 0, 3])
    y = clean.clone()
    eff = SignEffect.measure(pred, clean, y, 4, target=3)
    # images clean-classified 3 (positions 3, 4) are left out; of the other six, 3 of them (0, 1, 5, 7) -> 4/6
    assert eff.targeted_n == 6 and eff.targeted_success == pytest.approx(4 / 6)
    from uapx.stats import wilson

    assert eff.targeted_wilson95 == pytest.approx(wilson(4, 6))
    assert SignEffect.measure(pred, clean, y, 4).targeted_success is None
    from uapx.evaluate import baseline_stats

    all_target = torch.full((5,), 3)  # no image to send: no rate, and no crash
    base = baseline_stats(0.1, [all_target], clean_pred=all_target, y=all_target, num_classes=4, target=3)
    assert base["targeted_success"]["mean"] != base["targeted_success"]["mean"]


def test_random_linf_control_has_the_uaps_norm_and_target():
    model, x, y, best = linear_two_class()
    vs = random_directions((1, 4, 4), EPS, draws=4, seed=0, norm="linf")
    assert torch.equal(vs.abs(), torch.full_like(vs, EPS))  # vertices of the Linf ball
    from uapx.methods import UAP

    uap = UAP("lin", best.reshape(1, 4, 4), "hand", EPS, norm="linf", target_class=1)
    evals, extra = evaluate_many(model, x, y, [uap], num_classes=2, draws=4, progress=False)
    base = extra["random_baseline"][baseline_key(EPS, "linf", 1)]
    assert base["norm"] == "linf" and base["target_class"] == 1
    preds = torch.stack([predict(model, x, v=v) for v in vs])  # the same draws by hand
    hand = [(p == 1).double().mean().item() for p in preds]  # no image is class 1 clean
    assert base["targeted_success"]["mean"] == pytest.approx(sum(hand) / len(hand))
    ev = evals["lin"]
    assert ev.target_class == 1 and ev.to_dict()["targeted_success"] == ev.best.targeted_success


def test_targeted_pgd_is_pgd_towards_the_target():
    from uapx.attacks import pgd

    model, x, y, _ = linear_two_class()
    attack = get_registry().get("pgd-linf", "attack").cls(eps=EPS, steps=3, target_class=1)
    ours, _ = attack(model, x, y)
    ref = pgd(model, x, torch.ones_like(y), norm="linf", eps=EPS, steps=3, step_size=attack.step_size, targeted=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# -- a targeted UAP on real MNIST beats the random Linf control ------------------------------------


@pytest.fixture(scope="module")
def mnist():
    from uapx import data, models

    net = models.load("zoo:mnist-natural")
    images = data.load("mnist", "test").subset(500, seed=11)  # a seeded class-stratified draw
    return net, images.images(), images.y


@pytest.mark.parametrize("name, kw", [("sgd-uap", {"epochs": 3}), ("deepfool-uap", {"max_images": 200, "batch": 32})])
def test_targeted_linf_uap_on_real_mnist_beats_the_random_linf_control(mnist, name, kw):
    from uapx.evaluate import evaluate_uap, random_baseline

    net, x, y = mnist
    fit, held = slice(0, 200), slice(200, 500)  # fitted on 200 images, judged on 300 others
    target, eps = 3, 0.3
    pset = PerturbationSet(torch.zeros(200, 784), y[fit], y[fit], y[fit], (1, 28, 28), eps, "linf")
    uap = method(name, target_class=target, **kw)(pset, eps=eps, data=MethodData(net, x[fit], y[fit]))[0]
    assert uap.norm == "linf" and uap.target_class == target
    assert float(uap.vector.abs().max()) == pytest.approx(eps, rel=1e-6)
    clean = predict(net, x[held])
    ev = evaluate_uap(net, x[held], y[held], uap, clean_pred=clean, num_classes=10)
    base = random_baseline(net, x[held], y[held], eps, clean_pred=clean, num_classes=10, draws=3, norm="linf",
                           target=target)
    # criterion fixed before the numbers: the UAP's Wilson 95 % lower bound above the control's upper bound
    assert ev.best.targeted_wilson95[0] > base["targeted_success"]["wilson95"][1]


# -- the command line: one-line errors and the report ----------------------------------------------

SMALL = ["--n-samples", "60", "--steps", "3", "--batch-size", "30", "--random-draws", "2", "--k", "2"]


@pytest.mark.parametrize("argv, needle", [
    (["--target-class", "10"], "target class 10 is not a class index"),
    (["--target-class", "-1"], "--target-class"),
    (["--norm", "l1"], "--norm"),
    (["--norm", "linf", "--eps", "2"], "a Linf eps of 2"),
    (["--plugins", "sgd-uap", "--target-class", "2", "--set", "sgd-uap.loss_clip=3"], "loss_clip"),
])
def test_bad_norm_and_target_are_one_line_errors(capsys, tmp_path, argv, needle):
    code = main(["analyze", *SMALL, *argv, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("uapx: error: ") and err.count("\n") == 1 and "fix:" in err
    assert not (tmp_path / "r").exists()


def test_targeted_linf_run_reports_targeted_success(tmp_path):
    out = tmp_path / "r"
    assert main(["analyze", *SMALL, "--attack", "pgd-linf", "--target-class", "3", "--plugins", "average,svd",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["norm"] == "linf" and rep["config"]["target_class"] == 3
    pn = rep["attack"]["perturbation_norm_linf"]  # the per-image attack's budget, in its own norm
    assert 0 < pn["min"] <= pn["mean"] + 1e-6 and pn["mean"] <= pn["max"] + 1e-6
    assert pn["max"] <= rep["config"]["eps"] + 1e-6
    assert pn["max"] <= rep["attack"]["perturbation_norm"]["max"] + 1e-6  # ||r||_inf <= ||r||_2
    assert rep["uaps"]["held_out"]["random_baseline"]["targeted_success"]["wilson95"]
    for name in ("average", "svd:v1"):
        ev = rep["uaps"]["held_out"]["evaluations"][name]
        assert ev["norm"] == "linf" and ev["target_class"] == 3 and len(ev["targeted_success_wilson95"]) == 2
    v = torch.load(out / "uaps.pt", weights_only=False)["uaps"][0]["vector"]
    assert torch.allclose(v.abs(), torch.full_like(v, rep["config"]["eps"]))  # eps * sign
    page = (out / "index.html").read_text()
    assert "targeted success" in page and "not already classified 3 to that class" in page  # table, summary
    assert any("targeted-success" in p.name for p in out.rglob("*.png"))  # the plot beside the table


def test_plugins_that_cannot_honour_the_norm_or_target_are_named():
    from uapx import UapxError
    from uapx.methods import UAPMethod, check_threat_model

    class Fixed(UAPMethod):  # its own constructor, without norm: it makes the attack's norm only
        name, needs_model = "fixed", True

        def __init__(self, *, per_class: bool = False) -> None:
            super().__init__(per_class=per_class)

    class Untargeted:
        name, norm = "plain-attack", "l2"

        def __init__(self, *, eps: float) -> None:
            self.eps = eps

    reg = get_registry()
    pgd_l2, svd = reg.get("pgd-l2", "attack").cls, reg.get("svd", "method").cls
    check_threat_model(pgd_l2, [svd, Fixed], norm="l2", target_class=None)  # nothing to honour
    check_threat_model(pgd_l2, [svd], norm="linf", target_class=3)
    with pytest.raises(UapxError, match="'fixed' takes no norm setting"):
        check_threat_model(pgd_l2, [Fixed], norm="linf", target_class=None)
    with pytest.raises(UapxError, match="'fixed' takes no target class"):
        check_threat_model(pgd_l2, [Fixed], norm="l2", target_class=3)
    with pytest.raises(UapxError, match="'plain-attack' takes no target class"):
        check_threat_model(Untargeted, [svd], norm="l2", target_class=3)
