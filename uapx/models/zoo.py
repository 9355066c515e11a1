"""The model zoo: weights shipped with the package, each with a model card (JSON)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UapxError

ZOO_DIR = Path(__file__).with_name("zoo")


def names() -> list[str]:
    """Names of the zoo models shipped with this installation."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt"))


def path(name: str) -> Path:
    p = ZOO_DIR / f"{name}.pt"
    if not p.is_file():
        raise UapxError(f"no zoo model {name!r}", f"choose from: {', '.join('zoo:' + n for n in names()) or '(none)'}")
    return p


def card(name: str) -> dict:
    """The model card of zoo model ``name`` (data, architecture, training command, accuracies)."""
    p = ZOO_DIR / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def robust_names(dataset: str) -> list[str]:
    """Names of the adversarially trained zoo models of ``dataset`` (those whose card's ``config.adversarial``
    names a norm); each card's ``config`` holds the training ``adversarial`` norm and ``eps``."""
    cards = {n: card(n) for n in names()}
    return [n for n, c in cards.items() if c.get("dataset") == dataset and (c.get("config") or {}).get("adversarial")]
