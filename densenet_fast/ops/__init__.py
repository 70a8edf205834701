"""The fused ops (BN-ReLU-Conv1x1, BN-ReLU, the stem's BN-ReLU-MaxPool): schemas, reference
kernels and BatchNorm helpers."""

from contextlib import contextmanager

import torch

from . import torch_impl

# The reference kernels serve every device; compiled backends register over them when the
# package activates them (densenet_fast/__init__.py).
torch_impl.register()

# Set by reference_kernels(): bypass the dispatcher and run the pure-PyTorch kernels.
_use_reference = False


def _inline_reference() -> bool:
    # Traced by torch.compile (a block run without gradients, or a block op's fake
    # implementation), the reference kernels' ATen ops are traced: inductor fuses them, and
    # it miscompiled the backward op's mutated gradient buffer when it saw that op (README,
    # "Notes"). Training blocks reach this op only inside the opaque block ops of
    # densenet_fast.graph, which run eagerly, on the active backend's kernels.
    return _use_reference or torch.compiler.is_compiling()


@contextmanager
def reference_kernels():
    """Run the op's pure-PyTorch kernels inside this context, whatever backend is loaded.

    For side-by-side comparisons in one process (benchmarks, tests); wrap the backward too.
    """
    global _use_reference
    previous, _use_reference = _use_reference, True
    try:
        yield
    finally:
        _use_reference = previous


def bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight):
    """The fused forward (contract in ``schema.py``), on the active backend's kernel."""
    if _inline_reference():
        return torch_impl.bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias,
                                          conv_weight)
    return torch.ops.densenet_fast.bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias,
                                                   conv_weight)


def bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                             stats_grad, grad_buffer):
    """The fused backward (contract in ``schema.py``); adds into ``grad_buffer``."""
    args = (grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight, stats_grad,
            grad_buffer)
    if _inline_reference():
        return torch_impl.bn_relu_conv1x1_backward(*args)
    return torch.ops.densenet_fast.bn_relu_conv1x1_backward(*args)


def bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype=None):
    """``relu(bn(x))`` rounded to ``x``'s dtype, stored as ``dtype`` (contract in
    ``schema.py``)."""
    if _inline_reference():
        return torch_impl.bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype)
    return torch.ops.densenet_fast.bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype)


def bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias, pool_args):
    """``max_pool2d(relu(bn(x)), *pool_args)`` (contract in ``schema.py``)."""
    if _inline_reference():
        return torch_impl.bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias, *pool_args)
    return torch.ops.densenet_fast.bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias,
                                                      *pool_args)


def bn_relu_max_pool2d_backward(grad_out, x, mean, invstd, bn_weight, bn_bias, pool_args):
    """The gradient at the BN's output of :func:`bn_relu_max_pool2d` (contract in
    ``schema.py``)."""
    args = (grad_out, x, mean, invstd, bn_weight, bn_bias, *pool_args)
    if _inline_reference():
        return torch_impl.bn_relu_max_pool2d_backward(*args)
    return torch.ops.densenet_fast.bn_relu_max_pool2d_backward(*args)


__all__ = ["bn_relu", "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "bn_relu_max_pool2d",
           "bn_relu_max_pool2d_backward", "reference_kernels"]
