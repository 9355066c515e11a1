"""The batched evaluation (uapx.inference, uapx.evaluate.evaluate_many) against plain eager float32
PyTorch on the bundled natural MNIST model and real MNIST test images; defaults per norm."""
from __future__ import annotations

import copy

import pytest
import torch

import uapx.data
import uapx.models
import uapx.models.architectures
from uapx import inference
from uapx.errors import UapxError
from uapx.evaluate import evaluate_many
from uapx.methods import UAP


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = uapx.models.load("zoo:mnist-natural").eval()
    images = uapx.data.load("mnist", "test").subset(300, seed=3)
    x, y = images.images(), images.y
    g = torch.Generator().manual_seed(7)
    uaps = []
    for i, eps in enumerate((2.0, 2.0, 4.0)):
        v = torch.randn(1, 28, 28, generator=g)
        uaps.append(UAP(f"u{i}", v * (eps / v.norm()), "test", eps, signless=i == 0))
    mean_delta = (x[y == 3].mean(0) - x.mean(0))  # a structured direction that fools some images
    uaps.append(UAP("structured", mean_delta * (4.0 / mean_delta.norm()), "test", 4.0, source_class=3))
    return model, x, y, uaps


def plain_predictions(model, x, v):
    """Eager float32, contiguous, batches of 64: the reference."""
    with torch.no_grad():
        return torch.cat([model((x[s:s + 64] + v).clamp(0, 1)).argmax(1) for s in range(0, len(x), 64)])


def reference_rates(model, x, y, uaps):
    clean = plain_predictions(model, x, torch.zeros(1))
    out = {}
    for u in uaps:
        plus, minus = (plain_predictions(model, x, s * u.vector) for s in (1.0, -1.0))
        out[u.name] = ((plus != clean).double().mean().item(), (minus != clean).double().mean().item(),
                       (plus == y).double().mean().item())
    return clean, out


def test_float32_path_gives_the_eager_numbers(setting):
    model, x, y, uaps = setting
    clean, ref = reference_rates(model, x, y, uaps)
    evals, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=3, precision="float32", progress=False)
    assert extra["evaluation"]["precision"] == "float32"
    for u in uaps:
        ev = evals[u.name]
        assert (ev.plus.fooling_rate, ev.minus.fooling_rate, ev.plus.accuracy) == ref[u.name]
    assert max(r[0] for r in ref.values()) > 0.05  # the check is not vacuous: some images are fooled
    # the random baseline: the same Gaussian draws as a plain loop
    g = torch.Generator().manual_seed(0)
    fool = []
    for _ in range(3):
        v = torch.randn(1, 28, 28, generator=g)
        fool.append((plain_predictions(model, x, v * (4.0 / v.norm())) != clean).double().mean().item())
    assert extra["random_baseline"]["4"]["fooling_rate"]["mean"] == pytest.approx(sum(fool) / 3, abs=1e-12)


def test_small_forward_batches_give_the_same_predictions(setting):
    model, x, _, uaps = setting
    vs = torch.stack([u.vector for u in uaps])
    big = inference.predict_many(model, x, vs)
    small = inference.predict_many(model, x, vs, rows=50)  # one perturbation per pass, images in chunks
    assert torch.equal(big, small)
    assert torch.equal(big[1], plain_predictions(model, x, uaps[1].vector))


def test_passes_are_full_and_cover_every_pair(monkeypatch):
    """Every (perturbation, image) pair lands in exactly one pass, as clamp(x + v, 0, 1), and every
    pass of a chunk but its last holds exactly ``rows`` images (chunks of 70 images here)."""
    g = torch.Generator().manual_seed(3)
    x, vs = torch.rand(150, 1, 4, 4, generator=g), torch.randn(7, 1, 4, 4, generator=g)
    monkeypatch.setattr(inference, "CHUNK_ELEMENTS", 70 * 16)
    seen, sizes = torch.zeros(7 * 150, dtype=torch.long), []
    for inp, flat in inference._passes(x, vs, 33, "cpu"):
        sizes.append(inp.shape[0])
        seen[flat] += 1
        u, i = flat // 150, flat % 150
        assert torch.equal(inp, (x[i] + vs[u]).clamp(0, 1))
    assert bool((seen == 1).all())
    per_chunk = [7 * 70, 7 * 70, 7 * 10]  # pairs in each chunk of images
    expected = [min(33, p - a) for p in per_chunk for a in range(0, p, 33)]
    assert sizes == expected


def test_passes_side_by_side_give_the_serial_predictions(setting):
    """Two single-threaded workers (two intra-op threads) predict what one thread predicts, refined
    bfloat16 included, and torch's thread count comes back afterwards, after an error too."""
    model, x, _, uaps = setting
    vs = torch.stack([u.vector for u in uaps])
    before = torch.get_num_threads()
    runs = {}
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            with inference.side_by_side() as pool:
                assert (pool is None) == (n == 1) and torch.get_num_threads() == 1
            assert torch.get_num_threads() == n
            stats: dict = {}
            runs[n] = (inference.predict_many(model, x, vs, rows=60),
                       inference.predict_many(model, x, vs, rows=60, ladder=[("bfloat16", 0.5)], stats=stats), stats)
        torch.set_num_threads(2)
        with pytest.raises(ZeroDivisionError), inference.side_by_side() as pool:
            pool.submit(lambda: 1 / 0).result()
        assert torch.get_num_threads() == 2
        torch.set_num_threads(4)  # more threads than MAX_WORKERS: the threads are shared out
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(inference, "MAX_WORKERS", 2)
            with inference.side_by_side() as pool:
                assert pool.workers == 2 and pool.submit(torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[2][0], runs[1][0]) and torch.equal(runs[2][0], inference.predict_many(model, x, vs))
    assert torch.equal(runs[2][1], runs[1][1]) and runs[2][2] == runs[1][2]
    assert runs[2][2]["predicted"] == vs.shape[0] * x.shape[0]


def _evaluated(setting, precision):
    """``(evaluations, the run's evaluation info, float32 reference rates)`` of ``setting``'s UAPs."""
    model, x, y, uaps = setting
    _, ref = reference_rates(model, x, y, uaps)
    evals, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=2, precision=precision, progress=False)
    return evals, extra["evaluation"], ref


def test_auto_precision_gives_the_float32_numbers(setting):
    uaps = setting[3]
    evals, info, ref = _evaluated(setting, "auto")
    rungs = [p for p, ok in (("int8", inference.int8_supported()), ("bfloat16", inference.bf16_supported())) if ok]
    assert [r[0] for r in info.get("ladder", [])] == rungs
    assert info["precision"] == (f"{rungs[0]}-refined" if rungs else "float32")
    if "bfloat16" in rungs:
        assert info["refine_margin"] == pytest.approx(inference.refine_margin(info["bf16_max_spread"]))
        assert 0 < info["bf16_max_spread"] <= 2 * info["bf16_max_logit_error"]
        assert info["bf16_max_logit_error"] > 0 and 0 < info["refined"] < info["refined_share"] * 1e9
        assert info["refined_share"] <= inference.BF16_MAX_REFINED
    if "int8" in rungs:  # int8 errs more than bfloat16, and sends more predictions up
        assert info["int8_refine_margin"] == pytest.approx(inference.refine_margin(info["int8_max_spread"]))
        assert info["int8_max_spread"] > info.get("bf16_max_spread", 0)
        assert info["int8_refine_share_in_check"] <= inference.INT8_MAX_REFINED
        assert info["remade"][rungs[1] if len(rungs) > 1 else "float32"] > 0
    if rungs:
        assert info["remade"]["float32"] == info["refined"]
    for u in uaps:  # refined bfloat16 gives float32's predictions: the same rates to the image
        assert (evals[u.name].plus.fooling_rate, evals[u.name].minus.fooling_rate,
                evals[u.name].plus.accuracy) == ref[u.name]


def test_plain_bf16_precision_is_close_to_float32(setting):
    uaps = setting[3]
    evals, info, ref = _evaluated(setting, "bfloat16")
    if inference.bf16_supported():
        assert info["precision"] == "bfloat16" and info["bf16_agreement"] >= inference.BF16_MIN_AGREEMENT
    for u in uaps:  # at most a few images in a thousand change their verdict
        assert abs(evals[u.name].plus.fooling_rate - ref[u.name][0]) <= 0.01
        assert abs(evals[u.name].minus.fooling_rate - ref[u.name][1]) <= 0.01


@pytest.mark.skipif(not inference.bf16_supported(), reason="no bfloat16 arithmetic on this CPU")
def test_refined_bf16_remakes_every_disagreement_on_cifar10(data_root):
    """resnet-small disagrees with float32 under plain bfloat16 about 2 times in 1,000 (CIFAR-10):
    on real test images under random perturbations, the refined predictions equal float32's, and
    the refined rows are where the margin is small, with the check's margin."""
    model = uapx.models.load("zoo:cifar10-natural").eval()
    ds = uapx.data.load("cifar10", "test", str(data_root))
    x = ds.subset(300, seed=11).images()
    g = torch.Generator().manual_seed(5)
    vs = torch.randn(12, 3, 32, 32, generator=g)
    vs = vs * (1.0 / vs.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # L2 1: larger than the default eps 0.5
    check = inference.logit_errors(model, x, vs[:6])  # the check, on 1,800
    rung = check.rungs["bfloat16"]
    assert 0 < rung.error < 1 and 0 < rung.spread <= 2 * rung.error
    assert torch.equal(check.f32, inference.predict_many(model, x, vs[:6]))
    margin = inference.refine_margin(rung.spread)
    stats: dict = {}
    refined = inference.predict_many(model, x, vs[6:], ladder=[("bfloat16", margin)], stats=stats)
    plain = inference.predict_many(model, x, vs[6:], precision="bfloat16")
    exact = inference.predict_many(model, x, vs[6:])
    assert torch.equal(refined, exact)
    assert stats["predicted"] == exact.numel() and 0 < stats["refined"] < 0.5 * exact.numel()
    assert (plain != exact).sum() <= stats["refined"]  # every disagreement was among the remade


@pytest.mark.skipif(not inference.bf16_supported(), reason="no bfloat16 arithmetic on this CPU")
def test_check_spread_against_a_plain_loop(setting):
    """The check's largest error and spread are those of per-image logit differences computed
    one perturbation at a time (float32 eager model against the bfloat16 folded copy)."""
    model, x, _, uaps = setting
    vs = torch.stack([u.vector for u in uaps[:3]])
    check = inference.logit_errors(model, x, vs, rows=70).rungs["bfloat16"]
    folded = inference.prepared_model(model, precision="bfloat16")
    err = spread = 0.0
    with torch.no_grad():
        for v in vs:
            xv = (x + v).clamp(0, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lb = folded(xv.contiguous(memory_format=torch.channels_last)).float()
            d = lb - model(xv)
            err, spread = max(err, d.abs().max().item()), max(spread, (d.max(1).values - d.min(1).values).max().item())
    assert check.error == pytest.approx(err, rel=0.05) and check.spread == pytest.approx(spread, rel=0.05)
    assert check.spread > 0 and inference.refine_margin(check.spread) == inference.BF16_ERROR_SAFETY * check.spread


def test_disagreeing_bf16_falls_back_to_float32(setting, monkeypatch):
    model, x, y, uaps = setting
    _, ref = reference_rates(model, x, y, uaps)
    monkeypatch.setattr(inference, "BF16_MIN_AGREEMENT", 1.01)  # no agreement is enough
    with pytest.warns(UserWarning, match="evaluating in float32"):
        evals, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=1, precision="bfloat16",
                                     progress=False)
    assert extra["evaluation"]["precision"] == "float32"
    assert all(evals[u.name].plus.fooling_rate == ref[u.name][0] for u in uaps)


def test_failing_compile_falls_back_with_one_warning(setting, monkeypatch):
    model, x, _, uaps = setting
    net = uapx.models.load("zoo:mnist-natural").eval()

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    vs = torch.stack([u.vector for u in uaps])
    with pytest.warns(UserWarning, match="torch.compile failed") as rec:
        a = inference.predict_many(net, x, vs, compile=True)
        b = inference.predict_many(net, x, vs, compile=True)  # cached: no second warning
    assert len([w for w in rec if "torch.compile" in str(w.message)]) == 1
    assert torch.equal(a, b) and torch.equal(a, inference.predict_many(model, x, vs))


def test_prepared_copy_follows_weight_changes():
    net = uapx.models.load("zoo:mnist-natural").eval()
    x = uapx.data.load("mnist", "test").subset(64, seed=1).images()
    zero = torch.zeros(1, 1, 28, 28)
    before = inference.predict_many(net, x, zero)
    with torch.no_grad():
        net.classifier[-1].bias.copy_(torch.tensor([0.0] * 9 + [1e6]))  # everything becomes class 9
    after = inference.predict_many(net, x, zero)
    assert not torch.equal(before, after) and bool((after == 9).all())


def test_defaults_per_norm_and_data_set():
    from uapx.pipeline import AnalyzeConfig, attack_norm, defaults_applied
    from uapx.registry import get_registry

    for attack, dataset, eps in (("pgd-linf", "mnist", 0.3), ("pgd-linf", "cifar10", 8 / 255),
                                 ("pgd-l2", "mnist", 2.0), ("pgd-l2", "cifar10", 0.5)):
        given = AnalyzeConfig(attack=attack, dataset=dataset)
        c = given.resolved()
        assert c.eps == pytest.approx(eps) and c.step_size == pytest.approx(2.5 * eps / c.steps)
        applied = defaults_applied(given, c, attack_norm(get_registry().components[attack]))
        assert applied["eps"] == pytest.approx(eps) and applied["norm"] == attack[4:]
    assert "eps" not in defaults_applied(AnalyzeConfig(eps=1.0), AnalyzeConfig(eps=1.0).resolved(), "l2")
    with pytest.raises(UapxError, match="Linf eps of 1"):
        AnalyzeConfig(attack="pgd-linf", eps=1.0).resolved()


def test_linf_eps_of_one_is_a_one_line_error(capsys):
    from uapx.cli import main

    assert main(["analyze", "--attack", "pgd-linf", "--eps", "1.5", "--out", "r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uapx: error: a Linf eps of 1.5")


def test_bf16_check_covers_enough_predictions():
    """At least BF16_MIN_CHECKED predictions are compared (so that one disagreement in 600 cannot
    decide), in whole UAPs (+v and -v), never more perturbations than there are."""
    need = inference.BF16_MIN_CHECKED
    for n, u in ((200, 137), (5000, 137), (300, 9), (10, 4), (1, 1)):
        k = inference.bf16_check_count(n, u)
        assert k <= u and (k % 2 == 0 or k == u)
        assert (k + 1) * n >= need or k == u, (n, u, k)
        assert k == 2 or k == u or k * n < need + 2 * n, (n, u, k)  # no more than it takes


def test_folded_batchnorm_copy_gives_the_same_logits():
    """The bfloat16 copy folds BatchNorm into the convolutions: in float32 its logits are the
    model's up to rounding (an independent eager forward), and a model fx cannot trace is used
    as it is."""
    torch.manual_seed(0)
    model = uapx.models.architectures.build("resnet-small", num_classes=10)
    model.train()
    with torch.no_grad():  # running statistics away from the identity, so folding has work to do
        for _ in range(3):
            model(torch.rand(64, 3, 32, 32))
    model.eval()
    folded = inference._fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow

    odd = Untraceable().eval()
    assert inference._fold_batchnorm(odd) is odd


@pytest.mark.skipif(not inference.bf16_supported(), reason="no bfloat16 arithmetic on this CPU")
def test_a_second_evaluation_reuses_the_first_check(setting, monkeypatch):
    """Held-out images reuse the fit images' refined-bfloat16 margin: no second check, and still
    float32's numbers."""
    model, x, y, uaps = setting
    _, first, ref = _evaluated(setting, "auto")
    calls = []
    monkeypatch.setattr(inference, "logit_errors", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(inference, "calibrate_int8", lambda *a, **k: calls.append(1))
    evals, extra = evaluate_many(model, x, y, uaps, num_classes=10, draws=2, precision="auto", progress=False,
                                 checked=first)
    info = extra["evaluation"]
    assert not calls and info["check_reused"] and info["refine_margin"] == first["refine_margin"]
    assert info["ladder"] == first["ladder"] and info["precision"] == first["precision"] and info["refined"] > 0
    for u in uaps:
        assert (evals[u.name].plus.fooling_rate, evals[u.name].minus.fooling_rate,
                evals[u.name].plus.accuracy) == ref[u.name]
    _, plain = evaluate_many(model, x, y, uaps, num_classes=10, draws=2, precision="float32", progress=False,
                             checked=first)
    assert plain["evaluation"]["precision"] == "float32"  # asked for float32: float32
