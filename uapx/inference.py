"""Fast batched inference for evaluating perturbations: many perturbations per forward pass.

:func:`predict_many` gives the predictions on ``clamp(x + v_u, 0, 1)`` for every perturbation
``v_u`` of a stack, with the images of several perturbations in one large forward batch, under
``torch.inference_mode``, with the model and the inputs in channels-last memory layout (faster
convolutions on CPUs), optionally under bfloat16 autocast and optionally through a cached
``torch.compile``.  On a CPU with several intra-op threads the passes run side by side, one
thread each (:func:`side_by_side`): a cache-sized pass gains little from a second thread.  The
float32 path gives the predictions of plain eager float32 batches (the tests compare them).

Cheaper arithmetic comes in two forms (see :mod:`uapx.evaluate`).  *Refined* (the default): a
ladder of rungs, cheapest first, that ends in float32: int8 (:mod:`uapx.quantized`, where the CPU
has VNNI), bfloat16 (where the device has bfloat16 arithmetic; a copy of the model with its
BatchNorms folded into the convolutions), float32 (the model itself).  Every prediction is made
on the first rung, and those whose top-two logits are closer than the rung's margin go up one
rung and are made again.  If no difference of two logits is off by more than ``D`` (the spread of
a prediction's logit errors against float32, largest minus smallest), an argmax whose top-two
margin exceeds ``D`` is float32's; :func:`logit_errors` measures each rung's largest spread on
the run's own checked images and :func:`refine_margin` sets its margin at ``BF16_ERROR_SAFETY``
times it, so the predictions are float32's unless an image's spread exceeds that many times the
largest seen.  *Plain* (``precision="bfloat16"``): bfloat16 argmaxes, used only after
:func:`bf16_agrees` found that they agree with float32 often enough.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, quantized

PRECISIONS = ("auto", "float32", "bfloat16")
# The rungs refined evaluation may start from, cheapest first; float32, the model itself, ends every ladder.
RUNGS = ("int8", "bfloat16")
BF16_MIN_AGREEMENT = 0.999  # bfloat16 evaluation only where its predictions agree with float32 this often
# ... on at least this many checked predictions (the first perturbations' images, as many as it takes):
# on fewer a single disagreement already fails the bar, so a model that disagrees 2 times in 1,000
# (resnet-small on CIFAR-10: 45 in 25,000) would pass a 600-prediction check one time in three.
BF16_MIN_CHECKED = 3000
# Refined bfloat16: the safety factor of refine_margin, and the largest share of the checked
# predictions that may need remaking in float32 for refined bfloat16 to be used at all.
BF16_ERROR_SAFETY = 2.0
BF16_MAX_REFINED = 0.5
# The int8 rung is used where at most this share of the checked predictions would go up to the
# next rung: a pass costs 0.6 of a bfloat16 one (resnet-small; 0.5 for the MNIST CNN), so beyond
# a share of 0.4 it costs more than it saves; 0.3 leaves room for the float32 remakes it also sends.
INT8_MAX_REFINED = 0.3
# The int8 copy's activation ranges are observed on at most this many clean images.
INT8_CALIBRATION_IMAGES = 256
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


def _copy_name(precision: str) -> str:
    """The cache key of a model's eager inference copy in ``precision``: the model's own copy for
    float32, the folded one for bfloat16, the calibrated one for int8."""
    return {"float32": "eager", "bfloat16": "bf16", "int8": "int8"}[precision]


def _stamp(model: nn.Module) -> tuple:
    """What the prepared copies of ``model`` were made from: its tensors and their versions."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _cache(model: nn.Module) -> dict:
    """The prepared copies of ``model``, emptied when its parameters or buffers changed since."""
    stamp = _stamp(model)
    cache = _PREPARED.get(model)
    if cache is None or cache["stamp"] != stamp:  # new, or trained / reloaded since: copy again
        cache = _PREPARED[model] = {"stamp": stamp}
    return cache


def prepared_model(model: nn.Module, *, compile: bool = False, precision: str = "float32") -> nn.Module:
    """A channels-last copy of ``model`` for inference, cached per model until its parameters or
    buffers change; ``precision="bfloat16"``: the copy for bfloat16 passes, its BatchNorms folded
    into the convolutions (:func:`_fold_batchnorm`); ``"int8"``: the copy :func:`calibrate_int8`
    made (KeyError before); ``compile=True`` runs it through ``torch.compile`` (compiled once per
    copy; never the int8 one), falling back to eager with one warning where compiling fails."""
    cache = _cache(model)
    base = _copy_name(precision)
    if precision == "int8":
        return cache[base]
    key = f"{base}-compiled" if compile else base
    if key not in cache:
        if base not in cache:
            m = copy.deepcopy(model).eval()
            if precision == "bfloat16":
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


def int8_supported(device: str = "cpu") -> bool:
    """Whether refined evaluation may start from int8 here: native int8 arithmetic
    (:func:`uapx.quantized.supported`) in a single process (under torchrun every rank would
    calibrate its own copy on its own shard)."""
    return quantized.supported(device) and not distributed.active()


def calibrate_int8(model: nn.Module, images: torch.Tensor) -> bool:
    """Make the int8 copy of ``model`` (:func:`uapx.quantized.quantize` of its folded copy), its
    activation ranges observed on the first :data:`INT8_CALIBRATION_IMAGES` of ``images``
    ``(N, C, H, W)`` (a seeded draw already, so no selection); cached like the other copies, the
    latest calibration replacing any earlier.  Returns whether there is one (False where the
    model cannot be quantized)."""
    q = quantized.quantize(prepared_model(model, precision="bfloat16"), images[:INT8_CALIBRATION_IMAGES])
    cache = _cache(model)
    if q is None:
        cache.pop("int8", None)
        return False
    cache["int8"] = q
    return True


def has_int8(model: nn.Module) -> bool:
    """Whether :func:`calibrate_int8` made a copy of ``model`` that is still current."""
    return "int8" in _cache(model)


def _prepare(model: nn.Module, copies: Iterable[tuple[str, bool]]) -> None:
    """Make the prepared copies ``(precision, compile)`` of ``model`` here, before any worker of
    :func:`side_by_side` needs one (workers would otherwise race to build them)."""
    for precision, compile in copies:
        prepared_model(model, compile=compile, precision=precision)


def _logits(original: nn.Module, xb: torch.Tensor, *, precision: str, compile: bool) -> torch.Tensor:
    """Float32 logits ``(B, K)`` of ``xb`` computed in ``precision`` (bfloat16 by the folded copy,
    int8 by the calibrated one); a compiled model that fails at run time is replaced by the eager
    one (one warning)."""
    if xb.dim() == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    net = prepared_model(original, compile=compile, precision=precision)  # int8: never compiled
    base = _copy_name(precision)
    cache = _PREPARED[original]
    with torch.autocast("cuda" if xb.is_cuda else "cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
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
                 precision: str = "float32", ladder: Sequence[tuple[str, float]] = (), compile: bool = False,
                 rows: int | None = None, bar: tqdm | None = None, stats: dict | None = None) -> torch.Tensor:
    """Predictions ``(U, N)`` on ``clamp(x + vs[u], 0, 1)`` for images ``x`` ``(N, C, H, W)`` and
    perturbations ``vs`` ``(U, C, H, W)``, made in ``precision`` (``"float32"``, ``"bfloat16"``).

    Each forward pass holds about ``rows`` images (default :func:`rows_per_forward`): several
    perturbations of a chunk of images; on a CPU the passes run side by side
    (:func:`side_by_side`).  ``ladder`` (refined evaluation): ``(precision, margin)`` rungs,
    cheapest first, float32 above the last; every prediction is made on the first rung, and one
    whose top-two margin is below its rung's margin is made again on the next rung (eager; in
    passes of ``rows`` such images), and so on up.  ``stats["remade"]`` counts the predictions
    made on each rung above the first, ``stats["refined"]`` those made in float32 and
    ``stats["predicted"]`` all, on this rank.  Under torch.distributed ``x`` is this rank's shard
    and the predictions of every rank are returned, in rank order (``(U, N_all)``).  ``bar`` is
    advanced by the number of images predicted.
    """
    rows = rows or rows_per_forward(x.shape[1:])
    rungs = [*ladder, ("float32", float("nan"))] if ladder else [(precision, float("nan"))]
    _prepare(model, [(rungs[0][0], compile)] + [(p, False) for p, _ in rungs[1:]])
    out = torch.empty(vs.shape[0] * x.shape[0], dtype=torch.long)
    remade = [0] * len(rungs)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, positions) to make on the second rung
    remakes: list[tuple[torch.Tensor, Future]] = []  # (positions, their predictions from the second rung up)

    def near(logits: torch.Tensor, rung: int) -> torch.Tensor | None:
        """Which rows go up from ``rung`` (None on the last)."""
        return (_margins(logits) < rungs[rung][1]).cpu() if rung + 1 < len(rungs) else None

    def predicted(item: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = _logits(model, item[0], precision=rungs[0][0], compile=compile)
        return logits.argmax(1).cpu(), near(logits, 0)

    def climbed(imgs: torch.Tensor, rung: int = 1) -> tuple[torch.Tensor, list[int]]:
        """Predictions of ``imgs`` from ``rung`` up, and how many were made on each rung."""
        logits = _logits(model, imgs, precision=rungs[rung][0], compile=False)
        pred, up, counts = logits.argmax(1).cpu(), near(logits, rung), [0] * len(rungs)
        counts[rung] = imgs.shape[0]
        if up is not None and bool(up.any()):
            pred[up], higher = climbed(imgs[up.to(imgs.device)], rung + 1)
            counts = [a + b for a, b in zip(counts, higher)]
        return pred, counts

    def remake(pool: PassPool | None) -> None:
        if pending:
            imgs, at = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            remakes.append((at, _submit(pool, climbed, imgs)))
            pending.clear()

    with side_by_side(device, compile=compile) as pool:
        for (inp, flat), (pred, up) in _in_order(pool, predicted, _passes(x, vs, rows, device)):
            out[flat] = pred
            if up is not None and bool(up.any()):
                pending.append((inp[up.to(inp.device)], flat[up]))
                if sum(p[1].numel() for p in pending) >= rows:  # a full pass on the next rung
                    remake(pool)
            if bar is not None:
                bar.update(inp.shape[0])
        remake(pool)
        for at, fut in remakes:
            out[at], counts = fut.result()
            remade = [a + b for a, b in zip(remade, counts)]
    if stats is not None:
        by_rung = stats.setdefault("remade", {})
        for (p, _), n in list(zip(rungs, remade))[1:]:
            by_rung[p] = by_rung.get(p, 0) + n
        stats["refined"] = stats.get("refined", 0) + (remade[-1] if ladder else 0)
        stats["predicted"] = stats.get("predicted", 0) + out.numel()
    return _gathered(out.view(vs.shape[0], x.shape[0]))


class Rung(NamedTuple):
    """One cheaper precision in the check (:func:`logit_errors`), tables ``(U, N)`` gathered over ranks."""

    pred: torch.Tensor  # its predictions
    error: float  # largest |its logit - float32 logit|, every image and class
    spread: float  # largest spread (max - min over classes) of one prediction's logit errors
    margins: torch.Tensor  # its top-two margins


class Check(NamedTuple):
    """The check's result (:func:`logit_errors`): float32 predictions ``(U, N)`` and each cheaper
    precision's :class:`Rung`."""

    f32: torch.Tensor
    rungs: dict[str, Rung]


@torch.inference_mode()
def logit_errors(model: nn.Module, x: torch.Tensor, vs: torch.Tensor, *, precisions: Sequence[str] = ("bfloat16",),
                 device: str = "cpu", compile: bool = False, rows: int | None = None,
                 bar: tqdm | None = None) -> Check:
    """The check: every prediction on ``clamp(x + vs[u], 0, 1)`` made in float32 and in each of
    ``precisions`` (``"bfloat16"``; ``"int8"`` after :func:`calibrate_int8`).

    Returns a :class:`Check`: the float32 predictions and, per precision, its predictions, the
    largest logit error and the largest spread of one prediction's logit errors over every image
    (and every torchrun rank), and its top-two margins (for :func:`refine_margin`'s share).  The
    spread bounds how far any difference of two logits, a top-two margin among them, moved.
    ``bar`` is advanced ``1 + len(precisions)`` times per image.
    """
    rows = rows or rows_per_forward(x.shape[1:])
    size, names = vs.shape[0] * x.shape[0], list(precisions)
    f32 = torch.empty(size, dtype=torch.long)
    preds = {p: torch.empty(size, dtype=torch.long) for p in names}
    margins = {p: torch.empty(size) for p in names}
    err, spread = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    _prepare(model, [(p, compile) for p in ("float32", *names)])

    def made(item: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        lf = _logits(model, item[0], precision="float32", compile=compile)
        out = {}
        for p in names:
            lp = _logits(model, item[0], precision=p, compile=compile)
            diff = lp - lf
            e, sp = (float(diff.abs().max()), float((diff.amax(1) - diff.amin(1)).max())) if diff.numel() \
                else (0.0, 0.0)
            out[p] = (lp.argmax(1).cpu(), _margins(lp).cpu(), e, sp)
        return lf.argmax(1).cpu(), out

    with side_by_side(device, compile=compile) as pool:
        for (inp, flat), (pf, out) in _in_order(pool, made, _passes(x, vs, rows, device)):
            f32[flat] = pf
            for p, (pp, m, e, sp) in out.items():
                preds[p][flat], margins[p][flat] = pp, m
                err[p], spread[p] = max(err[p], e), max(spread[p], sp)
            if bar is not None:
                bar.update((1 + len(names)) * inp.shape[0])
    shape = (vs.shape[0], x.shape[0])
    return Check(_gathered(f32.view(shape)),
                 {p: Rung(_gathered(preds[p].view(shape)), distributed.all_reduce_scalar(err[p], "max"),
                          distributed.all_reduce_scalar(spread[p], "max"), _gathered(margins[p].view(shape)))
                  for p in names})


def refine_margin(max_spread: float) -> float:
    """The top-two margin below which a refined prediction goes up a rung (is made again):
    ``BF16_ERROR_SAFETY * max_spread`` (an argmax cannot change while no difference of two logits
    moves by more than its margin)."""
    return BF16_ERROR_SAFETY * max_spread


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """``(equal, total)`` entries of two prediction tensors, summed over every torchrun rank."""
    return int((a == b).sum()), int(a.numel())


def bf16_check_count(n_images: int, n_perturbations: int) -> int:
    """How many of ``n_perturbations`` perturbations (an even number: +v and -v of whole UAPs, at
    least 2) the check (:func:`logit_errors`) computes in every precision, for :data:`BF16_MIN_CHECKED`
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
