"""Build the uapx C++/CUDA extension (uapx._C) with ninja; everything else is in pyproject.toml.

The CPU kernel is always built, the CUDA kernel too when torch is a CUDA build and a CUDA toolkit
is found (``CUDA_HOME``, else ``/usr/local/cuda``). A failed build never fails the install: a
failed CUDA build is retried without CUDA, and if that fails too, uapx installs without the
extension and ``uapx.ops`` builds it just in time on first use or runs the pure-PyTorch reference.
Wheels also carry ``csrc/`` as ``uapx/csrc/`` for that just-in-time build.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


def _cuda_home() -> str | None:
    home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    found = (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()
    return str(home) if found else None


CUDA_HOME = _cuda_home()
if CUDA_HOME:  # before torch guesses it from the nvcc on PATH, which may be a wrapper script
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402



def _build_config():
    """``uapx/build_config.py``, loaded by path (importing ``uapx`` needs its dependencies)."""
    path = Path(__file__).parent / "uapx" / "build_config.py"
    spec = importlib.util.spec_from_file_location("uapx_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_config()  # the sources and flags, shared with the just-in-time build in uapx/ops.py
SOURCES = [f"csrc/{name}" for name in BUILD.SOURCES]
CUDA_SOURCES = [f"csrc/{name}" for name in BUILD.CUDA_SOURCES]


def extension(with_cuda: bool) -> Extension:
    """``uapx._C``: the CPU kernel, and the CUDA kernel ``with_cuda``."""
    kwargs = dict(depends=[f"csrc/{name}" for name in BUILD.HEADERS], extra_link_args=list(BUILD.LD_FLAGS),
                  optional=True)
    cxx = list(BUILD.CXX_FLAGS)
    if with_cuda:
        return cpp_extension.CUDAExtension("uapx._C", SOURCES + CUDA_SOURCES,
                                           extra_compile_args={"cxx": cxx, "nvcc": list(BUILD.NVCC_FLAGS)}, **kwargs)
    return cpp_extension.CppExtension("uapx._C", SOURCES, extra_compile_args=cxx, **kwargs)


WITH_CUDA = bool(torch.version.cuda and CUDA_HOME)
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # No GPU to build for: build for the architectures this torch supports.
    archs = sorted({int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()})
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a // 10}.{a % 10}" for a in archs) + "+PTX"


class BuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build that warns instead of failing (the extension is optional)."""

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except Exception as err:  # no compiler, a compile error, a CUDA toolkit torch rejects, ...
            if not any(s.endswith(".cu") for ext in self.extensions for s in ext.sources):
                self.warn(f"building uapx._C failed, installing without it ({err}); "
                          "uapx.ops will build it on first use or use the pure-PyTorch reference")
                return
            self.warn(f"building uapx._C with CUDA failed ({err}); building it without CUDA")
            cpu_only = extension(with_cuda=False)
            for ext in self.extensions:  # keep the objects setuptools finalised, swap their settings
                vars(ext).update((k, v) for k, v in vars(cpu_only).items() if not k.startswith("_"))
            self.build_extensions()

    def copy_extensions_to_source(self) -> None:
        """Replace, never overwrite, the library of an editable install: a running process (a
        training run, say) has the old one mapped, and rewriting that file in place crashes it."""
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        super().copy_extensions_to_source()


class BuildPy(build_py):
    """Also ship ``csrc/`` as ``uapx/csrc/`` (an editable install reads ``csrc/`` in place)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_tree("csrc", os.path.join(self.build_lib, "uapx", "csrc"))


setup(ext_modules=[extension(WITH_CUDA)], cmdclass={"build_ext": BuildExtension, "build_py": BuildPy})
