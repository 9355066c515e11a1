"""The fused PGD-L2 step against the pure-PyTorch reference: ``pytest --benchmark-only``.

One group per input shape, one timed callable per implementation, all in place on ``x`` (what
:func:`uapx.attacks.pgd` calls):

- ``fused``: :func:`uapx.ops.l2_pgd_step_`, the custom op (asserted active: a silent fallback
  fakes nothing);
- ``reference``: :func:`uapx.ops.l2_pgd_step_reference`, copied into ``x``;
- ``compiled``: the same, through ``torch.compile`` (Inductor);
- ``copy``: ``x += x0 * grad``, the bandwidth yardstick: the step's bytes (three reads, one
  write) with no arithmetic to speak of.

Every call reuses one ``x``: a step's output is a valid input (in the box and the eps-ball) and
its cost does not depend on the values, so repeated calls time the same work as fresh inputs.
``benchmarks/conftest.py`` prints the speedups; ``benchmarks/README.md`` has the numbers.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from uapx import attacks, data, models, ops

SHAPES = {
    "mnist": (256, 1, 28, 28),
    "cifar10": (256, 3, 32, 32),
    "imagenet": (64, 3, 224, 224),
}
STEP_SIZE, EPS = 0.5, 2.0


def reference_step_(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                    lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """The reference step, in place like :func:`uapx.ops.l2_pgd_step_`."""
    return x.copy_(ops.l2_pgd_step_reference(x, x0, grad, step_size, eps, lo, hi))


def copy_(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> None:
    x.addcmul_(x0, grad)


IMPLEMENTATIONS: dict[str, Callable] = {
    "fused": ops.l2_pgd_step_,
    "reference": reference_step_,
    "compiled": torch.compile(reference_step_, dynamic=False),
    "copy": copy_,
}


def step_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, x0, grad)``: images in [0, 1], an iterate near them, a gradient."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=gen)
    x = (x0 + 0.05 * torch.randn(shape, generator=gen)).clamp_(0.0, 1.0)
    return x, x0, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_l2_step(benchmark, shape: str, impl: str) -> None:
    if impl == "fused":
        assert ops.backend("cpu") == "cpu", ops.backend_status("cpu")
    args = (*step_inputs(SHAPES[shape]), STEP_SIZE, EPS)
    step = IMPLEMENTATIONS[impl]
    step(*args)  # untimed: torch.compile compiles here
    benchmark.group = f"l2-step {shape} {'x'.join(map(str, SHAPES[shape]))}"
    benchmark.extra_info.update(impl=impl, shape=shape, bytes=4 * args[0].numel() * 4)
    benchmark(step, *args)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_pgd_mnist(benchmark, monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """A 10-step PGD-L2 attack (eps 2) on 256 MNIST test images, Madry et al.'s CNN (random weights)."""
    if impl == "fused":
        assert ops.backend("cpu") == "cpu", ops.backend_status("cpu")
    else:
        monkeypatch.setattr(ops, "l2_pgd_step_", reference_step_)
    torch.manual_seed(0)
    model = models.build("mnist-cnn").eval().requires_grad_(False)
    images = data.load("mnist", "test")
    x, y = images.images(slice(0, 256)), images.y[:256]
    benchmark.group = "pgd-l2 mnist 10 steps, batch 256"
    benchmark.extra_info.update(impl=impl, shape="pgd-mnist")
    benchmark.pedantic(attacks.pgd, args=(model, x, y), kwargs=dict(eps=EPS, steps=10, step_size=STEP_SIZE),
                       rounds=5, warmup_rounds=1)
