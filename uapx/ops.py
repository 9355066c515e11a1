"""The fused PGD-L2 step: extension loading, the pure-PyTorch reference, ``backend()``.

The step, exactly (per sample over dim 0, flattened)::

    g_hat = g / (||g||_2 + 1e-12);  x' = x + step_size * g_hat;  delta = x' - x0
    delta = delta * min(1, eps / ||delta||_2);  x_new = clamp(x0 + delta, lo, hi)

:func:`l2_pgd_step` and :func:`l2_pgd_step_` run the custom ops ``torch.ops.uapx.l2_pgd_step``
and ``torch.ops.uapx.l2_pgd_step_`` (``csrc/``) where a kernel exists for the inputs: float32 on
the CPU; float32, float16 and bfloat16 (float32 arithmetic) on CUDA. Everything else, and every
call when the extension is missing, runs :func:`l2_pgd_step_reference`.

The extension is found on first use, never at import: the ``uapx._C`` module that ``pip install``
builds, else a just-in-time build of the sources into ``~/.cache/uapx/ext-<hash>``, else the
reference with one warning (:func:`backend_status` says why). ``UAPX_NO_EXTENSION=1`` forces the
reference.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build_config

__all__ = ["l2_pgd_step", "l2_pgd_step_", "l2_pgd_step_reference", "backend", "backend_status", "jit_build"]

NO_EXTENSION_ENV = "UAPX_NO_EXTENSION"
# The dtypes each device's kernel takes.
KERNEL_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def l2_pgd_step_reference(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float,
                          eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Pure-PyTorch L2 PGD step; the fallback and the test oracle.

    Args:
        x, x0, grad: ``(N, ...)`` current iterate, clean input, loss gradient at ``x``.
    Returns:
        ``(N, ...)`` the next iterate, in ``x``'s shape and dtype.
    """
    n = x.shape[0]
    xf, x0f, gf = (t.reshape(n, -1).float() for t in (x, x0, grad))
    gnorm = gf.norm(dim=1, keepdim=True)
    delta = xf + step_size * gf / (gnorm + 1e-12) - x0f
    dnorm = delta.norm(dim=1, keepdim=True)
    delta = delta * torch.clamp(eps / dnorm, max=1.0)  # eps / 0 = inf -> factor 1
    return (x0f + delta).clamp_(lo, hi).reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------- the extension

@dataclass(frozen=True)
class _Extension:
    """What loading the extension gave: the device types with a kernel, or why there are none."""

    devices: tuple[str, ...]
    reason: str = ""


_extension: _Extension | None = None
_lock = threading.Lock()


def _get_extension() -> _Extension:
    global _extension
    if _extension is None:
        with _lock:
            if _extension is None:
                _extension = _load_extension()
    return _extension


def _load_extension() -> _Extension:
    flag = os.environ.get(NO_EXTENSION_ENV, "")
    if flag not in ("", "0"):
        return _Extension((), f"{NO_EXTENSION_ENV}={flag} is set")
    try:
        importlib.import_module("uapx._C")  # the built library; loading it registers the ops
    except ImportError as missing:
        try:
            jit_build()
        except Exception as err:  # a compiler error, a missing compiler, missing sources, ...
            first_line = (str(err).strip().splitlines() or [""])[0][:200]
            reason = f"uapx._C is not built ({missing}) and building it failed ({type(err).__name__}: {first_line})"
            warnings.warn(f"uapx: {reason}; the PGD step runs the pure-PyTorch reference (the full error: "
                          "python -c 'import uapx.ops; uapx.ops.jit_build()')", RuntimeWarning)
            return _Extension((), reason)
    op = torch.ops.uapx.l2_pgd_step.default
    if not op.has_kernel_for_dispatch_key("Meta"):  # the fake kernels need the ops to exist
        torch.library.register_fake("uapx::l2_pgd_step", _l2_pgd_step_fake)
        torch.library.register_fake("uapx::l2_pgd_step_", _l2_pgd_step_inplace_fake)
    return _Extension(tuple(d for d in ("cpu", "cuda") if op.has_kernel_for_dispatch_key(d.upper())))


def _kernel_devices() -> tuple[str, ...]:
    """The device types with a fused kernel; torch.compile runs this once while tracing."""
    return _get_extension().devices


# What torch.compiler.assume_constant_result(_kernel_devices) does, without importing torch._dynamo
# here (1.6 s, every uapx command; tests/test_ops.py checks the decorator still does just this).
_kernel_devices._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _source_dir() -> Path:
    """``csrc/``: inside the installed package (wheels) or next to it (source checkouts)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "l2_pgd_step.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the uapx C++ sources are in neither {here / 'csrc'} nor {here.parent / 'csrc'}")


def jit_build(build_dir: Path | None = None, with_cuda: bool | None = None) -> None:
    """Compile the extension with ``torch.utils.cpp_extension.load`` and load it into this process.

    Args:
        build_dir: where to build; by default ``~/.cache/uapx/ext-<hash of sources, flags, torch>``,
            so a rebuilt source tree or another torch gets a fresh folder.
        with_cuda: compile the CUDA kernel too; by default when a GPU and nvcc are present.
    """
    from torch.utils import cpp_extension

    src = _source_dir()
    if with_cuda is None:
        home = cpp_extension.CUDA_HOME
        with_cuda = (torch.cuda.is_available() and home is not None
                     and (Path(home) / "include" / "cuda_runtime.h").is_file())
    b = build_config
    sources = [*b.SOURCES, *(b.CUDA_SOURCES if with_cuda else ())]
    cflags, cuda_cflags, ldflags = list(b.CXX_FLAGS), list(b.NVCC_FLAGS), list(b.LD_FLAGS)
    if build_dir is None:
        key = hashlib.sha256(repr((torch.__version__, cflags, cuda_cflags, ldflags)).encode())
        for name in (*b.HEADERS, *sources):
            key.update((src / name).read_bytes())
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        build_dir = cache / "uapx" / f"ext-{key.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="uapx_C", sources=[str(src / n) for n in sources], extra_cflags=cflags,
                       extra_cuda_cflags=cuda_cflags, extra_ldflags=ldflags, build_directory=str(build_dir),
                       is_python_module=False)


# ----------------------------------------------------------------------------- the public API

def backend(device: str | torch.device | None = None) -> str:
    """Which implementation :func:`l2_pgd_step` runs for float32 inputs on ``device``.

    Args:
        device: a device or device type; by default ``"cuda"`` when a GPU is available, else ``"cpu"``.
    Returns:
        ``"cpu"`` or ``"cuda"`` (that device's fused kernel) or ``"reference"``.
    """
    kind = _device_type(device)
    return kind if kind in _kernel_devices() else "reference"


def backend_status(device: str | torch.device | None = None) -> str:
    """One line saying why :func:`backend` is ``"reference"`` for ``device``; empty when it is not."""
    kind = _device_type(device)
    ext = _get_extension()
    if kind in ext.devices:
        return ""
    if ext.reason:
        return ext.reason
    return f"the uapx extension has no {kind} kernel (built for: {', '.join(ext.devices)})"


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _has_kernel(x: torch.Tensor) -> bool:
    """Whether the op has a kernel for ``x``'s device and dtype; the op checks the other inputs."""
    kind = x.device.type
    return x.dtype in KERNEL_DTYPES.get(kind, ()) and kind in _kernel_devices()


def l2_pgd_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """One L2 PGD step (see the module docstring).

    Args:
        x, x0, grad: ``(N, ...)`` current iterate, clean input, loss gradient at ``x``; one shape,
            dtype and device.
        step_size, eps: the step length and the radius of the L2 ball around ``x0``.
        lo, hi: the box the result is clamped to.
    Returns:
        ``(N, ...)`` the next iterate, a new contiguous tensor.
    """
    if _has_kernel(x):
        return torch.ops.uapx.l2_pgd_step.default(x, x0, grad, float(step_size), float(eps), float(lo),
                                                  float(hi))
    return l2_pgd_step_reference(x, x0, grad, step_size, eps, lo, hi)


def l2_pgd_step_(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                 lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """In-place variant of :func:`l2_pgd_step`: overwrites and returns ``x``."""
    if _has_kernel(x):
        torch.ops.uapx.l2_pgd_step_.default(x, x0, grad, float(step_size), float(eps), float(lo), float(hi))
        return x
    return x.copy_(l2_pgd_step_reference(x, x0, grad, step_size, eps, lo, hi))


# ----------------------------------------------------------------------------- fake (meta) kernels
# Registered when the extension loads; torch.compile and meta tensors run these instead of a kernel.

def _check_fake(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor) -> None:
    torch._check(x.dim() >= 1, lambda: "uapx::l2_pgd_step: x must have a batch dimension")
    torch._check(x.shape == x0.shape == grad.shape,
                 lambda: f"uapx::l2_pgd_step: shapes differ: {x.shape}, {x0.shape}, {grad.shape}")
    torch._check(x.dtype == x0.dtype == grad.dtype,
                 lambda: f"uapx::l2_pgd_step: dtypes differ: {x.dtype}, {x0.dtype}, {grad.dtype}")
    torch._check(x.device == x0.device == grad.device,
                 lambda: f"uapx::l2_pgd_step: devices differ: {x.device}, {x0.device}, {grad.device}")


def _l2_pgd_step_fake(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                      lo: float, hi: float) -> torch.Tensor:
    _check_fake(x, x0, grad)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _l2_pgd_step_inplace_fake(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float,
                              eps: float, lo: float, hi: float) -> None:
    _check_fake(x, x0, grad)
