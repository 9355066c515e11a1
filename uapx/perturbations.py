"""PerturbationSet: the N x d matrix of per-image perturbations and what produced them.

Rows are flattened perturbations ``delta_i = x_adv_i - x_i``; alongside them: labels, clean and
adversarial predictions, the budget, the model's id and the attack's settings.  Consumers read
it through :meth:`PerturbationSet.chunks`, so that a set kept on disk in chunks can stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import atomic
from .errors import UapxError

FORMAT, VERSION = "uapx-perturbations", 1


@dataclass
class PerturbationSet:
    """Per-image perturbations.

    Attributes:
        deltas: ``(N, d)`` float32 rows.
        labels, clean_pred, adv_pred: ``(N,)`` int64.
        shape: the image shape ``(C, H, W)``; ``d = C*H*W``.
        eps, norm: the attack budget.
        model_id: which model was attacked; attack: the attack's settings.
        indices: ``(N,)`` positions of the rows in the data set split.
    """

    deltas: torch.Tensor
    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    shape: tuple[int, ...]
    eps: float
    norm: str = "l2"
    model_id: str = ""
    attack: dict = field(default_factory=dict)
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.deltas.shape[0]
        for name in ("labels", "clean_pred", "adv_pred"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")

    def __len__(self) -> int:
        return int(self.deltas.shape[0])

    @property
    def d(self) -> int:
        return int(self.deltas.shape[1])

    @property
    def classes(self) -> list[int]:
        return sorted(int(c) for c in self.labels.unique())

    def chunks(self, size: int = 4096) -> Iterator[torch.Tensor]:
        """Yield ``(n_i, d)`` row blocks in order."""
        for s in range(0, len(self), size):
            yield self.deltas[s:s + size]

    def matrix(self) -> torch.Tensor:
        """The whole ``(N, d)`` matrix (only for sets that fit in memory)."""
        return self.deltas

    def where(self, mask: torch.Tensor) -> "PerturbationSet":
        """The rows selected by a boolean mask ``(N,)``."""
        return PerturbationSet(self.deltas[mask], self.labels[mask], self.clean_pred[mask], self.adv_pred[mask],
                               self.shape, self.eps, self.norm, self.model_id, self.attack,
                               None if self.indices is None else self.indices[mask])

    def save(self, path: str | os.PathLike) -> None:
        """Write the set to one file, atomically."""
        obj = {"format": FORMAT, "version": VERSION, **{k: getattr(self, k) for k in (
            "deltas", "labels", "clean_pred", "adv_pred", "eps", "norm", "model_id", "attack", "indices")},
            "shape": list(self.shape)}
        atomic.torch_save(obj, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PerturbationSet":
        from .models.checkpoints import read_checkpoint

        obj = read_checkpoint(path)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UapxError(f"{str(path)!r} is not a uapx perturbation set", "pass a file written by uapx")
        if obj.get("version") != VERSION:
            raise UapxError(f"{str(path)!r} has format version {obj.get('version')}, this uapx reads {VERSION}",
                            "re-create it with this version of uapx")
        obj = {k: v for k, v in obj.items() if k not in ("format", "version")}
        obj["shape"] = tuple(obj["shape"])
        return cls(**obj)
