"""Scale-out with torch.distributed: ranks, sharding, reductions.

Under ``torchrun --nproc_per_node=N -m uapx analyze ...`` every rank attacks a contiguous shard of
the images; the set-based reductions (the Gram matrix, column sums, randomized range sketches)
are summed across ranks with all-reduce, so the N x d perturbation matrix is never gathered;
predictions (N integers) are gathered for the evaluation; rank 0 writes the report.  Without
torchrun every function here is a no-op for a single process.  gloo on the CPU, nccl on GPUs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True when distributed."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
    r, w = rank(), world_size()
    return slice(r * n // w, (r + 1) * n // w)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 tensors stay float64); returns ``t``."""
    if active():
        dist.all_reduce(t)
    return t


def all_reduce_scalar(v: float, op: str = "sum") -> float:
    if not active():
        return v
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return float(t)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` ``(n_r, ...)`` in rank order (for small tensors: labels,
    predictions); the shards may differ in length."""
    if not active():
        return t
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros(top, *t.shape[1:], dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def barrier() -> None:
    if active():
        dist.barrier()
