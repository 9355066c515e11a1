"""Checkpoint formats: uapx's own, plain ``state_dict``s of known architectures, TorchScript, and
MadryLab ``robustness`` checkpoints (:mod:`uapx.models.robustness`).

uapx's own format is a dict::

    {"format": "uapx-model", "version": 1, "arch": "mnist-cnn", "arch_kwargs": {},
     "state_dict": {...}, "card": {...}, "train_state": {...} (training checkpoints only)}

Files are read with ``torch.load(weights_only=True)``, which refuses pickled Python objects
(they can run code).  A file that holds some is loaded only on request: ``trust=True`` or the
environment variable ``UAPX_TRUST_CHECKPOINTS=1``.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import atomic
from ..errors import UapxError
from . import robustness
from .architectures import ARCHITECTURES, build

FORMAT = "uapx-model"
VERSION = 1
TRUST_ENV = "UAPX_TRUST_CHECKPOINTS"


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


def trusted(trust: bool | None = None) -> bool:
    """Whether to unpickle arbitrary Python objects: ``trust``, else ``$UAPX_TRUST_CHECKPOINTS``."""
    if trust is not None:
        return trust
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def read_checkpoint(path: str | os.PathLike, *, trust: bool | None = None) -> Any:
    """``torch.load`` with one-line errors for missing, truncated, foreign or untrusted files.

    Args:
        path: the checkpoint file (``torch.save`` output or a TorchScript archive).
        trust: unpickle arbitrary Python objects if the file holds any (this can run code);
            None reads ``$UAPX_TRUST_CHECKPOINTS``.
    """
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
            raise UapxError(f"checkpoint {str(p)!r} is corrupt or truncated ({_first_line(exc)})",
                            "re-download or re-train it") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UapxError(f"checkpoint {str(p)!r} is corrupt, truncated or not a PyTorch file "
                            f"({_first_line(exc)})", "re-download or re-train it") from None
        if not trusted(trust):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" such as {found.group(1)}" if found else ""
            raise UapxError(f"checkpoint {str(p)!r} contains arbitrary Python objects{what}, which can run "
                            "code when loaded, so uapx refused it",
                            f"if you trust where it came from, set {TRUST_ENV}=1 (or pass trust=True)") from None
        # trusted: fall through to full unpickling below
    except Exception as exc:  # torch raises many types for damaged files
        raise UapxError(f"checkpoint {str(p)!r} is corrupt, truncated or not a PyTorch file ({_first_line(exc)})",
                        "re-download or re-train it") from None
    return _load_trusted(p)


def _load_trusted(p: Path) -> Any:
    """``torch.load`` with full unpickling (the user opted in)."""
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        name = exc.name or _first_line(exc)
        raise UapxError(f"checkpoint {str(p)!r} needs the Python module {name!r} to be loaded",
                        f"install the package that provides {name.split('.')[0]!r}") from None
    except Exception as exc:
        raise UapxError(f"checkpoint {str(p)!r} could not be unpickled ({type(exc).__name__}: {_first_line(exc)})",
                        "re-save it as a plain state_dict with torch.save(model.state_dict(), path)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def describe_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, Any]) -> str:
    """What keeps ``sd`` from loading into a model with state ``own`` ("" when it fits)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shape)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def load_state(model: nn.Module, state_dict: dict, *, source: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` in float32; a one-line error names missing/unexpected keys."""
    problem = describe_mismatch(model.state_dict(), state_dict)
    if problem:
        raise UapxError(f"checkpoint {source} does not fit architecture {type(model).__name__}: {problem}",
                        "pass --arch with the architecture the checkpoint was saved from")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(sd)
    return model


def model_from_object(obj: Any, *, source: str, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Turn whatever a checkpoint file held into ``(model, card)``.

    Recognised: TorchScript and pickled modules, uapx checkpoints, ``robustness`` checkpoints,
    and plain state_dicts of known architectures, bare or under a ``"state_dict"``/``"model"``
    key, with or without DataParallel's ``module.`` prefix.
    """
    if isinstance(obj, torch.jit.ScriptModule):
        return obj, {"format": "torchscript"}
    if isinstance(obj, nn.Module):
        return obj, {"format": "module"}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        lacking = [k for k in ("arch", "state_dict") if not obj.get(k)]
        if lacking:
            raise UapxError(f"uapx checkpoint {source} lacks its {' and '.join(lacking)}",
                            "re-save it with uapx.models.save_model (or 'uapx train')")
        model = build(arch or obj["arch"], **obj.get("arch_kwargs", {}))
        card = dict(obj.get("card", {}))
        card.setdefault("arch", obj["arch"])
        return load_state(model, obj["state_dict"], source=source), card
    found = robustness.model_from_checkpoint(obj, source=source, arch=arch) if isinstance(obj, dict) else None
    if found is not None:
        return found
    if _is_state_dict(obj):
        return _from_plain_state_dict(obj, source=source, arch=arch)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return _from_plain_state_dict(obj[key], source=source, arch=arch)
    raise UapxError(f"checkpoint {source} is in no format uapx knows",
                    "save a state_dict, a TorchScript module or a uapx checkpoint")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_plain_state_dict(sd: dict, *, source: str, arch: str | None) -> tuple[nn.Module, dict]:
    """A state_dict of a known architecture: ``arch``, else the one whose keys and shapes it matches."""
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if arch:
        return load_state(build(arch), sd, source=source), {"format": "state_dict", "arch": arch}
    mismatches = {}
    for name in ARCHITECTURES:
        with torch.device("meta"):  # keys and shapes only, no memory, no init
            own = build(name).state_dict()
        mismatches[name] = describe_mismatch(own, sd)
        if not mismatches[name]:
            return load_state(build(name), sd, source=source), {"format": "state_dict", "arch": name}
    closest = min(mismatches, key=lambda n: len(mismatches[n]))
    raise UapxError(f"checkpoint {source} is a state_dict of no known architecture (closest, {closest}: "
                    f"{mismatches[closest]})", f"pass --arch (one of: {', '.join(sorted(ARCHITECTURES))})")
