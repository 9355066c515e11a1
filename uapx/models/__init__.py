"""Models: architectures, the zoo, checkpoint formats.

>>> model = uapx.models.load("zoo:mnist-natural")      # eval mode, on the CPU
>>> model = uapx.models.load("cifar_l2_0_5.pt", trust=True)   # a MadryLab robustness checkpoint
>>> model = uapx.models.load("torchvision.models:resnet18", model_args={"num_classes": 10},
...                          weights="resnet18.pt", normalize="imagenet")   # any factory
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import zoo
from .architectures import ARCHITECTURES, DEFAULT_ARCH, build
from .checkpoints import model_from_object, read_checkpoint, save_model
from .factory import from_factory, is_factory, load_weights, normalization, normalized, parse_model_args

__all__ = ["load", "load_with_card", "build", "save_model", "ARCHITECTURES", "DEFAULT_ARCH", "zoo"]


def load_with_card(spec: str | os.PathLike | nn.Module, *, device: str | torch.device = "cpu",
                   arch: str | None = None, trust: bool | None = None, model_args: dict | str | None = None,
                   weights: str | os.PathLike | None = None,
                   normalize: str | tuple | None = None) -> tuple[nn.Module, dict]:
    """Load ``spec`` and return ``(model, card)``.

    ``spec`` is ``zoo:<name>``, a checkpoint path, a factory ``MODULE:CALLABLE`` (called with
    ``model_args``; e.g. ``torchvision.models:resnet18``), or an ``nn.Module`` itself.
    ``weights`` loads a state_dict file into a factory's or module's model
    (:func:`~uapx.models.factory.load_weights`); ``normalize`` (``"imagenet"``, ``"cifar10"``,
    ``"MEAN;STD"`` or a ``(mean, std)`` pair) puts a normalisation layer in front, since uapx
    feeds images in [0, 1].  The model is in eval mode with gradients of its parameters
    disabled.  ``arch`` names the architecture of a plain state_dict; ``trust`` allows files
    that hold pickled Python objects (None: ``$UAPX_TRUST_CHECKPOINTS``; see
    :func:`~uapx.models.checkpoints.read_checkpoint`).
    """
    args = parse_model_args(model_args)
    if isinstance(spec, nn.Module) or is_factory(os.fspath(spec)):
        if isinstance(spec, nn.Module):
            model, card = spec, {"format": "module", "id": f"<{type(spec).__name__}>", "arch": type(spec).__name__}
        else:
            model = from_factory(os.fspath(spec), args)
            card = {"format": "factory", "id": os.fspath(spec), "arch": os.fspath(spec), "model_args": args}
        if weights is not None:
            load_weights(model, weights, trust=trust)
            card["weights"] = os.fspath(weights)
        return _finish(model, card, device, normalize)
    spec = os.fspath(spec)
    if weights is not None or args:
        from ..errors import UapxError

        raise UapxError(f"--weights and --model-args apply to a factory MODULE:CALLABLE, not to {spec!r}",
                        "pass --model MODULE:CALLABLE (e.g. torchvision.models:resnet18), or leave them out")
    if spec.startswith("zoo:"):
        name = spec[4:]
        path = zoo.path(name)
        model, card = model_from_object(read_checkpoint(path), source=spec, arch=arch)
        card = {**card, **zoo.card(name), "id": spec}
    else:
        model, card = model_from_object(read_checkpoint(spec, trust=trust), source=repr(spec), arch=arch)
        card = {**card, "id": spec}
    return _finish(model, card, device, normalize)


def _finish(model: nn.Module, card: dict, device, normalize) -> tuple[nn.Module, dict]:
    """Normalisation in front (where asked), eval mode, on ``device``, no parameter gradients."""
    norm = normalization(normalize)
    if norm is not None:
        model = normalized(model, *norm)
        card = {**card, "normalize": {"mean": list(norm[0]), "std": list(norm[1])}}
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def load(spec: str | os.PathLike | nn.Module, *, device: str | torch.device = "cpu", arch: str | None = None,
         trust: bool | None = None, **options) -> nn.Module:
    """Load a model: ``zoo:<name>``, a checkpoint path (uapx, state_dict, TorchScript, robustness),
    a factory ``MODULE:CALLABLE`` or an ``nn.Module``; ``options``: ``model_args``, ``weights``,
    ``normalize`` (see :func:`load_with_card`)."""
    return load_with_card(spec, device=device, arch=arch, trust=trust, **options)[0]
