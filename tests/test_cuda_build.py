"""The CUDA kernel compiles and links with nvcc, GPU or not (tests/test_ops.py runs it on a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA_HOME = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
HAS_NVCC = (Path(CUDA_HOME) / "bin" / "nvcc").is_file()

# The just-in-time build of uapx.ops with the CUDA sources, in a fresh process: this one has
# uapx._C loaded, and a second library cannot register the uapx ops again.
BUILD = """
import pathlib, sys, torch
from uapx import ops
ops.jit_build(pathlib.Path(sys.argv[1]), with_cuda=True)
op = torch.ops.uapx.l2_pgd_step.default
assert op.has_kernel_for_dispatch_key("CPU") and op.has_kernel_for_dispatch_key("CUDA")
x0 = torch.rand(4, 3, 8, 8)
x, grad = (x0 + 0.1 * torch.randn_like(x0)).clamp(0, 1), torch.randn_like(x0)
torch.testing.assert_close(op(x, x0, grad, 2.0, 0.5, 0.0, 1.0),
                           ops.l2_pgd_step_reference(x, x0, grad, 2.0, 0.5), rtol=1e-6, atol=1e-7)
"""


def _arch_list() -> str:
    """The oldest and the newest architecture this torch supports (a GPU-less build needs a list)."""
    archs = sorted(int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit())
    return ";".join(f"{a // 10}.{a % 10}" for a in (archs[0], archs[-1])) + "+PTX"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason=f"nvcc not found in {CUDA_HOME} (set CUDA_HOME)")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")
def test_cuda_sources_compile_and_link(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_HOME": CUDA_HOME, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")
           or _arch_list()}
    run = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert any(p.name.endswith(".cuda.o") for p in tmp_path.iterdir()), "nvcc compiled nothing"
