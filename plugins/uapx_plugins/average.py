"""Built-in UAP method ``average``: the mean per-image perturbation, mapped onto the eps-sphere
(scaled to L2 norm eps, or ``eps * sign`` in Linf)."""
from __future__ import annotations

import uapx
from uapx.linalg import column_sum
from uapx.methods import Direction, UAPMethod


class AverageUAP(UAPMethod):
    """The mean of the perturbation rows (of the unit-normalised rows with ``normalize=True``)."""

    name = "average"
    supports_distributed = True
    description = "mean of the per-image perturbations (optionally of normalised ones), scaled to eps (Linf: eps*sign)"

    def __init__(self, *, normalize: bool = False, per_class: bool = True, norm: str | None = None) -> None:
        super().__init__(per_class=per_class, norm=norm)
        self.normalize = normalize

    def directions(self, pset):
        total, n = column_sum(pset.chunks(), pset.d, normalize_rows=self.normalize)
        return [Direction(total / max(n, 1))]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [AverageUAP]
