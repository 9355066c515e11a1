"""Built-in UAP method ``svd``: top right-singular vectors of the perturbation matrix."""
from __future__ import annotations

import uapx
from uapx.linalg import check_exact_svd, top_svd_gram, top_svd_lapack
from uapx.methods import UAPMethod, singular_directions


class SVDUAP(UAPMethod):
    """Top-``k`` right singular vectors of the ``(N, d)`` perturbation matrix, exact.

    ``solver="gram"`` streams the rows once into a ``d x d`` Gram matrix (float64);
    ``solver="lapack"`` runs LAPACK's SVD on the whole matrix.  Singular vectors have no sign:
    their UAPs are evaluated as +v and -v and the better is kept.  Under ``norm="linf"`` each
    singular vector becomes ``eps * sign(v)``.
    """

    name = "svd"
    supports_distributed = True
    description = "top-k right singular vectors of the perturbation matrix (exact; both signs evaluated)"

    def __init__(self, *, k: int = 5, center: bool = False, solver: str = "gram", per_class: bool = True,
                 norm: str | None = None) -> None:
        if solver not in ("gram", "lapack"):
            raise uapx.UapxError(f"unknown svd solver {solver!r}", "choose gram or lapack")
        if k < 1:
            raise uapx.UapxError(f"svd: k must be >= 1 (directions asked for), got {k}", "pass --k 1 or more")
        super().__init__(per_class=per_class, norm=norm)
        self.k, self.center, self.solver = k, center, solver

    def directions(self, pset):
        check_exact_svd(len(pset), pset.d, "svd")  # d > 16,384 at scale: a one-line error suggesting rsvd
        if self.solver == "gram":
            res = top_svd_gram(pset.chunks(), pset.d, self.k, center=self.center)
        else:
            res = top_svd_lapack(pset.matrix(), self.k, center=self.center)
        return singular_directions(res)


@uapx.hookimpl
def uapx_add_uap_methods():
    return [SVDUAP]
