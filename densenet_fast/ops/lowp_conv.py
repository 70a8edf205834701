"""Convolutions of bfloat16/float16 data (autocast's), in the precision that runs faster here.

Autocast's convolution multiplies low-precision operands and accumulates in float32. The
products of two bfloat16 (or float16) numbers are exact in float32, so a float32 convolution
of the same low-precision values, rounded back to the data's dtype, computes that same
function; only the summation order differs, as it does between any two kernels. Which one
is faster depends on the CPU: with AMX or a fast AVX512-BF16 path oneDNN's bfloat16 kernels
win; on a CPU without them (an Intel Xeon of family 6, model 207, as a guest without AMX)
bfloat16 3x3 convolutions (forward and backward) ran 1.2-1.4x slower than float32 ones, and
float16 ones about 100x slower. So the choice is measured on a convolution shaped like a
dense layer's, once per dtype, thread count and oneDNN setting on a machine: later processes
read it from the CPU kernels' file of measured choices (``cpu_engine_cache.py``), so that
load on the machine cannot make two runs round differently.

CUDA and other devices, float32 and float64 data, fake tensors (``torch.compile``'s tracing),
code dynamo traces (a compiled forward without gradients: inductor chooses its kernels),
``torch.use_deterministic_algorithms`` and float32 convolutions set to a lower precision
(``torch.backends.mkldnn.conv.fp32_precision``) keep the native kernels.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from ..cpu_engine_cache import kept_choice
from .measure import best_time

# The dense layers' 3x3 convolution in densenet121's third block (batch 8): 128 -> 32
# channels on 14x14 planes.
_PROBE_SHAPE = (8, 128, 14, 14)
_PROBE_OUT = 32
_PROBE_TRIALS = 3


@cache
def _float32_is_faster(dtype: torch.dtype, threads: int, mkldnn: bool) -> bool:
    """Whether a float32 3x3 convolution (forward and backward, casts included) of ``dtype``
    values beats the native ``dtype`` one on this CPU (measured by the first process)."""
    case = f"{str(dtype).removeprefix('torch.')}, {threads} threads, oneDNN {mkldnn}"
    return kept_choice("float32 convolution is faster", case, lambda: _measure(dtype))


def _measure(dtype: torch.dtype) -> bool:
    x = torch.randn(_PROBE_SHAPE).to(dtype)
    w = torch.randn(_PROBE_OUT, _PROBE_SHAPE[1], 3, 3).to(dtype)

    def run(upcast: bool):
        def step():
            out = conv2d(x, w, padding=(1, 1), upcast=upcast)
            conv2d_backward(torch.ones_like(out), x, w, (1, 1), (1, 1), (1, 1), 1,
                            (True, True), upcast=upcast)
        return step

    with torch.no_grad():
        return best_time(run(True), _PROBE_TRIALS) < best_time(run(False), _PROBE_TRIALS)


def runs_in_float32(x: torch.Tensor) -> bool:
    """Whether convolutions of ``x``'s data run as float32 convolutions of its values."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu":
        return False
    if torch.compiler.is_dynamo_compiling() or torch.are_deterministic_algorithms_enabled() \
            or _is_fake(x) or _float32_convolutions_lowered():
        return False
    return _float32_is_faster(x.dtype, torch.get_num_threads(), onednn_enabled())


def _float32_convolutions_lowered() -> bool:
    """Whether float32 convolutions may compute in bfloat16 or TF32
    (``torch.backends.mkldnn.conv.fp32_precision``): a float32 convolution of low-precision
    data is then no longer what the choice above measured, and a choice measured so, kept for
    the machine, could slow later processes that keep IEEE float32."""
    return torch.backends.mkldnn.conv.fp32_precision in ("bf16", "tf32")


def onednn_enabled() -> bool:
    """Whether CPU convolutions may run through oneDNN (built in, and not turned off with
    ``torch.backends.mkldnn.enabled``)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _is_fake(x: torch.Tensor) -> bool:
    if type(x) is torch.Tensor:  # is_fake takes about 10 us; fake tensors are a subclass
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def compute_dtype(data: torch.Tensor) -> torch.dtype:
    """The dtype convolutions of ``data``'s values compute in: float32 where
    :func:`runs_in_float32`, else ``data``'s own. A caller that produces a convolution's
    input can write it in this dtype directly (``ops.bn_relu``), saving the copy."""
    return torch.float32 if runs_in_float32(data) else data.dtype


def _upcast(x, weight, upcast: bool | None) -> bool:
    if x.dtype != weight.dtype:  # x is already the float32 copy of weight-dtype values
        return True
    return runs_in_float32(x) if upcast is None else upcast


def conv2d(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
           upcast: bool | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight)`` (no bias) in ``weight``'s dtype, the data's. ``x`` holds data of
    that dtype, or its float32 copy (from :func:`compute_dtype`); ``upcast`` (default:
    measured, :func:`runs_in_float32`) computes it as a float32 convolution rounded to that
    dtype."""
    if not _upcast(x, weight, upcast):
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)
    out = F.conv2d(x.float(), weight.float(), None, stride, padding, dilation, groups)
    return out.to(weight.dtype)


def conv2d_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask,
                    upcast: bool | None = None):
    """``(grad_x, grad_weight)`` of :func:`conv2d` (None where ``output_mask`` says so), in
    the dtypes of ``x`` and ``weight``."""
    mask = [output_mask[0], output_mask[1], False]
    if not _upcast(x, weight, upcast):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, mask)
        return grad_x, grad_w
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out.float(), x.float(), weight.float(), None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, mask)
    return (grad_x.to(x.dtype) if grad_x is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None)
