"""Pure-PyTorch kernels of the fused ops: the oracle of every parity test and the fallback.

They are each op's default kernel (``ops/__init__.py``), so they serve every device that
has no kernel of its own (MPS, or CPU/CUDA when no compiled backend is active). Compiled
backends register device-specific kernels that the dispatcher prefers.

The backward walks the prefix in channel chunks: BN is per channel and the 1x1 conv's
input gradient and weight gradient split along input channels, so each chunk is finished
on its own, and the recomputed activation, its gradient and ``dx`` exist one chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import batchnorm
from .batchnorm import bn_apply
from .formats import memory_format_of
from .schema import (
    check_backward_args,
    check_bn_backward_args,
    check_bn_relu_args,
    check_bn_relu_inplace_args,
    check_channel_stats_args,
    check_forward_args,
    check_pool_args,
    check_stats_coefficients_args,
    check_stats_term_args,
)

# Elements per temporary in the backward (4M float32 = 16 MiB); at least one channel.
BACKWARD_CHUNK_ELEMENTS = 1 << 22


def channel_chunks(channels: int, plane: int, limit: int | None = None):
    """Split ``range(channels)`` into ``(start, stop)`` pieces of at most ``limit`` elements
    (default ``BACKWARD_CHUNK_ELEMENTS``), each channel holding ``plane = N*H*W`` of them,
    balanced so no piece is tiny."""
    limit = BACKWARD_CHUNK_ELEMENTS if limit is None else limit
    per_chunk = max(1, limit // max(plane, 1))
    pieces = -(-channels // per_chunk)
    size = -(-channels // pieces)
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


def _laid_out_like(out: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``out`` dense in ``data``'s memory format (``formats.memory_format_of``), as the ops'
    fakes and compiled kernels lay their outputs out. ATen's ops follow the strides of a
    non-dense input (a channel slice of a channels-last tensor gives channels-last-like
    output), which would differ from the fake that ``torch.compile`` plans with."""
    return out.contiguous(memory_format=memory_format_of(data))


def bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight):
    """Reference forward: ``conv1x1(relu(bn(buffer[:, :C])), conv_weight)``."""
    channels = check_forward_args(buffer, mean, invstd, bn_weight, bn_bias, conv_weight)
    act = bn_apply(buffer[:, :channels], mean, invstd, bn_weight, bn_bias, relu=True)
    return _laid_out_like(F.conv2d(act, conv_weight), buffer)


def bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                             stats_grad, grad_buffer):
    """Reference backward: returns ``(grad_conv_weight, grad_bn_weight, grad_bn_bias)`` and
    adds the prefix's input gradient into ``grad_buffer[:, :C]``."""
    channels = check_backward_args(grad_out, buffer, mean, invstd, bn_weight, bn_bias,
                                   conv_weight, grad_buffer)
    n, _, h, w = buffer.shape
    grad_conv_weight = torch.empty_like(conv_weight)
    grad_bn_weight = torch.empty_like(bn_weight)
    grad_bn_bias = torch.empty_like(bn_bias)
    for start, stop in channel_chunks(channels, n * h * w):
        x = buffer[:, start:stop]
        act = bn_apply(x, mean[start:stop], invstd[start:stop], bn_weight[start:stop],
                       bn_bias[start:stop], relu=True)
        grad_act, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, act, conv_weight[:, start:stop], None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [True, True, False],
        )
        grad_conv_weight[:, start:stop] = grad_w
        # ReLU mask in place: the gradient is zero wherever the activation was clamped.
        torch.ops.aten.threshold_backward.grad_input(grad_act, act, 0, grad_input=grad_act)
        del act
        dx, dweight, dbias = batchnorm.bn_backward(
            grad_act, x, mean[start:stop], invstd[start:stop], bn_weight[start:stop],
            stats_grad=stats_grad)
        del grad_act
        grad_buffer[:, start:stop].add_(dx)
        grad_bn_weight[start:stop] = dweight
        grad_bn_bias[start:stop] = dbias
    return grad_conv_weight, grad_bn_weight, grad_bn_bias


def bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype=None):
    """Reference: ``relu(bn(x))`` in ``x``'s dtype, then stored as ``dtype``."""
    dtype = check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias, dtype)
    return _laid_out_like(bn_apply(x, mean, invstd, bn_weight, bn_bias, relu=True).to(dtype), x)


def bn_relu_inplace(x, mean, invstd, bn_weight, bn_bias):
    """Reference: :func:`bn_relu`'s values copied over ``x`` (through a temporary: the
    reference rounds exactly as ``bn_relu`` does, not in place)."""
    check_bn_relu_inplace_args(x, mean, invstd, bn_weight, bn_bias)
    x.copy_(bn_apply(x, mean, invstd, bn_weight, bn_bias, relu=True))


def add_stats_term(grad, x, kx, k0):
    """Reference: ``grad + (kx * x + k0)`` per channel in the statistics' dtype, rounded to
    the data's, dense in ``x``'s memory format."""
    check_stats_term_args(grad, x, kx, k0)
    shape = (1, -1, 1, 1)
    term = torch.addcmul(k0.view(shape), x, kx.view(shape))
    return torch.empty_like(x).copy_(term.add_(grad))


def add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias,
                           count):
    """Reference kernel of the op (contract in ``schema.py``; the maths in
    :func:`batchnorm.add_stats_coefficients`)."""
    check_stats_coefficients_args(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                  grad_bn_bias, count)
    batchnorm.add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                     grad_bn_bias, count)


def bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias, *pool_args):
    """Reference forward: ``max_pool2d(relu(bn(x)), *pool_args)``."""
    check_pool_args(x, mean, invstd, bn_weight, bn_bias, pool_args)
    act = bn_apply(x, mean, invstd, bn_weight, bn_bias, relu=True)
    return _laid_out_like(F.max_pool2d(act, *pool_args), x)


def bn_relu_max_pool2d_backward(grad_out, x, mean, invstd, bn_weight, bn_bias, *pool_args):
    """Reference backward: the gradient at the BN's output, winners found again from ``x``."""
    check_pool_args(x, mean, invstd, bn_weight, bn_bias, pool_args)
    act = bn_apply(x, mean, invstd, bn_weight, bn_bias, relu=True)
    _, indices = torch.ops.aten.max_pool2d_with_indices(act, *pool_args)
    grad = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, act, *pool_args, indices)
    del indices
    grad = torch.ops.aten.threshold_backward.grad_input(grad, act, 0, grad_input=grad)
    return _laid_out_like(grad, x)


def channel_stats(x, scratch=None):
    """Reference: per-channel ``(mean, biased var)`` of ``x`` (:func:`batchnorm.channel_stats`:
    ATen's BatchNorm statistics kernel where it serves)."""
    check_channel_stats_args(x, scratch)
    return batchnorm.channel_stats(x, scratch)


def bn_backward(grad, x, mean, invstd, bn_weight, stats_grad):
    """Reference: ATen's BatchNorm backward (:func:`batchnorm.bn_backward`), ``dx`` dense in
    ``x``'s memory format."""
    check_bn_backward_args(grad, x, mean, invstd, bn_weight)
    # Dense first: on strided bfloat16 data ATen's kernel sums dbias about 10x less
    # accurately than on dense data (a float32 bar missed by 10x).
    fmt = memory_format_of(x)
    x, grad = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
    dx, dweight, dbias = batchnorm.bn_backward(grad, x, mean, invstd, bn_weight,
                                               stats_grad=stats_grad)
    return _laid_out_like(dx, x), dweight, dbias
