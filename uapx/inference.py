"""Fast batched inference for evaluating perturbations: many perturbations per forward pass.

:func:`predict_many` gives the predictions on ``clamp(x + v_u, 0, 1)`` for every perturbation
``v_u`` of a stack, with the images of several perturbations in one large forward batch, under
``torch.inference_mode``, with the model and the inputs in channels-last memory layout (faster
convolutions on CPUs), optionally under bfloat16 autocast and optionally through a cached
``torch.compile``.  On a CPU with several intra-op threads the passes run side by side, one
thread each (:func:`side_by_side`): a cache-sized pass gains little from a second thread.  The
float32 path gives the predictions of plain eager float32 batches (the tests compare them).

bfloat16 comes in two forms (see :mod:`uapx.evaluate`).  *Refined* (the default where the device
has bfloat16 arithmetic): every prediction is made in bfloat16 by a copy of the model with its
BatchNorms folded into the convolutions, and those whose top-two logits are closer than a margin
are made again in float32 by the model itself.  If no difference of two logits is off by more
than ``D`` (the spread of a prediction's logit errors, largest minus smallest), an argmax whose
top-two margin exceeds ``D`` is float32's; :func:`bf16_logit_error` measures the largest spread
on the run's own checked images and :func:`refine_margin` sets the margin at
``BF16_ERROR_SAFETY`` times it, so the predictions are float32's unless an image's spread exceeds
that many times the largest seen.  *Plain* (``precision="bfloat16"``): bfloat16 argmaxes,
used only after :func:`bf16_agrees` found that they agree with float32 often enough.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from . import distributed

PRECISIONS = ("auto", "float32", "bfloat16")
BF16_MIN_AGREEMENT = 0.999  # bfloat16 evaluation only where its predictions agree with float32 this often
# ... on at least this many checked predictions (the first perturbations' images, as many as it takes):
# on fewer a single disagreement already fails the bar, so a model that disagrees 2 times in 1,000
# (resnet-small on CIFAR-10: 45 in 25,000) would pass a 600-prediction check one time in three.
BF16_MIN_CHECKED = 3000
# Refined bfloat16: the safety factor of refine_margin, and the largest share of the checked
# predictions that may need remaking in float32 for refined bfloat16 to be used at all.
BF16_ERROR_SAFETY = 2.0
BF16_MAX_REFINED = 0.5
# Input elements per forward pass (256 Ki floats = 1 MB): rows = this // pixels, at least MIN_ROWS.
# Measured on 2 AMD EPYC (Zen 4) cores, one thread, per image, channels-last: the MNIST CNN 92 us
# (bfloat16) and 200 us (float32) at 128-256 rows against 182 and 319 us at 4,096; resnet-small
# 0.76 / 1.8 ms at 64-128 rows against 1.5 / 3.1 ms at 1,365 (a large pass's activations leave
# the cache). The float32 predictions do not depend on it (tests/test_fast_evaluation.py).
ROW_ELEMENTS = 1 << 18
MIN_ROWS = 8
# Input elements of the images read at once (16 Mi floats = 64 MB: 5,461 CIFAR-10 images, 111 at
# 224 x 224); the passes cut from a chunk are all full but its last.
CHUNK_ELEMENTS = 1 << 24
# Forward passes side by side on a CPU (side_by_side): at most this many at once, each holding its
# pass's activations; beyond it, the threads are shared out among them.
MAX_WORKERS = 8

_PREPARED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def bf16_supported(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix arithmetic is native on ``device`` (AVX-512 BF16 / AMX on CPUs)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def rows_per_forward(sample_shape: tuple[int, ...] | torch.Size) -> int:
    """Images per forward pass for inputs of ``sample_shape`` (334 for MNIST, 85 for CIFAR-10, 8 at 224 x 224)."""
    return max(MIN_ROWS, min(4096, ROW_ELEMENTS // max(int(torch.Size(sample_shape).numel()), 1)))


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with each BatchNorm folded into the convolution before it (``torch.fx``; eval
    mode), or ``model`` itself where it cannot be traced.  Float32 logits move by about 1e-6 (the
    refined-bfloat16 check measures the bfloat16 copy's error as a whole); a bfloat16 pass of
    resnet-small is 1.25-1.33x faster folded (one thread, 85 images)."""
    if not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    except Exception:  # noqa: BLE001 - not traceable (control flow, custom modules): unfolded
        return model


def _copy_name(bf16: bool) -> str:
    """The cache key of a model's eager inference copy: the folded one for bfloat16 passes."""
    return "bf16" if bf16 else "eager"


def prepared_model(model: nn.Module, *, compile: bool = False, bf16: bool = False) -> nn.Module:
    """A channels-last copy of ``model`` for inference, cached per model until its parameters or
    buffers change; ``bf16=True``: the copy for bfloat16 passes, its BatchNorms folded into the
    convolutions (:func:`_fold_batchnorm`); ``compile=True`` runs it through ``torch.compile``
    (compiled once per copy), falling back to eager with one warning where compiling fails."""
    stamp = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    cache = _PREPARED.get(model)
    if cache is None or cache["stamp"] != stamp:  # new, or trained / reloaded since: copy again
        cache = _PREPARED[model] = {"stamp": stamp}
    base = _copy_name(bf16)
    key = f"{base}-compiled" if compile else base
    if key not in cache:
        if base not in cache:
            m = copy.deepcopy(model).eval()
            if bf16:
                m = _fold_batchnorm(m)
            try:
                m = m.to(memory_format=torch.channels_last)
            except RuntimeError:  # a model with parameters of another rank
                pass
            for p in m.parameters():
                p.requires_grad_(False)
            cache[base] = m
        if compile:
            try:
                cache[key] = torch.compile(cache[base], dynamic=False)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means eager
                warnings.warn(f"uapx: torch.compile failed ({type(exc).__name__}: {exc}); evaluating eagerly",
                              stacklevel=2)
                cache[key] = cache[base]
    return cache[key]


def _prepare(model: nn.Module, copies: Iterable[tuple[bool, bool]]) -> None:
    """Make the prepared copies ``(bf16, compile)`` of ``model`` here, before any worker of
    :func:`side_by_side` needs one (workers would otherwise race to build them)."""
    for bf16, compile in copies:
        prepared_model(model, compile=compile, bf16=bf16)


def _logits(original: nn.Module, xb: torch.Tensor, *, bf16: bool, compile: bool) -> torch.Tensor:
    """Float32 logits ``(B, K)`` of ``xb`` (computed in bfloat16 where ``bf16``, by the folded
    copy); a compiled model that fails at run time is replaced by the eager one (one warning)."""
    if xb.dim() == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    net = prepared_model(original, compile=compile, bf16=bf16)
    base = _copy_name(bf16)
    cache = _PREPARED[original]
    with torch.autocast("cuda" if xb.is_cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
        if net is not cache[base]:
            try:
                return net(xb).float()
            except Exception as exc:  # noqa: BLE001 - a compiled graph that fails at run time
                warnings.warn(f"uapx: the compiled model failed ({type(exc).__name__}: {exc}); evaluating eagerly",
                              stacklevel=3)
                cache[f"{base}-compiled"] = cache[base]
        return cache[base](xb).float()


def _passes(x: torch.Tensor, vs: torch.Tensor, rows: int | None, device: str):
    """The forward passes of a batched evaluation: yields ``(inputs, flat)``, the images
    ``clamp(x + v, 0, 1)`` of one pass ``(B, C, H, W)`` and their positions ``(B,)`` in a
    ``(U, N)`` prediction table, flattened.  Images outer, in chunks of up to
    :data:`CHUNK_ELEMENTS` (each chunk is read once: ``x`` may read files on demand); within a
    chunk the (perturbation, image) pairs are cut into passes of exactly ``rows`` images, the last
    one excepted."""
    n, u = x.shape[0], vs.shape[0]
    rows = rows or rows_per_forward(x.shape[1:])
    chunk = max(1, min(n, max(rows, CHUNK_ELEMENTS // max(int(torch.Size(x.shape[1:]).numel()), 1))))
    vd = vs.to(device)
    for s in range(0, n, chunk):
        xb = x[s:s + chunk].to(device)
        c = xb.shape[0]
        for a in range(0, u * c, rows):
            q = torch.arange(a, min(a + rows, u * c))
            g, i = q // c, q % c
            inp = (xb.index_select(0, i.to(xb.device)) + vd.index_select(0, g.to(vd.device))).clamp_(0.0, 1.0)
            yield inp, g * n + s + i


def _gathered(out: torch.Tensor) -> torch.Tensor:
    """A ``(U, n_rank)`` table of this rank's images -> ``(U, N_all)`` over every rank, in rank order."""
    if distributed.active():
        out = distributed.all_gather_rows(out.t().contiguous()).t().contiguous()
    return out


def _margins(logits: torch.Tensor) -> torch.Tensor:
    """Gap ``(B,)`` between the largest and the second-largest logit of each row."""
    top = logits.topk(min(2, logits.shape[1]), 1).values
    return top[:, 0] - top[:, -1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("inf"))


class PassPool(ThreadPoolExecutor):
    """The workers of :func:`side_by_side`: ``workers`` threads, each running torch on ``threads``
    intra-op threads."""

    def __init__(self, workers: int, threads: int) -> None:
        super().__init__(workers, thread_name_prefix="uapx-pass", initializer=torch.set_num_threads,
                         initargs=(threads,))
        self.workers = workers


@contextlib.contextmanager
def side_by_side(device: str = "cpu", *, compile: bool = False) -> Iterator[PassPool | None]:
    """A pool of workers (:class:`PassPool`) for forward passes, one per intra-op thread torch has
    (``torch.get_num_threads()``), at most :data:`MAX_WORKERS` (then each gets an equal share of
    the threads), or None (passes run in the caller, with torch's threads): on a GPU, with
    ``compile`` (Dynamo is not thread-safe) or with one thread.  While inside, the caller runs one
    thread per operation; its count is restored on exit.  Measured on 2 AMD EPYC cores, bfloat16
    passes of 334 MNIST / 85 CIFAR-10 images: 149 / 733 us per image with two intra-op threads,
    113 / 660 us side by side (214 / 1,157 us on one thread)."""
    n = torch.get_num_threads()
    if n <= 1 or compile or str(device).startswith("cuda"):
        yield None
        return
    workers = min(n, MAX_WORKERS)
    torch.set_num_threads(1)
    pool = PassPool(workers, n // workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(n)


def _submit(pool: PassPool | None, fn: Callable, *args: Any) -> Future:
    """``fn(*args)`` in ``pool`` under inference mode, or here and now without one."""
    def job():
        with torch.inference_mode():
            return fn(*args)

    if pool is not None:
        return pool.submit(job)
    done: Future = Future()
    done.set_result(job())
    return done


def _in_order(pool: PassPool | None, fn: Callable, items: Iterable) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` for each item, in order; with ``pool``, up to two per worker in flight
    (so at most that many passes' inputs are held at once)."""
    ahead = 2 * (pool.workers if pool is not None else 1)
    waiting: deque = deque()
    for item in items:
        waiting.append((item, _submit(pool, fn, item)))
        if len(waiting) >= ahead or pool is None:
            first, fut = waiting.popleft()
            yield first, fut.result()
    while waiting:
        first, fut = waiting.popleft()
        yield first, fut.result()


@torch.inference_mode()
def predict_many(model: nn.Module, x: torch.Tensor, vs: torch.Tensor, *, device: str = "cpu",
                 bf16: bool = False, refine_below: float | None = None, compile: bool = False,
                 rows: int | None = None, bar: tqdm | None = None, stats: dict | None = None) -> torch.Tensor:
    """Predictions ``(U, N)`` on ``clamp(x + vs[u], 0, 1)`` for images ``x`` ``(N, C, H, W)`` and
    perturbations ``vs`` ``(U, C, H, W)``.

    Each forward pass holds about ``rows`` images (default :func:`rows_per_forward`): several
    perturbations of a chunk of images; on a CPU the passes run side by side
    (:func:`side_by_side`).  With ``bf16`` and ``refine_below`` (refined bfloat16), every
    prediction whose bfloat16 top-two margin is below ``refine_below`` is made again in float32
    (eager; in passes of ``rows`` such images); ``stats["refined"]`` and ``stats["predicted"]``
    count them on this rank.  Under torch.distributed ``x`` is this rank's shard and the
    predictions of every rank are returned, in rank order (``(U, N_all)``).  ``bar`` is advanced
    by the number of images predicted.
    """
    rows = rows or rows_per_forward(x.shape[1:])
    refining = bf16 and refine_below is not None
    _prepare(model, [(bf16, compile)] + ([(False, False)] if refining else []))
    out = torch.empty(vs.shape[0] * x.shape[0], dtype=torch.long)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, positions) to remake in float32
    remakes: list[tuple[torch.Tensor, Future]] = []  # (positions, their float32 predictions)

    def predicted(item: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = _logits(model, item[0], bf16=bf16, compile=compile)
        return logits.argmax(1).cpu(), (_margins(logits) < refine_below).cpu() if refining else None

    def exact(imgs: torch.Tensor) -> torch.Tensor:
        return _logits(model, imgs, bf16=False, compile=False).argmax(1).cpu()

    def remake(pool: PassPool | None) -> None:
        if pending:
            imgs, at = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            remakes.append((at, _submit(pool, exact, imgs)))
            pending.clear()

    with side_by_side(device, compile=compile) as pool:
        for (inp, flat), (pred, near) in _in_order(pool, predicted, _passes(x, vs, rows, device)):
            out[flat] = pred
            if near is not None and bool(near.any()):
                pending.append((inp[near.to(inp.device)], flat[near]))
                if sum(p[1].numel() for p in pending) >= rows:  # a full float32 pass
                    remake(pool)
            if bar is not None:
                bar.update(inp.shape[0])
        remake(pool)
        for at, fut in remakes:
            out[at] = fut.result()
    if stats is not None:
        stats["refined"] = stats.get("refined", 0) + sum(int(at.numel()) for at, _ in remakes)
        stats["predicted"] = stats.get("predicted", 0) + out.numel()
    return _gathered(out.view(vs.shape[0], x.shape[0]))


class Check(NamedTuple):
    """The bfloat16 check's result (:func:`bf16_logit_error`), tables ``(U, N)`` gathered over ranks."""

    f32: torch.Tensor  # float32 predictions
    b16: torch.Tensor  # bfloat16 predictions
    error: float  # largest |bfloat16 logit - float32 logit|, every image and class
    spread: float  # largest spread (max - min over classes) of one prediction's logit errors
    margins: torch.Tensor  # bfloat16 top-two margins


@torch.inference_mode()
def bf16_logit_error(model: nn.Module, x: torch.Tensor, vs: torch.Tensor, *, device: str = "cpu",
                     compile: bool = False, rows: int | None = None, bar: tqdm | None = None) -> Check:
    """The bfloat16 check: every prediction on ``clamp(x + vs[u], 0, 1)`` made in both precisions.

    Returns a :class:`Check`: both precisions' predictions, the largest logit error and the
    largest spread of one prediction's logit errors over every image (and every torchrun rank),
    and the bfloat16 top-two margins (for :func:`refine_margin`'s share).  The spread bounds how
    far any difference of two logits, a top-two margin among them, moved.  ``bar`` is advanced
    twice per image.
    """
    rows = rows or rows_per_forward(x.shape[1:])
    size = vs.shape[0] * x.shape[0]
    f32, b16 = torch.empty(size, dtype=torch.long), torch.empty(size, dtype=torch.long)
    margin, err, spread = torch.empty(size), 0.0, 0.0
    _prepare(model, [(False, compile), (True, compile)])

    def both(item: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        lf = _logits(model, item[0], bf16=False, compile=compile)
        lb = _logits(model, item[0], bf16=True, compile=compile)
        diff = lb - lf
        e, sp = (float(diff.abs().max()), float((diff.amax(1) - diff.amin(1)).max())) if diff.numel() else (0.0, 0.0)
        return lf.argmax(1).cpu(), lb.argmax(1).cpu(), _margins(lb).cpu(), e, sp

    with side_by_side(device, compile=compile) as pool:
        for (inp, flat), (pf, pb, m, e, sp) in _in_order(pool, both, _passes(x, vs, rows, device)):
            f32[flat], b16[flat], margin[flat] = pf, pb, m
            err, spread = max(err, e), max(spread, sp)
            if bar is not None:
                bar.update(2 * inp.shape[0])
    shape = (vs.shape[0], x.shape[0])
    return Check(_gathered(f32.view(shape)), _gathered(b16.view(shape)), distributed.all_reduce_scalar(err, "max"),
                 distributed.all_reduce_scalar(spread, "max"), _gathered(margin.view(shape)))


def refine_margin(max_spread: float) -> float:
    """The top-two margin below which a refined-bfloat16 prediction is remade in float32:
    ``BF16_ERROR_SAFETY * max_spread`` (an argmax cannot change while no difference of two logits
    moves by more than its margin)."""
    return BF16_ERROR_SAFETY * max_spread


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """``(equal, total)`` entries of two prediction tensors, summed over every torchrun rank."""
    return int((a == b).sum()), int(a.numel())


def bf16_check_count(n_images: int, n_perturbations: int) -> int:
    """How many of ``n_perturbations`` perturbations (an even number: +v and -v of whole UAPs, at
    least 2) the bfloat16 check computes in both precisions, for :data:`BF16_MIN_CHECKED`
    predictions on ``n_images`` images (the clean images count once)."""
    need = -(-max(BF16_MIN_CHECKED - n_images, 0) // max(n_images, 1))
    return min(n_perturbations, max(2, need + need % 2))


def bf16_agrees(pred_bf16: torch.Tensor, pred_f32: torch.Tensor) -> tuple[bool, float]:
    """Whether bfloat16 predictions agree with float32 ones on at least ``BF16_MIN_AGREEMENT`` of
    the entries; returns ``(ok, agreement)``.  Predictions are already gathered over ranks, so
    every rank decides the same."""
    eq, total = agreement(pred_bf16, pred_f32)
    rate = eq / max(total, 1)
    return rate >= BF16_MIN_AGREEMENT, rate
