"""The memory format the stem's convolution runs in on the CPU.

oneDNN convolves low-precision data of few channels (conv0: 3 channels, 7x7, stride 2) far
faster in channels-last than in NCHW, where ATen also leaves two output-sized temporaries
behind a reorder. Measured on an Intel Xeon (family 6, model 167, AMX, 2 threads, torch
2.14.1), densenet121's conv0 at batch 8, 224x224, interleaved, the channels-last copy of the
input included: bfloat16 15.2 ms and a 36.8 MiB peak in NCHW against 4.9 ms and 19.8 MiB
channels-last, float16 47.0 ms against 24.7 ms; the same values bit for bit. The stem's
forward and backward (conv0, norm0, pool0) went from 82 to 66 ms in bfloat16. float32 ran
level (conv0 14.2 against 14.6 ms; the stem's forward and backward within the machine's
noise, the copy of the stem's output back to NCHW included), so float32 keeps its layout; so
do wide inputs (the dense layers' 3x3 convolutions ran level in both layouts).

The rule depends on the device, dtype, channel count and layout only, never on a
measurement, so that fake tensors (``torch.compile``'s tracing of the opaque ops) get the
strides the real kernels produce. Code dynamo traces itself (a compiled forward without
gradients) keeps the input's layout: inductor chooses the convolution's.
"""

from __future__ import annotations

import torch

from . import lowp_conv
from .formats import memory_format_of

# Inputs up to this many channels run channels-last (RGB, RGBA, grayscale images).
FEW_CHANNELS = 4


def runs_channels_last(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` runs on its channels-last copy: an NCHW CPU image batch
    of bfloat16 or float16 data with at most ``FEW_CHANNELS`` channels, with oneDNN enabled."""
    return (not torch.compiler.is_dynamo_compiling()
            and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 4 and x.size(1) <= FEW_CHANNELS
            and memory_format_of(x) != torch.channels_last
            and lowp_conv.onednn_enabled())


def _layout_for_conv(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if runs_channels_last(x) else x


def conv2d(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """:func:`lowp_conv.conv2d`, of ``x``'s channels-last copy where :func:`runs_channels_last`
    (the output is then channels-last)."""
    return lowp_conv.conv2d(_layout_for_conv(x), weight, stride, padding, dilation, groups)


def conv2d_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask):
    """:func:`lowp_conv.conv2d_backward` of :func:`conv2d`; ``grad_x`` in ``x``'s layout."""
    grad_x, grad_w = lowp_conv.conv2d_backward(grad_out, _layout_for_conv(x), weight, stride,
                                               padding, dilation, groups, output_mask)
    if grad_x is not None:
        grad_x = grad_x.contiguous(memory_format=memory_format_of(x))
    return grad_x, grad_w
