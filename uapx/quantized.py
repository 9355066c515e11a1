"""The int8 copy of a model: the cheapest rung of refined evaluation (:mod:`uapx.inference`).

Post-training static quantization with ``torch.ao``'s FX graph mode on the x86 backend: weights
per output channel (symmetric int8), activations per tensor (uint8 over their full range, their
scales from the smallest and largest value seen on calibration images).  BatchNorms are folded
into the convolutions first and every ``torch.relu`` becomes ``F.relu``, so that convolution,
ReLU and the residual sum run fused.  A copy is made only where its arithmetic is native (a CPU
with AVX-512 VNNI, whose int8 dot products cannot saturate at the full uint8 range) and where fx
can trace the model; its predictions are never used unchecked: refined evaluation measures its
logit errors against float32 on the run's own images and remakes every prediction whose top-two
margin is within reach of them.  Measured on 2 AMD EPYC (Zen 4) cores, one thread per pass:
resnet-small 0.60-0.74 ms per CIFAR-10 image against 1.07-1.24 in bfloat16 and 2.7-3.1 in
float32; the MNIST CNN 85-99 us against 155-182 and 300-350.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ENGINE = "x86"


def supported(device: str = "cpu") -> bool:
    """Whether int8 passes are native here: a CPU with AVX-512 VNNI and torch's x86 quantized engine."""
    if str(device).startswith("cuda") or ENGINE not in torch.backends.quantized.supported_engines:
        return False
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """torch.ao's deprecation warnings silenced, and fx tracing without stack traces (recording
    them imports torch._inductor, 1.8 s)."""
    import torch.fx.config as fx_config

    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated", category=UserWarning)
            yield
    finally:
        fx_config.do_not_emit_stack_traces = before


@torch.inference_mode(False)
def quantize(folded: nn.Module, calibration: torch.Tensor) -> nn.Module | None:
    """An int8 copy of ``folded`` (a model whose BatchNorms are folded, in eval mode), its
    activation ranges observed on ``calibration`` ``(N, C, H, W)``; None where torch.ao cannot
    quantize it (fx cannot trace it, or an operation has no int8 form)."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    qconfig = QConfig(activation=MinMaxObserver.with_args(reduce_range=False),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE  # the weights are packed for it; the passes do not read it
    try:
        with _quiet_tracing():
            m = copy.deepcopy(folded).eval()
            if isinstance(m, torch.fx.GraphModule):  # torch.relu is not a fusion pattern; F.relu is
                for node in m.graph.nodes:
                    if node.op == "call_function" and node.target is torch.relu:
                        node.target = F.relu
                m.recompile()
            example = calibration[:1].float()
            prepared = prepare_fx(m, QConfigMapping().set_global(qconfig), example_inputs=(example,))
            with torch.no_grad():
                prepared(calibration.float())
            q = convert_fx(prepared)
            with torch.no_grad():
                q(example)  # fails here, not in a worker, if an operation has no int8 form
            return q
    except Exception:  # noqa: BLE001 - untraceable or unquantizable: no int8 rung
        return None
    finally:
        torch.backends.quantized.engine = engine
