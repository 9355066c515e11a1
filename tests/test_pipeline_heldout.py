"""Held-out evaluation by default: the UAPs are fitted on one set of images and judged on a disjoint
one (a training split where the data set has one, else a class-stratified half of the sample); the
held-out figures are recounted in plain PyTorch; the attack component is looked up once."""
from __future__ import annotations

import json

import pytest
import torch

from uapx.cli import main
from uapx.errors import UapxError
from uapx.pipeline import AnalyzeConfig, analyze

SMALL = dict(steps=2, random_draws=2, k=2, batch_size=50, eval_precision="float32")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded default (only the MNIST test split): a sample of 80, fitted on 40, judged on 40."""
    cfg = AnalyzeConfig(plugins=["average", "svd", "subspace"], n_samples=80, out=str(tmp_path_factory.mktemp("e") / "r"),
                        plugin_settings={"subspace": {"draws": 2, "max_k": 2}}, **SMALL)
    return analyze(cfg)


def test_one_split_is_halved_into_disjoint_stratified_fit_and_held_out_images(embedded):
    rep, a = embedded.report, embedded.analysis
    assert rep["data"]["split"] == "test" and rep["data"]["n_images"] == 40 == len(a.pset)
    held = rep["uaps"]["held_out"]
    assert held["protocol"] == "sample" == rep["data"]["held_out"]["protocol"] and held["n_images"] == 40
    assert sum(held["class_counts"].values()) == 40 and max(held["class_counts"].values()) <= 6  # stratified
    assert a.heldout.x.shape == (40, 1, 28, 28) and a.heldout.y.shape == (40,)
    # no image in both: positions in the data set, and the pixels of those positions
    fit, out = set(a.pset.indices.tolist()), a.heldout.indices.tolist()
    assert len(fit) == 40 and len(set(out)) == 40 and not fit & set(out)
    from uapx import data

    pool = data.load("mnist", "test")
    torch.testing.assert_close(pool.images(a.heldout.indices), a.heldout.x)
    assert torch.equal(pool.y[a.heldout.indices], a.heldout.y)


def test_held_out_figures_are_those_of_a_plain_pytorch_recount(embedded):
    """Fooling rate on the held-out images with the sign chosen on the fit images, and the clean
    predictions stored in analysis.heldout, recounted without uapx's evaluation code."""
    a, rep = embedded.analysis, embedded.report
    model, held = a.model, a.heldout
    with torch.no_grad():
        clean = model(held.x).argmax(1)
    assert torch.equal(clean, held.clean_pred)
    for u in a.uaps:
        if u.source_class is not None:
            continue
        sign = a.evaluations[u.name].sign  # chosen on the fit images
        with torch.no_grad():
            pred = model((held.x + sign * u.vector).clamp(0, 1)).argmax(1)
        fooled = float((pred != clean).double().mean())
        ev = rep["uaps"]["held_out"]["evaluations"][u.name]
        assert ev["sign"] == sign and ev["fooling_rate"] == pytest.approx(fooled)
        lo, hi = ev["fooling_rate_wilson95"]
        assert lo <= fooled <= hi


def test_report_gives_the_held_out_figure_and_the_in_sample_one_beside_it(embedded):
    page = (embedded.out / "index.html").read_text()
    assert "held-out images" in page and "in-sample" in page and "held-out fooling rate [95 %]" in page
    rep = embedded.report  # report.json keeps both
    assert set(rep["uaps"]["held_out"]["evaluations"]) == set(rep["uaps"]["evaluations"])


def test_subspace_fits_on_the_pipeline_perturbations_and_measures_on_its_held_out_images(embedded):
    sub = embedded.report["diagnostics"]["subspace"]
    assert sub["fit_images"] == 40 and sub["held_out_images"] == 40
    assert sub["split"].startswith("the pipeline's held-out images")
    # without a held-out set (an Analysis built by hand) it falls back to a half split and says so
    from dataclasses import replace

    from uapx.registry import get_registry

    hand = replace(embedded.analysis, heldout=None)
    cls = get_registry().get("subspace", "diagnostic").cls
    res = cls(draws=2, max_k=2).run(hand)
    assert res.figures["split"].startswith("fallback") and res.figures["fit_images"] == 20


def test_a_training_split_is_the_fit_split_where_the_data_set_has_one(data_root, tmp_path):
    cfg = AnalyzeConfig(dataset="mnist", data_root=str(data_root), plugins=["average"], n_samples=30,
                        eval_n_samples=20, out=str(tmp_path / "r"), **SMALL)
    rep = analyze(cfg).report
    assert rep["data"]["split"] == "train" and rep["data"]["n_images"] == 30
    held = rep["uaps"]["held_out"]
    assert held["split"] == "test" and held["protocol"] == "split" and held["n_images"] == 20


def test_held_out_images_that_leave_no_fit_image_are_refused_in_one_line(capsys, tmp_path):
    code = main(["analyze", "--n-samples", "10", "--eval-n-samples", "10", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot hold 10 held-out images" in err
    assert not (tmp_path / "r").exists()


def test_the_attack_component_is_looked_up_once(monkeypatch, tmp_path):
    """analyze passes the component plan() found to resolved(): the default registry is never asked."""
    import uapx.pipeline as pipeline
    from uapx.registry import Registry

    reg = Registry().load_entrypoints()
    linf = reg.get("pgd-linf", "attack")
    assert AnalyzeConfig(attack="pgd-linf").resolved(linf).eps == pytest.approx(0.3)  # the Linf default

    def refuse():
        raise AssertionError("looked up a second time")

    monkeypatch.setattr(pipeline, "get_registry", refuse)
    res = analyze(AnalyzeConfig(attack="pgd-linf", plugins=["average"], n_samples=20, out=str(tmp_path / "r"),
                                **SMALL), registry=reg)
    assert res.report["config"]["eps"] == pytest.approx(0.3)
    assert json.loads((res.out / "report.json").read_text())["defaults_applied"]["norm"] == "linf"


def test_analyze_refuses_bad_held_out_settings_before_any_work(tmp_path):
    with pytest.raises(UapxError, match="held-out"):
        analyze(AnalyzeConfig(n_samples=1, out=str(tmp_path / "r"), **SMALL))


def test_a_linf_runs_landscape_and_subspace_draw_their_directions_in_linf(tmp_path):
    """In a Linf run the loss profile's t is a Linf size: at t = eps the profile along the average
    UAP (eps * sign) passes through that UAP's own loss, recounted here in plain PyTorch; random
    directions are vertices of the cube; the subspace vectors have ||v||_inf = eps."""
    import torch.nn.functional as F

    from uapx.registry import get_registry

    res = analyze(AnalyzeConfig(attack="pgd-linf", plugins=["average", "landscape", "subspace"], n_samples=40,
                                out=str(tmp_path / "r"),
                                plugin_settings={"landscape": {"points": 5, "grid": 3, "images": 20, "random_dirs": 1},
                                                 "subspace": {"draws": 2, "max_k": 2}}, **SMALL))
    a = res.analysis
    land = res.report["diagnostics"]["landscape"]
    assert land["norm"] == "linf" and land["t"] == pytest.approx([-0.6, -0.3, 0.0, 0.3, 0.6], abs=1e-6)
    u = next(u for u in a.uaps if u.name == "average")
    sign = a.evaluations[u.name].sign
    v = u.vector * sign
    assert float(v.abs().max()) == pytest.approx(0.3, rel=1e-6)
    x, y = a.x[:20], a.y[:20]
    with torch.no_grad():
        own = float(F.cross_entropy(a.model((x + v).clamp(0, 1)), y))
    assert land["profiles"]["average"][3] == pytest.approx(own, rel=1e-4)
    mod = __import__(get_registry().get("landscape", "diagnostic").cls.__module__, fromlist=["x"])
    r = mod.random_direction(torch.Size([1, 28, 28]), "linf", torch.Generator().manual_seed(0))
    assert torch.equal(r.abs(), torch.ones_like(r))  # a vertex of the unit cube
    assert res.report["diagnostics"]["subspace"]["norm"] == "linf"
    sub = __import__(get_registry().get("subspace", "diagnostic").cls.__module__, fromlist=["x"])
    basis = torch.linalg.qr(torch.randn(50, 3, generator=torch.Generator().manual_seed(1)))[0].T
    w = sub.subspace_vectors(basis, 4, 0.3, torch.Generator().manual_seed(2), norm="linf")
    torch.testing.assert_close(w.abs().amax(dim=1), torch.full((4,), 0.3))
    assert float((w - (w @ basis.T) @ basis).norm()) < 1e-5  # still in the span
