"""What ``uapx info`` and ``report.json`` say about the software and hardware."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, ops


def collect(registry=None) -> dict[str, str]:
    """Versions of uapx, Python, torch, CUDA; the device; the kernel backend; loaded plugins."""
    import numpy
    import pluggy

    cuda = torch.version.cuda or "none"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; no GPU)"
    backend = ops.backend()
    status = getattr(ops, "backend_status", None)
    reason = status() if callable(status) else ""
    out = {
        "uapx": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda (torch built with)": cuda,
        "numpy": numpy.__version__,
        "pluggy": pluggy.__version__,
        "device": device,
        "kernel backend": backend + (f" ({reason})" if reason and backend == "reference" else ""),
    }
    if registry is not None:
        loaded = [f"{r.name} ({r.distribution} {r.version})" for r in registry.records if r.ok]
        failed = [f"{r.name} ({r.error})" for r in registry.records if r.error]
        out["plugins loaded"] = ", ".join(loaded) or "none"
        if failed:
            out["plugins failed"] = "; ".join(failed)
        out.update(registry.environment())
    return out
