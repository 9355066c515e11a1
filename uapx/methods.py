"""UAP methods: the base class every UAP plugin subclasses, and the :class:`UAP` result.

A method is configured in its constructor (keyword-only) and called with data::

    uaps = SVDMethod(k=5)(pset, eps=[1.0, 2.0])   # one call, many eps

The base class owns what every method must get right: the eps sweep, scaling each direction
onto the eps-sphere (so a plugin cannot overstate its budget), class-specific variants and
naming.  Subclasses implement :meth:`UAPMethod.directions` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .perturbations import PerturbationSet


@dataclass
class Direction:
    """A raw direction a method found: ``vector`` ``(d,)`` of any non-zero norm."""

    vector: torch.Tensor
    tag: str = ""  # e.g. "v1" for the first singular vector
    signless: bool = False  # singular vectors have no sign: evaluate +v and -v
    meta: dict = field(default_factory=dict)


@dataclass
class UAP:
    """A universal perturbation of L2 norm ``eps``.

    Attributes:
        name: unique in a run, e.g. ``"svd:v1"``, ``"average:class-3"``.
        vector: ``(C, H, W)`` perturbation with ``||vector||_2 == eps``.
        method: the repr of the method that made it.
        eps: its norm.
        source_class: for class-specific UAPs, the class whose perturbations made it.
        signless: evaluate both signs and keep the better one.
    """

    name: str
    vector: torch.Tensor
    method: str
    eps: float
    source_class: int | None = None
    signless: bool = False
    meta: dict = field(default_factory=dict)
    tag: str = ""  # the direction's tag within its method, e.g. "v1"

    def save(self, path) -> None:
        from . import atomic

        atomic.torch_save({"format": "uapx-uap", "version": 1, "name": self.name, "vector": self.vector,
                           "method": self.method, "eps": self.eps, "source_class": self.source_class,
                           "signless": self.signless, "meta": self.meta, "tag": self.tag}, path)


class UAPMethod:
    """Base of UAP method plugins.

    Subclasses set ``name`` and ``description`` and implement :meth:`directions`.
    Keyword settings given to the constructor are stored and shown by ``repr``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, *, per_class: bool = True, **settings) -> None:
        self.per_class = per_class
        self.settings = dict(settings)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self.settings, "per_class": self.per_class}.items())
        return f"{type(self).__name__}({args})"

    def directions(self, pset: PerturbationSet) -> list[Direction]:
        """Find universal directions in ``pset`` (rows ``(N, d)``); any non-zero norm."""
        raise NotImplementedError

    def __call__(self, pset: PerturbationSet, eps: float | Sequence[float]) -> list[UAP]:
        """UAPs of norm ``eps`` (each of several eps): global, then per class if ``per_class``."""
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
        groups: list[tuple[int | None, PerturbationSet]] = [(None, pset)]
        if self.per_class:
            groups += [(c, pset.where(pset.labels == c)) for c in pset.classes]
        out: list[UAP] = []
        for cls, part in groups:
            if len(part) == 0:
                continue
            for direction in self.directions(part):
                v = direction.vector.detach().float().reshape(-1)
                norm = float(v.norm())
                if not norm > 0 or norm != norm:
                    continue  # a zero or NaN direction is no perturbation
                for e in eps_list:
                    parts = [self.name] + ([direction.tag] if direction.tag else [])
                    parts += [f"class-{cls}"] if cls is not None else []
                    name = ":".join(parts) + (f"@{e:g}" if len(eps_list) > 1 else "")
                    out.append(UAP(name, (v * (e / norm)).reshape(pset.shape), repr(self), e, cls,
                                   direction.signless, dict(direction.meta), direction.tag))
        return out
