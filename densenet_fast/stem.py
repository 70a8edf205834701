"""The stem's computation (conv0, norm0, relu0, pool0), keeping one tensor for backward.

Run as modules, the stem keeps per image three 112x112-plane tensors for backward: conv0's
output (norm0's input), norm0's output (relu0 works in place and pool0 reads it) and pool0's
int64 indices (twice the bytes of a float32 tensor of the pool's output size). Run as one
graph node (:mod:`densenet_fast.graph`), it keeps only conv0's output and the per-channel
statistics; backward recomputes BN-ReLU and the pool's winners from it (the same values, so
the same winners, ties included), in one fused op (``bn_relu_max_pool2d``, whose CPU kernel
also runs the forward's pool 8x faster than ATen's NCHW max pool, see ``csrc/``).
With ``recompute_bottleneck`` it keeps not even conv0's output, only the input the caller holds
anyway, and backward runs conv0 again (a few percent of a DenseNet step's time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .block import running_mean_invstd
from .ops import bn_relu_max_pool2d, bn_relu_max_pool2d_backward, channel_stats, conv_layout
from .ops.formats import memory_format_of, stats_dtype_for
from .spec import StemParams, StemSpec
from .sync import norm_backward, values_per_channel


@dataclass
class StemSaved:
    """What the stem keeps for backward besides its input and parameters; ``tensors()`` is
    the order in which it crosses to backward, ``load`` reads it back."""

    conv_out: torch.Tensor | None  # conv0's output; None where backward recomputes it
    mean: torch.Tensor | None  # norm0's batch statistics; None with running statistics
    var: torch.Tensor | None
    # Values per channel behind the statistics, merged over every rank: a CPU scalar, kept
    # only when synchronised; else None, and backward reads it off conv0's output (as
    # block.BlockSaved does).
    merged_count: torch.Tensor | None

    def tensors(self) -> list:
        kept = [self.conv_out] if self.conv_out is not None else []
        stats = [self.mean, self.var] if self.mean is not None else []
        count = [self.merged_count] if self.merged_count is not None else []
        return [*kept, *stats, *count]

    @classmethod
    def load(cls, tensors, spec: StemSpec) -> StemSaved:
        saved = iter(tensors)
        conv_out = next(saved) if not spec.recompute_bottleneck else None
        mean, var = (next(saved), next(saved)) if spec.norm.batch_stats else (None, None)
        return cls(conv_out, mean, var, next(saved) if spec.sync is not None else None)

    def for_backward(self, spec: StemSpec) -> StemSaved:
        """What backward needs of it: no conv0 output where backward recomputes it."""
        return replace(self, conv_out=None) if spec.recompute_bottleneck else self

    def running_stats_updates(self, spec: StemSpec) -> list:
        """``(BatchNormSpec, batch mean, batch var)`` for norm0, if it updates its running
        statistics."""
        return [(spec.norm, self.mean, self.var)] if spec.norm.update_running_stats else []


def _conv(spec: StemSpec, x, weight):
    return conv_layout.conv2d(x, weight, *spec.conv_args(), channels_last=spec.channels_last)


def _mean_invstd(spec: StemSpec, saved: StemSaved, dtype: torch.dtype):
    """``(mean, invstd)`` norm0 normalises with, for data of ``dtype``."""
    if saved.mean is None:
        return running_mean_invstd(spec.norm, stats_dtype_for(dtype))
    return saved.mean, torch.rsqrt(saved.var + spec.norm.eps)


def forward(x, spec: StemSpec, params: StemParams) -> tuple[torch.Tensor, StemSaved, int]:
    """``(max_pool(relu(bn(conv(x)))), saved, count)``, ``saved`` holding conv0's output
    whatever the spec (see :meth:`StemSaved.for_backward`), its merged count left to the
    caller; ``count`` values per channel, over every rank when synchronised. Running
    statistics are left to the caller."""
    conv_out = _conv(spec, x, params.conv_weight)
    n, _, h, w = conv_out.shape
    count, mean, var = n * h * w, None, None
    if spec.norm.batch_stats:
        mean, var = channel_stats(conv_out)
        if spec.sync is not None:
            mean, var, count = spec.sync.merge(mean, var, count, "norm0")
    saved = StemSaved(conv_out, mean, var, None)
    mean, invstd = _mean_invstd(spec, saved, conv_out.dtype)
    out = bn_relu_max_pool2d(conv_out, mean, invstd, params.norm_weight, params.norm_bias,
                             spec.pool_args())
    # conv0 may run channels-last (ops/conv_layout.py); the blocks get x's layout back, or
    # the fused steps' (spec.channels_last).
    layout = torch.channels_last if spec.channels_last else memory_format_of(x)
    return out.contiguous(memory_format=layout), saved, count


def backward(grad_out, x, spec: StemSpec, params: StemParams, saved: StemSaved,
             input_grad: bool) -> tuple:
    """``(grad_x or None, dconv, dnorm_weight, dnorm_bias)`` from what forward saved."""
    conv_out = saved.conv_out if saved.conv_out is not None else \
        _conv(spec, x, params.conv_weight)
    mean, invstd = _mean_invstd(spec, saved, conv_out.dtype)
    grad = bn_relu_max_pool2d_backward(grad_out, conv_out, mean, invstd, params.norm_weight,
                                       params.norm_bias, spec.pool_args())
    grad, dnorm_weight, dnorm_bias = norm_backward(
        grad, conv_out, mean, invstd, params.norm_weight, batch_stats=spec.norm.batch_stats,
        sync=spec.sync, count=values_per_channel(saved.merged_count, conv_out))
    grad_x, dconv = conv_layout.conv2d_backward(grad, x, params.conv_weight, *spec.conv_args(),
                                                (input_grad, True),
                                                channels_last=spec.channels_last)
    return grad_x, dconv, dnorm_weight, dnorm_bias
