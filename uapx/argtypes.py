"""Checked conversions for command-line values: each one turns text into a value or refuses it
with ``argparse.ArgumentTypeError("<what>; fix: <how>")``, before any work starts.

The CLI's parser prints a refusal as one line, ``uapx: error: argument --x: <what>; fix: <how>``.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX_LEN = len(".") + len(".tmp-") + 12  # what uapx.atomic adds to a name for its temporary copy
PATH_MAX = 4096


def _refuse(what: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{what}; fix: {fix}")


def whole(low: int = 1) -> Callable[[str], int]:
    """A whole number ``>= low``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _refuse(f"expected a whole number, got {text!r}", f"pass a whole number >= {low}") from None
        if value < low:
            raise _refuse(f"must be >= {low}, got {value}", f"pass {low} or more")
        return value

    convert.__name__ = f"whole number >= {low}"
    return convert


SEED_MAX = 2**32 - 1  # NumPy's limit; torch takes it too


def seed(text: str) -> int:
    """A random seed: a whole number in ``[0, 2**32 - 1]``."""
    value = whole(0)(text)
    if value > SEED_MAX:
        raise _refuse(f"must be at most {SEED_MAX}, got {value}", f"pass a seed between 0 and {SEED_MAX}")
    return value


def count_or_all(text: str) -> int | None:
    """A whole number >= 1, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise _refuse(f"expected a whole number or 'all', got {text!r}", "pass e.g. 1000 or all") from None
    if value < 1:
        raise _refuse(f"must be >= 1 or 'all', got {value}", "pass 1 or more, or all")
    return value


def _finite(text: str, *, ok, expected: str, out_of_range: str, fix: str) -> float:
    """``float(text)`` when finite and ``ok(value)``; else a one-line refusal."""
    try:
        value = float(text)
    except ValueError:
        raise _refuse(f"expected a number, got {text!r}", expected) from None
    if not ok(value) or not math.isfinite(value):
        raise _refuse(f"{out_of_range}, got {text}", fix)
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    return _finite(text, ok=lambda v: v > 0, expected="pass a positive number, e.g. 0.5",
                   out_of_range="must be a positive finite number", fix="pass a number > 0, e.g. 0.5")


def eps_values(text: str) -> float | list[float]:
    """One budget (a finite number > 0) or a comma-separated list of distinct ones (an eps sweep),
    e.g. ``2`` or ``1,2,4``."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise _refuse(f"expected numbers separated by commas, got {text!r}", "pass e.g. --eps 2 or --eps 1,2,4")
    values = [positive(t) for t in items]
    if len(set(values)) < len(values):
        raise _refuse(f"an eps appears twice in {text!r}", "list each eps once, e.g. --eps 1,2,4")
    return values[0] if len(values) == 1 else values


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    return _finite(text, ok=lambda v: v >= 0, expected="pass a number >= 0",
                   out_of_range="must be a finite number >= 0", fix="pass a number >= 0")


def names(text: str) -> list[str]:
    """A comma-separated list of names (empty items dropped)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def disable(text: str) -> str:
    """``-p no:NAME``: the plugin (entry point) NAME to disable."""
    if not text.startswith("no:") or not text[3:]:
        raise _refuse(f"-p takes no:NAME, got {text!r}", "write -p no:NAME to disable plugin NAME")
    return text


def device(text: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise _refuse(f"unknown device {text!r}", "pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _refuse(f"device {text!r} requested but CUDA is not available", "pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _refuse(f"device {text!r} does not exist ({torch.cuda.device_count()} CUDA devices)",
                          f"pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise _refuse(f"device {text!r} is not available in this torch build", "pass --device cpu or cuda")
    return text


def _check_path_text(text: str, fix: str) -> Path:
    """Refuse a path the file system cannot hold: not encodable, a NUL byte, a name or a whole path
    too long (``NAME_MAX`` of the nearest existing folder, ``PATH_MAX``)."""
    if "\0" in text:
        raise _refuse(f"path {text!r} contains a NUL byte", fix)
    try:
        encoded = os.fsencode(text)
    except UnicodeError:
        raise _refuse(f"path {text!r} cannot be encoded for this file system", fix) from None
    if len(encoded) >= PATH_MAX:
        raise _refuse(f"path '{text[:40]}...' is too long ({len(encoded)} bytes; the limit is {PATH_MAX})", fix)
    path = Path(text).expanduser()
    limit = _name_max(path)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise _refuse(f"name '{part[:40]}...' in path is too long ({len(os.fsencode(part))} bytes; the "
                          f"file system allows {limit})", fix)
    return path


def _name_max(path: Path) -> int:
    probe = path.absolute()
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long to look up
        return False


def input_path(text: str) -> str:
    """A path to read (data root, checkpoint, UAP file): encodable and not too long."""
    _check_path_text(text, "pass a shorter path made of ordinary characters")
    return text


def output_path(text: str) -> str:
    """A path uapx will write: encodable, its name short enough for uapx's temporary copy beside it,
    and no regular file where a folder of it must be."""
    fix = "pass an --out with a shorter name made of ordinary characters"
    path = _check_path_text(text, fix)
    limit = _name_max(path)
    name = os.fsencode(path.name)
    if len(name) + TMP_SUFFIX_LEN > limit:
        raise _refuse(f"output name '{path.name[:40]}...' is too long ({len(name)} bytes; uapx writes "
                      f"'.<name>.tmp-*' beside it, and the file system allows {limit})",
                      f"pass an --out whose last part has at most {limit - TMP_SUFFIX_LEN} bytes")
    for parent in path.absolute().parents:
        if _exists(parent):
            if not parent.is_dir():
                raise _refuse(f"cannot write {text!r}: {str(parent)!r} is a file, not a folder",
                              "pass an --out in a folder")
            break
    return text
