"""uapx: universal adversarial perturbations for studying adversarial training.

The pipeline, as data flows::

    data.load -> models.load -> attacks.pgd (fused op in ops) -> perturbations.PerturbationSet
      -> UAP methods (plugins) -> evaluate -> diagnostics (plugins) -> report

Plugins implement the hooks in :mod:`uapx.hookspecs`, marked with :data:`uapx.hookimpl`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import UapxError
from .hookspecs import hookimpl

__all__ = ["__version__", "UapxError", "hookimpl"]
