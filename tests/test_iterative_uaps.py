"""DeepFool, DeepFool-UAP and SGD-UAP against analytic answers on linear models, and on real MNIST."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from uapx.errors import UapxError
from uapx.methods import MethodData
from uapx.perturbations import PerturbationSet
from uapx.registry import get_registry


def method(name, **kw):
    return get_registry().get(name, "method").cls(**kw)


def linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_deepfool_reaches_the_nearest_hyperplane_of_an_affine_classifier():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 16, generator=g), torch.randn(4, generator=g) * 0.1
    model = linear_model(w, b)
    x = 0.5 + 0.01 * torch.randn(1, 1, 4, 4, generator=g)
    f = model(x)[0].detach()
    o = int(f.argmax())
    dists = [abs(float(f[k] - f[o])) / float((w[k] - w[o]).norm()) for k in range(4) if k != o]
    r = importlib.import_module("uapx_plugins.deepfool_uap").deepfool(model, x, overshoot=0.02)
    assert float(r.norm()) == pytest.approx(1.02 * (min(dists) + 1e-4), rel=1e-4)
    assert int(model(x + r).argmax()) != o


def planted():
    """Two classes split by a hyperplane with normal u; every image sits 0.5 from it on side 0."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, generator=g)
    u /= u.norm()
    noise = 0.05 * torch.randn(60, 16, generator=g)
    noise -= (noise @ u)[:, None] * u  # stay in the hyperplane's parallel plane
    x = (0.5 - 0.5 * u + noise).clamp(0.05, 0.95).reshape(60, 1, 4, 4)
    half = 0.5 * float(u.sum())  # decision boundary u.(x - 0.5) = 0
    model = linear_model(torch.stack([-u, u]) * 4, torch.tensor([4 * half, -4 * half]))
    y = torch.zeros(60, dtype=torch.long)
    pset = PerturbationSet(torch.zeros(60, 16), y, y.clone(), y.clone(), (1, 4, 4), 1.0)
    return model, x, y, u, pset


@pytest.mark.parametrize("name, kw", [("deepfool-uap", {"passes": 2, "delta": 0.05}),
                                      ("sgd-uap", {"epochs": 5, "batch_size": 20})])
def test_iterative_methods_find_the_planted_universal_direction(name, kw):
    model, x, y, u, pset = planted()
    uaps = method(name, **kw)(pset, eps=1.0, data=MethodData(model, x, y, batch_size=30))
    assert len(uaps) == 1 and uaps[0].source_class is None
    v = uaps[0].vector.reshape(-1)
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(v @ u) > 0.9  # points across the hyperplane
    fooled = (model((x + uaps[0].vector).clamp(0, 1)).argmax(1) != y).float().mean()
    assert float(fooled) > 0.95
    assert uaps[0].meta["found_norm"] <= 1.0 + 1e-5


def test_model_based_methods_need_the_model():
    _, _, _, _, pset = planted()
    with pytest.raises(UapxError, match="needs the model"):
        method("sgd-uap")(pset, eps=1.0)


def test_on_real_mnist_they_beat_random_directions():
    from uapx import data, models
    from uapx.evaluate import evaluate_uap, predict, random_baseline

    net = models.load("zoo:mnist-natural")
    images = data.load("mnist", "test").subset(200, seed=3)
    x, y = images.images(), images.y
    pset = PerturbationSet(torch.zeros(200, 784), y, y.clone(), y.clone(), (1, 28, 28), 4.0)
    clean = predict(net, x)
    base = random_baseline(net, x, y, 4.0, clean_pred=clean, num_classes=10, draws=3)
    uap = method("sgd-uap", epochs=3)(pset, eps=4.0, data=MethodData(net, x, y))[0]
    ev = evaluate_uap(net, x, y, uap, clean_pred=clean, num_classes=10)
    # the Wilson 95 % interval of the UAP's fooling rate lies above every random direction's rate
    assert ev.best.fooling_wilson95[0] > base["fooling_rate"]["max"]
