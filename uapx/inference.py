"""Fast batched inference for evaluating perturbations: many perturbations per forward pass.

:func:`predict_many` gives the predictions on ``clamp(x + v_u, 0, 1)`` for every perturbation
``v_u`` of a stack, with the images of several perturbations in one large forward batch, under
``torch.inference_mode``, with the model and the inputs in channels-last memory layout (faster
convolutions on CPUs), optionally under bfloat16 autocast and optionally through a cached
``torch.compile``.  The float32 path gives the predictions of plain eager float32 batches (the
tests compare them); bfloat16 is used only after :func:`bf16_agrees` found that it agrees with
float32 on the run's own images (see :mod:`uapx.evaluate`).
"""
from __future__ import annotations

import copy
import warnings
import weakref

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
# Input elements per forward pass (256 Ki floats = 1 MB): rows = this // pixels, at least MIN_ROWS.
# Measured on 2 AMD EPYC (Zen 4) cores, one thread, per image, channels-last: the MNIST CNN 92 us
# (bfloat16) and 200 us (float32) at 128-256 rows against 182 and 319 us at 4,096; resnet-small
# 0.76 / 1.8 ms at 64-128 rows against 1.5 / 3.1 ms at 1,365 (a large pass's activations leave
# the cache). The float32 predictions do not depend on it (tests/test_fast_evaluation.py).
ROW_ELEMENTS = 1 << 18
MIN_ROWS = 8

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


def prepared_model(model: nn.Module, *, compile: bool = False) -> nn.Module:
    """A channels-last copy of ``model`` for inference, cached per model until its parameters or
    buffers change; ``compile=True`` runs it through ``torch.compile`` (compiled once per copy),
    falling back to eager with one warning where compiling fails."""
    stamp = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    cache = _PREPARED.get(model)
    if cache is None or cache["stamp"] != stamp:  # new, or trained / reloaded since: copy again
        cache = _PREPARED[model] = {"stamp": stamp}
    key = "compiled" if compile else "eager"
    if key not in cache:
        if "eager" not in cache:
            m = copy.deepcopy(model).eval()
            try:
                m = m.to(memory_format=torch.channels_last)
            except RuntimeError:  # a model with parameters of another rank
                pass
            for p in m.parameters():
                p.requires_grad_(False)
            cache["eager"] = m
        if compile:
            try:
                cache["compiled"] = torch.compile(cache["eager"], dynamic=False)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means eager
                warnings.warn(f"uapx: torch.compile failed ({type(exc).__name__}: {exc}); evaluating eagerly",
                              stacklevel=2)
                cache["compiled"] = cache["eager"]
    return cache[key]


def _forward(original: nn.Module, xb: torch.Tensor, *, bf16: bool, compile: bool) -> torch.Tensor:
    """Predicted classes ``(B,)`` of ``xb``; a compiled model that fails at run time is replaced
    by the eager one (one warning)."""
    if xb.dim() == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    net = prepared_model(original, compile=compile)
    with torch.autocast("cuda" if xb.is_cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
        if net is not _PREPARED[original]["eager"]:
            try:
                return net(xb).argmax(1)
            except Exception as exc:  # noqa: BLE001 - a compiled graph that fails at run time
                warnings.warn(f"uapx: the compiled model failed ({type(exc).__name__}: {exc}); evaluating eagerly",
                              stacklevel=3)
                _PREPARED[original]["compiled"] = _PREPARED[original]["eager"]
        return _PREPARED[original]["eager"](xb).argmax(1)


@torch.inference_mode()
def predict_many(model: nn.Module, x: torch.Tensor, vs: torch.Tensor, *, device: str = "cpu",
                 bf16: bool = False, compile: bool = False, rows: int | None = None,
                 bar: tqdm | None = None) -> torch.Tensor:
    """Predictions ``(U, N)`` on ``clamp(x + vs[u], 0, 1)`` for images ``x`` ``(N, C, H, W)`` and
    perturbations ``vs`` ``(U, C, H, W)``.

    Each forward pass holds about ``rows`` images (default :func:`rows_per_forward`): several
    perturbations of a chunk of images.  Under torch.distributed ``x`` is this rank's shard and
    the predictions of every rank are returned, in rank order (``(U, N_all)``).  ``bar`` is
    advanced by the number of images predicted.
    """
    n, u = x.shape[0], vs.shape[0]
    rows = rows or rows_per_forward(x.shape[1:])
    per = max(1, min(u, rows // max(n, 1)))  # perturbations per pass when a pass holds all images
    chunk = max(1, n if per > 1 else min(n, rows))  # else: one perturbation, images in chunks
    out = torch.empty(u, n, dtype=torch.long)
    vd = vs.to(device)
    for s in range(0, n, chunk):  # images outer: each chunk is read once (x may read files on demand)
        xb = x[s:s + chunk].to(device)
        for g in range(0, u, per):
            vg = vd[g:g + per]
            inp = (xb.unsqueeze(0) + vg.unsqueeze(1)).clamp_(0.0, 1.0).reshape(-1, *x.shape[1:])
            pred = _forward(model, inp, bf16=bf16, compile=compile)
            out[g:g + vg.shape[0], s:s + xb.shape[0]] = pred.view(vg.shape[0], xb.shape[0]).cpu()
            if bar is not None:
                bar.update(vg.shape[0] * xb.shape[0])
    if distributed.active():
        out = distributed.all_gather_rows(out.t().contiguous()).t().contiguous()
    return out


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
