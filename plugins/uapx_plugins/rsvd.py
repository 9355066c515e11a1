"""Built-in UAP method ``rsvd``: top right-singular vectors by randomized SVD, for large sets."""
from __future__ import annotations

import uapx
from uapx.linalg import randomized_svd, single_pass_svd
from uapx.methods import Direction, UAPMethod, singular_directions
from uapx.perturbations import PerturbationSet


class RandomizedSVDUAP(UAPMethod):
    """Top-``k`` right singular vectors of the ``(N, d)`` perturbation matrix, randomized.

    The rows stream through :meth:`PerturbationSet.chunks`; the matrix is never held whole.
    By default, randomized subspace iteration (:func:`uapx.linalg.randomized_svd`): a sketch of
    ``k + oversample`` columns, ``power_iters`` iterations, ``2 * power_iters + 2`` passes over the
    rows.  With ``single_pass=True``, one pass (:func:`uapx.linalg.single_pass_svd`) for sets too
    large to read twice: range sketch of ``k + oversample`` columns, co-range sketch of twice that
    plus one rows; ``power_iters`` does not apply.  Singular vectors have no sign: their UAPs are
    evaluated as +v and -v and the better is kept; under ``norm="linf"`` each becomes ``eps * sign(v)``.

    Accuracy: a single pass is only as good as the tail energy allows (error ~ ``tau_{k+1}``).  On
    slowly decaying spectra, such as MNIST perturbations, its singular values come out inflated and
    its directions unreliable unless ``k + oversample`` approaches the numerical rank; there, and
    whenever ``d`` is a few thousand, the exact ``svd`` method (Gram matrix) is also one pass.
    """

    name = "rsvd"
    supports_distributed = True
    description = "top-k right singular vectors by randomized SVD, streamed (optionally one pass; both signs evaluated)"

    def __init__(self, *, k: int = 5, oversample: int = 10, power_iters: int = 2, center: bool = False,
                 single_pass: bool = False, seed: int = 0, per_class: bool = True, norm: str | None = None) -> None:
        for setting, value, low in (("k", k, 1), ("oversample", oversample, 0), ("power_iters", power_iters, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise uapx.UapxError(f"rsvd: {setting} must be a whole number >= {low}, got {value!r}",
                                     f"pass {setting} >= {low}")
        super().__init__(per_class=per_class, norm=norm)
        self.k, self.oversample, self.power_iters = int(k), int(oversample), int(power_iters)
        self.center, self.single_pass, self.seed = center, single_pass, seed

    def directions(self, pset: PerturbationSet) -> list[Direction]:
        n, d = len(pset), pset.d
        if self.single_pass:
            r = self.k + self.oversample
            res = single_pass_svd(pset.chunks(), n, d, self.k, range_dim=r, corange_dim=2 * r + 1,
                                  center=self.center, seed=self.seed)
        else:
            res = randomized_svd(pset.chunks, n, d, self.k, oversample=self.oversample,
                                 power_iters=self.power_iters, center=self.center, seed=self.seed)
        return singular_directions(res)


@uapx.hookimpl
def uapx_add_uap_methods():
    return [RandomizedSVDUAP]
