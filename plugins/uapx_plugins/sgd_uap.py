"""Built-in UAP method ``sgd-uap``: one perturbation optimised by projected stochastic gradient
ascent on the loss over mini-batches (after Shafahi et al., 2020), in the L2 or Linf ball;
optionally targeted (descending the loss of one class)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import uapx
from uapx import distributed
from uapx.methods import Direction, UAPMethod
from uapx.norms import check_target_class, project, steepest


class SGDUAP(UAPMethod):
    """Maximise the mean (optionally clipped) cross-entropy of ``clamp(x + v, 0, 1)`` over batches
    with steepest-ascent steps of the ball's norm (normalised gradient in L2, signed gradient in
    Linf), projecting ``v`` onto the eps-ball after each (:mod:`uapx.norms`).  With
    ``target_class=C`` it minimises the mean cross-entropy to class ``C`` instead: a UAP that
    pushes every image to ``C``.

    Under torchrun, distributed mini-batch SGD: the batches come from the same seeded permutation
    of the global image order (rank 0's images first) as in one process, every rank takes its own
    images of each global batch, and the gradients of the summed loss (divided by the global batch
    size) are all-reduced, so every rank takes the same steps and ``v`` stays identical on all of
    them.  The steps are one process's up to float rounding (the gradient is summed in another
    order), which normalised steps through a non-linear model can amplify over a long run.
    """

    name = "sgd-uap"
    supports_distributed = True
    description = ("single perturbation by projected stochastic gradient ascent over batches (Shafahi et al. 2020), "
                   "L2 or Linf, optionally targeted")
    needs_model = True

    def __init__(self, *, epochs: int = 10, batch_size: int = 100, step_size: float | None = None,
                 loss_clip: float | None = None, per_class: bool = False, norm: str | None = None,
                 target_class: int | None = None) -> None:
        if loss_clip is not None and target_class is not None:
            raise uapx.UapxError("sgd-uap.loss_clip clips the untargeted loss; it does not apply to a targeted UAP",
                                 "leave sgd-uap.loss_clip unset with --target-class")
        super().__init__(per_class=per_class, norm=norm)
        self.epochs, self.batch_size, self.step_size, self.loss_clip = epochs, batch_size, step_size, loss_clip
        self.target_class = check_target_class(target_class)

    def directions(self, pset, *, data, eps):
        model, dev = data.model, data.device
        norm, target = self.ball_norm(pset), self.target_class
        g = torch.Generator().manual_seed(data.seed)
        x, y = data.x, data.y
        start, n = distributed.row_offset(x.shape[0])  # this rank's first row in the global order; all rows
        v = torch.zeros(1, *x.shape[1:], device=dev)
        lr0 = self.step_size if self.step_size is not None else eps / 2
        batches = (n + self.batch_size - 1) // self.batch_size
        total, t, losses = self.epochs * batches, 0, []
        for ep in range(self.epochs):
            order = torch.randperm(n, generator=g)
            epoch_loss = 0.0
            for s in tqdm(range(0, n, self.batch_size), desc=f"sgd-uap eps {eps:g} epoch {ep + 1}",
                          leave=False, unit="batch", disable=not distributed.is_main()):
                idx = order[s:s + self.batch_size]
                count = idx.numel()  # the global batch
                if distributed.active():  # this rank's images of it
                    idx = idx[(idx >= start) & (idx < start + x.shape[0])] - start
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                if target is not None:
                    yb = torch.full_like(yb, target)
                v.requires_grad_(True)
                loss = F.cross_entropy(model((xb + v).clamp(0, 1)), yb, reduction="none")
                if self.loss_clip is not None:
                    loss = loss.clamp(max=self.loss_clip)
                ascent = -loss if target is not None else loss  # targeted: descend the loss of the target
                (grad,) = torch.autograd.grad(ascent.sum() / count, v)  # this rank's part of the batch mean
                distributed.all_reduce_(grad)
                lr = lr0 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / total))).item()  # cosine decay
                with torch.no_grad():
                    v = project(v + steepest(grad, lr, norm), eps, norm)
                epoch_loss += float(loss.detach().sum())
                t += 1
            losses.append(distributed.all_reduce_scalar(epoch_loss) / n)
        v = distributed.broadcast_(v.detach().contiguous())  # identical on every rank, bit for bit
        return [Direction(v.reshape(-1).cpu(), meta={"loss_per_epoch": losses})]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [SGDUAP]
