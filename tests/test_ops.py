"""The fused PGD-L2 step (``uapx.ops``) against its pure-PyTorch reference, on the CPU and CUDA."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from uapx import attacks, ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# float32 agreement. The op sums the norms in another order than the reference (and partly in
# float64), so an element may round differently by an ulp of its intermediates x + step_size *
# g_hat, which stay below 2 (one ulp: at most 1.2e-7). rtol covers that for outputs away from 0;
# atol, one ulp just below 1, covers outputs near 0 (measured worst case: half of this tolerance).
RTOL, ATOL = 1e-6, 1e-7
# float16/bfloat16 on CUDA: the op and the reference both compute in float32 and round once.
HALF_TOL = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}

# name -> sample_inputs keyword arguments
CASES = {
    "random": {},
    "zero_grad": dict(grad_scale=0.0),
    "zero_delta": dict(spread=0.0, grad_scale=0.0),  # x == x0 and no gradient: delta = 0
    "x_equals_x0": dict(spread=0.0),
    "inside_ball": dict(step_size=0.01, eps=100.0),
    "projected": dict(step_size=2.0, eps=0.3),  # most rows leave the ball and are projected back
    "box_bounds": dict(at_bounds=True, step_size=3.0, eps=10.0),  # clamping at 0 and 1 dominates
    "tiny_grad": dict(grad_scale=1e-20),
    "batch_of_1": dict(shape=(1, 3, 8, 8)),
    "imagenet_rows": dict(shape=(3, 3, 224, 224)),
    "odd_row": dict(shape=(5, 37)),  # not a multiple of the vector width
    "odd_large_row": dict(shape=(2, 70001)),  # many reduction blocks and a short last one
    "mnist": dict(shape=(16, 1, 28, 28)),
}


def sample_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32, *, shape: tuple[int, ...] = (8, 3, 10, 10),
                  spread: float = 0.2, grad_scale: float = 1.0, step_size: float = 0.5, eps: float = 1.0,
                  at_bounds: bool = False, seed: int = 0) -> tuple:
    """``(x, x0, grad, step_size, eps, lo, hi)`` for the op: clean images ``x0`` in [0, 1] (or at
    exactly 0 and 1 ``at_bounds``), an iterate ``x`` within ``spread`` of them, a gradient."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen)
    if at_bounds:
        x0 = x0.round()
    x = (x0 + spread * torch.randn(shape, generator=gen)).clamp(0.0, 1.0)
    grad = grad_scale * torch.randn(shape, generator=gen)
    return (*(t.to(device, dtype) for t in (x, x0, grad)), step_size, eps, 0.0, 1.0)


def assert_matches_reference(out: torch.Tensor, args: tuple) -> None:
    expected = ops.l2_pgd_step_reference(*args)
    tol = HALF_TOL.get(out.dtype, dict(rtol=RTOL, atol=ATOL))
    torch.testing.assert_close(out, expected, **tol)


@pytest.fixture
def reference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reload the extension state with UAPX_NO_EXTENSION=1: everything runs the reference."""
    monkeypatch.setenv(ops.NO_EXTENSION_ENV, "1")
    monkeypatch.setattr(ops, "_extension", None)


@pytest.mark.parametrize("device", DEVICES)
def test_backend_is_the_fused_kernel(device: str) -> None:
    # CI installs with the README's command, which builds the extension: a missing kernel fails here.
    assert ops.backend(device) == device, ops.backend_status(device)
    assert ops.backend_status(device) == ""


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device: str, case: str) -> None:
    args = sample_inputs(device, **CASES[case])
    out = ops.l2_pgd_step(*args)
    assert out.shape == args[0].shape and out.is_contiguous()
    assert_matches_reference(out, args)


def test_cpu_result_does_not_depend_on_threads() -> None:
    args = sample_inputs("cpu", shape=(4, 3, 224, 224), step_size=2.0, eps=0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.l2_pgd_step(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ops.l2_pgd_step(*args), single, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_mutates_and_returns_x(device: str) -> None:
    args = sample_inputs(device, step_size=2.0, eps=0.5)
    expected = ops.l2_pgd_step_reference(*args)
    x, ptr = args[0], args[0].data_ptr()
    out = ops.l2_pgd_step_(*args)
    assert out is x and x.data_ptr() == ptr
    torch.testing.assert_close(x, expected, rtol=RTOL, atol=ATOL)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _strided(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t], dim=-1)[..., ::2]  # same values, every other element of a bigger buffer


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, rows not dense


LAYOUTS = {"channels_last": _channels_last, "strided": _strided, "transposed": _transposed}


@pytest.mark.parametrize("only_x", [False, True], ids=["all", "only_x"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_layouts(device: str, layout: str, only_x: bool) -> None:
    x, x0, grad, *scalars = sample_inputs(device, step_size=2.0, eps=0.5)
    relayout = LAYOUTS[layout]
    x = relayout(x)
    x0, grad = (x0, grad) if only_x else (relayout(x0), relayout(grad))
    args = (x, x0, grad, *scalars)
    expected = ops.l2_pgd_step_reference(*args)
    torch.testing.assert_close(ops.l2_pgd_step(*args), expected, rtol=RTOL, atol=ATOL)
    strides = x.stride()
    assert ops.l2_pgd_step_(*args) is x and x.stride() == strides
    torch.testing.assert_close(x, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device: str) -> None:
    args = sample_inputs(device, shape=(0, 3, 4, 4))
    assert ops.l2_pgd_step(*args).shape == (0, 3, 4, 4)
    assert ops.l2_pgd_step_(*args) is args[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_half_precision_on_cuda(device: str, dtype: torch.dtype) -> None:
    args = sample_inputs(device, dtype, step_size=2.0, eps=0.5)
    out = ops.l2_pgd_step(*args)
    assert out.dtype == dtype
    assert_matches_reference(out, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_cpu_dtypes_run_the_reference(dtype: torch.dtype) -> None:
    args = sample_inputs("cpu", dtype)
    torch.testing.assert_close(ops.l2_pgd_step(*args), ops.l2_pgd_step_reference(*args), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="CPU kernel takes float32"):
        torch.ops.uapx.l2_pgd_step(*args)


@pytest.mark.parametrize(("change", "message"), [
    (lambda x0: x0[:, :2], "same shape"),
    (lambda x0: x0.double(), "same dtype"),
    (lambda x0: x0.to("cuda"), "same device"),
])
def test_op_rejects_mismatched_inputs(change, message: str) -> None:
    x, x0, grad, *scalars = sample_inputs("cpu")
    if message == "same device" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uapx.l2_pgd_step(x, change(x0), grad, *scalars)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uapx.l2_pgd_step_(x, change(x0), grad, *scalars)


@pytest.mark.parametrize("op", ["l2_pgd_step", "l2_pgd_step_"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str, op: str) -> None:
    overload = getattr(torch.ops.uapx, op).default
    for args in (sample_inputs(device), sample_inputs(device, shape=(2, 5)),
                 (*map(_channels_last, sample_inputs(device)[:3]), 0.5, 1.0, 0.0, 1.0)):
        torch.library.opcheck(overload, args)


def test_torch_compile() -> None:
    x, x0, grad, *scalars = sample_inputs("cpu", step_size=2.0, eps=0.5)
    expected = ops.l2_pgd_step_reference(x, x0, grad, *scalars)
    step = torch.compile(ops.l2_pgd_step, fullgraph=True)
    torch.testing.assert_close(step(x, x0, grad, *scalars), expected, rtol=RTOL, atol=ATOL)

    @torch.compile(fullgraph=True)
    def step_in_place_and_double(x: torch.Tensor) -> torch.Tensor:
        return 2 * ops.l2_pgd_step_(x, x0, grad, *scalars)

    torch.testing.assert_close(step_in_place_and_double(x), 2 * expected, rtol=RTOL, atol=2 * ATOL)
    torch.testing.assert_close(x, expected, rtol=RTOL, atol=ATOL)


def test_kernel_devices_marked_constant_without_importing_dynamo() -> None:
    """uapx marks ``_kernel_devices`` for torch.compile the way the public decorator does, by hand,
    so that importing uapx (every command) does not import torch._dynamo (1.6 s); test_torch_compile
    shows the mark works, this that it is still all the decorator does and that the import stays out."""
    import subprocess

    def probe() -> int:
        return 0

    assert torch.compiler.assume_constant_result(probe) is probe
    assert vars(probe) == {"_dynamo_marked_constant": True} == vars(ops._kernel_devices)
    code = "import sys, uapx.ops, uapx.pipeline, uapx.cli; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reference_fallback(reference_only: None) -> None:
    assert ops.backend() == "reference" and ops.backend("cpu") == "reference"
    assert ops.NO_EXTENSION_ENV in ops.backend_status()
    args = sample_inputs("cpu", step_size=2.0, eps=0.5)
    expected = ops.l2_pgd_step_reference(*args)
    torch.testing.assert_close(ops.l2_pgd_step(*args), expected, rtol=0, atol=0)
    assert ops.l2_pgd_step_(*args) is args[0]
    torch.testing.assert_close(args[0], expected, rtol=0, atol=0)


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(*args, **kwargs) -> None:
        raise RuntimeError("Error building extension 'uapx_C'")

    monkeypatch.delenv(ops.NO_EXTENSION_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uapx._C", None)  # makes `import uapx._C` fail
    monkeypatch.setattr(ops, "jit_build", failing_build)
    monkeypatch.setattr(ops, "_extension", None)
    args = sample_inputs("cpu")
    with pytest.warns(RuntimeWarning, match="building it failed"):
        torch.testing.assert_close(ops.l2_pgd_step(*args), ops.l2_pgd_step_reference(*args), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.l2_pgd_step(*args)
    assert ops.backend("cpu") == "reference"
    assert "Error building extension" in ops.backend_status("cpu")


def _pgd_mnist() -> torch.Tensor:
    # A smooth model: ulp-level differences between the op and the reference stay that small over
    # the steps (in a CNN, a ReLU or max-pool kink can flip a gradient and one sample's path).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    return attacks.pgd(model, x, y, eps=2.0, steps=10, step_size=0.5)


def test_pgd_same_with_op_and_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ops.backend("cpu") == "cpu", ops.backend_status("cpu")
    fused = _pgd_mnist()
    monkeypatch.setattr(ops, "_extension", ops._Extension((), "forced by the test"))
    assert ops.backend("cpu") == "reference"
    torch.testing.assert_close(fused, _pgd_mnist(), rtol=0, atol=1e-5)
