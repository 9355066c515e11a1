"""UAP methods: the base class every UAP plugin subclasses, and the :class:`UAP` result.

A method is configured in its constructor (keyword-only) and called with data::

    uaps = SVDMethod(k=5)(pset, eps=[1.0, 2.0])   # one call, many eps

The base class owns what every method must get right: the eps sweep, turning each direction
into a UAP on the eps-sphere of the run's norm (so a plugin cannot overstate its budget),
class-specific variants and naming.  Subclasses implement :meth:`UAPMethod.directions` only.

Norms (:mod:`uapx.norms`): a method's ``norm`` setting (``"l2"`` or ``"linf"``; default: the
perturbation set's, i.e. the attack's) is the UAP's ball.  A set-based direction ``w`` becomes the
point of the eps-ball that maximises ``<w, v>``: ``eps * w / ||w||_2`` (L2) or ``eps * sign(w)``
(Linf); a model-based method's optimum, already inside the ball, is scaled along itself onto the
sphere.  Targets: a UAP's ``target_class`` is the method's (model-based methods that take one)
or, for set-based methods, the target of the targeted attack that made the perturbations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from . import contract
from .errors import UapxError
from .norms import check_norm, onto_sphere, size, steepest
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

    def __repr__(self) -> str:
        return (f"Direction(tag={self.tag!r}, d={self.vector.numel()}, norm={float(self.vector.norm()):.4g}, "
                f"signless={self.signless}{', meta_keys=' + str(list(self.meta)) if self.meta else ''})")


@dataclass
class UAP:
    """A universal perturbation of size ``eps`` in ``norm``.

    Attributes:
        name: unique in a run, e.g. ``"svd:v1"``, ``"average:class-3"``.
        vector: ``(C, H, W)`` perturbation with ``||vector|| == eps`` in ``norm``.
        method: the repr of the method that made it.
        eps: its size.
        source_class: for class-specific UAPs, the class whose perturbations made it.
        signless: evaluate both signs and keep the better one.
        norm: ``"l2"`` or ``"linf"``, the ball it lies on.
        target_class: the class it pushes every image to (targeted UAPs), else None.
    """

    name: str
    vector: torch.Tensor
    method: str
    eps: float
    source_class: int | None = None
    signless: bool = False
    meta: dict = field(default_factory=dict)
    tag: str = ""  # the direction's tag within its method, e.g. "v1"
    norm: str = "l2"
    target_class: int | None = None

    def __repr__(self) -> str:
        cls = "" if self.source_class is None else f", source_class={self.source_class}"
        cls += "" if self.target_class is None else f", target_class={self.target_class}"
        ball = "" if self.norm == "l2" else f", norm={self.norm!r}"
        return f"UAP({self.name!r}, shape={tuple(self.vector.shape)}, eps={self.eps:g}{ball}{cls})"


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
    passes ``per_class`` and ``norm`` on to this constructor.

    Set-based methods (the default) implement ``directions(pset)``: one computation serves
    every eps, since each direction is mapped onto the eps-sphere (:func:`uapx.norms.steepest`).
    Model-based methods set ``needs_model = True`` and implement ``directions(pset, *, data,
    eps)``: they optimise a perturbation for each eps on ``data`` (a :class:`MethodData`) in the
    ball of :meth:`ball_norm` (targeted towards ``self.target_class`` where they take one); the
    base class still scales the result onto the eps-sphere, so all methods are compared at the
    same size (the size the method itself reached is kept in ``meta["found_norm"]``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = False  # reduces across torchrun ranks (uapx.linalg helpers)

    def __init__(self, *, per_class: bool = True, norm: str | None = None) -> None:
        self.per_class = per_class
        self.norm = None if norm is None else check_norm(norm)

    def ball_norm(self, pset: PerturbationSet) -> str:
        """The norm of this method's UAPs: its ``norm`` setting, else the perturbation set's."""
        return check_norm(self.norm or pset.norm)

    def target_of(self, pset: PerturbationSet) -> int | None:
        """The class the UAPs push images to (None: untargeted): a model-based method's own
        ``target_class`` setting; for a set-based one, the target of the attack that made ``pset``."""
        if self.needs_model:
            return getattr(self, "target_class", None)
        return (pset.attack or {}).get("target_class")

    def directions(self, pset: PerturbationSet, **kwargs) -> list[Direction]:
        """Find universal directions in ``pset`` (rows ``(N, d)``); any non-zero norm."""
        raise NotImplementedError

    def __call__(self, pset: PerturbationSet, eps: float | Sequence[float], *,
                 data: MethodData | None = None) -> list[UAP]:
        """UAPs of norm ``eps`` (each of several eps): global, then per class if ``per_class``."""
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if self.needs_model and data is None:
            raise UapxError(f"UAP method {self.name!r} needs the model and images",
                            "call it with data=MethodData(model, x, y)")
        groups: list[tuple[int | None, torch.Tensor | None]] = [(None, None)]
        if self.per_class:
            groups += [(c, pset.labels == c) for c in pset.classes]
        out: list[UAP] = []
        ball = (self.ball_norm(pset), self.target_of(pset))
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
                    out += self._scaled(direction, eps_group, cls, pset.shape, len(eps_list) > 1, ball)
        return out

    def _scaled(self, direction: Direction, eps_list: list[float], cls: int | None, shape: tuple,
                tag_eps: bool, ball: tuple[str, int | None]) -> list[UAP]:
        v = direction.vector.detach().float().reshape(-1)
        ball_norm, target = ball
        norm = float(size(v, ball_norm))
        if not norm > 0 or norm != norm:
            return []  # a zero or NaN direction is no perturbation
        out = []
        for e in eps_list:
            parts = [self.name] + ([direction.tag] if direction.tag else [])
            parts += [f"class-{cls}"] if cls is not None else []
            name = ":".join(parts) + (f"@{e:g}" if tag_eps else "")
            meta = {**direction.meta, **({"found_norm": norm} if self.needs_model else {})}
            u = onto_sphere(v, e, ball_norm) if self.needs_model else steepest(v, e, ball_norm)
            out.append(UAP(name, u.reshape(shape), repr(self), e, cls, direction.signless, meta,
                           direction.tag, ball_norm, target))
        return out


def check_threat_model(attack: type, methods: Sequence[type], *, norm: str, target_class: int | None) -> None:
    """Before any work: the attack class can be targeted where ``target_class`` is given, and every
    method class can make UAPs of ``norm`` (a method without a ``norm`` setting makes the attack's)
    and, if model-based, towards ``target_class``; else a one-line error naming the plugin."""
    from .settings import parameters, takes_any

    def takes(cls: type, key: str) -> bool:
        return key in parameters(cls) or takes_any(cls)

    if target_class is not None and not takes(attack, "target_class"):
        raise UapxError(f"attack {attack.name!r} takes no target class, so it cannot make targeted perturbations",
                        "use --attack pgd-l2 or pgd-linf with --target-class, or drop --target-class")
    for cls in methods:
        if norm != getattr(attack, "norm", "l2") and not takes(cls, "norm"):
            raise UapxError(f"UAP method {cls.name!r} takes no norm setting, so it cannot make {norm} UAPs "
                            f"from the {attack.name!r} perturbations", f"drop --norm, or leave {cls.name} out of --plugins")
        if target_class is not None and cls.needs_model and not takes(cls, "target_class"):
            raise UapxError(f"UAP method {cls.name!r} takes no target class, so it cannot make targeted UAPs",
                            f"drop --target-class, or leave {cls.name} out of --plugins")


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
    from .models.checkpoints import read_checkpoint

    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != "uapx-uaps":
        raise UapxError(f"{str(path)!r} is not a uapx UAP file", "pass a uaps.pt written by 'uapx analyze'")
    return [UAP(**d) for d in obj["uaps"]]
