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

from . import contract
from .analysis import MethodData  # noqa: F401  (re-exported: uapx.methods.MethodData)
from .perturbations import PerturbationSet
from .settings import Configurable


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

    def __repr__(self) -> str:
        cls = "" if self.source_class is None else f", source_class={self.source_class}"
        return f"UAP({self.name!r}, shape={tuple(self.vector.shape)}, eps={self.eps:g}{cls})"


def singular_directions(res) -> list[Direction]:
    """Directions ``v1, v2, ...`` (signless) from a :class:`uapx.linalg.TopSVD`, with each one's
    singular value and explained-variance ratio in ``meta``."""
    total = max(res.total_energy, 1e-30)
    return [Direction(res.V[i], tag=f"v{i + 1}", signless=True,
                      meta={"singular_value": float(res.S[i]), "explained_variance": float(res.S[i] ** 2 / total)})
            for i in range(res.S.numel())]


class UAPMethod(Configurable):
    """Base of UAP method plugins.

    Subclasses set ``name`` and ``description`` and implement :meth:`directions`.  A subclass's
    constructor takes its settings as keyword parameters and keeps each as the attribute of the
    same name (``repr`` and :meth:`~uapx.settings.Configurable.settings` read them back); it
    passes ``per_class`` on to this constructor.

    Set-based methods (the default) implement ``directions(pset)``: one computation serves
    every eps, since each direction is scaled onto the eps-sphere.  Model-based methods set
    ``needs_model = True`` and implement ``directions(pset, *, data, eps)``: they optimise a
    perturbation for each eps on ``data`` (a :class:`MethodData`); the base class still scales
    the result onto the eps-sphere, so all methods are compared at the same norm (the norm
    the method itself reached is kept in ``meta["found_norm"]``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = False  # reduces across torchrun ranks (uapx.linalg helpers)

    def __init__(self, *, per_class: bool = True) -> None:
        self.per_class = per_class

    def directions(self, pset: PerturbationSet, **kwargs) -> list[Direction]:
        """Find universal directions in ``pset`` (rows ``(N, d)``); any non-zero norm."""
        raise NotImplementedError

    def __call__(self, pset: PerturbationSet, eps: float | Sequence[float], *,
                 data: MethodData | None = None) -> list[UAP]:
        """UAPs of norm ``eps`` (each of several eps): global, then per class if ``per_class``."""
        from .errors import UapxError

        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if self.needs_model and data is None:
            raise UapxError(f"UAP method {self.name!r} needs the model and images",
                            "call it with data=MethodData(model, x, y)")
        groups: list[tuple[int | None, torch.Tensor | None]] = [(None, None)]
        if self.per_class:
            groups += [(c, pset.labels == c) for c in pset.classes]
        out: list[UAP] = []
        for cls, mask in groups:
            part = pset if mask is None else pset.where(mask)
            if _global_len(part) == 0:  # every rank takes the same groups (their reductions pair up)
                continue
            if self.needs_model:
                part_data = data if mask is None else data.select(mask)
                found = [(self.directions(part, data=part_data, eps=e), [e]) for e in eps_list]
            else:
                found = [(self.directions(part), eps_list)]
            for directions, eps_group in found:
                for direction in contract.directions(self.name, directions, pset.d):
                    out += self._scaled(direction, eps_group, cls, pset.shape, len(eps_list) > 1)
        return out

    def _scaled(self, direction: Direction, eps_list: list[float], cls: int | None, shape: tuple,
                tag_eps: bool) -> list[UAP]:
        v = direction.vector.detach().float().reshape(-1)
        norm = float(v.norm())
        if not norm > 0 or norm != norm:
            return []  # a zero or NaN direction is no perturbation
        out = []
        for e in eps_list:
            parts = [self.name] + ([direction.tag] if direction.tag else [])
            parts += [f"class-{cls}"] if cls is not None else []
            name = ":".join(parts) + (f"@{e:g}" if tag_eps else "")
            meta = {**direction.meta, **({"found_norm": norm} if self.needs_model else {})}
            out.append(UAP(name, (v * (e / norm)).reshape(shape), repr(self), e, cls, direction.signless, meta,
                           direction.tag))
        return out


def project_l2(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v`` scaled back onto the L2 ball of radius ``eps`` if it lies outside (one perturbation)."""
    return v * min(1.0, eps / max(float(v.norm()), 1e-12))


def _global_len(part: PerturbationSet) -> int:
    """Rows of ``part`` over every torchrun rank (a rank may hold none of a class)."""
    from . import distributed

    return int(distributed.all_reduce_scalar(float(len(part)))) if distributed.active() else len(part)


def uaps_to_bytes(uaps: Sequence[UAP]) -> bytes:
    """UAPs (tensors plus metadata) serialised as the content of a ``uaps.pt`` file."""
    import io

    buf = io.BytesIO()
    torch.save({"format": "uapx-uaps", "version": 1,
                "uaps": [{k: getattr(u, k) for k in UAP.__dataclass_fields__} for u in uaps]}, buf)
    return buf.getvalue()


def load_uaps(path) -> list[UAP]:
    """Read UAPs written by :func:`uaps_to_bytes` (a report's ``uaps.pt``)."""
    from .errors import UapxError
    from .models.checkpoints import read_checkpoint

    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != "uapx-uaps":
        raise UapxError(f"{str(path)!r} is not a uapx UAP file", "pass a uaps.pt written by 'uapx analyze'")
    return [UAP(**d) for d in obj["uaps"]]
