"""The public surface: the verbs and classes ``uapx`` exports, and short reprs of what they return."""
from __future__ import annotations

import pytest
import torch

import uapx
from uapx.registry import get_registry


def test_plugin_classes_by_registered_name_and_by_class_name():
    reg = get_registry()
    for name, comp in reg.components.items():
        assert uapx.plugin(name) is comp.cls
        assert getattr(uapx, comp.cls.__name__) is comp.cls
    assert set(uapx.plugins("diagnostic")) == {n for n, c in reg.components.items() if c.kind == "diagnostic"}
    with pytest.raises(uapx.UapxError, match="unknown"):
        uapx.plugin("no-such-plugin")
    with pytest.raises(AttributeError):
        uapx.NoSuchThing  # noqa: B018


def test_exported_verbs_are_the_modules_own():
    import uapx.data
    import uapx.models
    import uapx.pipeline

    assert uapx.load_data is uapx.data.load and uapx.load_model is uapx.models.load
    assert uapx.AnalyzeConfig is uapx.pipeline.AnalyzeConfig
    assert set(uapx.__all__) <= set(dir(uapx))


def test_short_reprs_of_sets_uaps_and_evaluations():
    g = torch.Generator().manual_seed(0)
    n, shape = 40, (1, 4, 4)
    deltas = torch.randn(n, 16, generator=g)
    labels = torch.arange(n) % 2
    pset = uapx.PerturbationSet(deltas, labels, labels.clone(), 1 - labels, shape, 2.0)
    r = repr(pset)
    assert r == "PerturbationSet(n=40, shape=(1, 4, 4), norm='l2', eps=2, in memory)"
    uaps = uapx.plugin("average")()(pset, 2.0)
    assert repr(uaps[0]) == "UAP('average', shape=(1, 4, 4), eps=2)"
    assert "source_class=1" in repr(uaps[-1]) and len(repr(uaps[-1])) < 100
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.rand(n, *shape, generator=g)
    ev = uapx.evaluate_uap(model, x, labels, uaps[0], clean_pred=model(x).argmax(1), num_classes=2)
    fr = ev.best.fooling_rate
    assert repr(ev).startswith(f"UAPEvaluation('average', eps=2, fooling_rate={fr:.1%}")


def test_short_reprs_of_image_sets_directions_and_diagnostic_results():
    images = uapx.load_data("mnist", "test").subset(12, seed=0)
    assert repr(images) == ("ImageSet('mnist', split='test', n=12, shape=(1, 28, 28), 10 classes, "
                            f"source={images.source!r})")
    direction = uapx.Direction(torch.full((784,), 0.5), "v1", True, {"found_norm": 1.0})
    assert repr(direction) == "Direction(tag='v1', d=784, norm=14, signless=True, meta_keys=['found_norm'])"
    from matplotlib.figure import Figure

    res = uapx.DiagnosticResult({"global": {"singular_values": list(range(1000))}, "images": 12},
                                [("spectrum", Figure(), "caption")], "x" * 200)
    r = repr(res)
    assert r.startswith("DiagnosticResult(figures=['global', 'images'], plots=['spectrum'], summary='xxx")
    assert len(r) < 200 and "999" not in r  # the keys, not every number
