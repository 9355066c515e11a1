"""Diagnostics: the base class every diagnostic plugin subclasses.

One base, one verb: the constructor takes fixed settings, :meth:`Diagnostic.run` takes the
analysis (model, images, perturbation set, UAPs, cached trajectories) and returns a
:class:`DiagnosticResult`.  Capabilities are declared, so the pipeline drives any diagnostic
without special cases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .settings import Configurable

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .analysis import Analysis


@dataclass
class DiagnosticResult:
    """What a diagnostic measured.

    Attributes:
        figures: JSON-serialisable numbers (nested dicts/lists), stored under the diagnostic's
            name in ``report.json`` and shown in the report.
        plots: ``(name, matplotlib Figure, caption)`` triples, saved as PNGs in the report.
        summary: one or two sentences for the report, stating what the numbers show.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    plots: list[tuple[str, "Figure", str]] = field(default_factory=list)
    summary: str = ""

    def __repr__(self) -> str:
        """The figures' top-level keys, the plots' names and the summary, not every number."""
        summary = self.summary if len(self.summary) <= 80 else self.summary[:77] + "..."
        return (f"DiagnosticResult(figures={list(self.figures)}, plots={[p[0] for p in self.plots]}, "
                f"summary={summary!r})")


class Diagnostic(Configurable):
    """Base of diagnostic plugins.

    Class attributes declare what a diagnostic needs and can do: ``needs_trajectories`` (the
    attack's recorded trajectories, :meth:`uapx.analysis.Analysis.trajectories`: the pipeline
    records them once, in a stage of their own, before the diagnostics that declare it run),
    ``supports_distributed`` (gives the single-process answer when each torchrun rank holds a
    shard of the perturbations, e.g. through :func:`uapx.linalg.gram`; undeclared plugins are
    refused under torchrun).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_trajectories: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = False  # correct when each rank holds a shard (torchrun)

    def __init__(self) -> None:
        """No settings; a subclass's constructor takes its own as keyword parameters and keeps each
        as the attribute of the same name (``repr`` and ``settings()`` read them back)."""

    def run(self, analysis: "Analysis") -> DiagnosticResult:
        """Measure on ``analysis``; see :class:`uapx.analysis.Analysis` for what it holds."""
        raise NotImplementedError
