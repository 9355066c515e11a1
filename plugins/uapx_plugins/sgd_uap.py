"""Built-in UAP method ``sgd-uap``: one perturbation optimised by projected stochastic gradient
ascent on the loss over mini-batches (after Shafahi et al., 2020), L2-bounded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import uapx
from uapx.methods import Direction, UAPMethod


class SGDUAP(UAPMethod):
    """Maximise the mean (optionally clipped) cross-entropy of ``clamp(x + v, 0, 1)`` over batches
    with normalised-gradient steps, projecting ``v`` onto the L2 ball of radius eps after each."""

    name = "sgd-uap"
    description = "single perturbation by projected stochastic gradient ascent over batches (Shafahi et al. 2020), L2"
    needs_model = True

    def __init__(self, *, epochs: int = 10, batch_size: int = 100, step_size: float | None = None,
                 loss_clip: float | None = None, per_class: bool = False) -> None:
        super().__init__(per_class=per_class, epochs=epochs, batch_size=batch_size, step_size=step_size,
                         loss_clip=loss_clip)
        self.epochs, self.batch_size, self.step_size, self.loss_clip = epochs, batch_size, step_size, loss_clip

    def directions(self, pset, *, data, eps):
        model, dev = data.model, data.device
        g = torch.Generator().manual_seed(data.seed)
        x, y = data.x, data.y
        v = torch.zeros(1, *x.shape[1:], device=dev)
        lr0 = self.step_size if self.step_size is not None else eps / 2
        batches = (x.shape[0] + self.batch_size - 1) // self.batch_size
        total, t, losses = self.epochs * batches, 0, []
        for ep in range(self.epochs):
            order = torch.randperm(x.shape[0], generator=g)
            epoch_loss = 0.0
            for s in tqdm(range(0, x.shape[0], self.batch_size), desc=f"sgd-uap eps {eps:g} epoch {ep + 1}",
                          leave=False, unit="batch"):
                idx = order[s:s + self.batch_size]
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                v.requires_grad_(True)
                loss = F.cross_entropy(model((xb + v).clamp(0, 1)), yb, reduction="none")
                if self.loss_clip is not None:
                    loss = loss.clamp(max=self.loss_clip)
                (grad,) = torch.autograd.grad(loss.mean(), v)
                lr = lr0 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / total))).item()  # cosine decay
                with torch.no_grad():
                    v = v + lr * grad / grad.norm().clamp_min(1e-12)
                    v = v * min(1.0, eps / max(float(v.norm()), 1e-12))
                epoch_loss += float(loss.sum())
                t += 1
            losses.append(epoch_loss / x.shape[0])
        return [Direction(v.detach().reshape(-1).cpu(), meta={"loss_per_epoch": losses})]


@uapx.hookimpl
def uapx_add_uap_methods():
    return [SGDUAP]
