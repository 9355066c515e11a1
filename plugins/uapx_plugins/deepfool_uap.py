"""Built-in UAP method ``deepfool-uap``: Moosavi-Dezfooli et al. (2017), L2-bounded.

The universal perturbation v starts at 0; for each image that x + v does not fool, DeepFool
finds the smallest extra step that sends x + v across the nearest decision boundary, and v is
updated to v + dv, projected back onto the L2 ball of radius eps.  Passes over the images
repeat until the fooling rate reaches ``1 - delta`` or ``passes`` run out.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

import uapx
from uapx import distributed
from uapx.methods import Direction, UAPMethod, project_l2


def deepfool(model: torch.nn.Module, x: torch.Tensor, *, max_iter: int = 10, overshoot: float = 0.02,
             num_candidates: int = 10) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al., 2016) for one image ``x`` ``(1, C, H, W)``, L2.

    Returns the perturbation ``r`` ``(1, C, H, W)`` (with overshoot) that changes the model's
    prediction on ``clamp(x + r, 0, 1)``, or the last iterate if ``max_iter`` is reached.
    """
    with torch.no_grad():
        logits = model(x)[0]
    orig = int(logits.argmax())
    cands = logits.argsort(descending=True)[:num_candidates]
    cands = cands[cands != orig]
    sel = torch.cat([torch.tensor([orig]), cands.cpu()]).to(x.device)
    r_tot = torch.zeros_like(x)
    for _ in range(max_iter):
        xi = (x + (1 + overshoot) * r_tot).clamp(0, 1)
        # one copy of the image per logit of interest: one backward gives every gradient
        xr = xi.detach().expand(sel.numel(), *xi.shape[1:]).clone().requires_grad_(True)
        out = model(xr)
        if int(out[0].argmax()) != orig:
            break
        (grads,) = torch.autograd.grad(out.gather(1, sel[:, None]).sum(), xr)
        out = out[:1]
        w = (grads[1:] - grads[:1]).flatten(1)  # (m, d)
        f = (out[0, cands] - out[0, orig]).detach()  # (m,)
        wn = w.norm(dim=1)
        dist = f.abs() / wn.clamp_min(1e-12)
        dist[wn < 1e-12] = float("inf")
        j = int(dist.argmin())
        if not torch.isfinite(dist[j]):
            break
        r_tot = r_tot + ((dist[j] + 1e-4) * w[j] / wn[j]).view_as(x)
    return (1 + overshoot) * r_tot


class DeepFoolUAP(UAPMethod):
    """Universal perturbation by accumulating DeepFool steps (L2 ball of radius eps).

    The loop is sequential by nature.  Under torchrun it runs as a parallel, iterate-averaging
    variant, so its UAP is not the single-process one: in each pass every rank runs the loop on its
    share of the ``max_images`` sample (in proportion to its number of images, drawn from its own
    images), starting from the shared ``v``; after the pass ``v`` becomes the mean of the ranks'
    iterates (all-reduce), projected onto the eps-ball.  The fooling rate after each pass is over
    every rank's images (all-reduced counts), so every rank stops after the same pass.  In one
    process it is the sequential algorithm.
    """

    name = "deepfool-uap"
    supports_distributed = True
    description = "universal perturbation from accumulated DeepFool steps (Moosavi-Dezfooli et al. 2017), L2"
    needs_model = True

    def __init__(self, *, passes: int = 1, delta: float = 0.2, max_iter: int = 10, overshoot: float = 0.02,
                 max_images: int | None = 500, per_class: bool = False) -> None:
        super().__init__(per_class=per_class, passes=passes, delta=delta, max_iter=max_iter, overshoot=overshoot,
                         max_images=max_images)
        self.passes, self.delta, self.max_iter, self.overshoot = passes, delta, max_iter, overshoot
        self.max_images = max_images

    def directions(self, pset, *, data, eps):
        model, dev = data.model, data.device
        parallel = distributed.active()
        # each rank draws its own images (rank 0 with the single-process seed)
        g = torch.Generator().manual_seed(data.seed + 1_000_003 * distributed.rank())
        start, n_all = distributed.row_offset(data.x.shape[0])
        n_total = n_all if self.max_images is None else min(self.max_images, n_all)
        # this rank's share of the sample, in proportion to its images (the shares add up to n_total)
        n = (start + data.x.shape[0]) * n_total // max(n_all, 1) - start * n_total // max(n_all, 1)
        x = data.x.to(dev)
        v = torch.zeros(1, *x.shape[1:], device=dev)
        with torch.no_grad():
            clean = model(x).argmax(1)
        history = []
        for p in range(self.passes):
            order = torch.randperm(x.shape[0], generator=g)[:n]
            for i in tqdm(order.tolist(), desc=f"deepfool-uap eps {eps:g} pass {p + 1}", leave=False, unit="img",
                          disable=not distributed.is_main()):
                xi = x[i:i + 1]
                with torch.no_grad():
                    fooled = int(model((xi + v).clamp(0, 1)).argmax(1)) != int(clean[i])
                if fooled:
                    continue
                dv = deepfool(model, (xi + v).clamp(0, 1), max_iter=self.max_iter, overshoot=self.overshoot)
                v = v + dv
                v = project_l2(v, eps)
            if parallel:  # the mean of the ranks' iterates, back in the eps-ball, the same on every rank
                v = distributed.all_reduce_(v.contiguous()) / distributed.world_size()
                v = project_l2(v, eps)
                v = distributed.broadcast_(v.contiguous())
            with torch.no_grad():
                fooled = torch.cat([clean[:0]] + [model((x[s:s + data.batch_size] + v).clamp(0, 1)).argmax(1)
                                                  for s in range(0, x.shape[0], data.batch_size)]).ne(clean)
            rate = distributed.all_reduce_scalar(float(fooled.sum())) / max(n_all, 1)  # over every rank's images
            history.append(rate)
            if rate >= 1 - self.delta:
                break
        return [Direction(v.reshape(-1).cpu(), meta={"fooling_rate_per_pass": history})]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [DeepFoolUAP]
