"""The extension's sources and compiler flags: the one list that ``setup.py`` (the ahead-of-time
build of ``uapx._C``) and :func:`uapx.ops.jit_build` (the just-in-time build) both read.

Standard library only: ``setup.py`` loads this file by path, before uapx's dependencies exist.
Paths are relative to ``csrc/``.
"""
from __future__ import annotations

import sys

HEADERS = ("l2_pgd_step.h",)
SOURCES = ("l2_pgd_step.cpp",)  # the CPU kernel and the op schema, always built
CUDA_SOURCES = ("cuda/l2_pgd_step.cu",)  # the CUDA kernel, built where a toolkit is found
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
# -ffp-contract=off / --fmad=false: no fused multiply-adds, so the kernels round as the reference does
CXX_FLAGS = ("-O3", "-ffp-contract=off", *OPENMP)
NVCC_FLAGS = ("-O3", "--fmad=false")
LD_FLAGS = OPENMP
