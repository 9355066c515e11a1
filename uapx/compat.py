"""Model/data compatibility, checked with one forward pass on one image before any attack."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UapxError


def check_model_fits(model: nn.Module, x1: torch.Tensor, num_classes: int | None, *, what: str, data: str) -> int:
    """Refuse a model that cannot classify these images; return its number of outputs (the run's
    number of classes: at least the data's, e.g. 1000 for an ImageNet model on a class subset).
    With ``num_classes`` None the labels are checked afterwards, in the model's output space
    (:func:`uapx.class_index.model_labels`: ImageNet wnids, ``--class-index``).

    Args:
        model: the classifier (eval mode).
        x1: ``(1, C, H, W)`` one image of the data set, on the model's device.
        num_classes: classes of the data set (None: not checked here).
        what: the model as the user named it (``zoo:mnist-natural``, a path).
        data: the data set's name, for the message.
    Raises:
        UapxError: the forward pass fails (channels, image size), or its output is not
            ``(1, K)`` logits with ``K >= num_classes``.
    """
    shape = tuple(x1.shape[1:])
    classes = "" if num_classes is None else f", {num_classes} classes"
    fix = f"pass a model made for {data} images ({shape[0]} channels, {shape[1]}x{shape[2]}{classes})"
    try:
        with torch.no_grad():
            out = model(x1)
    except Exception as exc:  # the model's own shape error, e.g. a conv expecting 1 channel
        why = " ".join(str(exc).split())[:160]
        raise UapxError(f"model {what} does not accept {data} images of shape {shape}: {type(exc).__name__}: {why}",
                        fix) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UapxError(f"model {what} returned {got} for one {data} image, not logits of shape "
                        f"(1, {num_classes or 'K'})", fix)
    if num_classes is not None and out.shape[1] < num_classes:  # a label the model cannot predict; more outputs are fine (a class subset)
        raise UapxError(f"model {what} has {out.shape[1]} outputs but {data} has {num_classes} classes", fix)
    return int(out.shape[1])
