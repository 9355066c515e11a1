"""Checkpoints of MadryLab's ``robustness`` library (their pretrained CIFAR-10 models).

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
    blocks = []
    for stage in range(1, 5):
        idx = [int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))]
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in sd)
    return _DEPTHS.get((tuple(blocks), bottleneck), DEFAULT)


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
    name = arch or infer_arch(sd)
    linear = sd.get("linear.weight")
    model = build(name, num_classes=int(linear.shape[0])) if linear is not None else build(name)
    load_state(model, sd, source=source)
    card: dict[str, Any] = {"format": "robustness", "arch": name}
    epoch = obj.get("epoch")
    if isinstance(epoch, (int, torch.Tensor)):
        card["epoch"] = int(epoch)
    return model, card
