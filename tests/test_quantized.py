"""The int8 rung of refined evaluation (uapx.quantized, uapx.inference) against eager float32
PyTorch, on the bundled natural models and real MNIST and CIFAR-10 test images."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import uapx.data
import uapx.models
from uapx import distributed, inference, quantized
from uapx.evaluate import evaluate_many
from uapx.methods import UAP

needs_int8 = pytest.mark.skipif(not inference.int8_supported(), reason="no int8 (VNNI) arithmetic on this CPU")


@pytest.fixture(scope="module")
def mnist():
    model = uapx.models.load("zoo:mnist-natural").eval()
    x = uapx.data.load("mnist", "test").subset(300, seed=4).images()
    g = torch.Generator().manual_seed(9)
    vs = torch.randn(6, 1, 28, 28, generator=g)
    return model, x, vs * (3.0 / vs.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)


def _exact(model, x, vs):
    """Eager float32, one perturbation at a time: the reference."""
    with torch.no_grad():
        return torch.stack([model((x + v).clamp(0, 1)).argmax(1) for v in vs])


@needs_int8
def test_int8_ladder_gives_float32_predictions_on_cifar10(data_root):
    """resnet-small in int8 disagrees with float32 on a few perturbed CIFAR-10 images in 1,000: with
    the check's margins, int8 -> bfloat16 -> float32 and int8 -> float32 both give float32's
    predictions, and every int8 disagreement is among the predictions sent up."""
    model = uapx.models.load("zoo:cifar10-natural").eval()
    x = uapx.data.load("cifar10", "test", str(data_root)).subset(300, seed=11).images()
    g = torch.Generator().manual_seed(5)
    vs = torch.randn(12, 3, 32, 32, generator=g)
    vs = vs * (1.0 / vs.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # L2 1: larger than the default eps 0.5
    assert inference.calibrate_int8(model, x)
    check = inference.logit_errors(model, x, vs[:6], precisions=("int8", "bfloat16"))
    i8, b16 = check.rungs["int8"], check.rungs["bfloat16"]
    assert b16.spread < i8.spread < 3.0  # coarser than bfloat16, yet a working copy (0.7 measured)
    assert torch.equal(check.f32, _exact(model, x, vs[:6]))
    exact = _exact(model, x, vs[6:])
    plain = inference.predict_many(model, x, vs[6:], precision="int8")
    assert 0 < int((plain != exact).sum())  # int8 alone is not float32: the ladder has work to do
    m8, mb = inference.refine_margin(i8.spread), inference.refine_margin(b16.spread)
    for ladder in ([("int8", m8), ("bfloat16", mb)], [("int8", m8)]):
        stats: dict = {}
        assert torch.equal(inference.predict_many(model, x, vs[6:], ladder=ladder, stats=stats), exact)
        up = stats["remade"][ladder[1][0] if len(ladder) > 1 else "float32"]
        assert (plain != exact).sum() <= up < 0.5 * exact.numel()
        assert stats["predicted"] == exact.numel() and stats["refined"] == stats["remade"]["float32"] <= up


@needs_int8
def test_int8_check_against_a_plain_loop(mnist):
    """The check's int8 error and spread are those of the int8 copy's logits computed one
    perturbation at a time, against the eager float32 model."""
    model, x, vs = mnist
    assert inference.calibrate_int8(model, x)
    rung = inference.logit_errors(model, x, vs[:3], precisions=("int8",), rows=70).rungs["int8"]
    q = inference.prepared_model(model, precision="int8")
    err = spread = 0.0
    with torch.no_grad():
        for v in vs[:3]:
            xv = (x + v).clamp(0, 1)
            d = q(xv) - model(xv)
            err, spread = max(err, d.abs().max().item()), max(spread, (d.max(1).values - d.min(1).values).max().item())
    assert rung.error == pytest.approx(err, rel=1e-4) and rung.spread == pytest.approx(spread, rel=1e-4)
    assert rung.spread > 0


@needs_int8
def test_int8_copy_is_quantized_and_calibrated_on_the_first_images(mnist):
    """The copy runs int8 convolutions; its activation ranges come from the first
    INT8_CALIBRATION_IMAGES images only, and other calibration images give another copy."""
    model, x, _ = mnist
    assert inference.INT8_CALIBRATION_IMAGES < len(x)
    inference.calibrate_int8(model, x)
    q = inference.prepared_model(model, precision="int8")
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in q.modules())
    with torch.no_grad():
        first = q(x)
        inference.calibrate_int8(model, x[:inference.INT8_CALIBRATION_IMAGES])
        assert torch.equal(inference.prepared_model(model, precision="int8")(x), first)
        inference.calibrate_int8(model, x * 0.5)  # other (dimmer) images, other ranges
        assert not torch.equal(inference.prepared_model(model, precision="int8")(x), first)
        assert (first - model(x)).abs().max() < 2.0


def test_untraceable_model_gets_no_int8_rung():
    """A model fx cannot trace has no int8 copy, and refined evaluation goes on without that rung."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 26 * 26, 10)

        def forward(self, x):
            h = self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent control flow
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(40, 1, 28, 28)
    assert not inference.calibrate_int8(model, x) and not inference.has_int8(model)
    y = torch.randint(0, 10, (40,))
    uaps = [UAP("u", torch.randn(1, 28, 28) * 0.1, "test", 1.0)]
    _, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=1, precision="auto", progress=False)
    assert "int8" not in [r[0] for r in extra["evaluation"].get("ladder", [])]


@needs_int8
def test_int8_rung_is_dropped_when_it_would_send_too_many_up(mnist, monkeypatch):
    model, x, vs = mnist
    y = torch.zeros(len(x), dtype=torch.long)
    uaps = [UAP("u", vs[0], "test", 3.0)]
    monkeypatch.setattr(inference, "INT8_MAX_REFINED", -1.0)  # no share is small enough
    _, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=1, precision="auto", progress=False)
    info = extra["evaluation"]
    assert "int8_refine_share_in_check" in info and "int8" not in [r[0] for r in info.get("ladder", [])]
    assert info["precision"] == ("bfloat16-refined" if inference.bf16_supported() else "float32")


def test_no_int8_rung_on_gpus_or_under_torchrun(monkeypatch):
    assert not quantized.supported("cuda") and not inference.int8_supported("cuda:0")
    monkeypatch.setattr(distributed, "active", lambda: True)  # every rank would calibrate its own copy
    assert not inference.int8_supported()


@needs_int8
def test_a_changed_model_is_checked_again(mnist, monkeypatch):
    """The held-out evaluation reuses the fit images' int8 rung only while the int8 copy is the
    model's: after a weight change it calibrates and checks afresh."""
    _, x, vs = mnist
    model = uapx.models.load("zoo:mnist-natural").eval()  # its own: its weights change below
    y = torch.zeros(len(x), dtype=torch.long)
    uaps = [UAP("u", vs[0], "test", 3.0)]
    _, first = evaluate_many(model, x, y, uaps, num_classes=10, draws=1, precision="auto", progress=False)
    assert first["evaluation"]["ladder"][0][0] == "int8" and inference.has_int8(model)
    with torch.no_grad():
        model.classifier[-1].bias.add_(0.1)
    assert not inference.has_int8(model)
    calls = []
    check = inference.logit_errors
    monkeypatch.setattr(inference, "logit_errors", lambda *a, **k: calls.append(1) or check(*a, **k))
    _, second = evaluate_many(model, x, y, uaps, num_classes=10, draws=1, precision="auto", progress=False,
                              checked=first["evaluation"])
    assert calls and "check_reused" not in second["evaluation"] and inference.has_int8(model)
