"""The dtype and memory-format conventions shared by the op, its kernels and the block."""

from __future__ import annotations

import torch


def stats_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics for data of ``dtype``: float32, or float64 for float64.

    Half-precision data keeps float32 statistics, as cuDNN's and ATen's batch norm do: a
    variance summed over N*H*W values overflows or loses every digit in float16.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``t.to(dtype)`` returns, without the call where it would return ``t`` itself: a
    few microseconds per tensor that the fused call reads on every forward."""
    return t if t.dtype == dtype else t.to(dtype)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a dense NHWC tensor, else the default (contiguous) format."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for ``meta``, which autocast does not
    know (it raises there): a forward on meta tensors, for shapes or a model built on the
    meta device, runs as it does elsewhere without autocast."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_dtype_of(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives ``t`` as an argument of a lower-precision op (a
    convolution): autocast's dtype for a floating-point tensor other than float64, which
    autocast leaves alone (as it does integer tensors), and ``t``'s own dtype where
    autocast is off."""
    device_type = t.device.type
    if autocast_enabled(device_type) and t.is_floating_point() and t.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return t.dtype
