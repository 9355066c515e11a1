"""Models: architectures against functional references, the zoo's claims, checkpoint formats."""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uapx.cli
import uapx.data
import uapx.models
from uapx.errors import UapxError
from uapx.models import build, save_model
from uapx.models.architectures import ROBUSTNESS_CIFAR_MEAN, ROBUSTNESS_CIFAR_STD

from nets import randomize_bn as _randomize_bn


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch):
    monkeypatch.delenv("UAPX_TRUST_CHECKPOINTS", raising=False)


@pytest.fixture(scope="module")
def mnist_test() -> uapx.data.ImageSet:
    return uapx.data.load("mnist", "test")  # the embedded split: works offline


@pytest.fixture(scope="module")
def zoo() -> tuple[nn.Module, dict]:
    return uapx.models.load_with_card("zoo:mnist-natural")


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    """The error's text, checked to be one line with no chained traceback."""
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip()
    err = exc_info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return msg


# -- architectures -------------------------------------------------------------------------------


def madry_cnn_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Madry et al.'s MNIST CNN written out functionally, normalising [0, 1] inputs first."""
    h = (x - mean) / std
    h = F.max_pool2d(F.relu(F.conv2d(h, sd["features.0.weight"], sd["features.0.bias"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, sd["features.3.weight"], sd["features.3.bias"], padding=2)), 2)
    h = F.relu(F.linear(h.flatten(1), sd["classifier.1.weight"], sd["classifier.1.bias"]))
    return F.linear(h, sd["classifier.3.weight"], sd["classifier.3.bias"])


def test_madry_cnn_structure():
    model = build("mnist-cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 1, 5, 5), (64, 32, 5, 5)]
    assert [c.padding for c in convs] == [(2, 2), (2, 2)]  # "SAME": 28 -> 14 -> 7 after the pools
    assert [(p.kernel_size, p.stride) for p in pools] == [(2, 2), (2, 2)]
    assert [tuple(f.weight.shape) for f in fcs] == [(1024, 7 * 7 * 64), (10, 1024)]
    assert sum(p.numel() for p in model.parameters()) == 3_274_634  # Madry et al.'s count
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_zoo_model_normalises_inside(zoo, mnist_test):
    model, _ = zoo
    x = mnist_test.images(slice(0, 16))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    # the zoo stores fp16 weights, the normalisation constants included: MNIST's to fp16 precision
    mean, std = sd["normalize.mean"].item(), sd["normalize.std"].item()
    assert mean == pytest.approx(0.1307, abs=1e-4) and std == pytest.approx(0.3081, abs=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), madry_cnn_reference(sd, x, mean, std), rtol=1e-5, atol=1e-5)


def test_zoo_model_is_eval_and_frozen(zoo):
    model, card = zoo
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert card["id"] == "zoo:mnist-natural" and card["arch"] == "mnist-cnn"


def test_zoo_accuracy_matches_its_card(zoo, mnist_test):
    model, card = zoo
    assert len(mnist_test) == 10_000
    correct = 0
    with torch.no_grad():
        for s in range(0, len(mnist_test), 1000):
            pred = model(mnist_test.images(slice(s, s + 1000))).argmax(1)
            correct += int((pred == mnist_test.y[s:s + 1000]).sum())
    acc = correct / len(mnist_test)
    assert acc >= 0.99
    assert card["clean_eval_images"] == len(mnist_test)
    assert abs(acc - card["clean_accuracy"]) <= 0.001


# -- round trips ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_net() -> tuple[nn.Module, torch.Tensor]:
    """resnet-small (has BatchNorm buffers) with random statistics, and a batch of inputs."""
    torch.manual_seed(0)
    return _randomize_bn(build("resnet-small")), torch.rand(4, 3, 32, 32)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_save_model_round_trip(tmp_path, small_net):
    net, x = small_net
    path = tmp_path / "m.pt"
    save_model(path, net, "resnet-small", card={"note": "hello"})
    model, card = uapx.models.load_with_card(str(path))
    assert card["arch"] == "resnet-small" and card["note"] == "hello" and card["id"] == str(path)
    assert not model.training
    assert torch.equal(_logits(model, x), _logits(net, x))


def test_save_model_half_stores_fp16_rounded_weights(tmp_path, small_net):
    net, _ = small_net
    save_model(tmp_path / "h.pt", net, "resnet-small", half=True)
    loaded = uapx.models.load(tmp_path / "h.pt")
    for k, v in net.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype
        assert torch.equal(w, v.half().float() if v.is_floating_point() else v), k


@pytest.mark.parametrize("arch", ["mnist-cnn", "resnet-small"])
@pytest.mark.parametrize("layout", ["bare", "module-prefix", "wrapped"])
def test_plain_state_dict_detects_architecture(tmp_path, arch, layout):
    torch.manual_seed(1)
    net = _randomize_bn(build(arch))
    sd = net.state_dict()
    if layout == "module-prefix":  # saved from nn.DataParallel
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 7} if layout == "wrapped" else sd
    torch.save(obj, tmp_path / "sd.pt")
    model, card = uapx.models.load_with_card(str(tmp_path / "sd.pt"))
    assert card["format"] == "state_dict" and card["arch"] == arch
    x = torch.rand(2, *((1, 28, 28) if arch == "mnist-cnn" else (3, 32, 32)))
    assert torch.equal(_logits(model, x), _logits(net, x))


def test_state_dict_of_unknown_architecture_names_closest(tmp_path):
    sd = build("mnist-cnn").state_dict()
    sd["classifier.5.weight"] = torch.zeros(3, 10)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(UapxError) as info:
        uapx.models.load(tmp_path / "x.pt")
    msg = _one_line_error(info)
    assert "mnist-cnn" in msg and "unexpected keys: classifier.5.weight" in msg and "--arch" in msg


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_round_trip(tmp_path, small_net, how):
    net, x = small_net
    scripted = torch.jit.trace(net, x) if how == "trace" else torch.jit.script(net)
    scripted.save(str(tmp_path / "ts.pt"))
    model, card = uapx.models.load_with_card(str(tmp_path / "ts.pt"))
    assert card["format"] == "torchscript" and isinstance(model, torch.jit.ScriptModule)
    assert not model.training
    torch.testing.assert_close(_logits(model, x), _logits(net, x), rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_architecture_names_keys(tmp_path, small_net):
    net, _ = small_net
    save_model(tmp_path / "wrong.pt", net, "mnist-cnn")  # says mnist-cnn, holds resnet-small weights
    with pytest.raises(UapxError) as info:
        uapx.models.load(str(tmp_path / "wrong.pt"))
    msg = _one_line_error(info)
    assert "missing keys: " in msg and "features.0.weight" in msg
    assert "unexpected keys: " in msg and "stem.0.weight" in msg

    torch.save(net.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UapxError) as info:
        uapx.models.load(str(tmp_path / "plain.pt"), arch="resnet18")
    assert "shape mismatch: " in _one_line_error(info)


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path, small_net):
    net, x = small_net
    save_model(tmp_path / "ok.pt", net, "resnet-small")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint\n" * 100)
    torch.jit.trace(net, x).save(str(tmp_path / "ts.pt"))
    ts = (tmp_path / "ts.pt").read_bytes()
    (tmp_path / "ts-cut.pt").write_bytes(ts[: len(ts) // 2])
    for name in ("cut.pt", "junk.pt", "ts-cut.pt"):
        with pytest.raises(UapxError) as info:
            uapx.models.load(str(tmp_path / name))
        msg = _one_line_error(info)
        assert name in msg and ("corrupt" in msg or "truncated" in msg), msg


def test_missing_file(tmp_path):
    with pytest.raises(UapxError) as info:
        uapx.models.load(str(tmp_path / "nope.pt"))
    assert "does not exist" in _one_line_error(info)


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    code = uapx.cli.main(["analyze", "--model", str(bad), "--n-samples", "10", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uapx: error:") and "bad.pt" in lines[0], err
    assert not (tmp_path / "r" / "report.json").exists()


# -- MadryLab robustness checkpoints -------------------------------------------------------------


def robustness_resnet_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: tuple[int, ...],
                                bottleneck: bool) -> torch.Tensor:
    """robustness' ``AttackerModel(ResNet)`` inference, functionally, from *their* state_dict.

    ``sd`` has robustness' keys with ``module.`` stripped: ``normalizer.new_mean`` etc. and
    ``model.conv1.weight`` etc. (their cifar_models/resnet.py and helpers.InputNormalize).
    """
    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    h = (x.clamp(0, 1) - sd["normalizer.new_mean"]) / sd["normalizer.new_std"]
    h = F.relu(bn(F.conv2d(h, sd["model.conv1.weight"], padding=1), "model.bn1"))
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"model.layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if bottleneck:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                o = F.relu(bn(F.conv2d(o, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                o = bn(F.conv2d(o, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                o = bn(F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                h = bn(F.conv2d(h, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            h = F.relu(o + h)
    h = F.avg_pool2d(h, 4).flatten(1)
    return F.linear(h, sd["model.linear.weight"], sd["model.linear.bias"])


def robustness_state_dict(arch: str, seed: int, *, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """An ``AttackerModel`` state_dict as robustness writes it: classifier, normaliser, attacker copies."""
    torch.manual_seed(seed)
    net = _randomize_bn(build(arch))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])
    sd: dict[str, torch.Tensor] = {}
    for owner in ("", "attacker."):  # the attacker shares the classifier: same tensors
        norm = "normalize" if owner else "normalizer"
        sd[f"{prefix}{owner}{norm}.new_mean"] = mean[:, None, None]
        sd[f"{prefix}{owner}{norm}.new_std"] = std[:, None, None]
        sd.update({f"{prefix}{owner}model.{k}": v for k, v in net.state_dict().items()
                   if not k.startswith("normalize.")})
    return sd


def _their_ckpt(sd: dict, key: str = "model") -> dict:
    return {key: sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
            "schedule": None, "epoch": 150, "amp": None, "prec1": torch.tensor(95.25)}


@pytest.fixture(scope="module")
def resnet50_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = robustness_state_dict("robustness-resnet50", seed=2)
    path = tmp_path_factory.mktemp("robustness") / "cifar_nat.pt"
    torch.save(_their_ckpt(sd), path)
    return path, sd


def test_robustness_resnet50_matches_their_forward(resnet50_ckpt):
    path, sd = resnet50_ckpt
    model, card = uapx.models.load_with_card(str(path))
    assert card["format"] == "robustness" and card["arch"] == "robustness-resnet50" and card["epoch"] == 150
    assert not model.training
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = {k[len("module."):]: v for k, v in sd.items()}
    ref = robustness_resnet_reference(theirs, x, (3, 4, 6, 3), bottleneck=True)
    out = _logits(model, x)
    assert ref.abs().max() > 1e-2  # a non-degenerate comparison
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_robustness_checkpoint_equals_directly_built_model(resnet50_ckpt):
    path, sd = resnet50_ckpt
    direct = build("robustness-resnet50")
    direct.load_state_dict({k[len("module.model."):]: v for k, v in sd.items() if k.startswith("module.model.")}
                           | {"normalize.mean": torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1),
                              "normalize.std": torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)})
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_logits(uapx.models.load(path), x), _logits(direct.eval(), x))


def test_robustness_default_normaliser_is_theirs():
    model = build("robustness-resnet50")
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(ROBUSTNESS_CIFAR_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(ROBUSTNESS_CIFAR_STD))


def test_robustness_resnet18_legacy_layout(tmp_path):
    """Old robustness versions: ``state_dict`` key; no DataParallel prefix; ResNet-18 inferred."""
    sd = robustness_state_dict("robustness-resnet18", seed=3, prefix="")
    torch.save(_their_ckpt(sd, key="state_dict"), tmp_path / "r18.pt")
    model, card = uapx.models.load_with_card(str(tmp_path / "r18.pt"))
    assert card["arch"] == "robustness-resnet18"
    x = torch.rand(2, 3, 32, 32)
    ref = robustness_resnet_reference(sd, x, (2, 2, 2, 2), bottleneck=False)
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-4, atol=1e-5)


def test_robustness_checkpoint_that_does_not_fit_names_keys(tmp_path):
    sd = robustness_state_dict("robustness-resnet18", seed=4)
    del sd["module.model.layer3.1.conv2.weight"]
    sd["module.model.extra.weight"] = torch.zeros(1)
    torch.save(_their_ckpt(sd), tmp_path / "bad.pt")
    with pytest.raises(UapxError) as info:
        uapx.models.load(str(tmp_path / "bad.pt"))
    msg = _one_line_error(info)
    assert "missing keys: layer3.1.conv2.weight" in msg and "unexpected keys: extra.weight" in msg


# -- checkpoints holding pickled Python objects --------------------------------------------------


@pytest.fixture
def ckpt_with_args(tmp_path) -> Path:
    sd = robustness_state_dict("robustness-resnet18", seed=5)
    path = tmp_path / "with_args.pt"
    torch.save({**_their_ckpt(sd), "args": argparse.Namespace(arch="resnet18", eps=0.5)}, path)
    return path


def test_pickled_objects_are_refused_by_default(ckpt_with_args, monkeypatch):
    for env in (None, "0"):
        if env is not None:
            monkeypatch.setenv("UAPX_TRUST_CHECKPOINTS", env)
        with pytest.raises(UapxError) as info:
            uapx.models.load(str(ckpt_with_args))
        msg = _one_line_error(info)
        assert "arbitrary Python objects" in msg and "argparse.Namespace" in msg
        assert "UAPX_TRUST_CHECKPOINTS=1" in msg and "trust=True" in msg
    with pytest.raises(UapxError):
        uapx.models.load(str(ckpt_with_args), trust=False)


def test_pickled_objects_load_on_opt_in(ckpt_with_args, monkeypatch):
    x = torch.rand(2, 3, 32, 32)
    by_arg = _logits(uapx.models.load(str(ckpt_with_args), trust=True), x)
    monkeypatch.setenv("UAPX_TRUST_CHECKPOINTS", "1")
    by_env = _logits(uapx.models.load(str(ckpt_with_args)), x)
    assert torch.equal(by_arg, by_env)


def test_pickled_module_loads_when_trusted(tmp_path, small_net):
    net, x = small_net
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(UapxError, match="arbitrary Python objects"):
        uapx.models.load(str(tmp_path / "whole.pt"))
    model, card = uapx.models.load_with_card(str(tmp_path / "whole.pt"), trust=True)
    assert card["format"] == "module"
    assert torch.equal(_logits(model, x), _logits(net, x))


def test_trusted_checkpoint_needing_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "gone_module_xyz.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module_xyz

    torch.save({"model": {"w": torch.zeros(1)}, "args": gone_module_xyz.Thing()}, tmp_path / "t.pt",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    monkeypatch.delitem(sys.modules, "gone_module_xyz")
    (tmp_path / "gone_module_xyz.py").unlink()
    with pytest.raises(UapxError) as info:
        uapx.models.load(str(tmp_path / "t.pt"), trust=True)
    assert "gone_module_xyz" in _one_line_error(info)
