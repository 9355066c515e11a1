"""The threat models of uapx: the L2 and Linf balls (the one place each norm's geometry is
written) and targets (:func:`check_target_class`).

For a perturbation ``v`` (one row, or a batch of rows ``(N, ...)`` handled row by row):

- :func:`size`: ``||v||_2`` or ``||v||_inf`` per row;
- :func:`dual_size`: the dual norm, ``||w||_2`` or ``||w||_1`` per row (the largest ``<w, u>``
  over unit ``u``: the first-order gain of a unit step, as DeepFool uses it);
- :func:`steepest`: the point of the eps-ball maximising ``<w, v>``: ``eps * w / ||w||_2`` or
  ``eps * sign(w)`` (how a direction becomes a UAP, and the step of PGD, SGD-UAP and DeepFool);
- :func:`project`: the nearest point of the eps-ball: ``v * min(1, eps / ||v||_2)`` or
  ``clamp(v, -eps, eps)``;
- :func:`onto_sphere`: ``v`` scaled along itself to size exactly ``eps``.
"""
from __future__ import annotations

import torch

from .errors import UapxError

NORMS = ("l2", "linf")
_TINY = 1e-12


def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`, else a one-line error."""
    if norm not in NORMS:
        raise UapxError(f"unknown norm {norm!r}", f"choose from: {', '.join(NORMS)} (e.g. --norm linf)")
    return norm


def _rows(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)


def _per_row(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row sizes ``(N,)`` broadcast against ``v``."""
    return s.reshape(-1, *([1] * (v.dim() - 1))) if v.dim() > 1 else s.reshape(())


def size(v: torch.Tensor, norm: str) -> torch.Tensor:
    """``||v||`` in ``norm`` of each row of ``v`` ``(N, ...)`` (``(N,)``); of a 1-d ``v``: ``(1,)``."""
    r = _rows(v)
    return r.norm(dim=1) if check_norm(norm) == "l2" else r.abs().amax(dim=1)


def dual_size(w: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm of each row of ``w`` ``(N, ...)``: ``||w||_2`` (L2) or ``||w||_1`` (Linf), ``(N,)``."""
    r = _rows(w)
    return r.norm(dim=1) if check_norm(norm) == "l2" else r.abs().sum(dim=1)


def steepest(w: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Per row of ``w`` ``(N, ...)``, the point of the eps-ball that maximises ``<w, v>``:
    ``eps * w / ||w||_2`` (L2) or ``eps * sign(w)`` (Linf); ``eps`` a number or ``(N,)`` sizes."""
    eps_t = torch.as_tensor(eps, dtype=w.dtype, device=w.device)
    e = _per_row(eps_t, w) if eps_t.dim() else eps_t
    if check_norm(norm) == "l2":
        return w * (e / _per_row(dual_size(w, norm), w).clamp_min(_TINY))
    return e * w.sign()


def project(v: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Each row of ``v`` ``(N, ...)`` onto the eps-ball of ``norm``: scaled back if longer (L2),
    clamped to ``[-eps, eps]`` (Linf)."""
    if check_norm(norm) == "l2":
        return v * (eps / _per_row(size(v, norm), v).clamp_min(_TINY)).clamp(max=1.0)
    return v.clamp(-eps, eps)


def onto_sphere(v: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Each row of ``v`` ``(N, ...)`` scaled along itself to size ``eps`` in ``norm`` (a zero row stays zero)."""
    s = _per_row(size(v, norm), v)
    return torch.where(s > 0, v * (eps / s.clamp_min(_TINY)), v)


def check_target_class(target_class: int | None, num_classes: int | None = None) -> int | None:
    """``target_class`` as an int (or None), if it is a whole number in ``[0, num_classes)``
    (``num_classes`` None: only ``>= 0`` is checked); else a one-line error."""
    if target_class is None:
        return None
    top = "" if num_classes is None else f" below {num_classes}"
    if isinstance(target_class, bool) or int(target_class) != target_class or target_class < 0 \
            or (num_classes is not None and target_class >= num_classes):
        known = "" if num_classes is None else f" (this model has classes 0..{num_classes - 1})"
        raise UapxError(f"target class {target_class!r} is not a class index{known}",
                        f"pass --target-class C with C a whole number >= 0{top}, e.g. --target-class 3")
    return int(target_class)
