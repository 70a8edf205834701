"""Launchers of the Triton kernels and their registration against the op schemas.

Registered for CUDA tensors; with ``TRITON_INTERPRET=1`` (and ``DENSENET_FAST_BACKEND=triton``)
for CPU tensors too, which is how the kernels are tested on machines without a GPU.
Triton's ``tl.dot`` has no float64: float64 calls (gradcheck) go to the reference kernels.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import triton

from . import torch_impl
from .batchnorm import StatsGradient, scale_shift
from .formats import memory_format_of
from .schema import BACKWARD, FORWARD, check_backward_args, check_forward_args
from .triton_kernels import add_dx_kernel, forward_kernel, input_grad_kernel, weight_grad_kernel

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


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); few, so that the first call's compile and
# tuning stay short. The interpreter (slow) tunes over the first only; the tests run every
# one of them explicitly (``forced_config``).
GEMM_CONFIGS = _configs([(32, 32, 32, 4, 2), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)])
WEIGHT_GRAD_CONFIGS = _configs([(32, 32, 32, 4, 2), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3)])


def _tuned(configs):
    return configs[:1] if INTERPRETED else configs


_forward = triton.autotune(_tuned(GEMM_CONFIGS), key=["P", "C", "CO"])(forward_kernel)
# The input-gradient kernel adds into the gradient buffer: autotuning must restore it after
# each trial run. Its per-block partial sums have as many rows as the config has blocks, so
# only the rows of the config that ran last are read (``_launch`` says which).
_input_grad = triton.autotune(_tuned(GEMM_CONFIGS), key=["P", "C", "CO", "STORE_G"],
                              restore_value=["gbuf_ptr"])(input_grad_kernel)
_weight_grad = triton.autotune(_tuned(WEIGHT_GRAD_CONFIGS), key=["P", "C", "CO"])(
    weight_grad_kernel)

_forced: triton.Config | None = None


@contextmanager
def forced_config(config: triton.Config | None):
    """Launch every kernel with ``config`` instead of the autotuned choice (tests, checks)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def _launch(kernel, grid, *args, **kwargs) -> triton.Config:
    """Launch an autotuned ``kernel`` on the current device; return the config that ran."""
    if _forced is None:
        kernel[grid](*args, **kwargs)
        return kernel.best_config
    kernel.fn[grid](*args, **kwargs, **_forced.kwargs, num_warps=_forced.num_warps,
                    num_stages=_forced.num_stages)
    return _forced


_ELEMENTWISE_BLOCK = (32, 32)


def _precision(dtype: torch.dtype) -> str:
    # float32 GEMMs follow torch's setting for convolutions (TF32 by default on Ampere+);
    # the setting only matters for float32 operands.
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRETED:
        return "tf32"
    return "ieee"


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, pixel-in-image) strides of a tensor dense in NCHW or NHWC."""
    return t.stride(0), t.stride(1), t.stride(3)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A tensor whose pixels can be addressed as ``n * s_n + hw * s_hw`` (NCHW or NHWC)."""
    if t.stride(2) == t.shape[3] * t.stride(3):
        return t
    return t.contiguous()


def _num_splits(tiles: int, pixels: int, device: torch.device) -> int:
    """Pixel splits of the weight-gradient reduction: enough programs to fill ``device``."""
    if INTERPRETED or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
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
    scale, shift = scale_shift(mean, invstd, bn_weight, bn_bias)
    weight = conv_weight.view(co, channels)
    out = torch.empty((n, co, h, w), dtype=buffer.dtype, device=buffer.device,
                      memory_format=memory_format_of(buffer))
    pixels = n * h * w

    def grid(meta):
        return triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"])

    with _device_guard(buffer.device):
        _launch(_forward, grid, buffer, weight, scale.contiguous(), shift.contiguous(), out,
                pixels, channels, co, h * w, *_pixel_strides(buffer), *weight.stride(),
                *_pixel_strides(out), PRECISION=_precision(buffer.dtype), UPCAST=INTERPRETED)
    return out


def input_grad_pass(grad_out, weight, buffer, scale, shift, mean, k_g, target, store,
                    partial_sums, stats_grad: bool) -> torch.Tensor:
    """``g = (W^T grad_out) * [a > 0]``; adds ``k_g * g`` into ``target`` (or, with
    ``stats_grad``, stores ``g`` in ``store``). Returns ``[sum(g), sum(g * (x - mean))]``
    per channel, float64, from the rows of ``partial_sums`` that the launch wrote: it needs
    ``ceil(P / 32)`` rows, of which a config with a larger ``BLOCK_M`` fills fewer."""
    n, channels, h, w = buffer.shape[0], weight.shape[1], buffer.shape[2], buffer.shape[3]
    co, pixels = weight.shape[0], n * h * w
    config = _launch(
        _input_grad, lambda meta: (triton.cdiv(pixels, meta["BLOCK_M"]),
                                   triton.cdiv(channels, meta["BLOCK_N"])),
        grad_out, weight, buffer, scale, shift, mean, k_g, target, store, partial_sums,
        pixels, channels, co, h * w, *_pixel_strides(grad_out), *weight.stride(),
        *_pixel_strides(buffer), *_pixel_strides(target), STORE_G=stats_grad,
        PRECISION=_precision(buffer.dtype), UPCAST=INTERPRETED)
    rows = triton.cdiv(pixels, config.kwargs["BLOCK_M"])
    return partial_sums[:rows].double().sum(0)


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
    target = grad_buffer if grad_buffer.stride(2) == grad_buffer.shape[3] * grad_buffer.stride(3) \
        else torch.zeros_like(buffer)
    n, _, h, w = buffer.shape
    co, pixels, device = conv_weight.shape[0], n * h * w, buffer.device
    scale, shift = (t.contiguous() for t in scale_shift(mean, invstd, bn_weight, bn_bias))
    weight = conv_weight.view(co, channels)
    # dx's direct term k_g * g: batchnorm.bn_backward's dx without stats_grad.
    k_g = (bn_weight.float() * invstd.float()).contiguous()

    # dW: split-K over pixels, partial sums reduced in a fixed order (deterministic).
    tiles_mn = triton.cdiv(co, 64) * triton.cdiv(channels, 64)
    splits = _num_splits(tiles_mn, pixels, device)
    per_split = -(-pixels // splits)
    partial_w = torch.empty((splits, co, channels), dtype=torch.float32, device=device)
    _launch(_weight_grad, lambda meta: (triton.cdiv(co, meta["BLOCK_M"]),
                                        triton.cdiv(channels, meta["BLOCK_N"]), splits),
            grad_out, buffer, scale, shift, partial_w, pixels, channels, co, h * w, per_split,
            *_pixel_strides(grad_out), *_pixel_strides(buffer),
            PRECISION=_precision(buffer.dtype), UPCAST=INTERPRETED)
    grad_weight = partial_w.sum(0).view_as(conv_weight).to(conv_weight.dtype)

    # Input gradient, ReLU mask, per-channel partial sums; dx directly or via a store of g.
    partial_sums = torch.empty((triton.cdiv(pixels, 32), 2, channels), dtype=torch.float32,
                               device=device)
    store = torch.empty((pixels, channels) if stats_grad else (0,), dtype=torch.float32,
                        device=device)
    sums = input_grad_pass(grad_out, weight, buffer, scale, shift, mean.float().contiguous(),
                           k_g, target, store, partial_sums, stats_grad)
    grad_bias = sums[0]  # batchnorm.bn_backward's dbias = sum(g), dweight = sum(g * xhat)
    grad_scale = sums[1] * invstd.double()
    if stats_grad:
        # The statistics' term kx * x + k0, with the block's own coefficient formula.
        term = StatsGradient(channels, torch.float64, device)
        term.add(mean.double(), invstd.double(), bn_weight, grad_scale, grad_bias, pixels)
        add_dx_kernel[(triton.cdiv(pixels, _ELEMENTWISE_BLOCK[0]),
                       triton.cdiv(channels, _ELEMENTWISE_BLOCK[1]))](
            store, buffer, k_g, term.kx.float(), term.k0.float(), target, pixels, channels,
            h * w,
            *_pixel_strides(buffer), *_pixel_strides(target),
            BLOCK_M=_ELEMENTWISE_BLOCK[0], BLOCK_N=_ELEMENTWISE_BLOCK[1])
    if target is not grad_buffer:
        grad_buffer[:, :channels].add_(target[:, :channels])
    return grad_weight, grad_scale.to(bn_weight.dtype), grad_bias.to(bn_bias.dtype)


def register(dispatch_keys) -> None:
    """Register the Triton launchers as the op's kernels for ``dispatch_keys`` ("CUDA", "CPU")."""
    for key in dispatch_keys:
        torch.library.impl(FORWARD, key)(bn_relu_conv1x1)
        torch.library.impl(BACKWARD, key)(bn_relu_conv1x1_backward)
