"""Built-in UAP method ``deepfool-uap``: Moosavi-Dezfooli et al. (2017), in the L2 or Linf ball.

The universal perturbation v starts at 0; for each image that x + v does not fool, DeepFool
finds the smallest extra step (in the ball's norm) that sends x + v across the nearest decision
boundary, and v is updated to v + dv, projected back onto the eps-ball.  Passes over the images
repeat until the fooling rate reaches ``1 - delta`` or ``passes`` run out.  Targeted
(``target_class=C``): the images not yet sent to ``C`` take targeted DeepFool steps towards
``C``'s boundary, and the rate that stops the passes is the share of images classified ``C``.
"""
from __future__ import annotations

import warnings

import torch
from tqdm import tqdm

import uapx
from uapx import distributed
from uapx.methods import Direction, UAPMethod
from uapx.norms import check_norm, check_target_class, dual_size, project, steepest


def _difference_gradients(picked: torch.Tensor, x: torch.Tensor, *,
                          batched: bool = True) -> tuple[torch.Tensor, bool]:
    """``w[i, j] = grad_x (picked[i, j + 1] - picked[i, 0])`` ``(B, m-1, d)`` for logits ``picked``
    ``(B, m)`` of one forward pass on ``x`` ``(B, ...)``: m-1 vector-Jacobian products of that one
    pass (``is_grads_batched``), not a forward pass per class.  A model whose backward cannot run
    under vmap (a custom autograd Function without vmap support) gets the same products one
    backward pass at a time.  Returns ``(w, batched)``: ``batched`` is False once vmap failed (or
    was not to be tried), so that later iterations go straight to the loop."""
    b, m = picked.shape
    if m < 2:
        return x.new_zeros(b, 0, x[0].numel()), batched
    rows = torch.zeros(m - 1, b, m, dtype=picked.dtype, device=picked.device)
    rows[:, :, 0] = -1.0
    rows[torch.arange(m - 1), :, torch.arange(1, m)] = 1.0  # row j: e_{j+1} - e_0 for every image
    g = None
    if batched:
        try:
            with warnings.catch_warnings():  # vmap's note that convolution_backward runs as a loop over the rows
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                (g,) = torch.autograd.grad(picked, x, grad_outputs=rows, is_grads_batched=True, retain_graph=True)
        except RuntimeError:  # backward not vmappable
            batched = False
    if g is None:  # one product per row
        g = torch.stack([torch.autograd.grad(picked, x, grad_outputs=r, retain_graph=True)[0] for r in rows])
    return g.reshape(m - 1, b, -1).transpose(0, 1), batched


def deepfool(model: torch.nn.Module, x: torch.Tensor, *, max_iter: int = 10, overshoot: float = 0.02,
             num_candidates: int = 10, norm: str = "l2", target: int | None = None, box: bool = False,
             logits: torch.Tensor | None = None) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al., 2016) for one image ``x`` ``(1, C, H, W)``: the
    perturbation ``r`` ``(1, C, H, W)`` (with overshoot) that changes the model's prediction on
    ``clamp(x + r, 0, 1)`` (or makes it ``target``), or the last iterate if ``max_iter`` is
    reached.  The iteration of :func:`deepfool_batch` on a batch of one image."""
    return deepfool_batch(model, x, max_iter=max_iter, overshoot=overshoot, num_candidates=num_candidates,
                          norm=norm, target=target, box=box, logits=logits)


def within_box(w: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The DeepFool gradients ``w`` ``(B, m-1, d)`` at iterates ``x`` ``(B, ...)`` in ``[0, 1]``,
    each with the components that would move a pixel out of the box set to 0: a step moves along
    ``-sign(f) * w`` (``f`` ``(B, m-1)``: the logit differences it must bring to 0), so a pixel at 0
    cannot take a component of that direction below 0, nor a pixel at 1 one above 0.  The
    linearised boundary is then the nearest one reachable without leaving the box (at its face)."""
    xf = x.detach().reshape(x.shape[0], 1, -1)
    move = w * (-f).sign()[:, :, None]
    return w.masked_fill(((xf <= 0) & (move < 0)) | ((xf >= 1) & (move > 0)), 0.0)


def deepfool_batch(model: torch.nn.Module, x: torch.Tensor, *, max_iter: int = 10, overshoot: float = 0.02,
                   num_candidates: int = 10, norm: str = "l2", target: int | None = None,
                   box: bool = False, logits: torch.Tensor | None = None) -> torch.Tensor:
    """DeepFool for every image of a batch ``x`` ``(B, C, H, W)`` at once; each image stops once its
    prediction changed (or, with ``target``, became ``target``).

    Each iteration linearises the model at the iterate ``x + (1 + overshoot) r``: for each class
    ``k`` of interest, ``w_k = grad f_k - grad f_a`` and ``f_k - f_a`` (``a`` the class to leave);
    the linearised boundary of ``k`` lies at distance ``|f_k - f_a| / ||w_k||_*`` in ``norm`` (the
    dual norm: L2 for L2, L1 for Linf), reached by the step ``(distance + 1e-4) * u(w_k)`` with
    ``u(w) = w / ||w||_2`` (L2) or ``sign(w)`` (Linf) -- the paper's l_p DeepFool, p = 2 or inf
    (:func:`uapx.norms.steepest`).  Untargeted: ``a`` is the clean prediction, ``k`` ranges over
    the other top ``num_candidates`` classes of the clean image and the nearest boundary is taken.
    Targeted (``target=C``): ``a`` is the current prediction and ``k = C`` (targeted DeepFool).
    ``box=True`` linearises within the image box (:func:`within_box`): the components of ``w_k``
    that would push a pixel already at 0 or 1 out of ``[0, 1]`` are dropped before the distance and
    the step, so no part of a step is lost to the clamp (the classic algorithm, ``box=False``,
    steps as if unconstrained and clamps the iterate, which on MNIST's saturated pixels takes
    about twice the iterations).  ``logits`` ``(B, classes)``: the model's logits on ``x`` where the
    caller has them (one forward pass fewer).

    Returns the perturbations ``r`` ``(B, C, H, W)`` (with overshoot).
    """
    check_norm(norm)
    b = x.shape[0]
    if logits is None:
        with torch.no_grad():
            logits = model(x)
    orig = logits.argmax(1)
    if target is None:
        m = min(num_candidates, logits.shape[1])
        cands = logits.argsort(1, descending=True)[:, :m]  # per image: the top classes, the original among them
        keep = cands != orig[:, None]
        # the m-1 other classes of each image (drop the original from its row)
        others = torch.stack([row[k][: m - 1] for row, k in zip(cands, keep)]) if b else cands[:, 1:]
        sel = torch.cat([orig[:, None], others], 1)  # (B, m)
    else:
        m = 2  # the class to leave (set per iteration) and the target
        sel = torch.stack([orig, torch.full_like(orig, int(target))], 1)
    r_tot = torch.zeros_like(x)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    vmap_ok = True  # the gradients as one batched backward until vmap fails on this model
    for it in range(max_iter):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        xi = (x[idx] + (1 + overshoot) * r_tot[idx]).clamp(0, 1).detach()
        if it == 0 and torch.equal(xi, x):  # the iterate is x itself: its prediction is orig
            now = orig
        else:  # where the iterate is: a forward pass without the graph, so that the images that
            with torch.no_grad():  # crossed take no gradients (m-1 backward passes) they would not use
                now = model(xi).argmax(1)
        crossed = now != orig[idx] if target is None else now == int(target)
        active[idx[crossed]] = False
        idx, xi, now = idx[~crossed], xi[~crossed].requires_grad_(True), now[~crossed]
        if idx.numel() == 0:
            break
        out = model(xi)  # (a, classes): one forward pass per iterate, its m-1 gradients below
        s = sel[idx] if target is None else torch.stack([now, sel[idx, 1]], 1)  # targeted: leave the current class
        picked = out.gather(1, s)  # (a, m): the logits of classes s[i, 0], ..., s[i, m-1]
        w, vmap_ok = _difference_gradients(picked, xi, batched=vmap_ok)  # (a, m-1, d)
        f = (picked[:, 1:] - picked[:, :1]).detach()  # (a, m-1)
        if box:
            w = within_box(w, xi, f)
        wn = dual_size(w.reshape(-1, w.shape[2]), norm).view(w.shape[:2])
        dist = f.abs() / wn.clamp_min(1e-12)
        dist[wn < 1e-12] = float("inf")
        best = dist.argmin(1)
        dj = dist.gather(1, best[:, None]).squeeze(1)
        go = torch.isfinite(dj)
        active[idx[~go]] = False
        if go.any():
            rows = go.nonzero().flatten()
            step = steepest(w[rows, best[rows]], dj[rows] + 1e-4, norm)
            r_tot[idx[rows]] += step.view(-1, *x.shape[1:])
    return (1 + overshoot) * r_tot


class DeepFoolUAP(UAPMethod):
    """Universal perturbation by accumulating DeepFool steps (the eps-ball of ``norm``, L2 or Linf;
    towards class ``target_class`` where given).

    The loop is sequential by nature.  Under torchrun it runs as a parallel, iterate-averaging
    variant, so its UAP is not the single-process one: in each pass every rank runs the loop on its
    share of the ``max_images`` sample (in proportion to its number of images, drawn from its own
    images), starting from the shared ``v``; after the pass ``v`` becomes the mean of the ranks'
    iterates (all-reduce), projected onto the eps-ball.  The fooling rate after each pass is over
    every rank's images (all-reduced counts), so every rank stops after the same pass.  In one
    process it is the sequential algorithm.

    ``batch=B`` runs the *batched variant* of the sequential algorithm: the pass goes through the
    sample in mini-batches of ``B`` images; for the images of a batch that ``x + v`` does not yet
    fool, DeepFool runs on all of them at once (:func:`deepfool_batch`) from the same ``v``, and
    ``v`` takes their summed steps (the sequential loop's update, with every step computed at the
    batch's starting ``v``), projected onto the eps-ball.  ``batch=None`` (the default) is the
    sequential algorithm; ``batch=1`` is it too, up to float rounding.

    ``box=True`` takes box-aware DeepFool steps (:func:`deepfool_batch`): no step component pushes
    a pixel of ``x + v`` that is already at 0 or 1 further out, so the steps are not lost to the
    clamp.  The default, ``box=False``, is the classic DeepFool of the paper (and of ART).
    """

    name = "deepfool-uap"
    supports_distributed = True
    description = ("universal perturbation from accumulated DeepFool steps (Moosavi-Dezfooli et al. 2017), "
                   "L2 or Linf, optionally targeted")
    needs_model = True

    def __init__(self, *, passes: int = 1, delta: float = 0.2, max_iter: int = 10, overshoot: float = 0.02,
                 max_images: int | None = 500, batch: int | None = None, per_class: bool = False,
                 norm: str | None = None, target_class: int | None = None, box: bool = False) -> None:
        if batch is not None and (int(batch) != batch or batch < 1):
            raise uapx.UapxError(f"deepfool-uap.batch must be a whole number >= 1, got {batch}",
                                 "pass --set deepfool-uap.batch=32, or leave it unset for the sequential loop")
        super().__init__(per_class=per_class, norm=norm)
        self.batch = None if batch is None else int(batch)
        self.passes, self.delta, self.max_iter, self.overshoot = passes, delta, max_iter, overshoot
        self.max_images = max_images
        self.box = bool(box)
        self.target_class = check_target_class(target_class)

    def _reached(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Whether each prediction ``(n,)`` is where the UAP should send it: changed from ``clean``,
        or (targeted) the target class."""
        return pred == self.target_class if self.target_class is not None else pred != clean

    def _deepfool(self, model, x, norm, batched: bool, logits: torch.Tensor | None = None):
        fn = deepfool_batch if batched else deepfool
        return fn(model, x, max_iter=self.max_iter, overshoot=self.overshoot, norm=norm, target=self.target_class,
                  box=self.box, logits=logits)

    def directions(self, pset, *, data, eps):
        model, dev = data.model, data.device
        norm = self.ball_norm(pset)
        parallel = distributed.active()
        # each rank draws its own images (rank 0 with the single-process seed)
        g = torch.Generator().manual_seed(data.seed + 1_000_003 * distributed.rank())
        start, n_all = distributed.row_offset(data.x.shape[0])
        n_total = n_all if self.max_images is None else min(self.max_images, n_all)
        # this rank's share of the sample, in proportion to its images (the shares add up to n_total)
        n = (start + data.x.shape[0]) * n_total // max(n_all, 1) - start * n_total // max(n_all, 1)
        # in memory: on the device once; streamed (an ImageRows): read where indexed, never all at once
        x = data.x.to(dev) if isinstance(data.x, torch.Tensor) else data.x
        v = torch.zeros(1, *x.shape[1:], device=dev)
        with torch.no_grad():
            clean = torch.cat([model(x[s:s + data.batch_size].to(dev)).argmax(1)
                               for s in range(0, x.shape[0], data.batch_size)])
        history = []
        for p in range(self.passes):
            order = torch.randperm(x.shape[0], generator=g)[:n]
            desc = f"deepfool-uap eps {eps:g} pass {p + 1}"
            if self.batch is not None:
                v = self._batched_pass(model, x, clean, order, v, eps, norm, desc)
            else:
                v = self._sequential_pass(model, x, clean, order, v, eps, norm, desc)
            if parallel:  # the mean of the ranks' iterates, back in the eps-ball, the same on every rank
                v = distributed.all_reduce_(v.contiguous()) / distributed.world_size()
                v = project(v, eps, norm)
                v = distributed.broadcast_(v.contiguous())
            with torch.no_grad():
                pred = torch.cat([clean[:0]] + [model((x[s:s + data.batch_size].to(dev) + v).clamp(0, 1)).argmax(1)
                                                for s in range(0, x.shape[0], data.batch_size)])
            reached = self._reached(pred, clean)
            rate = distributed.all_reduce_scalar(float(reached.sum())) / max(n_all, 1)  # over every rank's images
            history.append(rate)
            if rate >= 1 - self.delta:
                break
        key = "fooling_rate_per_pass" if self.target_class is None else "targeted_success_per_pass"
        return [Direction(v.reshape(-1).cpu(), meta={key: history})]

    def _sequential_pass(self, model, x, clean, order, v, eps, norm, desc):
        """One pass of the sequential algorithm over the images ``order``; returns the new ``v``."""
        for i in tqdm(order.tolist(), desc=desc, leave=False, unit="img", disable=not distributed.is_main()):
            xi = (x[i:i + 1].to(v.device) + v).clamp(0, 1)
            with torch.no_grad():
                out = model(xi)
            if bool(self._reached(out.argmax(1), clean[i:i + 1])):
                continue
            v = project(v + self._deepfool(model, xi, norm, False, logits=out), eps, norm)
        return v

    def _batched_pass(self, model, x, clean, order, v, eps, norm, desc):
        """One pass of the batched variant over the images ``order``; returns the new ``v``."""
        with tqdm(total=order.numel(), desc=desc, leave=False, unit="img", disable=not distributed.is_main()) as bar:
            for s in range(0, order.numel(), self.batch):
                idx = order[s:s + self.batch]  # CPU indices: an ImageRows reads these rows
                xb = (x[idx].to(v.device) + v).clamp(0, 1)
                with torch.no_grad():
                    out = model(xb)
                todo = ~self._reached(out.argmax(1), clean[idx])
                if todo.any():
                    r = self._deepfool(model, xb[todo], norm, True, logits=out[todo])
                    v = project(v + r.sum(0, keepdim=True), eps, norm)
                bar.update(idx.numel())
        return v


@uapx.hookimpl
def uapx_add_uap_methods():
    return [DeepFoolUAP]
