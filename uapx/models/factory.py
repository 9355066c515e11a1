"""The user's own models: a factory ``MODULE:CALLABLE`` with keyword arguments, weights from a
file, and a normalisation layer in front.

>>> model = from_factory("torchvision.models:resnet18", {"num_classes": 10})
>>> load_weights(model, "resnet18.pt")          # a state_dict, or a checkpoint dict holding one
>>> model = normalized(model, *normalization("imagenet"))   # inputs stay images in [0, 1]
"""
from __future__ import annotations

import ast
import importlib
import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import UapxError
from .architectures import CIFAR10_MEAN, CIFAR10_STD, Normalize

FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
STATE_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")


def is_factory(spec: str) -> bool:
    """Whether ``spec`` names a factory (``module.sub:callable``) rather than a file or zoo model."""
    return bool(FACTORY_PATTERN.fullmatch(spec)) and not spec.startswith("zoo:") and not os.path.exists(spec)


def parse_model_args(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"num_classes=10,weights=None"`` -> ``{"num_classes": 10, "weights": None}``.

    Each value is read as a Python literal (numbers, True/False/None, quoted strings, tuples and
    lists); anything else stays text.  A mapping is returned as a dict unchanged.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    out: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UapxError(f"--model-args item {item!r} is not KEY=VALUE",
                            "write e.g. --model-args num_classes=10,pretrained=False")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (so ``size=(3,224)`` stays one item)."""
    items, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i for i in (s.strip() for s in items) if i]


def from_factory(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory ``MODULE:CALLABLE`` (e.g. ``torchvision.models:resnet18``) with ``kwargs``."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UapxError(f"--model {spec}: cannot import module {module_name!r} ({exc})",
                        f"install the package that provides {module_name.split('.')[0]!r} or fix the name") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UapxError(f"--model {spec}: {module_name!r} has no attribute {attr!r}",
                            "name a function or class that builds the model, e.g. torchvision.models:resnet18")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UapxError(f"--model {spec}: {attr!r} is not callable", "name a function or class that builds the model")
    try:
        model = obj(**dict(kwargs or {}))
    except TypeError as exc:
        raise UapxError(f"--model {spec} refused its arguments: {exc}", "check --model-args KEY=VALUE,...") from None
    if not isinstance(model, nn.Module):
        raise UapxError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module",
                        "name a factory that returns the model")
    return model


def state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict a weights file held: itself, or under one of :data:`STATE_KEYS`."""
    def is_sd(o: Any) -> bool:
        return isinstance(o, Mapping) and bool(o) and all(isinstance(v, torch.Tensor) for v in o.values())

    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if is_sd(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if is_sd(obj.get(key)):
                return dict(obj[key])
    return None


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """``sd`` with DataParallel's ``module.`` removed where every key carries it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def load_weights(model: nn.Module, path: str | os.PathLike, *, trust: bool | None = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place; float tensors as float32).

    The file holds a state_dict, or a checkpoint dict with one under ``state_dict``, ``model``,
    ``model_state_dict``, ``net`` or ``weights``; DataParallel's ``module.`` prefix is stripped.
    Raises a one-line :class:`UapxError` listing missing, unexpected and mis-shaped keys.
    """
    from .checkpoints import describe_mismatch, read_checkpoint

    obj = read_checkpoint(path, trust=trust)
    sd = state_dict_in(obj)
    if sd is None:
        keys = ", ".join(list(obj)[:5]) if isinstance(obj, Mapping) else type(obj).__name__
        raise UapxError(f"--weights {os.fspath(path)!r} holds no state_dict (found: {keys})",
                        "save the weights with torch.save(model.state_dict(), path)")
    sd = strip_prefix(sd)
    problem = describe_mismatch(model.state_dict(), sd)
    if problem:
        raise UapxError(f"--weights {os.fspath(path)!r} does not fit {type(model).__name__}: {problem}",
                        "pass the --model and --model-args the weights were saved from")
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    return model


def normalization(spec: str | Sequence[Sequence[float]] | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``"imagenet"``, ``"cifar10"`` or ``"MEAN;STD"`` (comma-separated per-channel lists, e.g.
    ``"0.5,0.5,0.5;0.25,0.25,0.25"``), or a ``(mean, std)`` pair -> ``(mean, std)``; None -> None."""
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        mean, std = spec
        return _checked(tuple(map(float, mean)), tuple(map(float, std)), str(spec))
    if spec.lower() in NORMALIZATIONS:
        return NORMALIZATIONS[spec.lower()]
    mean_text, sep, std_text = spec.partition(";")
    try:
        if not sep:
            raise ValueError
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise UapxError(f"--normalize {spec!r} is neither a name nor MEAN;STD",
                        f"pass {' or '.join(NORMALIZATIONS)}, or e.g. '0.5,0.5,0.5;0.25,0.25,0.25'") from None
    return _checked(mean, std, spec)


def checked_normalize(text: str) -> str:
    """``text`` once :func:`normalization` accepts it (the CLI's check of ``--normalize``)."""
    normalization(text)
    return text


def _checked(mean: tuple[float, ...], std: tuple[float, ...], spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise UapxError(f"--normalize {spec!r}: mean and std need one value per channel each, std > 0",
                        "pass e.g. '0.5,0.5,0.5;0.25,0.25,0.25'")
    return mean, std


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model that takes images in [0, 1].

    Input ``(N, C, H, W)`` in [0, 1]; output what ``model`` returns.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` behind a per-channel normalisation layer (:class:`Normalized`)."""
    return Normalized(model, mean, std)
