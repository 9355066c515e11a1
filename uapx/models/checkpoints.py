"""Checkpoint formats: uapx's own, plain ``state_dict``s of known architectures, TorchScript.

uapx's own format is a dict::

    {"format": "uapx-model", "version": 1, "arch": "mnist-cnn", "arch_kwargs": {},
     "state_dict": {...}, "card": {...}, "train_state": {...} (training checkpoints only)}
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic
from ..errors import UapxError
from .architectures import ARCHITECTURES, build

FORMAT = "uapx-model"
VERSION = 1


def save_model(path: str | os.PathLike, model: nn.Module, arch: str, *, arch_kwargs: dict | None = None,
               card: dict | None = None, half: bool = False, train_state: dict | None = None) -> None:
    """Write a model in uapx's format, atomically. ``half`` stores float tensors as fp16."""
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
          for k, v in model.state_dict().items()}
    obj: dict[str, Any] = {"format": FORMAT, "version": VERSION, "arch": arch,
                           "arch_kwargs": arch_kwargs or {}, "state_dict": sd, "card": card or {}}
    if train_state is not None:
        obj["train_state"] = train_state
    atomic.torch_save(obj, path)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with one-line errors for missing, truncated or foreign files."""
    p = Path(path)
    if not p.is_file():
        raise UapxError(f"model file {str(p)!r} does not exist",
                        "pass an existing checkpoint path or a zoo name like zoo:mnist-natural")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                if any(n.endswith("constants.pkl") for n in zf.namelist()):
                    return torch.jit.load(str(p), map_location="cpu")
        except (zipfile.BadZipFile, RuntimeError) as exc:
            raise UapxError(f"checkpoint {str(p)!r} is corrupt or truncated ({exc})",
                            "re-download or re-train it") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UapxError(f"checkpoint {str(p)!r} is corrupt, truncated or not a PyTorch file ({msg[:160]})",
                        "re-download or re-train it") from None


def load_state(model: nn.Module, state_dict: dict, *, source: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` in float32; a one-line error names missing/unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatch", shape)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise UapxError(f"checkpoint {source} does not fit architecture {type(model).__name__}: "
                        + "; ".join(parts), "pass --arch with the architecture the checkpoint was saved from")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(sd)
    return model


def model_from_object(obj: Any, *, source: str, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Turn whatever a checkpoint file held into ``(model, card)``."""
    if isinstance(obj, torch.jit.ScriptModule):
        return obj, {"format": "torchscript"}
    if isinstance(obj, nn.Module):
        return obj, {"format": "module"}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        model = build(arch or obj["arch"], **obj.get("arch_kwargs", {}))
        card = dict(obj.get("card", {}))
        card.setdefault("arch", obj["arch"])
        return load_state(model, obj["state_dict"], source=source), card
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_plain_state_dict(obj, source=source, arch=arch)
    raise UapxError(f"checkpoint {source} is in no format uapx knows",
                    "save a state_dict, a TorchScript module or a uapx checkpoint")


def _from_plain_state_dict(sd: dict, *, source: str, arch: str | None) -> tuple[nn.Module, dict]:
    candidates = [arch] if arch else list(ARCHITECTURES)
    for name in candidates:
        model = build(name)
        keys = model.state_dict()
        if arch or (set(keys) == set(sd) and all(tuple(keys[k].shape) == tuple(sd[k].shape) for k in keys)):
            return load_state(model, sd, source=source), {"format": "state_dict", "arch": name}
    raise UapxError(f"checkpoint {source} is a state_dict of no known architecture",
                    f"pass --arch (one of: {', '.join(sorted(ARCHITECTURES))})")
