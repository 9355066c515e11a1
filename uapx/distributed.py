"""Scale-out with torch.distributed: ranks, sharding, reductions.

Under ``torchrun --nproc_per_node=N -m uapx analyze ...`` every rank attacks a contiguous shard of
the images (:func:`shard`; the global order is rank 0's shard, then rank 1's, ...).  Every
built-in plugin reduces across ranks, so nothing of size N x d is gathered:

- ``average``, ``svd``, ``rsvd``, ``spectrum``: column sums, the d x d Gram matrix, the
  randomized SVD's d x l sketches and l x l Gram matrices are summed with all-reduce;
- ``interpretability``: per-class sums and counts, and the images' d x d covariance (or, for
  large d, the distributed randomized SVD);
- ``landscape`` and ``trajectory``: each rank takes its part of the *global* first m images
  (:func:`local_prefix`); loss sums and counts are all-reduced, the (m x steps) cosines of the
  trajectories are gathered;
- ``sgd-uap``: a distributed mini-batch (every rank takes its own images of each global batch,
  drawn as in one process; the gradient is all-reduced): one process's steps up to rounding;
- ``deepfool-uap``: iterate averaging (each rank runs a pass on its share of the sample, the
  iterates are averaged and projected): a UAP of its own, not one process's.

Every plugin but ``deepfool-uap`` gives the single-process answer up to float rounding.

Predictions (N integers) are gathered for the evaluation; rank 0 writes the report.  Without
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


_process_rank, _process_world = rank, world_size  # the parameters below shadow the names


def shard(n: int, *, rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one); ``rank`` and
    ``world`` stand in for the process group's (to reason about another rank, or in tests)."""
    r = _process_rank() if rank is None else rank
    w = _process_world() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


def local_prefix(m: int, n: int, *, rank: int | None = None, world: int | None = None) -> slice:
    """The rows of this rank's shard that belong to the global first ``m`` rows, as a slice of the
    shard (local positions).

    ``n`` is the global row count, sharded by :func:`shard` (rank 0's rows first).  In one process
    this is ``slice(0, min(m, n))``; a rank whose shard starts at or after row ``m`` gets an empty
    slice.  Pure: no communication, so it may be called on some ranks only.
    """
    rows = shard(n, rank=rank, world=world)
    m = max(int(m), 0)
    return slice(0, max(0, min(m, rows.stop) - rows.start))


def row_offset(n_local: int) -> tuple[int, int]:
    """``(start, total)``: where this rank's ``n_local`` rows begin in the global order (rank 0's
    rows first) and how many rows all ranks hold.  For row sets not cut by :func:`shard` (e.g. one
    class's rows); a collective: every rank must call it.  ``(0, n_local)`` in one process."""
    if not active():
        return 0, int(n_local)
    sizes = all_gather_rows(torch.tensor([int(n_local)], dtype=torch.long))
    return int(sizes[:_process_rank()].sum()), int(sizes.sum())


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


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s ``t`` (in place); returns ``t``."""
    if active():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if active():
        dist.barrier()
