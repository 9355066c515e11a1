"""The plugin manager: loads every ``uapx`` entry point, remembers where each came from.

Built-in plugins (package ``uapx_plugins``) and third-party ones take the same path: an entry
point in group ``uapx``.  Entry points are loaded one at a time; one that fails to import, or
implements a misspelled hook, becomes a :class:`PluginRecord` with its error and every other
plugin keeps working.

Environment:
    ``UAPX_DISABLE_PLUGIN_AUTOLOAD=1``  load only the plugins shipped with uapx itself.
    ``UAPX_PLUGINS_DISABLE=a,b``        skip the entry points named ``a`` and ``b``
                                        (the CLI's ``-p no:a`` does the same).
"""
from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import UapxError

KINDS = ("method", "diagnostic", "attack")
_HOOK_OF_KIND = {
    "method": "uapx_add_uap_methods",
    "diagnostic": "uapx_add_diagnostics",
    "attack": "uapx_add_attacks",
}
OWN_DISTRIBUTION = "uapx"


@dataclass
class PluginRecord:
    """One entry point: where it comes from and whether it loaded."""

    name: str
    value: str
    distribution: str
    version: str
    error: str | None = None
    disabled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disabled


@dataclass(frozen=True)
class Component:
    """A named object a plugin contributed: a UAP method, diagnostic or attack class."""

    name: str
    kind: str
    cls: type
    plugin: PluginRecord = field(compare=False)

    @property
    def description(self) -> str:
        lines = str(getattr(self.cls, "description", "") or "").strip().splitlines()
        return lines[0] if lines else ""


class Registry:
    """Plugin manager plus an index of the components the plugins contributed."""

    def __init__(self, *, autoload: bool | None = None, disabled: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.components: dict[str, Component] = {}
        if autoload is None:
            autoload = os.environ.get("UAPX_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        env_disabled = [s.strip() for s in os.environ.get("UAPX_PLUGINS_DISABLE", "").split(",")]
        self._disabled = {s for s in [*disabled, *env_disabled] if s}
        self._asked_disabled = [s for s in disabled if s]  # named by the caller (-p no:NAME): must exist
        self._autoload = autoload

    # -- loading ----------------------------------------------------------------------------

    def load_entrypoints(self) -> "Registry":
        """Load every entry point in group ``uapx``, one at a time, recording failures.  A name
        passed as ``disabled`` that no entry point has (a typo in ``-p no:NAME``) is a one-line error."""
        seen: set[tuple[str, str]] = set()
        for ep in sorted(md.entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            key = (dist_name, ep.name)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            rec = PluginRecord(ep.name, ep.value, dist_name, version)
            self.records.append(rec)
            if ep.name in self._disabled or (
                not self._autoload and _normalise(dist_name) != OWN_DISTRIBUTION
            ):
                rec.disabled = True
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                rec.error = f"{type(exc).__name__}: {exc}"
                continue
            self._register(plugin, rec)
        known = {r.name for r in self.records}
        unknown = [name for name in self._asked_disabled if name not in known]
        if unknown:
            raise UapxError(f"-p no:{unknown[0]}: no plugin (entry point) is named {unknown[0]!r}",
                            f"disable one of: {', '.join(sorted(known)) or '(none installed)'} (see 'uapx plugins')")
        return self

    def register(self, plugin: Any, name: str, *, distribution: str = "<local>",
                 version: str = "") -> PluginRecord:
        """Register a plugin object directly (for notebooks and conftest-style local plugins)."""
        rec = PluginRecord(name, repr(plugin), distribution, version)
        self.records.append(rec)
        self._register(plugin, rec)
        if rec.error:
            raise UapxError(f"plugin {name!r} could not be registered: {rec.error}")
        return rec

    def _register(self, plugin: Any, rec: PluginRecord) -> None:
        try:
            self.pm.register(plugin, name=rec.name)
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            return
        # A misspelled uapx_* hook is an error, not a silent no-op (pluggy's check_pending).
        unknown = sorted(hc.name for hc in (self.pm.get_hookcallers(plugin) or []) if not hc.has_spec())
        if unknown:
            self.pm.unregister(plugin)
            rec.error = f"unknown hook(s) {', '.join(unknown)}; the hooks are listed in uapx.hookspecs"
            return
        new: list[Component] = []
        for kind, hook in _HOOK_OF_KIND.items():
            impl = getattr(plugin, hook, None)
            if impl is None:
                continue
            try:
                classes = list(impl() or [])
            except Exception as exc:
                rec.error = f"{hook} raised {type(exc).__name__}: {exc}"
                self.pm.unregister(plugin)
                return
            for cls in classes:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    rec.error = f"{hook} returned {cls!r} without a 'name'"
                elif name in self.components or any(c.name == name for c in new):
                    other = self.components.get(name)
                    where = other.plugin.name if other else rec.name
                    rec.error = f"name {name!r} is already provided by plugin {where!r}"
                else:
                    new.append(Component(name, kind, cls, rec))
                    continue
                self.pm.unregister(plugin)
                return
        for comp in new:
            self.components[comp.name] = comp

    # -- lookup -----------------------------------------------------------------------------

    def get(self, name: str, kinds: Iterable[str] | str | None = None) -> Component:
        """The component called ``name`` (of one of ``kinds``); a one-line error listing the
        known names if there is none."""
        kinds = KINDS if kinds is None else ((kinds,) if isinstance(kinds, str) else tuple(kinds))
        comp = self.components.get(name)
        if comp is None or comp.kind not in kinds:
            known = sorted(c.name for c in self.components.values() if c.kind in kinds)
            broken = [r.name for r in self.records if r.error]
            hint = f" (failed to load: {', '.join(broken)}; see 'uapx plugins')" if broken else ""
            what = kinds[0] if len(kinds) == 1 else "plugin"
            raise UapxError(f"unknown {what} {name!r}{hint}",
                            f"choose from: {', '.join(known) or '(none installed)'}")
        return comp

    def check_names(self, names: Iterable[str],
                    kinds: Iterable[str] = ("method", "diagnostic")) -> list[Component]:
        """Resolve ``--plugins`` names before any work starts."""
        return [self.get(name, kinds) for name in names]

    def environment(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for part in self.pm.hook.uapx_report_environment():
            if part:
                merged.update({str(k): str(v) for k, v in part.items()})
        return merged


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


_DEFAULT: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _DEFAULT
    if _DEFAULT is None or reload:
        _DEFAULT = Registry().load_entrypoints()
    return _DEFAULT
