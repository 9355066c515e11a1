"""The whole plugin contract of uapx: every hook a plugin may implement.

A plugin is a module (or object) registered in the ``uapx`` entry-point group, e.g. in its
``pyproject.toml``::

    [project.entry-points.uapx]
    median = "uapx_median"

and implementing any of the hooks below with the :data:`uapx.hookimpl` marker::

    import uapx

    @uapx.hookimpl
    def uapx_add_uap_methods():
        return [MedianUAP]

Hooks are called with keyword arguments; pluggy passes an implementation only the arguments it
names, so an argument added to a spec later breaks no plugin.  The built-in methods and
diagnostics (package ``uapx_plugins``) are registered through exactly this contract.

Contributed objects are *classes* with two class attributes, ``name`` (unique across all kinds,
used in ``--plugins``) and ``description`` (one line, shown by ``uapx plugins``):

- UAP methods subclass :class:`uapx.methods.UAPMethod`,
- diagnostics subclass :class:`uapx.diagnostics.Diagnostic`,
- attacks subclass :class:`uapx.attacks.Attack`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .attacks import Attack
    from .diagnostics import Diagnostic
    from .methods import UAPMethod

PROJECT = "uapx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------------------------
# Contributing: each plugin adds named objects; results from all plugins are concatenated.
# -------------------------------------------------------------------------------------------


@hookspec
def uapx_add_uap_methods() -> list[type["UAPMethod"]]:
    """Contribute UAP methods: ways to turn a perturbation set into universal directions.

    :return: a list of :class:`uapx.methods.UAPMethod` subclasses.  All plugins' lists are
        concatenated; two classes with the same ``name`` are an error at load time.
    """


@hookspec
def uapx_add_diagnostics() -> list[type["Diagnostic"]]:
    """Contribute diagnostics: measurements run on an analysis (spectra, trajectories, ...).

    :return: a list of :class:`uapx.diagnostics.Diagnostic` subclasses, concatenated across
        plugins.
    """


@hookspec
def uapx_add_attacks() -> list[type["Attack"]]:
    """Contribute attacks that compute per-image perturbations (``--attack NAME``).

    :return: a list of :class:`uapx.attacks.Attack` subclasses, concatenated across plugins.
    """


# -------------------------------------------------------------------------------------------
# Reporting: a plugin may add to what the report shows about the run.
# -------------------------------------------------------------------------------------------


@hookspec
def uapx_report_environment() -> dict[str, str] | None:
    """Add entries to the ``environment`` block of ``report.json`` and ``uapx info``.

    :return: a mapping of short names to version strings (e.g. ``{"my-lib": "1.2"}``), or
        None.  Mappings from all plugins are merged.
    """
