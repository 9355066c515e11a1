"""uapx: universal adversarial perturbations for studying adversarial training.

The pipeline, as data flows::

    data.load -> models.load -> attacks.pgd (fused op in ops) -> perturbations.PerturbationSet
      -> UAP methods (plugins) -> evaluate -> diagnostics (plugins) -> report

The main verbs and classes are here, imported on first use (``import uapx`` stays light)::

    import uapx
    model = uapx.load_model("zoo:mnist-natural")
    images = uapx.load_data("mnist", "test").subset(256, seed=0)
    svd = uapx.plugin("svd")(k=3)            # any registered plugin class, by its name
    result = uapx.analyze(plugins=["average", "svd"], n_samples=200, out="my-report")

Plugin classes are also attributes by class name (``uapx.SVDUAP``), found through the
registry, never by importing a plugin package by name.  Plugins implement the hooks in
:mod:`uapx.hookspecs`, marked with :data:`uapx.hookimpl`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import UapxError
from .hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import AnalyzeResult

# public name -> "module:attribute" (the first importable one wins, so code may move between modules)
_LAZY: dict[str, tuple[str, ...]] = {
    "AnalyzeConfig": ("uapx.pipeline:AnalyzeConfig",),
    "AnalyzeResult": ("uapx.pipeline:AnalyzeResult",),
    "Analysis": ("uapx.analysis:Analysis",),
    "HeldOut": ("uapx.analysis:HeldOut",),
    "attack_dataset": ("uapx.pipeline:attack_dataset",),
    "apply_uaps": ("uapx.pipeline:apply_uaps",),
    "load_data": ("uapx.data:load",),
    "ImageSet": ("uapx.data:ImageSet",),
    "load_model": ("uapx.models:load",),
    "pgd": ("uapx.attacks:pgd",),
    "Attack": ("uapx.attacks:Attack",),
    "Trajectory": ("uapx.attacks:Trajectory",),
    "PerturbationSet": ("uapx.perturbations:PerturbationSet",),
    "UAPMethod": ("uapx.methods:UAPMethod",),
    "Direction": ("uapx.methods:Direction",),
    "UAP": ("uapx.methods:UAP",),
    "MethodData": ("uapx.analysis:MethodData",),
    "load_uaps": ("uapx.methods:load_uaps",),
    "Diagnostic": ("uapx.diagnostics:Diagnostic",),
    "DiagnosticResult": ("uapx.diagnostics:DiagnosticResult",),
    "evaluate_uap": ("uapx.evaluate:evaluate_uap",),
    "evaluate_many": ("uapx.evaluate:evaluate_many",),
    "random_baseline": ("uapx.evaluate:random_baseline",),
    "UAPEvaluation": ("uapx.evaluate:UAPEvaluation",),
    "get_registry": ("uapx.registry:get_registry",),
}


def analyze(config: Any = None, /, **settings: Any) -> "AnalyzeResult":
    """Run an analysis end to end and write its report folder (``uapx analyze`` in Python).

    Pass an :class:`~uapx.pipeline.AnalyzeConfig`, or its fields as keywords
    (``uapx.analyze(plugins=["svd"], n_samples=200, out="rep")``).  ``model=`` may be an
    ``nn.Module`` and ``data=`` an :class:`~uapx.data.ImageSet` or any ``torch.utils.data.Dataset``
    of ``(image, label)`` (``uapx.analyze(config, model=my_model, data=my_dataset)``).  ``registry=`` passes a
    :class:`~uapx.registry.Registry` through.  Returns an
    :class:`~uapx.pipeline.AnalyzeResult` (``.report`` is ``report.json`` as a dict).
    """
    from . import pipeline

    registry = settings.pop("registry", None)
    objects = {k: settings.pop(k) for k in ("model", "data") if k in settings and not isinstance(settings[k], str)}
    if config is None:
        config = pipeline.AnalyzeConfig(**settings)
    elif settings:
        raise TypeError("give an AnalyzeConfig or keyword settings, not both")
    return pipeline.analyze(config, registry=registry, **objects)


def plugin(name: str) -> type:
    """The class a plugin registered under ``name`` (``"svd"``, ``"spectrum"``, ``"pgd-l2"``).

    Raises :class:`UapxError` listing the known names for an unknown one.
    """
    from .registry import get_registry

    return get_registry().get(name).cls


def plugins(kind: str | None = None) -> dict[str, type]:
    """Every registered plugin class by name; ``kind`` keeps ``"method"``, ``"diagnostic"`` or ``"attack"``."""
    from .registry import get_registry

    return {n: c.cls for n, c in sorted(get_registry().components.items()) if kind in (None, c.kind)}


def _plugin_class(attr: str) -> type | None:
    for cls in plugins().values():
        if cls.__name__ == attr:
            return cls
    return None


def __getattr__(attr: str) -> Any:
    for target in _LAZY.get(attr, ()):
        module, _, name = target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if hasattr(mod, name):
            value = getattr(mod, name)
            globals()[attr] = value
            return value
    if attr[:1].isupper() and not attr.startswith("_"):
        cls = _plugin_class(attr)
        if cls is not None:
            return cls
    raise AttributeError(f"module 'uapx' has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", "UapxError", "hookimpl", "analyze", "plugin", "plugins", *_LAZY]
