"""BatchNorm pieces with statistics passed in, in plain PyTorch.

The block never lets ``nn.BatchNorm2d`` compute statistics: a channel's batch mean and
variance are computed once, when the channel is written, and every BN that reads the
channel reuses them. These helpers apply a normalisation with given statistics, run its
backward, and fold statistics into running averages exactly as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import torch

from .schema import stats_dtype_for

_REDUCE_DIMS = (0, 2, 3)


_NO_FUSED_STATS: set[str] = set()  # device types without aten::batch_norm_update_stats


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` over N, H, W, in float32 (float64)."""
    stats_dtype = stats_dtype_for(x.dtype)
    if x.dtype != stats_dtype:
        x = x.to(stats_dtype)
    if x.device.type not in _NO_FUSED_STATS:
        # BatchNorm's own statistics kernel: several times faster than var_mean on CPU.
        try:
            return torch.batch_norm_update_stats(x, None, None, 0.0)
        except NotImplementedError:
            _NO_FUSED_STATS.add(x.device.type)
    var, mean = torch.var_mean(x, dim=_REDUCE_DIMS, correction=0)
    return mean, var


def scale_shift(mean, invstd, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN into one affine map: ``bn(x) = x * scale + shift``, in the statistics' dtype."""
    scale = invstd * weight.to(invstd.dtype)
    shift = bias.to(invstd.dtype) - mean * scale
    return scale, shift


def bn_apply(x, mean, invstd, weight, bias, *, relu: bool) -> torch.Tensor:
    """``[relu](bn(x))`` with the given statistics, returned in ``x``'s dtype and layout."""
    scale, shift = scale_shift(mean, invstd, weight, bias)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        # The eval-mode BN kernel is the fastest affine map on dense data; with running
        # statistics 0 and 1 and eps 0 it computes exactly x * scale + shift.
        zeros = torch.zeros_like(scale)
        out = torch.batch_norm(x, scale, shift, zeros, torch.ones_like(scale), False, 0.0, 0.0,
                               False)
    else:
        shape = (1, -1, 1, 1)
        out = torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
    if relu:
        out.clamp_min_(0)
    return out


def bn_backward(grad, x, mean, invstd, weight, *, batch_stats: bool):
    """Gradient of ``bn(x)`` for ``grad`` at its output: ``(dx, dweight, dbias)``.

    With ``batch_stats`` the statistics are ``x``'s own and the gradient flows through them:
    ``dx = weight * invstd / n * (n g - sum(g) - xhat * sum(g xhat))``; otherwise
    ``dx = weight * invstd * g``. ``dweight = sum(g xhat)``, ``dbias = sum(g)``.
    """
    if batch_stats:
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        return dx, dweight, dbias
    stats_dtype = invstd.dtype
    shape = (1, -1, 1, 1)
    grad_s = grad.to(stats_dtype)
    dbias = grad_s.sum(_REDUCE_DIMS)
    xhat = (x.to(stats_dtype) - mean.view(shape)) * invstd.view(shape)
    dweight = (grad_s * xhat).sum(_REDUCE_DIMS)
    del xhat
    dx = grad_s * (weight.to(stats_dtype) * invstd).view(shape)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)


def update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                         mean, var, count: int) -> None:
    """Fold one batch's statistics into running averages exactly as ``nn.BatchNorm2d`` does.

    ``running_var`` takes the unbiased variance ``var * n / (n - 1)``; ``momentum=None``
    means a cumulative average (factor ``1 / num_batches_tracked``).
    """
    num_batches_tracked.add_(1)
    factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
