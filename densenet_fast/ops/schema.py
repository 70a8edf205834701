"""The fused kernel ops' contracts: schemas, argument checks, fake implementations, FLOPs.

``ops/__init__.py`` defines each op from these (:func:`library.define`), with the reference
kernel of ``torch_impl.py`` as the default for every device; the compiled backends (C++ for
CPU, Triton for CUDA) register device kernels against the same schemas and the dispatcher
picks one by device, so model code never branches on the device.

``bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight) -> out``
    Reads the channel prefix ``x = buffer[:, :C]`` with ``C = conv_weight.size(1)`` in place
    and returns ``conv1x1(relu((x - mean) * invstd * bn_weight + bn_bias), conv_weight)``.

``bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
stats_grad, grad_buffer) -> (grad_conv_weight, grad_bn_weight, grad_bn_bias)``
    Recomputes ``a = relu(bn(x))`` from the buffer, returns
    ``grad_conv_weight = grad_out (x) a`` (summed over N, H, W),
    ``grad_bn_bias = sum(g)`` and ``grad_bn_weight = sum(g * xhat)`` with
    ``g = (conv_weight^T grad_out) * [a > 0]``, and *adds* the input gradient into
    ``grad_buffer[:, :C]``: the direct term ``bn_weight * invstd * g``, plus, with
    ``stats_grad``, the gradient through batch statistics computed from ``x``:
    ``dx = bn_weight * invstd / n * (n g - sum(g) - xhat sum(g xhat))``. Without
    ``stats_grad`` the statistics are constants (eval mode), or the caller adds their term
    itself: it is affine in ``x`` per channel, so the dense block sums it over every reader
    of a channel and applies it once (see ``block.py``).

``bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype=None) -> out``
    ``relu(bn(x))`` rounded to ``x``'s dtype (as ``nn.BatchNorm2d`` and ``nn.ReLU`` return it),
    stored as ``dtype``: ``x``'s own, or the statistics' (float32 for bfloat16/float16 data,
    for a convolution that runs in float32, see ``lowp_conv.py``). ``x``'s memory format.

``bn_relu_inplace(x, mean, invstd, bn_weight, bn_bias) -> ()``
    ``bn_relu(x, ...)`` (``dtype`` None) written over ``x``, which must be dense (NCHW or
    channels-last): a forward that keeps no bottleneck for backward normalises it where it
    lies instead of holding a second copy beside it.

``add_stats_term(grad, x, kx, k0) -> out``
    ``grad + kx * x + k0`` per channel (``kx``, ``k0``: ``(C,)`` in the statistics' dtype),
    computed in that dtype and rounded to the data's, returned dense in ``x``'s memory format.
    ``grad`` and ``x`` (one shape, one dtype) may be strided views: the block's backward reads
    a layer's new channels out of its gradient buffer with the gradient through the batch
    statistics (``kx * x + k0``, summed over every BN that read them) added, see ``block.py``.

``add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias,
count) -> ()``
    Adds, in place, one training-mode BN's coefficients of ``add_stats_term``'s map to
    ``kx`` and ``k0`` (``(C,)``, the statistics' dtype; views of longer vectors): with
    ``s = bn_weight * invstd`` and ``n = count`` values per channel behind the statistics,
    ``kx -= s * invstd * grad_bn_weight / n`` and
    ``k0 += s * (mean * invstd * grad_bn_weight - grad_bn_bias) / n``. The dense block sums
    them over every BN that read a channel (``batchnorm.add_stats_coefficients`` has the maths).

``bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias, kernel_size, stride, padding,
dilation, ceil_mode) -> out``
    The stem's tail: ``max_pool2d(relu(bn(x)), ...)`` (the BN-ReLU activation rounded to
    ``x``'s dtype, as ``nn.BatchNorm2d`` and ``nn.ReLU`` would return it).

``bn_relu_max_pool2d_backward(grad_out, x, mean, invstd, bn_weight, bn_bias, kernel_size,
stride, padding, dilation, ceil_mode) -> grad``
    The gradient at the BN's output (before the ReLU): ``grad_out`` added at each window's
    winner, which ``max_pool2d_with_indices`` would pick (the first maximum, NaN first),
    where the activation there is positive. The winners are found again from ``x``: nothing
    but ``x`` and the statistics is kept between forward and backward.

``channel_stats(x, scratch=None) -> (mean, var)``
    Per-channel batch mean and biased variance of ``x`` over N, H, W, in the statistics'
    dtype: what ``nn.BatchNorm2d`` normalises with in training (``var`` before ``eps``).
    ``scratch``: ``(2, >=C)`` in the statistics' dtype, row 0 zeros and row 1 ones, which a
    kernel may use as running statistics it never updates (``batchnorm.stats_scratch``
    makes one per block), or None.

``bn_backward(grad, x, mean, invstd, bn_weight, stats_grad) -> (dx, grad_bn_weight,
grad_bn_bias)``
    The backward of ``bn(x) = (x - mean) * invstd * bn_weight + bias`` for ``grad`` at its
    output: ``grad_bn_bias = sum(g)``, ``grad_bn_weight = sum(g * xhat)`` (in
    ``bn_weight``'s dtype), and ``dx = bn_weight * invstd * g``, or with ``stats_grad``
    (``mean`` and ``invstd`` are ``x``'s own batch statistics) the gradient through them too:
    ``dx = bn_weight * invstd / n * (n g - sum(g) - xhat * sum(g xhat))``. ``dx`` in ``x``'s
    dtype, dense in its memory format. The BNs outside the fused op run it (norm0, each
    layer's norm2, a block's last norm); the prefix BNs' backward is part of the fused op's.

Statistics (``mean``, ``invstd``) are float32 (float64 for float64 data); the buffer and the
conv weight share one dtype; BN parameters may be float32 while the data is lower precision.
Every data output is dense in its data input's memory format as ``formats.memory_format_of``
names it (channels-last only for a dense NHWC input; a channel slice of one is not), except
``add_stats_term``'s, dense in the format ``x``'s strides suggest: what the fakes below say,
which ``torch.compile`` plans with, so every kernel of every backend returns exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import as_pair, pads_over_half_kernel
from .formats import memory_format_of, stats_dtype_for
from .library import qualified

_POOL_ARGS = ("int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
              "bool ceil_mode")
# Op name -> schema.
SCHEMAS = {
    "bn_relu_conv1x1": (
        "(Tensor buffer, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        "Tensor conv_weight) -> Tensor"),
    "bn_relu_conv1x1_backward": (
        "(Tensor grad_out, Tensor buffer, Tensor mean, Tensor invstd, Tensor bn_weight, "
        "Tensor bn_bias, Tensor conv_weight, bool stats_grad, Tensor(a!) grad_buffer) "
        "-> (Tensor, Tensor, Tensor)"),
    "bn_relu": (
        "(Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        "ScalarType? dtype=None) -> Tensor"),
    "bn_relu_inplace": (
        "(Tensor(a!) x, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias) -> ()"),
    "add_stats_term": "(Tensor grad, Tensor x, Tensor kx, Tensor k0) -> Tensor",
    "add_stats_coefficients": (
        "(Tensor(a!) kx, Tensor(b!) k0, Tensor mean, Tensor invstd, Tensor bn_weight, "
        "Tensor grad_bn_weight, Tensor grad_bn_bias, int count) -> ()"),
    "bn_relu_max_pool2d": (
        "(Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        f"{_POOL_ARGS}) -> Tensor"),
    "bn_relu_max_pool2d_backward": (
        "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, "
        f"Tensor bn_bias, {_POOL_ARGS}) -> Tensor"),
    "channel_stats": "(Tensor x, Tensor? scratch=None) -> (Tensor, Tensor)",
    "bn_backward": (
        "(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, "
        "bool stats_grad) -> (Tensor, Tensor, Tensor)"),
}
FORWARD, BACKWARD = qualified("bn_relu_conv1x1"), qualified("bn_relu_conv1x1_backward")


def _check_data(x, name: str) -> None:
    """``x`` (called ``name`` in messages) is 4-D floating-point data."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_writable(t, name: str) -> None:
    """``t`` (called ``name``), which an op adds into in place, has no two elements at one
    address (an expanded tensor): ATen's rule for in-place writes, which Triton's stores
    would not enforce (their sums would race)."""
    if torch._debug_has_internal_overlap(t) == 1:  # 2: cannot tell, as ATen lets it pass
        raise RuntimeError(
            f"{name} has elements that share one memory location (an expanded tensor?); the "
            "op adds into it in place: pass a tensor of its own (clone() it)")


def _check_bn_vectors(x, name: str, channels: int, mean, invstd, bn_weight,
                      bn_bias=None) -> None:
    """The BN arguments that ``channels`` channels of data ``x`` are normalised with:
    ``(channels,)`` floating-point vectors on ``x``'s device, the statistics in the
    statistics' dtype (``bn_bias``: None for an op that takes none)."""
    expected_stats = stats_dtype_for(x.dtype)
    vectors = (("mean", mean), ("invstd", invstd), ("bn_weight", bn_weight),
               ("bn_bias", bn_bias))
    for what, t in vectors[:3] if bn_bias is None else vectors:
        if t.shape != (channels,):
            raise ValueError(f"{what} must have shape ({channels},), got {tuple(t.shape)}")
        if what in ("mean", "invstd") and t.dtype != expected_stats:
            raise TypeError(
                f"{what} must be {expected_stats} for {x.dtype} data, got {t.dtype}")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{what} is on {t.device} but {name} is on {x.device}")


def check_forward_args(buffer, mean, invstd, bn_weight, bn_bias, conv_weight) -> int:
    """Validate the op's arguments; return the prefix width ``C``. Raises before any compute."""
    _check_data(buffer, "buffer")
    if conv_weight.dim() != 4 or conv_weight.shape[2:] != (1, 1):
        raise ValueError(
            f"conv_weight must have shape [C_out, C, 1, 1], got {tuple(conv_weight.shape)}"
        )
    channels = conv_weight.shape[1]
    if channels > buffer.shape[1]:
        raise ValueError(
            f"conv_weight reads {channels} input channels but buffer has only {buffer.shape[1]}"
        )
    if conv_weight.dtype != buffer.dtype:
        raise TypeError(
            f"conv_weight dtype {conv_weight.dtype} differs from buffer dtype {buffer.dtype}"
        )
    _check_bn_vectors(buffer, "buffer", channels, mean, invstd, bn_weight, bn_bias)
    if conv_weight.device != buffer.device:
        raise RuntimeError(
            f"conv_weight is on {conv_weight.device} but buffer is on {buffer.device}")
    return channels


def check_backward_args(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                        grad_buffer) -> int:
    """Validate the backward op's arguments; return the prefix width ``C``."""
    channels = check_forward_args(buffer, mean, invstd, bn_weight, bn_bias, conv_weight)
    expected = (buffer.shape[0], conv_weight.shape[0], buffer.shape[2], buffer.shape[3])
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must have shape {expected}, got {tuple(grad_out.shape)}")
    if grad_out.dtype != buffer.dtype:
        raise TypeError(f"grad_out dtype {grad_out.dtype} differs from buffer dtype {buffer.dtype}")
    if grad_buffer.dim() != 4 or grad_buffer.shape[0] != buffer.shape[0] \
            or grad_buffer.shape[2:] != buffer.shape[2:] or grad_buffer.shape[1] < channels:
        raise ValueError(
            f"grad_buffer must have shape [N, >={channels}, H, W] matching buffer "
            f"{tuple(buffer.shape)}, got {tuple(grad_buffer.shape)}"
        )
    if grad_buffer.dtype != buffer.dtype:
        raise TypeError(
            f"grad_buffer dtype {grad_buffer.dtype} differs from buffer dtype {buffer.dtype}"
        )
    for name, t in (("grad_out", grad_out), ("grad_buffer", grad_buffer)):
        if t.device != buffer.device:
            raise RuntimeError(f"{name} is on {t.device} but buffer is on {buffer.device}")
    _check_writable(grad_buffer, "grad_buffer")
    return channels


def check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias, dtype=None) -> torch.dtype:
    """Validate the arguments of the ops that normalise all of ``x``; return the output
    dtype."""
    _check_data(x, "x")
    _check_bn_vectors(x, "x", x.shape[1], mean, invstd, bn_weight, bn_bias)
    expected_stats = stats_dtype_for(x.dtype)
    dtype = x.dtype if dtype is None else dtype
    if dtype not in (x.dtype, expected_stats):
        raise TypeError(f"dtype must be x's dtype ({x.dtype}) or {expected_stats}, got {dtype}")
    return dtype


def check_bn_relu_inplace_args(x, mean, invstd, bn_weight, bn_bias) -> None:
    """Validate :func:`bn_relu_inplace`'s arguments: :func:`check_bn_relu_args`'s, with ``x``
    dense in NCHW or channels-last order."""
    check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("x must be dense (NCHW or channels-last) to be overwritten, got "
                         f"strides {x.stride()} for shape {tuple(x.shape)}")


def _check_grad_of_data(grad, x) -> None:
    """``x`` is 4-D floating-point data and ``grad`` a gradient of it: same shape, dtype and
    device."""
    _check_data(x, "x")
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype:
        raise TypeError(f"grad dtype {grad.dtype} differs from x dtype {x.dtype}")
    if grad.device != x.device:
        raise RuntimeError(f"grad is on {grad.device} but x is on {x.device}")


def check_stats_term_args(grad, x, kx, k0) -> None:
    """Validate :func:`add_stats_term`'s arguments."""
    _check_grad_of_data(grad, x)
    expected_stats = stats_dtype_for(x.dtype)
    for what, t in (("kx", kx), ("k0", k0)):
        if t.shape != (x.shape[1],):
            raise ValueError(f"{what} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
        if t.dtype != expected_stats:
            raise TypeError(f"{what} must be {expected_stats} for {x.dtype} data, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{what} is on {t.device} but x is on {x.device}")


def check_stats_coefficients_args(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                  grad_bn_bias, count) -> None:
    """Validate :func:`add_stats_coefficients`'s arguments: ``(C,)`` vectors on one device,
    the coefficients and statistics in one floating-point dtype, a positive count."""
    channels, device = kx.shape[0] if kx.dim() == 1 else None, kx.device
    for what, t in (("kx", kx), ("k0", k0), ("mean", mean), ("invstd", invstd),
                    ("bn_weight", bn_weight), ("grad_bn_weight", grad_bn_weight),
                    ("grad_bn_bias", grad_bn_bias)):
        if t.dim() != 1 or t.shape[0] != channels:
            expected = f"({channels},)" if channels is not None else "1-D"
            raise ValueError(f"{what} must have shape {expected}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be floating point, got {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{what} is on {t.device} but kx is on {device}")
        if what in ("k0", "mean", "invstd") and t.dtype != kx.dtype:
            raise TypeError(f"{what} must have kx's dtype {kx.dtype}, got {t.dtype}")
    if kx.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"kx must be torch.float32 or torch.float64, got {kx.dtype}")
    if count < 1:
        raise ValueError(f"count must be a positive number of values per channel, got {count}")
    _check_writable(kx, "kx")
    _check_writable(k0, "k0")


def check_channel_stats_args(x, scratch) -> None:
    """Validate :func:`channel_stats`'s arguments."""
    _check_data(x, "x")
    if scratch is None:
        return
    expected_stats = stats_dtype_for(x.dtype)
    if scratch.dim() != 2 or scratch.shape[0] != 2 or scratch.shape[1] < x.shape[1]:
        raise ValueError(f"scratch must have shape (2, >={x.shape[1]}), got "
                         f"{tuple(scratch.shape)}")
    if scratch.dtype != expected_stats:
        raise TypeError(f"scratch must be {expected_stats} for {x.dtype} data, got "
                        f"{scratch.dtype}")
    if scratch.device != x.device:
        raise RuntimeError(f"scratch is on {scratch.device} but x is on {x.device}")


def check_bn_backward_args(grad, x, mean, invstd, bn_weight) -> None:
    """Validate :func:`bn_backward`'s arguments: ``grad`` shaped and typed as the data ``x``,
    the statistics in the statistics' dtype, the weight of any floating dtype."""
    _check_grad_of_data(grad, x)
    _check_bn_vectors(x, "x", x.shape[1], mean, invstd, bn_weight)


def check_pool_args(x, mean, invstd, bn_weight, bn_bias, pool_args) -> tuple:
    """Validate the pool op's arguments; return its output shape. Raises before any compute,
    with ``F.max_pool2d``'s own messages for the pool's settings."""
    check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias)
    # The pool's own checks and output size, on a tensor without storage; a ValueError, as
    # for every other bad shape (and as the C++ kernels raise).
    try:
        shape = tuple(F.max_pool2d(torch.empty(x.shape, device="meta"), *pool_args).shape)
    except RuntimeError as exc:
        raise ValueError(f"max pool {pool_args} cannot pool x of shape {tuple(x.shape)}: "
                         f"{exc}") from None
    kernel, padding = pool_args[0], pool_args[2]
    if pads_over_half_kernel(kernel, padding):  # the meta function passed it, if dilated
        raise ValueError(f"max pool {pool_args}: padding must be at most half the kernel "
                         f"size, got padding {as_pair(padding)} for kernel_size "
                         f"{as_pair(kernel)}")
    return shape


def forward_fake(buffer, mean, invstd, bn_weight, bn_bias, conv_weight):
    check_forward_args(buffer, mean, invstd, bn_weight, bn_bias, conv_weight)
    n, _, h, w = buffer.shape
    return buffer.new_empty((n, conv_weight.shape[0], h, w)).contiguous(
        memory_format=memory_format_of(buffer)
    )


def backward_fake(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                   stats_grad, grad_buffer):
    check_backward_args(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                        grad_buffer)
    return torch.empty_like(conv_weight), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def bn_relu_fake(x, mean, invstd, bn_weight, bn_bias, dtype=None):
    dtype = check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias, dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=memory_format_of(x))


def bn_relu_inplace_fake(x, mean, invstd, bn_weight, bn_bias):
    check_bn_relu_inplace_args(x, mean, invstd, bn_weight, bn_bias)


def stats_term_fake(grad, x, kx, k0):
    check_stats_term_args(grad, x, kx, k0)
    return torch.empty_like(x)  # preserve_format: dense in the format x's strides suggest


def stats_coefficients_fake(kx, k0, mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias,
                            count):
    check_stats_coefficients_args(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                  grad_bn_bias, count)


def pool_forward_fake(x, mean, invstd, bn_weight, bn_bias, *pool_args):
    shape = check_pool_args(x, mean, invstd, bn_weight, bn_bias, pool_args)
    return x.new_empty(shape).contiguous(memory_format=memory_format_of(x))


def pool_backward_fake(grad_out, x, mean, invstd, bn_weight, bn_bias, *pool_args):
    check_pool_args(x, mean, invstd, bn_weight, bn_bias, pool_args)
    return x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x))


def channel_stats_fake(x, scratch=None):
    check_channel_stats_args(x, scratch)
    stats = x.new_empty((x.shape[1],), dtype=stats_dtype_for(x.dtype))
    return stats, torch.empty_like(stats)


def bn_backward_fake(grad, x, mean, invstd, bn_weight, stats_grad):
    check_bn_backward_args(grad, x, mean, invstd, bn_weight)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            torch.empty_like(bn_weight), torch.empty_like(bn_weight))


def _conv1x1_flops(out_shape, conv_weight_shape) -> int:
    """Multiply-adds of the 1x1 convolution, counted as FlopCounterMode counts
    ``aten.convolution``: ``2 * N*H*W * C_out * C``. BN and ReLU are not counted, as they are
    not for ``nn.BatchNorm2d`` and ``nn.ReLU``."""
    n, c_out, h, w = out_shape
    return 2 * n * h * w * c_out * conv_weight_shape[1]


def forward_flops(buffer, mean, invstd, bn_weight, bn_bias, conv_weight, *args, out_shape=None,
                   **kwargs) -> int:
    return _conv1x1_flops(out_shape, conv_weight)


def backward_flops(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight, *args,
                    **kwargs) -> int:
    # The input gradient and the weight gradient, each as costly as the forward: what
    # FlopCounterMode counts for aten.convolution_backward with both outputs.
    return 2 * _conv1x1_flops(grad_out, conv_weight)


# Op name -> (fake implementation, FLOP formula or None).
FAKES = {
    "bn_relu_conv1x1": (forward_fake, forward_flops),
    "bn_relu_conv1x1_backward": (backward_fake, backward_flops),
    "bn_relu": (bn_relu_fake, None),
    "bn_relu_inplace": (bn_relu_inplace_fake, None),
    "add_stats_term": (stats_term_fake, None),
    "add_stats_coefficients": (stats_coefficients_fake, None),
    "bn_relu_max_pool2d": (pool_forward_fake, None),
    "bn_relu_max_pool2d_backward": (pool_backward_fake, None),
    "channel_stats": (channel_stats_fake, None),
    "bn_backward": (bn_backward_fake, None),
}
