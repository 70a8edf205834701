"""The memory formats CPU convolutions run in: ``features``' fused steps, and the stem's
convolution.

**Fused steps, channels-last on AVX-512 CPUs.** ``features`` runs its fused stem and blocks
channels-last for an NCHW batch where :func:`fused_steps_channels_last` says so, and gives the
caller's layout back after them (:func:`plan.run_steps`). On a 2-core AMD EPYC of family 25
(Zen 4, AVX-512 with AVX512_BF16, torch 2.14.1), densenet121 ran so, against NCHW
(interleaved in one process), in 0.91-0.92x (float32) and 0.86-0.87x (bfloat16 autocast) the
time of a training step at batch 8, 224x224, 0.86-0.90x at batches 1-2, and 0.91x (float32)
and 0.72x (bfloat16) the time of an inference forward: oneDNN's convolutions, ATen's
float32 batch statistics (2.6 against 0.25 ms on a block-1 bottleneck) and the fused
kernels' channels-last tiles are all faster there.
On an Intel Xeon with AMX (family 6, model 167) the bfloat16 step took 0.82x in channels-last
(model and input, in two bench runs of one day).
In float32 ATen reduces channels-last data in float32: the statistics are taken in two
passes instead (``ops.batchnorm.channel_stats``); the backward's BN reductions remain
ATen's, as in torchvision's model given channels-last input (docs/design.md).
On an AMD EPYC without AVX-512 (family 23: AVX2) the bfloat16 step took 1.08x, and float64
ran 1.06x on the Zen 4 (no oneDNN kernels): those keep the caller's layout, as float16 (level
on the Zen 4), devices other than the CPU, and CPUs without oneDNN do.

**The stem's convolution of a low-precision image.** oneDNN convolves low-precision data of
few channels (conv0: 3 channels, 7x7, stride 2) far faster in channels-last than in NCHW,
where ATen also leaves two output-sized temporaries behind a reorder. Measured on an Intel
Xeon (family 6, model 167, AMX, 2 threads, torch 2.14.1), densenet121's conv0 at batch 8,
224x224, interleaved, the channels-last copy of the input included: bfloat16 15.2 ms and a
36.8 MiB peak in NCHW against 4.9 ms and 19.8 MiB channels-last, float16 47.0 ms against
24.7 ms; the same values bit for bit. The stem's forward and backward (conv0, norm0, pool0)
went from 82 to 66 ms in bfloat16. float32 ran level there, so float32 keeps its layout; so
do wide inputs (:func:`runs_channels_last`: where the fused steps keep NCHW, the stem's
convolution alone still runs channels-last).

Both rules depend on the device, dtype, channel count, layout and the CPU's instruction set
only, never on a measurement, so that fake tensors (``torch.compile``'s tracing of the opaque
ops) get the strides the real kernels produce, and every process sums in the same order.
Under ``torch.compile`` the fused steps that run channels-last run as their ops, with or
without gradients (``plan.run_block``); code dynamo traces itself (elsewhere, a compiled
forward without gradients) keeps the input's layout: inductor chooses the convolution's.
"""

from __future__ import annotations

import torch

from . import lowp_conv
from .capability import CPU_CAPABILITY
from .formats import autocast_dtype_of, memory_format_of

# Inputs up to this many channels run channels-last (RGB, RGBA, grayscale images).
FEW_CHANNELS = 4


# The dtypes whose fused steps run channels-last on an AVX-512 CPU.
_FUSED_CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16)


def fused_steps_channels_last(x: torch.Tensor) -> bool:
    """Whether ``features``' fused steps run channels-last for the batch ``x`` (else in its
    own layout): a dense NCHW CPU batch that computes in float32 or bfloat16 (its dtype as
    autocast casts it: a float32 batch under float16 autocast computes in float16), on a CPU
    whose torch kernels run at AVX-512, with oneDNN enabled (:mod:`this module's measurements
    <densenet_fast.ops.conv_layout>`; dynamo cannot read oneDNN's setting, so code it traces
    assumes it on)."""
    return (x.device.type == "cpu" and x.dim() == 4
            and autocast_dtype_of(x) in _FUSED_CHANNELS_LAST_DTYPES
            and CPU_CAPABILITY == "avx512" and x.is_contiguous()
            and (torch.compiler.is_dynamo_compiling() or lowp_conv.onednn_enabled()))


def runs_channels_last(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` runs on its channels-last copy: an NCHW CPU image batch
    of bfloat16 or float16 data with at most ``FEW_CHANNELS`` channels, with oneDNN enabled."""
    return (not torch.compiler.is_dynamo_compiling()
            and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 4 and x.size(1) <= FEW_CHANNELS
            and memory_format_of(x) != torch.channels_last
            and lowp_conv.onednn_enabled())


def _layout_for_conv(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last or runs_channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def conv2d(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
           channels_last: bool = False):
    """:func:`lowp_conv.conv2d`, of ``x``'s channels-last copy where ``channels_last`` or
    :func:`runs_channels_last` says so (the output is then channels-last)."""
    return lowp_conv.conv2d(_layout_for_conv(x, channels_last), weight, stride, padding,
                            dilation, groups)


def conv2d_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask,
                    channels_last: bool = False):
    """:func:`lowp_conv.conv2d_backward` of :func:`conv2d`; ``grad_x`` in ``x``'s layout."""
    grad_x, grad_w = lowp_conv.conv2d_backward(grad_out, _layout_for_conv(x, channels_last),
                                               weight, stride, padding, dilation, groups,
                                               output_mask)
    if grad_x is not None:
        grad_x = grad_x.contiguous(memory_format=memory_format_of(x))
    return grad_x, grad_w
