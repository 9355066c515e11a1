"""Built-in UAP method ``average``: the mean per-image perturbation, scaled to eps."""
from __future__ import annotations

import torch

import uapx
from uapx.methods import Direction, UAPMethod


class AverageUAP(UAPMethod):
    """The mean of the perturbation rows (of the unit-normalised rows with ``normalize=True``)."""

    name = "average"
    description = "mean of the per-image perturbations (optionally of normalised ones), scaled to eps"

    def __init__(self, *, normalize: bool = False, per_class: bool = True) -> None:
        super().__init__(per_class=per_class, normalize=normalize)
        self.normalize = normalize

    def directions(self, pset):
        total = torch.zeros(pset.d, dtype=torch.float64)
        for block in pset.chunks():
            b = block.to(torch.float64)
            if self.normalize:
                b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
            total += b.sum(0)
        return [Direction(total / max(len(pset), 1))]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [AverageUAP]
