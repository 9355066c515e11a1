"""The batched DeepFool-UAP variant (deepfool-uap.batch): batched DeepFool is per-image DeepFool,
batch=1 is the sequential loop, and a batched UAP fools held-out images beyond random directions."""
from __future__ import annotations

import pytest
import torch

import uapx
import uapx.data
import uapx.models
from uapx.evaluate import predict, random_baseline
from uapx.methods import MethodData
from uapx.perturbations import PerturbationSet
from uapx.registry import get_registry


@pytest.fixture(scope="module")
def mnist():
    model = uapx.models.load("zoo:mnist-natural").eval()
    images = uapx.data.load("mnist", "test").subset(700, seed=5)
    return model, images.images(), images.y


def _pset(x, y):
    n = x.shape[0]
    return PerturbationSet(torch.zeros(n, x[0].numel()), y, y, y, tuple(x.shape[1:]), 4.0, "l2", "m", {})


def reference_deepfool(model, x, *, norm="l2", max_iter=10, overshoot=0.02, num_candidates=10, box=False):
    """Textbook DeepFool for one image ``(1, C, H, W)``, one gradient at a time (Moosavi-Dezfooli et
    al. 2016, Algorithm 2; p = 2, or p = inf with the l1 dual norm and sign steps).  ``box``: each
    gradient difference loses the components whose step (along it if ``f_k < f_orig``, against it
    otherwise) would take a pixel at 0 below 0 or a pixel at 1 above 1."""
    with torch.no_grad():
        logits = model(x)[0]
    orig = int(logits.argmax())
    cands = [int(k) for k in logits.argsort(descending=True)[:num_candidates] if int(k) != orig]
    r = torch.zeros_like(x)
    for _ in range(max_iter):
        xi = ((x + (1 + overshoot) * r).clamp(0, 1)).detach().requires_grad_(True)
        out = model(xi)[0]
        if int(out.argmax()) != orig:
            break
        g0 = torch.autograd.grad(out[orig], xi, retain_graph=True)[0].flatten()
        best = None
        for k in cands:
            w = torch.autograd.grad(out[k], xi, retain_graph=True)[0].flatten() - g0
            if box:
                up = 1.0 if float(out[k] - out[orig]) < 0 else -1.0  # the step goes along up * w
                px = xi.detach().flatten()
                w = w.clone()
                w[((px <= 0) & (up * w < 0)) | ((px >= 1) & (up * w > 0))] = 0.0
            dual = float(w.norm()) if norm == "l2" else float(w.abs().sum())
            dist = abs(float((out[k] - out[orig]).detach())) / dual
            if best is None or dist < best[0]:
                best = (dist, w, dual)
        dist, w, dual = best
        unit = w / dual if norm == "l2" else w.sign()
        r = r + ((dist + 1e-4) * unit).view_as(x)
    return (1 + overshoot) * r


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_batched_deepfool_is_per_image_deepfool(mnist, norm):
    from uapx_plugins.deepfool_uap import deepfool_batch

    model, x, _ = mnist
    xb = x[:12]
    batched = deepfool_batch(model, xb, max_iter=10, norm=norm)
    single = torch.cat([reference_deepfool(model, xb[i:i + 1], norm=norm) for i in range(12)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and each perturbation does what DeepFool promises: the prediction changes
        changed = model((xb + batched).clamp(0, 1)).argmax(1) != model(xb).argmax(1)
    assert changed.float().mean() >= 0.9


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_box_aware_deepfool_is_the_reference_and_stays_in_the_box(mnist, norm):
    from uapx_plugins.deepfool_uap import deepfool_batch

    model, x, _ = mnist
    xb = x[12:24]
    boxed = deepfool_batch(model, xb, max_iter=10, norm=norm, box=True)
    single = torch.cat([reference_deepfool(model, xb[i:i + 1], norm=norm, box=True) for i in range(12)])
    torch.testing.assert_close(boxed, single, atol=1e-5, rtol=1e-4)
    # a step pushes no saturated pixel (MNIST's background at 0) further out (later steps start
    # where earlier ones moved pixels inside, so the first is the one to check)
    first = deepfool_batch(model, xb, max_iter=1, norm=norm, box=True)
    assert bool((first[xb <= 0] >= 0).all()) and bool((first[xb >= 1] <= 0).all())
    # it moves background pixels: the steps are not all 0 there (and, since any() of nothing is
    # False, the images have such pixels, so the check above is not vacuous)
    assert bool((first[xb <= 0] > 0).any())
    # and no step is lost to the clamp: within 3 iterations it changes more predictions than the
    # classic algorithm, whose steps on saturated pixels the clamp undoes
    three = {box: deepfool_batch(model, x[:200], max_iter=3, norm=norm, box=box) for box in (False, True)}
    with torch.no_grad():
        clean = model(x[:200]).argmax(1)
        changed = {box: int((model((x[:200] + r).clamp(0, 1)).argmax(1) != clean).sum()) for box, r in three.items()}
    assert changed[True] > changed[False], changed


def test_batch_of_one_is_the_sequential_loop(mnist):
    model, x, y = mnist
    cls = get_registry().get("deepfool-uap").cls
    data = MethodData(model, x[:40], y[:40])
    seq = cls(max_images=40)(_pset(x[:40], y[:40]), 4.0, data=data)[0]
    one = cls(max_images=40, batch=1)(_pset(x[:40], y[:40]), 4.0, data=data)[0]
    torch.testing.assert_close(one.vector, seq.vector, atol=1e-4, rtol=1e-3)


def test_batched_uap_fools_held_out_images(mnist):
    model, x, y = mnist
    fit, held = slice(0, 200), slice(200, 700)
    cls = get_registry().get("deepfool-uap").cls
    uap = cls(max_images=200, batch=32)(_pset(x[fit], y[fit]), 4.0, data=MethodData(model, x[fit], y[fit]))[0]
    assert float(uap.vector.norm()) == pytest.approx(4.0, rel=1e-5)
    clean = predict(model, x[held])
    fooled = float((predict(model, x[held], v=uap.vector) != clean).double().mean())
    base = random_baseline(model, x[held], y[held], 4.0, clean_pred=clean, num_classes=10, draws=3)
    assert fooled > base["fooling_rate"]["max"] + 0.02


def test_bad_batch_is_a_one_line_error():
    cls = get_registry().get("deepfool-uap").cls
    with pytest.raises(uapx.UapxError, match="batch must be a whole number"):
        cls(batch=0)


def test_deepfool_with_a_backward_vmap_cannot_batch(mnist):
    """A model with a custom autograd Function whose backward vmap cannot run (it goes through
    NumPy) gets DeepFool's per-class gradients one backward pass at a time: the same
    perturbations as the reference loop."""
    from uapx_plugins.deepfool_uap import deepfool_batch

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t * t

        @staticmethod
        def backward(ctx, g):  # through NumPy: vmap cannot batch it
            (t,) = ctx.saved_tensors
            return torch.from_numpy((2 * t * g).numpy())

    model, x = mnist[0], mnist[1]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            return self.inner(Square.apply(t))

    net = Wrapped().eval()
    xb = x[:6]
    batched = deepfool_batch(net, xb, max_iter=10)
    single = torch.cat([reference_deepfool(net, xb[i:i + 1]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-4)
