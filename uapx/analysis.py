"""The analysis context: what model-based UAP methods and diagnostics receive.

:class:`MethodData` is what a model-based method optimises on (model, images, labels, how to
run); :class:`Analysis` adds what a diagnostic reads: the attack, its perturbation set, the one
eps of the run, the UAPs and their evaluations, and shared artefacts computed once on demand
(PGD trajectories).  The module sits below :mod:`uapx.diagnostics`, :mod:`uapx.plots` and
:mod:`uapx.pipeline` and imports none of them.

To run one diagnostic on one's own tensors::

    pset = uapx.PerturbationSet(deltas, y, clean_pred, adv_pred, shape=(1, 28, 28), eps=2.0)
    analysis = Analysis(model, x, y, pset=pset, eps=2.0, attack=uapx.plugin("pgd-l2")(eps=2.0, steps=20,
                        step_size=0.25))
    result = uapx.plugin("trajectory")(restarts=5).run(analysis)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed
from .attacks import Trajectory
from .perturbations import PerturbationSet

if TYPE_CHECKING:  # pragma: no cover
    from .attacks import Attack
    from .evaluate import UAPEvaluation
    from .methods import UAP


@dataclass
class MethodData:
    """The model and images that model-based methods (``needs_model = True``) optimise on.

    Attributes:
        model: the classifier (eval mode); x: ``(N, C, H, W)`` images in [0, 1], row i of the
            perturbation set; y: ``(N,)`` labels; device, batch_size, seed: how to run.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    device: str = "cpu"
    batch_size: int = 250
    seed: int = 0

    def select(self, mask: torch.Tensor) -> "MethodData":
        """The rows ``mask`` (boolean ``(N,)`` or an index) of the images and labels (of streamed
        images, an :class:`~uapx.image_sources.ImageRows` view that reads them where indexed)."""
        x = self.x.rows(mask) if hasattr(type(self.x), "rows") else self.x[mask]
        return MethodData(self.model, x, self.y[mask], self.device, self.batch_size, self.seed)


@dataclass
class HeldOut:
    """The held-out images the UAPs are judged on: disjoint from the images they were fitted on.

    Attributes:
        x: ``(M, C, H, W)`` images in [0, 1] (this rank's shard under torchrun); y: ``(M,)``
            labels; clean_pred: ``(M,)`` predictions on the clean images.
        split: the split they were drawn from; protocol: ``"split"`` (a draw of another split than
            the fit images') or ``"sample-half"`` (a class-stratified part of the one sample, the
            rest of which the UAPs were fitted on).
        n_images: held-out images over every torchrun rank (default ``len(x)``).
        evaluations: every UAP's :class:`~uapx.evaluate.UAPEvaluation` on these images, by name;
        random_baseline: random directions of the run's eps on them (``report.json``'s
            ``uaps.held_out.random_baseline``).
        indices: ``(M,)`` their positions in the data set (as ``pset.indices`` for the fit images).
    """

    x: torch.Tensor
    y: torch.Tensor
    clean_pred: torch.Tensor
    split: str = ""
    protocol: str = "split"
    n_images: int = 0
    evaluations: dict[str, "UAPEvaluation"] = field(default_factory=dict)
    random_baseline: dict | None = None
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.n_images = self.n_images or int(self.x.shape[0])

    def __repr__(self) -> str:
        return f"HeldOut(split={self.split!r}, protocol={self.protocol!r}, n_images={self.n_images})"


@dataclass(kw_only=True)
class Analysis(MethodData):
    """What diagnostics receive: the :class:`MethodData` of the run plus its shared artefacts.

    Attributes:
        pset: the :class:`~uapx.perturbations.PerturbationSet` of the attack (row i is image i).
        eps: the run's budget, the one every diagnostic reads (UAPs carry their own ``eps``).
        attack: the attack object that made ``pset`` (``None`` where none is known: then
            :meth:`trajectories` is unavailable).
        clean_pred: ``(N,)`` predictions on the clean images (default ``pset.clean_pred``).
        classes: the data set's class names (default ``"0" .. str(max label)``).
        n_images: images over every torchrun rank (``x`` holds this rank's shard); default ``len(x)``.
        model_id: how the model was named (e.g. ``"zoo:mnist-natural"``), for titles.
        trajectory_samples: how many images :meth:`trajectories` records.
        uaps: every UAP the methods produced; evaluations: their
            :class:`~uapx.evaluate.UAPEvaluation` by UAP name, on the images they were fitted on
            (in-sample).
        heldout: the :class:`HeldOut` images (disjoint from ``x``) with every UAP's evaluation on
            them -- the figure a UAP is judged by; ``None`` where the analysis has none.
    """

    pset: PerturbationSet
    eps: float
    attack: "Attack | None" = None
    clean_pred: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    n_images: int = 0
    model_id: str = ""
    trajectory_samples: int = 100
    uaps: list["UAP"] = field(default_factory=list)
    evaluations: dict[str, "UAPEvaluation"] = field(default_factory=dict)
    heldout: HeldOut | None = None
    _trajectory: Trajectory | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.eps = float(self.eps)
        self.n_images = self.n_images or int(self.x.shape[0])
        if self.clean_pred is None:
            self.clean_pred = self.pset.clean_pred
        if not self.classes:
            self.classes = [str(c) for c in range(int(self.y.max()) + 1 if self.y.numel() else 0)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def norm(self) -> str:
        """The run's threat model, ``"l2"`` or ``"linf"``: the norm of ``eps`` (the attack's, else
        the perturbation set's) -- the norm every random control of the run is drawn in."""
        return getattr(self.attack, "norm", None) or self.pset.norm

    def __repr__(self) -> str:
        return (f"Analysis(model={self.model_id or type(self.model).__name__!r}, n_images={self.n_images}, "
                f"eps={self.eps:g}, {len(self.uaps)} UAPs"
                + (f", {self.heldout.n_images} held-out images)" if self.heldout is not None else ")"))

    def trajectories(self) -> Trajectory:
        """The attack's trajectories of the first ``trajectory_samples`` images, recorded once and
        shared by every diagnostic that asks (the attack object of the main run, ``record=True``).

        Under torchrun each rank records its part of the *global* first ``trajectory_samples``
        images (:func:`uapx.distributed.local_prefix`; possibly none), and ``index`` holds their
        global positions (in one process, positions ``0 .. m-1`` of ``x``)."""
        if self._trajectory is None:
            if self.attack is None:
                from .errors import UapxError

                raise UapxError("this analysis has no attack, so no trajectories can be recorded",
                                "build the Analysis with attack=<an attack object>")
            part = distributed.local_prefix(self.trajectory_samples, self.n_images)
            if part.stop > 0:
                _, traj = self.attack(self.model, self.x[part].to(self.device), self.y[part].to(self.device),
                                      record=True)
            else:  # this rank holds none of them
                steps, d = int(self.attack.steps), int(torch.Size(self.x.shape[1:]).numel())
                traj = Trajectory(torch.arange(0), torch.empty(steps, 0, d), torch.empty(steps, 0, d),
                                  torch.empty(steps, 0))
            traj.index = traj.index + distributed.shard(self.n_images).start  # global positions
            self._trajectory = traj
        return self._trajectory
