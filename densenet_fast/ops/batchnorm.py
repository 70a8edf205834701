"""BatchNorm pieces with statistics passed in, in plain PyTorch.

The block never lets ``nn.BatchNorm2d`` compute statistics: a channel's batch mean and
variance are computed once, when the channel is written, and every BN that reads the
channel reuses them. These helpers apply a normalisation with given statistics, run its
backward, and fold statistics into running averages exactly as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .formats import memory_format_of, stats_dtype_for

_REDUCE_DIMS = (0, 2, 3)


_NO_FUSED_STATS: set[str] = set()  # device types without aten::batch_norm_update_stats


def stats_scratch(channels: int, x: torch.Tensor):
    """Running statistics for :func:`channel_stats`'s mixed-dtype path on data like ``x``,
    long enough for ``channels``: ``(2, channels)``, row 0 zeros and row 1 ones. Allocate
    once and pass to every call (a block's forward does), instead of two allocations and two
    fills per call. ``None`` where that path does not take them (data in the statistics' own
    dtype)."""
    stats_dtype = stats_dtype_for(x.dtype)
    if x.dtype == stats_dtype:
        return None
    scratch = torch.zeros(2, channels, dtype=stats_dtype, device=x.device)
    scratch[1].fill_(1.0)
    return scratch


def channel_stats(x: torch.Tensor, scratch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` over N, H, W, in float32 (float64):
    the reference kernel of the ``channel_stats`` op.

    ``scratch``: what :func:`stats_scratch` returned for at least ``x``'s channels, or None.
    """
    stats_dtype = stats_dtype_for(x.dtype)
    # Traced (by dynamo, or with fake tensors), var_mean: batch_norm_update_stats has no
    # shape function. is_compiling() first: dynamo refuses to trace is_fake on torch 2.11;
    # is_fake (about 10 us) only for tensor subclasses, which fake tensors are.
    traced = torch.compiler.is_compiling() or (type(x) is not torch.Tensor and is_fake(x))
    if x.dtype == torch.float32 and x.device.type == "cpu" and not traced \
            and memory_format_of(x) == torch.channels_last:
        # ATen's CPU kernel accumulates channels-last float32 data in float32: about 1e-5
        # relative error in a variance, against 1e-7 for NCHW data and for these two passes
        # (still faster than its NCHW kernel; docs/design.md).
        mean = x.mean(dim=_REDUCE_DIMS)
        return mean, (x - mean.view(1, -1, 1, 1)).square_().mean(dim=_REDUCE_DIMS)
    if x.device.type not in _NO_FUSED_STATS and not traced:
        # BatchNorm's own statistics kernel: several times faster than var_mean on CPU.
        # Given running statistics of the statistics' dtype, its mixed-type path reads
        # bfloat16/float16 data as is, accumulates in float32 and returns float32 statistics:
        # no float32 copy of the data. With momentum 0 it writes them back unchanged (a
        # non-finite batch may turn them NaN), and the statistics it returns never read them:
        # scratch shared by every call is safe.
        channels = x.shape[1]
        if x.dtype == stats_dtype:
            running = (None, None)
        else:
            scratch = scratch if scratch is not None else stats_scratch(channels, x)
            running = (scratch[0, :channels], scratch[1, :channels])
        try:
            return torch.batch_norm_update_stats(x, *running, 0.0)
        except NotImplementedError:
            _NO_FUSED_STATS.add(x.device.type)
    var, mean = torch.var_mean(x.to(stats_dtype), dim=_REDUCE_DIMS, correction=0)
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


def bn_backward(grad, x, mean, invstd, weight, *, stats_grad: bool):
    """Gradient of ``bn(x)`` for ``grad`` at its output: ``(dx, dweight, dbias)``, with
    ``dweight = sum(g xhat)`` and ``dbias = sum(g)``.

    With ``stats_grad`` the statistics are ``x``'s own batch statistics and the gradient flows
    through them: ``dx = weight * invstd / n * (n g - sum(g) - xhat * sum(g xhat))``;
    otherwise ``dx = weight * invstd * g`` (constant statistics, or a caller that adds the
    statistics' term itself, see :func:`add_stats_coefficients`).
    """
    # ATen's BN mixes dtypes only as (reduced-precision data, float32 parameters): give the
    # parameters the statistics' dtype, and the gradients back in the parameters' own.
    param_dtype, weight = weight.dtype, weight.to(invstd.dtype)
    if stats_grad:
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True])
    else:
        # Eval-mode BN backward with running_var = invstd^-2 and eps = 0 is exactly this map
        # (up to the rounding of 1 / sqrt(invstd^-2)), in one fused kernel. The saved
        # statistics go in as empty tensors, not None: CUDA's kernel asserts they are defined
        # (an empty one means "use the running statistics"); the CPU's takes either.
        unused = mean.new_empty(0)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, mean, invstd.pow(-2), unused, unused, False, 0.0,
            [True, True, True])
    return dx, dweight.to(param_dtype), dbias.to(param_dtype)


def add_stats_coefficients(kx, k0, mean, invstd, weight, dweight, dbias, count: int) -> None:
    """Add one training-mode BN's gradient through its batch statistics to the per-channel
    coefficients ``kx``, ``k0`` (in place): the reference kernel of the op of that name.

    For a BN with statistics computed from ``x`` over ``n = count`` values per channel, the
    part of ``dx`` that flows through the mean and variance is
    ``-weight * invstd / n * (dbias + xhat * dweight)``, per channel an affine map
    ``kx * x + k0`` of the data with ``s = weight * invstd``:
    ``kx -= s * invstd * dweight / n`` and ``k0 += s * (mean * invstd * dweight - dbias) / n``.
    ``dweight = sum(g xhat)`` and ``dbias = sum(g)`` are the BN's parameter gradients. Every BN
    that reads a channel adds its coefficients; the sum is applied once per channel (the
    ``add_stats_term`` op), instead of one pass over the data per reader.
    """
    dweight, dbias = dweight.to(invstd.dtype), dbias.to(invstd.dtype)
    # Six tensor ops (the formula as written takes ten): 1/n folds into the scalars.
    scale = weight.to(invstd.dtype) * invstd
    term = scale * dweight
    term.mul_(invstd)
    kx.add_(term, alpha=-1 / count)
    k0.addcmul_(term, mean, value=1 / count)
    k0.addcmul_(scale, dbias, value=-1 / count)


def update_running_stats(running_means, running_vars, batches_tracked, momenta, means, vars_,
                         count: int) -> None:
    """Fold batch statistics into running averages exactly as ``nn.BatchNorm2d`` does, for
    every BN of a list at once (one entry per BN in each list argument).

    ``running_var`` takes the unbiased variance ``var * n / (n - 1)``; ``momentum=None``
    means a cumulative average (factor ``1 / num_batches_tracked``). The arithmetic is
    ``nn.BatchNorm2d``'s, per element, in ``_foreach`` ops: on CUDA a handful of launches for
    a whole block instead of six per BN.
    """
    if count < 2:  # checked first: nothing may be updated
        raise ValueError("update_running_stats needs at least 2 values per channel behind the "
                         "batch statistics (their unbiased variance divides by count - 1), "
                         f"got {count}")
    torch._foreach_add_(batches_tracked, 1)
    by_factor: dict[float, list[int]] = {}
    for i, momentum in enumerate(momenta):
        # A cumulative average reads its counter: a device sync, as in nn.BatchNorm2d.
        factor = 1.0 / float(batches_tracked[i]) if momentum is None else momentum
        by_factor.setdefault(factor, []).append(i)
    unbiased = torch._foreach_mul(list(vars_), count / (count - 1))
    for factor, indices in by_factor.items():
        for running, batch in ((running_means, means), (running_vars, unbiased)):
            targets = [running[i] for i in indices]
            values = [batch[i].to(running[i].dtype) for i in indices]
            torch._foreach_mul_(targets, 1.0 - factor)
            torch._foreach_add_(targets, values, alpha=factor)
