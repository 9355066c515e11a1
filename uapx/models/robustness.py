"""Checkpoints of MadryLab's ``robustness`` library (their pretrained CIFAR-10 and ImageNet models).

``robustness.train`` saves (``torch.save``, pickled with ``dill``)::

    {"model": <AttackerModel.state_dict(), usually of its DataParallel wrapper>,
     "optimizer": ..., "schedule": ..., "epoch": int, "amp": ..., "prec1": ...}

(old versions name the state_dict ``"state_dict"``).  The state_dict holds the classifier under
``module.model.``, the data set's normalisation as ``module.normalizer.new_mean`` / ``new_std``
(shape ``(C, 1, 1)``), and the same two again under ``module.attacker.model.`` and
``module.attacker.normalize.`` (the attacker shares the classifier).  uapx keeps the classifier
(:class:`~uapx.models.architectures.RobustnessResNet`, keys 1:1 after stripping ``module.model.``)
and turns the normaliser into the model's :class:`~uapx.models.architectures.Normalize` layer, so
the model takes images in [0, 1] like every uapx model.

Their ImageNet models (``robustness/imagenet_models/resnet.py``) are torchvision's ResNets with
torchvision's module names (``conv1`` 7x7, ``layer1``.., ``downsample``, ``fc``); they load into
``torchvision.models.resnet*`` (chosen by the block layout; ``wide_resnet*_2`` by the width) behind
the checkpoint's own normaliser (:class:`~uapx.models.factory.Normalized`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from .architectures import build

STATE_KEYS = ("model", "state_dict")
# (blocks per stage, bottleneck blocks) -> architecture name
_DEPTHS = {((2, 2, 2, 2), False): "robustness-resnet18", ((3, 4, 6, 3), True): "robustness-resnet50"}
DEFAULT = "robustness-resnet50"


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``sd`` with ``prefix`` removed from its keys when every key carries it (DataParallel's ``module.``)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict a ``robustness`` checkpoint holds, or None when ``obj`` is not one."""
    if not isinstance(obj, Mapping):
        return None
    for key in STATE_KEYS:
        sd = obj.get(key)
        if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            keys = _strip(sd, "module.").keys()
            if any(k.startswith("model.") for k in keys) and any(k.startswith("normalizer.") for k in keys):
                return dict(sd)
    return None


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an ``AttackerModel`` state_dict onto uapx's keys.

    ``model.*`` -> ``*``; ``normalizer.new_mean``/``new_std`` -> ``normalize.mean``/``std``
    ``(1, C, 1, 1)``; the attacker's duplicates are dropped.  Any other key is kept as it is, so
    that loading names it as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in _strip(sd, "module.").items():
        if k.startswith("attacker."):
            continue
        if k.startswith("model."):
            out[k[len("model."):]] = v
        elif k in ("normalizer.new_mean", "normalizer.new_std"):
            out["normalize." + k.split("_")[-1]] = v.reshape(1, -1, 1, 1)
        else:
            out[k] = v
    return out


def infer_arch(sd: Mapping[str, torch.Tensor]) -> str:
    """The ``robustness-*`` architecture whose block layout ``sd`` (converted keys) has.

    Falls back to ResNet-50 (their published CIFAR-10 models); loading then names what differs.
    """
    return _DEPTHS.get(_block_layout(sd), DEFAULT)


# (blocks per stage, bottleneck, wide) -> torchvision factory of robustness's ImageNet ResNets
_IMAGENET = {((2, 2, 2, 2), False, False): "resnet18", ((3, 4, 6, 3), False, False): "resnet34",
             ((3, 4, 6, 3), True, False): "resnet50", ((3, 4, 23, 3), True, False): "resnet101",
             ((3, 8, 36, 3), True, False): "resnet152", ((3, 4, 6, 3), True, True): "wide_resnet50_2",
             ((3, 4, 23, 3), True, True): "wide_resnet101_2"}


def _block_layout(sd: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], bool]:
    blocks = []
    for stage in range(1, 5):
        idx = [int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))]
        blocks.append(max(idx) + 1 if idx else 0)
    return tuple(blocks), any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in sd)


def is_imagenet(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether converted keys ``sd`` are of an ImageNet ResNet (7x7 stem, ``fc`` head)."""
    stem = sd.get("conv1.weight")
    return "fc.weight" in sd and stem is not None and tuple(stem.shape[-2:]) == (7, 7)


def imagenet_model(sd: Mapping[str, torch.Tensor], *, source: str) -> tuple[nn.Module, str]:
    """``(model, torchvision name)``: the torchvision ResNet behind the checkpoint's normaliser,
    with the weights of ``sd`` (converted keys) loaded."""
    import torchvision.models as tvm

    from .checkpoints import load_state
    from .factory import Normalized

    blocks, bottleneck = _block_layout(sd)
    width = sd.get("layer1.0.conv1.weight")
    wide = bottleneck and width is not None and int(width.shape[0]) == 128
    name = _IMAGENET.get((blocks, bottleneck, wide), "resnet50")
    net = getattr(tvm, name)(weights=None, num_classes=int(sd["fc.weight"].shape[0]))
    mean, std = sd.get("normalize.mean"), sd.get("normalize.std")
    model = Normalized(net, mean.flatten().tolist() if mean is not None else [0.0] * 3,
                       std.flatten().tolist() if std is not None else [1.0] * 3)
    wrapped = {("normalize." + k[len("normalize."):] if k.startswith("normalize.") else "model." + k): v
               for k, v in sd.items()}
    load_state(model, wrapped, source=source)
    return model, name


def model_from_checkpoint(obj: Mapping[str, Any], *, source: str,
                          arch: str | None = None) -> tuple[nn.Module, dict] | None:
    """``(model, card)`` from a ``robustness`` checkpoint, or None when ``obj`` is not one.

    Args:
        obj: what ``torch.load`` returned.
        source: how to name the file in errors.
        arch: architecture name overriding the one inferred from the keys.
    Raises:
        UapxError: the weights do not fit the architecture (names the missing/unexpected keys).
    """
    from .checkpoints import load_state

    raw = state_dict_of(obj)
    if raw is None:
        return None
    sd = convert(raw)
    if arch is None and is_imagenet(sd):
        model, tv_name = imagenet_model(sd, source=source)
        card: dict[str, Any] = {"format": "robustness", "arch": f"robustness-imagenet-{tv_name}",
                                "torchvision": f"torchvision.models:{tv_name}"}
        return model, _with_epoch(card, obj)
    name = arch or infer_arch(sd)
    linear = sd.get("linear.weight")
    model = build(name, num_classes=int(linear.shape[0])) if linear is not None else build(name)
    load_state(model, sd, source=source)
    return model, _with_epoch({"format": "robustness", "arch": name}, obj)


def _with_epoch(card: dict, obj: Mapping[str, Any]) -> dict:
    epoch = obj.get("epoch")
    if isinstance(epoch, (int, torch.Tensor)):
        card["epoch"] = int(epoch)
    return card
