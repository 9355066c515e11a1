"""PGD (L2, Linf) against a plain PyTorch PGD written here, trajectories, budgets, loss functions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uapx.data
import uapx.models
from uapx.attacks import PGD, pgd, pgd_trajectory
from uapx.errors import UapxError

BUDGETS = {"l2": {"eps": 2.0, "step_size": 0.5}, "linf": {"eps": 0.3, "step_size": 0.1}}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return uapx.models.load("zoo:mnist-natural")


@pytest.fixture(scope="module")
def batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """8 real MNIST test images the zoo model classifies correctly, and their labels."""
    images = uapx.data.load("mnist", "test")
    x, y = images.images(slice(0, 32)), images.y[:32]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:8], y[ok][:8]


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int,
                  step_size: float, targeted: bool = False) -> torch.Tensor:
    """Textbook PGD from the clean point (Madry et al.); L2 steps as in the design card."""
    x0, xa = x.clone(), x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        g = -g if targeted else g
        with torch.no_grad():
            if norm == "l2":
                g_hat = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
                delta = xa + step_size * g_hat - x0
                scale = torch.clamp(eps / delta.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
                xa = (x0 + delta * scale).clamp(0, 1)
            else:
                xa = torch.min(torch.max(xa + step_size * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return xa.detach()


def _assert_feasible(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    d = (x_adv - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all(), size
    assert x_adv.min() >= 0 and x_adv.max() <= 1


# -- PGD against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_matches_reference(model, batch, norm, targeted):
    x, y = batch
    target = (y + 1) % 10 if targeted else y
    kw = dict(norm=norm, steps=5, targeted=targeted, **BUDGETS[norm])
    ours = pgd(model, x, target, **kw)
    ref = reference_pgd(model, x, target, **kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    _assert_feasible(ours, x, norm, kw["eps"])
    before, after = ce(model, x, target), ce(model, ours, target)
    assert ((after < before) if targeted else (after > before)).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_start_properties(model, batch, norm):
    x, y = batch
    kw = dict(norm=norm, steps=3, **BUDGETS[norm])

    def run(seed: int) -> torch.Tensor:
        return pgd(model, x, y, random_start=True, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    _assert_feasible(a, x, norm, kw["eps"])
    assert (ce(model, a, y) > ce(model, x, y)).all()
    assert torch.equal(a, b)  # the generator decides the start
    assert not torch.allclose(a, c, atol=1e-4)
    assert not torch.allclose(a, pgd(model, x, y, **kw), atol=1e-4)  # the start was random


def test_pgd_does_not_change_its_inputs(model, batch):
    x, y = batch
    x_copy, y_copy = x.clone(), y.clone()
    pgd(model, x, y, norm="l2", steps=2, random_start=True, **BUDGETS["l2"])
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)


# -- trajectories --------------------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_trajectory_records_what_pgd_did(model, batch, norm, targeted):
    x, y = batch
    target = (y + 1) % 10 if targeted else y
    steps, n, d = 4, len(x), x[0].numel()
    kw = dict(norm=norm, steps=steps, targeted=targeted, **BUDGETS[norm])
    x_adv, traj = pgd_trajectory(model, x, target, record=True, **kw)
    assert torch.equal(x_adv, pgd(model, x, target, **kw))  # recording changes nothing
    assert torch.equal(traj.index, torch.arange(n))
    assert traj.grads.shape == (steps, n, d) and traj.deltas.shape == (steps, n, d)
    assert traj.losses.shape == (steps, n)
    torch.testing.assert_close(traj.deltas[-1], (x_adv - x).flatten(1), rtol=0, atol=1e-6)
    for t in range(steps):  # the loss and its input gradient at each step's iterate, by hand
        xt = (x if t == 0 else x + traj.deltas[t - 1].view_as(x)).requires_grad_(True)
        loss = F.cross_entropy(model(xt), target, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), xt)
        torch.testing.assert_close(traj.losses[t], loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traj.grads[t], g.flatten(1), rtol=1e-4, atol=1e-6)


def test_trajectory_of_chosen_samples(model, batch):
    x, y = batch
    kw = dict(norm="l2", steps=3, **BUDGETS["l2"])
    x_all, full = pgd_trajectory(model, x, y, record=True, **kw)
    idx = torch.tensor([5, 1])
    x_some, some = pgd_trajectory(model, x, y, record=idx, **kw)
    assert torch.equal(x_some, x_all)
    assert torch.equal(some.index, idx)
    assert some.grads.shape == (3, 2, x[0].numel())
    for name in ("grads", "deltas", "losses"):
        assert torch.equal(getattr(some, name), getattr(full, name)[:, idx]), name
    assert pgd_trajectory(model, x, y, **kw)[1] is None


def test_linear_model_gradient_is_constant_and_custom_loss_is_used(batch):
    """For a linear model and a loss linear in the logits, the input gradient is a constant: W[y]."""
    x, y = batch
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10))
    w = lin[1].weight.detach()

    def logit_of_label(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, t[:, None]).squeeze(1)

    steps = 5
    x_adv, traj = pgd_trajectory(lin, x, y, norm="l2", eps=3.0, steps=steps, step_size=1.0,
                                 loss_fn=logit_of_label, record=True)
    expected = w[y]  # (n, d): d logit_y / dx
    for t in range(steps):
        torch.testing.assert_close(traj.grads[t], expected, rtol=1e-6, atol=1e-7)
        cos = F.cosine_similarity(traj.grads[t], traj.grads[-1], dim=1)
        torch.testing.assert_close(cos, torch.ones(len(x)), rtol=0, atol=1e-6)
        x_t = x if t == 0 else x + traj.deltas[t - 1].view_as(x)
        with torch.no_grad():
            torch.testing.assert_close(traj.losses[t], logit_of_label(lin(x_t), y), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # ascent on the custom loss, not on cross-entropy
        assert (logit_of_label(lin(x_adv), y) > logit_of_label(lin(x), y)).all()


# -- budgets and failures ------------------------------------------------------------------------


@pytest.mark.parametrize("eps, steps, step_size", [
    (0.0, 5, 0.1), (-1.0, 5, 0.1), (float("nan"), 5, 0.1), (float("inf"), 5, 0.1),
    (1.0, 0, 0.1), (1.0, -2, 0.1), (1.0, 2.5, 0.1),
    (1.0, 5, 0.0), (1.0, 5, -0.1), (1.0, 5, float("nan")),
])
def test_impossible_budgets_are_user_errors(batch, eps, steps, step_size):
    x, y = batch
    lin = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10))
    with pytest.raises(UapxError) as info:
        pgd(lin, x, y, norm="l2", eps=eps, steps=steps, step_size=step_size)
    assert "\n" not in str(info.value)
    with pytest.raises(UapxError):
        PGD(eps=eps, steps=steps, step_size=step_size)


def test_unknown_norm(batch):
    x, y = batch
    with pytest.raises(UapxError, match="unknown norm 'l1'"):
        pgd(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y, norm="l1", eps=1.0, steps=1, step_size=0.1)


def test_every_norm_has_one_pgd_entry():
    from uapx import norms
    from uapx.attacks import NORM_STEPS

    assert tuple(NORM_STEPS) == norms.NORMS  # the norms uapx accepts are the norms PGD can step in


def test_nan_gradient_is_a_user_error(batch):
    x, y = batch

    class NaNModel(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return inp.flatten(1)[:, :10] * float("nan")

    with pytest.raises(UapxError, match="NaN or Inf at PGD step 1"):
        pgd(NaNModel(), x, y, norm="l2", eps=1.0, steps=2, step_size=0.5)


# -- bad input to the attack is a user error, up front ------------------------------------------


@pytest.mark.parametrize("steps", [float("nan"), float("inf")])
def test_non_finite_steps_are_user_errors(batch, steps):
    x, y = batch
    with pytest.raises(UapxError):
        pgd(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y, norm="l2", eps=1.0, steps=steps, step_size=0.1)


def test_record_index_out_of_range_is_a_user_error(batch):
    x, y = batch
    with pytest.raises(UapxError):
        pgd_trajectory(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y, eps=1.0, steps=2, step_size=0.5,
                       record=torch.tensor([len(x)]))


def test_scalar_loss_fn_is_a_user_error(batch):
    x, y = batch
    with pytest.raises(UapxError):
        pgd_trajectory(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y, eps=1.0, steps=2, step_size=0.5,
                       loss_fn=lambda logits, t: F.cross_entropy(logits, t), record=True)


def test_trajectory_streams_to_disk_and_matches_memory(batch, tmp_path):
    import numpy as np

    x, y = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    kw = dict(eps=1.0, steps=4, step_size=0.4, record=torch.tensor([0, 2]))
    xa, mem = pgd_trajectory(model, x, y, **kw)
    xb, disk = pgd_trajectory(model, x, y, **kw, record_dir=tmp_path / "traj")
    assert torch.equal(xa, xb)
    for name in ("grads", "deltas", "losses"):
        assert torch.equal(getattr(mem, name), getattr(disk, name))
        on_disk = np.load(tmp_path / "traj" / f"{name}.npy", mmap_mode="r")
        assert on_disk.shape == tuple(getattr(mem, name).shape)
        np.testing.assert_array_equal(on_disk, getattr(mem, name).numpy())
