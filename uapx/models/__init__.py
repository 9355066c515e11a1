"""Models: architectures, the zoo, checkpoint formats.

>>> model = uapx.models.load("zoo:mnist-natural")      # eval mode, on the CPU
>>> model = uapx.models.load("cifar_l2_0_5.pt", trust=True)   # a MadryLab robustness checkpoint
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import zoo
from .architectures import ARCHITECTURES, DEFAULT_ARCH, build
from .checkpoints import model_from_object, read_checkpoint, save_model

__all__ = ["load", "load_with_card", "build", "save_model", "ARCHITECTURES", "DEFAULT_ARCH", "zoo"]


def load_with_card(spec: str | os.PathLike, *, device: str | torch.device = "cpu", arch: str | None = None,
                   trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Load ``spec`` (``zoo:<name>`` or a checkpoint path) and return ``(model, card)``.

    The model is in eval mode with gradients of its parameters disabled.  ``arch`` names the
    architecture of a plain state_dict; ``trust`` allows files that hold pickled Python objects
    (None: ``$UAPX_TRUST_CHECKPOINTS``; see :func:`~uapx.models.checkpoints.read_checkpoint`).
    """
    spec = os.fspath(spec)
    if spec.startswith("zoo:"):
        name = spec[4:]
        path = zoo.path(name)
        model, card = model_from_object(read_checkpoint(path), source=spec, arch=arch)
        card = {**card, **zoo.card(name), "id": spec}
    else:
        model, card = model_from_object(read_checkpoint(spec, trust=trust), source=repr(spec), arch=arch)
        card = {**card, "id": spec}
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def load(spec: str | os.PathLike, *, device: str | torch.device = "cpu", arch: str | None = None,
         trust: bool | None = None) -> nn.Module:
    """Load a model: ``zoo:<name>`` or a checkpoint path (uapx, state_dict, TorchScript, robustness)."""
    return load_with_card(spec, device=device, arch=arch, trust=trust)[0]
