"""The plugin contract, checked where plugin code returns: a method's directions and UAPs, a
diagnostic's result.  A break is reported like a plugin that raises,
``plugin 'x' failed: <what it returned>; fix: ...``, exit code 3."""
from __future__ import annotations

from typing import Any

import torch

from .errors import EXIT_PLUGIN, UapxError


def describe(obj: Any) -> str:
    """A short account of what a plugin returned: its type, and the shape or length that matters."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = ", ".join(map(repr, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
        return f"a dict (keys {keys})" if obj else "an empty dict"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return f"an empty {type(obj).__name__}"
        kinds = sorted({type(e).__name__ for e in obj})
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(kinds)})"
    return "None" if obj is None else f"a {type(obj).__name__}"


def broken(name: str, what: str, fix: str) -> UapxError:
    return UapxError(f"plugin {name!r} failed: {what}", f"{fix}; or run without it (--plugins)", exit_code=EXIT_PLUGIN)


def directions(name: str, found: Any, d: int) -> list:
    """``found`` from ``UAPMethod.directions``: a list of :class:`~uapx.methods.Direction` whose
    vectors have ``d`` elements."""
    from .methods import Direction

    fix = f"directions() must return a list of uapx.methods.Direction with vectors of {d} elements"
    if not isinstance(found, (list, tuple)) or not all(isinstance(e, Direction) for e in found):
        raise broken(name, f"directions() returned {describe(found)}", fix)
    for e in found:
        if not isinstance(e.vector, torch.Tensor) or e.vector.numel() != d:
            got = describe(e.vector)
            raise broken(name, f"directions() returned a Direction whose vector is {got}, not {d} elements", fix)
    return list(found)


def method_uaps(name: str, uaps: Any) -> list:
    """A method's UAPs over all its groups: at least one."""
    if not uaps:
        raise broken(name, "the method returned no directions (no UAP at all)",
                     "directions() must return at least one non-zero direction")
    return uaps


def diagnostic_result(name: str, res: Any):
    """``Diagnostic.run``'s return: a :class:`~uapx.diagnostics.DiagnosticResult`."""
    from .diagnostics import DiagnosticResult

    if not isinstance(res, DiagnosticResult):
        raise broken(name, f"run() returned {describe(res)}, not a DiagnosticResult",
                     "return uapx.diagnostics.DiagnosticResult(figures=..., plots=..., summary=...)")
    if not isinstance(res.figures, dict):
        raise broken(name, f"run() returned figures as {describe(res.figures)}, not a dict",
                     "give DiagnosticResult.figures as a dict of JSON-ready numbers")
    if not isinstance(res.plots, (list, tuple)) or not all(isinstance(p, tuple) and len(p) == 3 for p in res.plots):
        raise broken(name, f"run() returned plots as {describe(res.plots)}, not (name, figure, caption) triples",
                     "give DiagnosticResult.plots as a list of (name, matplotlib Figure, caption)")
    return res
