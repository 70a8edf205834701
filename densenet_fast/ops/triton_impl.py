"""Launchers of the Triton kernels and their registration against the op schemas.

Registered for CUDA tensors; with ``TRITON_INTERPRET=1`` (and ``DENSENET_FAST_BACKEND=triton``)
for CPU tensors too, which is how the kernels are tested on machines without a GPU.
Triton's ``tl.dot`` has no float64: float64 calls (gradcheck) go to the reference kernels.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager, nullcontext

import torch
import triton

from . import batchnorm, torch_impl
from .formats import memory_format_of
from .library import qualified
from .schema import (
    BACKWARD,
    FORWARD,
    check_backward_args,
    check_bn_relu_args,
    check_bn_relu_inplace_args,
    check_forward_args,
    check_stats_coefficients_args,
    check_stats_term_args,
)
from .triton_kernels import (
    add_dx_kernel,
    bn_grads_kernel,
    bn_relu_kernel,
    forward_kernel,
    input_grad_kernel,
    stats_coefficients_kernel,
    stats_term_kernel,
    weight_grad_kernel,
)
from .triton_tuning import Tuner, size_class

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_scalar_index() -> None:
    """Let Triton's interpreter index with scalar kernel arguments under NumPy >= 2.4.

    The interpreter holds a scalar argument as a one-element array and, before Triton 3.7,
    turns it into a Python int with ``int(array)``, which NumPy 2.4 no longer allows for
    arrays of one dimension (``range(0, C, BLOCK_K)`` then fails with "only 0-dimensional
    arrays can be converted to Python scalars"). Later Triton squeezes first; so do we.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_densenet_fast_fixed", False):
        return

    def patched(tensor, *scope):  # Triton before 3.5 patches without a scope object
        patch_tensor(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._densenet_fast_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_scalar_index()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' host arithmetic: ``triton.cdiv`` is a constexpr
    function whose host calls cost microseconds each (Triton 3.8), eight per backward call."""
    return -(-a // b)


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); few, so that the first call's compile and
# tuning stay short. The interpreter (slow) runs the first only; the tests run every one of
# them explicitly (``forced_config``). Deterministic mode pins the second of each list.
GEMM_CONFIGS = _configs([(32, 32, 32, 4, 2), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)])
WEIGHT_GRAD_CONFIGS = _configs([(32, 32, 32, 4, 2), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3)])
# The partial-sum rows of the input-gradient kernel: one per pixel tile of the narrowest config.
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)


def _tuned(configs):
    return configs[:1] if INTERPRETED else configs


_forward = Tuner(forward_kernel, _tuned(GEMM_CONFIGS), pinned=GEMM_CONFIGS[1])
_input_grad = Tuner(input_grad_kernel, _tuned(GEMM_CONFIGS), pinned=GEMM_CONFIGS[1])
_weight_grad = Tuner(weight_grad_kernel, _tuned(WEIGHT_GRAD_CONFIGS),
                     pinned=WEIGHT_GRAD_CONFIGS[1])
TUNERS = (_forward, _input_grad, _weight_grad)

_forced = threading.local()


@contextmanager
def forced_config(config: triton.Config | None):
    """Launch every kernel that this thread launches with ``config`` instead of the tuned
    choice (tests, checks)."""
    previous = getattr(_forced, "config", None)
    _forced.config = config
    try:
        yield
    finally:
        _forced.config = previous


def _launch(tuner: Tuner, grid, shape_class: tuple, device: torch.device, args: tuple,
            options: dict, trial_args=None) -> triton.Config:
    """Launch ``tuner``'s kernel with the config chosen for ``shape_class`` and return that
    config (what the launcher reads, e.g. how many partial-sum rows it filled). Tuning trials
    run on ``trial_args()`` where given (scratch outputs, allocated once), else on ``args``."""

    def run(config, arguments):
        with _one_kernel_at_a_time():
            tuner.kernel[grid](*arguments, **options, **config.kwargs,
                               num_warps=config.num_warps, num_stages=config.num_stages)

    scratch = []

    def trial(config):
        if not scratch:
            scratch.append(trial_args() if trial_args is not None else args)
        run(config, scratch[0])

    config = getattr(_forced, "config", None) or tuner.choose(shape_class, device, trial)
    run(config, args)
    return config


_ELEMENTWISE_BLOCK = (32, 32)
_interpreter_lock = threading.Lock()


def _one_kernel_at_a_time():
    """Triton's interpreter patches ``triton.language`` module-wide while a kernel runs, so
    kernels launched from several threads (multi-threaded autograd) take turns; compiled
    kernels need no such lock."""
    return _interpreter_lock if INTERPRETED else nullcontext()


def _launch_elementwise(kernel, pixels: int, channels: int, *args, **constexprs) -> None:
    """Launch a per-channel elementwise kernel over ``[pixels, channels]`` tiles."""
    block_m, block_n = _ELEMENTWISE_BLOCK
    grid = (_cdiv(pixels, block_m), _cdiv(channels, block_n))
    with _one_kernel_at_a_time():
        kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **constexprs)


def conv_uses_tf32() -> bool:
    """Whether torch runs float32 convolutions on CUDA in TF32, which the kernels follow.

    torch >= 2.9 settles it per operator: ``torch.backends.cudnn.conv.fp32_precision``,
    falling back to cuDNN's, then the global setting, while any is ``"none"`` (IEEE at the
    end). Reading the deprecated ``torch.backends.cudnn.allow_tf32`` raises once the new
    settings of conv and RNN differ, so it is read only on torch versions without them."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def _precision(dtype: torch.dtype) -> str:
    # The setting only matters for float32 operands; the interpreter has no TF32.
    if dtype == torch.float32 and not INTERPRETED and conv_uses_tf32():
        return "tf32"
    return "ieee"


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, pixel-in-image) strides of a tensor dense in NCHW or NHWC."""
    return t.stride(0), t.stride(1), t.stride(3)


def _pixels_addressable(t: torch.Tensor) -> bool:
    """Whether pixel ``hw = h * W + w`` of ``t`` sits at ``hw * s_hw`` in its image, as the
    kernels address pixels (NCHW, NHWC, and any layout with W inside H)."""
    return t.stride(2) == t.shape[3] * t.stride(3)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it, whose pixels the kernels can address (``_pixels_addressable``)."""
    return t if _pixels_addressable(t) else t.contiguous()


def pixels_flat(hw: int, *tensors: torch.Tensor) -> bool:
    """Whether every tensor's pixel ``p = n * HW + hw`` sits at ``p * s_hw`` (channels-last):
    the kernels then address pixels without dividing (``FLAT``)."""
    for t in tensors:  # noqa: SIM110 (a loop: all() over a generator costs more per launch)
        if t.stride(0) != hw * t.stride(3):
            return False
    return True


@functools.lru_cache(maxsize=4096)  # every call of every launcher asks: a lookup, not 10 us
def _shape_class(dtype: torch.dtype, flat: bool, *sizes: int) -> tuple:
    return (str(dtype).removeprefix("torch."), flat, *map(size_class, sizes))


# Deterministic mode sizes the weight-gradient split as for this many SMs (an H100's and
# H200's count) on every device: the summation order then depends on the shape alone.
REFERENCE_SMS = 132


def _num_splits(tiles: int, pixels: int, device: torch.device) -> int:
    """Pixel splits of the weight-gradient reduction: enough programs to fill ``device``."""
    if INTERPRETED or device.type != "cuda":
        return 1
    sms = (REFERENCE_SMS if torch.are_deterministic_algorithms_enabled()
           else torch.cuda.get_device_properties(device).multi_processor_count)
    return max(1, min(-(-2 * sms // max(tiles, 1)), pixels // 256 or 1))


def _device_guard(device: torch.device):
    """Make ``device`` current: Triton launches on the current CUDA device, which need not
    be the tensors' (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight):
    """Triton forward; see ``schema.py`` for the contract."""
    channels = check_forward_args(buffer, mean, invstd, bn_weight, bn_bias, conv_weight)
    if buffer.dtype == torch.float64:
        return torch_impl.bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight)
    buffer = _dense(buffer)
    n, _, h, w = buffer.shape
    co = conv_weight.shape[0]
    weight = conv_weight.view(co, channels)
    out = torch.empty((n, co, h, w), dtype=buffer.dtype, device=buffer.device,
                      memory_format=memory_format_of(buffer))
    flat = pixels_flat(h * w, buffer, out)

    def grid(meta):
        return _cdiv(n * h * w, meta["BLOCK_M"]), _cdiv(co, meta["BLOCK_N"])

    with _device_guard(buffer.device):
        # Trials write ``out`` in full; the last launch's values are the result.
        _launch(_forward, grid, _shape_class(buffer.dtype, flat, n * h * w, channels, co),
                buffer.device,
                (buffer, weight, *_bn_vectors(mean, invstd, bn_weight, bn_bias), out,
                 n * h * w, channels, co, h * w, *_pixel_strides(buffer), *weight.stride(),
                 *_pixel_strides(out)),
                dict(FLAT=flat, PRECISION=_precision(buffer.dtype), UPCAST=INTERPRETED))
    return out


def _bn_vectors(mean, invstd, bn_weight, bn_bias) -> tuple:
    """The BN's per-channel vectors as the kernels read them (unit stride; they fold the BN
    into a scale and shift themselves)."""
    return tuple(t.contiguous() for t in (mean, invstd, bn_weight, bn_bias))


def input_grad_pass(grad_out, weight, buffer, bn, target, store, partial_sums,
                    stats_grad: bool) -> int:
    """``g = (W^T grad_out) * [a > 0]``; adds ``scale * g`` into ``target`` (or, with
    ``stats_grad``, stores ``g`` in ``store``); ``bn`` is ``_bn_vectors``' (mean, invstd,
    weight, bias) and ``scale = invstd * weight``. Writes per-tile partial sums
    ``[sum(g), sum(g * (x - mean))]`` per channel to the first rows of ``partial_sums`` and
    returns how many: one per tile of ``BLOCK_M`` pixels, so fewer for a config with a larger
    ``BLOCK_M`` (:func:`bn_grads` sums them)."""
    n, channels, h, w = buffer.shape[0], weight.shape[1], buffer.shape[2], buffer.shape[3]
    co, pixels = weight.shape[0], n * h * w
    flat = pixels_flat(h * w, grad_out, buffer, target)

    def scratch():
        # Trials add into the target and overwrite the sums: give them their own.
        return (grad_out, weight, buffer, *bn, torch.zeros_like(target),
                torch.empty_like(store), torch.empty_like(partial_sums), *sizes)

    sizes = (pixels, channels, co, h * w, *_pixel_strides(grad_out), *weight.stride(),
             *_pixel_strides(buffer), *_pixel_strides(target))
    config = _launch(
        _input_grad, lambda meta: (_cdiv(pixels, meta["BLOCK_M"]),
                                   _cdiv(channels, meta["BLOCK_N"])),
        (*_shape_class(buffer.dtype, flat, pixels, channels, co), stats_grad), buffer.device,
        (grad_out, weight, buffer, *bn, target, store, partial_sums, *sizes),
        dict(STORE_G=stats_grad, FLAT=flat, PRECISION=_precision(buffer.dtype),
             UPCAST=INTERPRETED),
        trial_args=scratch)
    return _cdiv(pixels, config.kwargs["BLOCK_M"])


_BN_GRADS_BLOCK = (64, 32)  # (rows, channels) per step of bn_grads_kernel


def bn_grads(partial_sums, rows: int, invstd, scale_dtype: torch.dtype,
             bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(g * xhat), sum(g))`` per channel, the BN's weight and bias gradients, from the
    first ``rows`` rows of ``input_grad_pass``'s ``partial_sums``: summed in float64, returned
    as ``scale_dtype`` and ``bias_dtype``. One launch."""
    channels = partial_sums.shape[2]
    grad_scale = torch.empty(channels, dtype=scale_dtype, device=partial_sums.device)
    grad_bias = torch.empty(channels, dtype=bias_dtype, device=partial_sums.device)
    if channels == 0:
        return grad_scale, grad_bias
    block_r, block_n = _BN_GRADS_BLOCK
    with _one_kernel_at_a_time():
        bn_grads_kernel[(_cdiv(channels, block_n),)](
            partial_sums, invstd, grad_scale, grad_bias, rows, channels, BLOCK_R=block_r,
            BLOCK_N=block_n)
    return grad_scale, grad_bias


def partial_rows(buffer: torch.Tensor) -> int:
    """Rows ``input_grad_pass``'s ``partial_sums`` needs for ``buffer``, whatever the config."""
    n, _, h, w = buffer.shape
    return _cdiv(n * h * w, _MIN_BLOCK_M)


def bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                             stats_grad, grad_buffer):
    """Triton backward; see ``schema.py`` for the contract."""
    channels = check_backward_args(grad_out, buffer, mean, invstd, bn_weight, bn_bias,
                                   conv_weight, grad_buffer)
    if buffer.dtype == torch.float64:
        return torch_impl.bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight,
                                                   bn_bias, conv_weight, stats_grad, grad_buffer)
    with _device_guard(buffer.device):
        return _backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                         stats_grad, grad_buffer, channels)


def _backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight, stats_grad,
              grad_buffer, channels):
    buffer, grad_out = _dense(buffer), _dense(grad_out)
    target = grad_buffer if _pixels_addressable(grad_buffer) else torch.zeros_like(buffer)
    n, _, h, w = buffer.shape
    co, pixels, device = conv_weight.shape[0], n * h * w, buffer.device
    bn = _bn_vectors(mean, invstd, bn_weight, bn_bias)
    weight = conv_weight.view(co, channels)

    # dW: split-K over pixel tiles, partial sums reduced in a fixed order (deterministic).
    tiles_mn = _cdiv(co, 64) * _cdiv(channels, 64)
    splits = _num_splits(tiles_mn, pixels, device)
    partial_w = torch.empty((splits, co, channels), dtype=torch.float32, device=device)
    flat = pixels_flat(h * w, grad_out, buffer)
    _launch(_weight_grad, lambda meta: (_cdiv(co, meta["BLOCK_M"]),
                                        _cdiv(channels, meta["BLOCK_N"]), splits),
            _shape_class(buffer.dtype, flat, pixels, channels, co), device,
            (grad_out, buffer, *bn, partial_w, pixels, channels, co, h * w, splits,
             *_pixel_strides(grad_out), *_pixel_strides(buffer)),
            dict(FLAT=flat, PRECISION=_precision(buffer.dtype), UPCAST=INTERPRETED))
    grad_weight = partial_w.sum(0).view_as(conv_weight).to(conv_weight.dtype)

    # Input gradient, ReLU mask, per-channel partial sums; dx directly or via a store of g.
    partial_sums = torch.empty((partial_rows(buffer), 2, channels), dtype=torch.float32,
                               device=device)
    store = torch.empty((pixels, channels) if stats_grad else (0,), dtype=torch.float32,
                        device=device)
    rows = input_grad_pass(grad_out, weight, buffer, bn, target, store, partial_sums,
                           stats_grad)
    # batchnorm.bn_backward's dweight = sum(g * xhat) and dbias = sum(g); in float64 where
    # the statistics' term is formed from them.
    wide = torch.float64 if stats_grad else None
    grad_scale, grad_bias = bn_grads(partial_sums, rows, bn[1], wide or bn_weight.dtype,
                                     wide or bn_bias.dtype)
    if stats_grad:
        # The statistics' term kx * x + k0, with the block's own coefficient formula.
        kx, k0 = torch.zeros((2, channels), dtype=torch.float64, device=device)
        batchnorm.add_stats_coefficients(kx, k0, mean.double(), invstd.double(), bn_weight,
                                         grad_scale, grad_bias, pixels)
        _launch_elementwise(add_dx_kernel, pixels, channels, store, buffer, bn[1], bn[2],
                            kx.float(), k0.float(), target, pixels, channels, h * w,
                            *_pixel_strides(buffer), *_pixel_strides(target),
                            FLAT=pixels_flat(h * w, buffer, target))
        grad_scale, grad_bias = grad_scale.to(bn_weight.dtype), grad_bias.to(bn_bias.dtype)
    if target is not grad_buffer:
        grad_buffer[:, :channels].add_(target[:, :channels])
    return grad_weight, grad_scale, grad_bias


def bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype=None):
    """Triton kernel of the ``bn_relu`` op (contract in ``schema.py``): one launch, where the
    reference kernel takes seven (fold, constants, BN, clamp) on a GPU."""
    dtype = check_bn_relu_args(x, mean, invstd, bn_weight, bn_bias, dtype)
    if x.dtype == torch.float64:
        return torch_impl.bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype)
    out = torch.empty_like(x, dtype=dtype, memory_format=memory_format_of(x))
    _launch_bn_relu(_dense(x), mean, invstd, bn_weight, bn_bias, out)
    return out


def bn_relu_inplace(x, mean, invstd, bn_weight, bn_bias):
    """Triton kernel of the ``bn_relu_inplace`` op (contract in ``schema.py``): ``bn_relu``'s
    launch with ``x`` as its output (each element is loaded, then stored, by one program)."""
    check_bn_relu_inplace_args(x, mean, invstd, bn_weight, bn_bias)
    if x.dtype == torch.float64:
        torch_impl.bn_relu_inplace(x, mean, invstd, bn_weight, bn_bias)
        return
    _launch_bn_relu(x, mean, invstd, bn_weight, bn_bias, x)


def _launch_bn_relu(x, mean, invstd, bn_weight, bn_bias, out) -> None:
    if out.numel() == 0:
        return
    n, channels, h, w = x.shape
    with _device_guard(x.device):
        _launch_elementwise(bn_relu_kernel, n * h * w, channels, x,
                            *_bn_vectors(mean, invstd, bn_weight, bn_bias), out, n * h * w,
                            channels, h * w, *_pixel_strides(x), *_pixel_strides(out),
                            FLAT=pixels_flat(h * w, x, out))


def add_stats_term(grad, x, kx, k0):
    """Triton kernel of the ``add_stats_term`` op (contract in ``schema.py``): one launch,
    where the reference kernel takes three."""
    check_stats_term_args(grad, x, kx, k0)
    if x.dtype == torch.float64:
        return torch_impl.add_stats_term(grad, x, kx, k0)
    out = torch.empty_like(x)  # dense in the layout x's strides suggest, as the fake says
    if out.numel() == 0:
        return out
    # The kernel addresses pixels as n * s_n + hw * s_hw; the layout x suggests may not (x
    # with its plane transposed): the kernel then writes NCHW, copied into place.
    target = out if _pixels_addressable(out) else torch.empty(x.shape, dtype=x.dtype,
                                                               device=x.device)
    grad, x = _dense(grad), _dense(x)
    n, channels, h, w = x.shape
    with _device_guard(x.device):
        _launch_elementwise(stats_term_kernel, n * h * w, channels, grad, x, kx.contiguous(),
                            k0.contiguous(), target, n * h * w, channels, h * w,
                            *_pixel_strides(grad), *_pixel_strides(x), *_pixel_strides(target),
                            FLAT=pixels_flat(h * w, grad, x, target))
    if target is not out:
        out.copy_(target)
    return out


_COEFFICIENTS_BLOCK = 128


def add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias,
                           count):
    """Triton kernel of the ``add_stats_coefficients`` op (contract in ``schema.py``): one
    launch, where the reference kernel takes six."""
    check_stats_coefficients_args(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                  grad_bn_bias, count)
    if kx.dtype == torch.float64:
        torch_impl.add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight,
                                          grad_bn_bias, count)
        return
    channels = kx.shape[0]
    if channels == 0:
        return
    vectors = (t.contiguous() for t in (mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias))
    with _device_guard(kx.device), _one_kernel_at_a_time():
        stats_coefficients_kernel[(_cdiv(channels, _COEFFICIENTS_BLOCK),)](
            kx, k0, *vectors, channels, 1.0 / count, kx.stride(0), k0.stride(0),
            BLOCK=_COEFFICIENTS_BLOCK)


_KERNELS = {FORWARD: bn_relu_conv1x1, BACKWARD: bn_relu_conv1x1_backward,
            qualified("bn_relu"): bn_relu, qualified("bn_relu_inplace"): bn_relu_inplace,
            qualified("add_stats_term"): add_stats_term,
            qualified("add_stats_coefficients"): add_stats_coefficients}


def register(dispatch_keys) -> None:
    """Register the Triton launchers as the ops' kernels for ``dispatch_keys`` ("CUDA",
    "CPU")."""
    for key in dispatch_keys:
        for op, kernel in _KERNELS.items():
            torch.library.impl(op, key)(kernel)
