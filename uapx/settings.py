"""Plugin settings (``--set PLUGIN.KEY=VALUE``) checked against the plugin's constructor.

The constructor signature is the one statement of a plugin's settings: its keyword parameters
are the keys, their defaults the defaults, their annotations the types.  :func:`convert` refuses
an unknown key and converts a value (text from the command line, or a Python value) to the
annotated type, or refuses it naming the type; :func:`check_selected` refuses settings for a
plugin that is not part of the run.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any

from .errors import UapxError

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword settings of ``cls.__init__`` by name (``self`` and ``*args`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def takes_any(cls: type) -> bool:
    """Whether ``cls.__init__`` takes ``**settings`` (any key)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def defaults(cls: type) -> dict[str, Any]:
    """``{key: default}`` (``inspect.Parameter.empty`` for a required one)."""
    return {n: p.default for n, p in parameters(cls).items()}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: fall back to the defaults' types
        return {}


def _allowed(annotation: Any, default: Any) -> tuple[type, ...] | None:
    """The plain types a setting accepts, from its annotation (or its default); None: anything."""
    if annotation is None or annotation is inspect.Parameter.empty:
        if default is inspect.Parameter.empty or default is None:
            return None
        return (type(default),)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            sub = _allowed(arg, inspect.Parameter.empty)
            if sub is None:
                return None
            out += sub
        return tuple(out)
    if annotation is type(None):
        return (type(None),)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    if isinstance(annotation, type):
        return (annotation,)
    if origin is not None and isinstance(origin, type):
        return (origin,)
    return None


def type_name(allowed: tuple[type, ...] | None) -> str:
    if allowed is None:
        return "any value"
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", type(None): "none"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


def _from_text(text: str, allowed: tuple[type, ...] | None) -> Any:
    if allowed is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    low = text.strip().lower()
    for t in allowed:
        if t is type(None) and low in _NONE:
            return None
        if t is bool and low in _TRUE + _FALSE:
            return low in _TRUE
        if t is int:
            try:
                return int(text)
            except ValueError:
                pass
        if t is float:
            try:
                return float(text)
            except ValueError:
                pass
    if str in allowed:
        return text
    raise ValueError(text)


def _from_value(value: Any, allowed: tuple[type, ...] | None) -> Any:
    if allowed is None:
        return value
    if isinstance(value, bool):
        if bool in allowed:
            return value
        raise ValueError(value)
    if isinstance(value, int) and int in allowed:
        return value
    if isinstance(value, (int, float)) and float in allowed:
        return float(value)
    if value is None and type(None) in allowed:
        return None
    if any(t not in (bool, int, float, type(None)) and isinstance(value, t) for t in allowed):
        return value
    raise ValueError(value)


def convert(plugin: str, cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` checked against ``cls``'s constructor and converted to the annotated types.

    Raises:
        UapxError: an unknown key (naming the known ones) or a value of the wrong type.
    """
    params, hints, any_key = parameters(cls), _hints(cls), takes_any(cls)
    out: dict[str, Any] = {}
    for key, value in settings.items():
        p = params.get(key)
        if p is None:
            if any_key:
                out[key] = _from_text(value, None) if isinstance(value, str) else value
                continue
            known = ", ".join(params) or "(it takes none)"
            raise UapxError(f"plugin {plugin!r} has no setting {key!r}",
                            f"choose from: {known} ('uapx plugins --settings' lists them)")
        allowed = _allowed(hints.get(key, p.annotation if not isinstance(p.annotation, str) else None), p.default)
        try:
            out[key] = _from_text(value, allowed) if isinstance(value, str) else _from_value(value, allowed)
        except ValueError:
            example = "" if p.default is inspect.Parameter.empty else f", e.g. --set {plugin}.{key}={_show(p.default)}"
            raise UapxError(f"--set {plugin}.{key}={value!r}: expected {type_name(allowed)}",
                            f"pass {type_name(allowed)}{example}") from None
    return out


def check_selected(settings: dict[str, dict], selected: list[str]) -> None:
    """Refuse settings for a plugin that is not part of the run."""
    for plugin in settings:
        if plugin not in selected:
            raise UapxError(f"--set {plugin}.* given but plugin {plugin!r} is not part of this run "
                            f"(selected: {', '.join(selected)})",
                            f"add {plugin} to --plugins (or --attack), or drop the --set")


def check_run(settings: dict[str, dict], components: list, offered: dict[str, Any] | None = None) -> None:
    """Before any work: every ``settings`` entry names a component of the run (registry
    :class:`~uapx.registry.Component` objects) and passes :func:`convert`; every method and
    diagnostic is built once with its settings (over the run's ``offered`` ones, e.g. ``k``, where
    its constructor takes them), so a constructor's own checks (``k >= 1``) fail here too."""
    by_name = {c.name: c for c in components}
    check_selected(settings, list(by_name))
    converted = {plugin: convert(plugin, by_name[plugin].cls, values) for plugin, values in settings.items()}
    for comp in components:
        if comp.kind == "attack":  # built from the attack options right after this
            continue
        params = parameters(comp.cls)
        kwargs = {k: v for k, v in (offered or {}).items() if k in params}
        kwargs.update(converted.get(comp.name, {}))
        try:
            comp.cls(**kwargs)
        except UapxError:
            raise
        except Exception as exc:
            raise UapxError(f"bad settings for plugin {comp.name!r}: {type(exc).__name__}: {exc}",
                            "check --set NAME.KEY=VALUE ('uapx plugins --settings')") from None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe(cls: type) -> list[tuple[str, str, str]]:
    """``(key, type, default)`` rows for ``uapx plugins --settings``."""
    params, hints = parameters(cls), _hints(cls)
    rows = []
    for key, p in params.items():
        allowed = _allowed(hints.get(key, p.annotation if not isinstance(p.annotation, str) else None), p.default)
        default = "(required)" if p.default is inspect.Parameter.empty else _show(p.default)
        rows.append((key, type_name(allowed), default))
    if takes_any(cls):
        rows.append(("**", "any value", ""))
    return rows


class Configurable:
    """Base of plugin classes (methods, diagnostics, attacks): a plugin's settings are written once.

    The constructor's keyword parameters are the settings (:func:`parameters`) and the plugin keeps
    each as the attribute of the same name; :meth:`settings` and ``repr`` read them back, so
    reports, logs and test ids name a plugin exactly as it ran.
    """

    def settings(self) -> dict[str, Any]:
        """``{key: value}`` of every constructor setting, read from the attribute of the same name:
        the plugin's own settings first, then those its base classes declare (e.g. ``per_class``)."""
        keys = [k for k in parameters(type(self)) if hasattr(self, k)]
        inherited = {k for base in type(self).__mro__[1:] if issubclass(base, Configurable)
                     and "__init__" in vars(base) for k in parameters(base)}
        return {k: getattr(self, k) for k in sorted(keys, key=lambda k: k in inherited)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"
