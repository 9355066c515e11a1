"""uapx-median: the coordinate-wise median of the per-image perturbations, as a UAP method."""
import uapx
from uapx.methods import Direction, UAPMethod


class MedianUAP(UAPMethod):
    """Median over images of each pixel's perturbation, scaled to eps by uapx."""

    name = "median"
    description = "coordinate-wise median of the per-image perturbations, scaled to eps"

    def directions(self, pset):
        return [Direction(pset.matrix().median(dim=0).values)]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [MedianUAP]
