"""The user's own models: factories, weights files, normalisation, robustness ImageNet checkpoints,
and nn.Modules passed to the Python API; each against plain PyTorch."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import uapx.models
from uapx.errors import UapxError
from uapx.models.factory import IMAGENET_MEAN, IMAGENET_STD, normalization, parse_model_args

from nets import randomize_bn as _randomize_bn


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "; fix: " in msg
    return msg


def _reference(net: nn.Module, x: torch.Tensor, mean, std) -> torch.Tensor:
    """An independent normalise + forward."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return net.eval()((x - m) / s)


def test_model_args_are_typed_literals():
    got = parse_model_args("num_classes=10,zero_init_residual=True,weights=None,name=abc,size=(3, 64),lr=1e-3,"
                           "tag='a,b'")
    assert got == {"num_classes": 10, "zero_init_residual": True, "weights": None, "name": "abc", "size": (3, 64),
                   "lr": 1e-3, "tag": "a,b"}
    assert parse_model_args(None) == {} and parse_model_args({"k": 1}) == {"k": 1}
    with pytest.raises(UapxError) as e:
        parse_model_args("num_classes")
    assert "KEY=VALUE" in _one_line(e)


def test_factory_weights_and_normalize_give_the_reference_logits(tmp_path):
    torch.manual_seed(0)
    net = _randomize_bn(torchvision.models.resnet18(num_classes=7))
    # saved as a checkpoint dict from a DataParallel wrapper: "module." on every key
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
               tmp_path / "w.pt")
    model, card = uapx.models.load_with_card("torchvision.models:resnet18", model_args="num_classes=7",
                                             weights=tmp_path / "w.pt", normalize="imagenet")
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _reference(net, x, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-5, atol=1e-5)
    assert card["format"] == "factory" and card["model_args"] == {"num_classes": 7}
    assert card["normalize"]["mean"] == list(IMAGENET_MEAN)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_explicit_normalization_and_bare_state_dict(tmp_path):
    net = _randomize_bn(torchvision.models.resnet18(num_classes=4), seed=1)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    model = uapx.models.load("torchvision.models:resnet18", model_args={"num_classes": 4},
                             weights=str(tmp_path / "sd.pt"), normalize="0.5,0.4,0.3;0.2,0.25,0.3")
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(net, x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    assert normalization("cifar10")[0] == pytest.approx((0.4914, 0.4822, 0.4465))


def test_mismatched_weights_name_the_keys_in_one_line(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UapxError) as e:
        uapx.models.load("torchvision.models:resnet18", model_args="num_classes=10", weights=tmp_path / "w.pt")
    msg = _one_line(e)
    assert "shape mismatch: fc.weight, fc.bias" in msg
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "epoch": 1}, tmp_path / "none.pt")
    with pytest.raises(UapxError) as e:
        uapx.models.load("torchvision.models:resnet18", weights=tmp_path / "none.pt")
    assert "holds no state_dict" in _one_line(e)


@pytest.mark.parametrize("spec, args, needle", [
    ("torchvision.nomodule:resnet18", None, "cannot import module"),
    ("torchvision.models:resnet999", None, "has no attribute"),
    ("torchvision.models:resnet18", "bogus=1", "refused its arguments"),
    ("torchvision.models:__name__", None, "is not callable"),
])
def test_bad_factories_are_one_line_errors(spec, args, needle):
    with pytest.raises(UapxError) as e:
        uapx.models.load(spec, model_args=args)
    assert needle in _one_line(e)


def test_bad_normalize_is_one_line_error():
    for bad in ("imagenett", "0.5,0.5;0.2", "0.5;0"):
        with pytest.raises(UapxError) as e:
            normalization(bad)
        _one_line(e)


def test_weights_need_a_factory(tmp_path):
    with pytest.raises(UapxError) as e:
        uapx.models.load("zoo:mnist-natural", weights=tmp_path / "w.pt")
    assert "MODULE:CALLABLE" in _one_line(e)


def test_module_passed_directly():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    model, card = uapx.models.load_with_card(net, normalize="0.5;0.25")
    x = torch.rand(2, 1, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.25))
    assert card["format"] == "module"


def test_robustness_imagenet_checkpoint_gives_the_library_logits(tmp_path):
    """A checkpoint laid out as robustness's trainer saves an ImageNet ResNet-50: the AttackerModel
    state_dict of its DataParallel wrapper (classifier under module.model., the normaliser under
    module.normalizer., both again under module.attacker.), next to optimizer state and the epoch."""
    torch.manual_seed(0)
    net = _randomize_bn(torchvision.models.resnet50(num_classes=1000), seed=2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sd = {}
    for prefix in ("module.model.", "module.attacker.model."):
        sd.update({prefix + k: v for k, v in net.state_dict().items()})
    sd.update({"module.normalizer.new_mean": mean, "module.normalizer.new_std": std,
               "module.attacker.normalize.new_mean": mean, "module.attacker.normalize.new_std": std})
    torch.save({"model": sd, "epoch": 90, "schedule": None, "optimizer": {"state": {}}}, tmp_path / "in.pt")
    model, card = uapx.models.load_with_card(tmp_path / "in.pt")
    assert card["arch"] == "robustness-imagenet-resnet50" and card["epoch"] == 90
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _reference(net, x, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 1000)
