"""The stem's computation (conv0, norm0, relu0, pool0), keeping one tensor for backward.

Run as modules, the stem keeps per image three 112x112-plane tensors for backward: conv0's
output (norm0's input), norm0's output (relu0 works in place and pool0 reads it) and pool0's
int64 indices (twice the bytes of a float32 tensor of the pool's output size). Run as one
graph node (:mod:`densenet_fast.graph`), it keeps only conv0's output and the per-channel
statistics; backward recomputes BN-ReLU and the pool's winners from it (the same values, so
the same winners, ties included), in one fused op (``bn_relu_max_pool2d``, whose CPU kernel
also runs the forward's pool 8x faster than ATen's NCHW max pool, see ``csrc/``).
With ``recompute_conv`` it keeps not even conv0's output, only the input the caller holds
anyway, and backward runs conv0 again (a few percent of a DenseNet step's time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .block import NormState, running_stats
from .ops import bn_relu_max_pool2d, bn_relu_max_pool2d_backward, lowp_conv
from .ops.batchnorm import channel_stats
from .ops.formats import stats_dtype_for
from .sync import norm_backward


@dataclass(frozen=True)
class StemSpec:
    """conv0's and pool0's settings and norm0's state (see :class:`block.NormState`)."""

    conv_stride: tuple[int, int]
    conv_padding: tuple[int, int]
    conv_dilation: tuple[int, int]
    conv_groups: int
    pool_kernel: tuple[int, int]
    pool_stride: tuple[int, int]
    pool_padding: tuple[int, int]
    pool_dilation: tuple[int, int]
    pool_ceil_mode: bool
    norm: NormState
    recompute_conv: bool = False

    def conv(self, x, weight):
        return lowp_conv.conv2d(x, weight, self.conv_stride, self.conv_padding,
                                self.conv_dilation, self.conv_groups)

    def pool_args(self) -> tuple:
        return (self.pool_kernel, self.pool_stride, self.pool_padding, self.pool_dilation,
                self.pool_ceil_mode)


def _norm_stats(spec: StemSpec, conv_out: torch.Tensor):
    """``(mean, invstd, batch var or None, count)`` norm0 normalises with; ``count`` values
    per channel, over every rank when synchronised."""
    n, _, h, w = conv_out.shape
    count = n * h * w
    if not spec.norm.batch_stats:
        return (*running_stats(spec.norm, stats_dtype_for(conv_out.dtype)), None, count)
    mean, var = channel_stats(conv_out)
    if spec.norm.sync is not None:
        mean, var, count = spec.norm.sync.merge(mean, var, count, "norm0")
    return mean, torch.rsqrt(var + spec.norm.eps), var, count


class StemForward(NamedTuple):
    """The stem's output and what backward and the running statistics need."""

    out: torch.Tensor
    conv_out: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    var: torch.Tensor | None  # norm0's batch variance; None with running statistics
    count: int  # values per channel behind the statistics, every rank's


def forward(x, spec: StemSpec, conv_weight, norm_weight, norm_bias) -> StemForward:
    """``max_pool(relu(bn(conv(x))))``; running statistics are left to the caller."""
    conv_out = spec.conv(x, conv_weight)
    mean, invstd, var, count = _norm_stats(spec, conv_out)
    out = bn_relu_max_pool2d(conv_out, mean, invstd, norm_weight, norm_bias, spec.pool_args())
    return StemForward(out, conv_out, mean, invstd, var, count)


def backward(grad_out, x, spec: StemSpec, conv_weight, norm_weight, norm_bias, conv_out, mean,
             invstd, count: int, needs_input_grad: bool):
    """``(grad_x or None, dconv, dnorm_weight, dnorm_bias)``; ``conv_out`` None: recompute
    it from ``x``."""
    if conv_out is None:
        conv_out = spec.conv(x, conv_weight)
    grad = bn_relu_max_pool2d_backward(grad_out, conv_out, mean, invstd, norm_weight, norm_bias,
                                       spec.pool_args())
    grad, dnorm_weight, dnorm_bias = norm_backward(
        grad, conv_out, mean, invstd, norm_weight, batch_stats=spec.norm.batch_stats,
        sync=spec.norm.sync, count=count)
    grad_x, dconv = lowp_conv.conv2d_backward(
        grad, x, conv_weight, spec.conv_stride, spec.conv_padding, spec.conv_dilation,
        spec.conv_groups, (needs_input_grad, True))
    return grad_x, dconv, dnorm_weight, dnorm_bias
