"""Built-in attack plugins: PGD with L2 and Linf threat models."""
from __future__ import annotations

import uapx
from uapx.attacks import PGD


class PGDL2(PGD):
    name = "pgd-l2"
    description = "PGD bounded in the L2 norm (fused step), per-image perturbations"
    norm = "l2"


class PGDLinf(PGD):
    name = "pgd-linf"
    description = "PGD bounded in the Linf norm (signed-gradient steps)"
    norm = "linf"


@uapx.hookimpl
def uapx_add_attacks():
    return [PGDL2, PGDLinf]
