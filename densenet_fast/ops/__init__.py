"""The fused kernel ops (BN-ReLU-Conv1x1 and its backward, BN-ReLU and its in-place form, the
statistics' gradient term and its coefficients, the stem's BN-ReLU-MaxPool and its backward,
a BN's batch statistics and the backward of a BN on its own): defined here, once,
from their contracts (``schema.py``) with the pure-PyTorch reference kernels
(``torch_impl.py``) as the default for every device; the compiled backends add device kernels
when the package activates them (``densenet_fast/__init__.py``, :mod:`densenet_fast.backends`),
and the dispatcher chooses.

The functions below call the ops; ``_run`` is the one place that sends them to the
reference kernels instead: for side-by-side comparisons in one process
(:func:`reference_kernels`), and while dynamo or ``torch.export`` traces them.
"""

from contextlib import contextmanager

import torch

from . import library, schema, torch_impl

for _name, _schema in schema.SCHEMAS.items():
    _fake, _flops = schema.FAKES[_name]
    library.define(_name, _schema, kernel=getattr(torch_impl, _name), fake=_fake,
                   flops=_flops)

_reference_depth = 0  # nesting of reference_kernels()


@contextmanager
def reference_kernels():
    """Run the ops' pure-PyTorch kernels inside this context, whatever backend is loaded.

    For side-by-side comparisons in one process (benchmarks, tests); wrap the backward too.
    """
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


def reference_kernels_in_force() -> bool:
    """Whether :func:`reference_kernels` is in force (the ops run their pure-PyTorch
    kernels whatever backend is loaded)."""
    return _reference_depth > 0


def _run(name: str, *args):
    """Op ``name`` on ``args``: the dispatcher's kernel; the reference kernel inside
    :func:`reference_kernels`, and while dynamo or ``torch.export`` traces the call: a
    compiled graph then holds ATen ops, which inductor fuses (a block without gradients
    where ``features`` keeps the caller's layout; elsewhere the block is one opaque op whose
    kernels dynamo never sees, ``graph.py``), and an exported program runs without
    densenet_fast. The compiled densenet121 inference forward (NCHW, float32, batch 8,
    224x224, 2-core AMD EPYC, Zen 4) ran at 0.94-0.96x compiled torchvision's time so,
    1.03-1.07x with these kernel ops opaque, before the fused steps ran channels-last
    there."""
    if _reference_depth or torch.compiler.is_dynamo_compiling() or \
            torch.compiler.is_exporting():
        return getattr(torch_impl, name)(*args)
    return getattr(torch.ops.densenet_fast, name)(*args)


def bn_relu_conv1x1(buffer, mean, invstd, bn_weight, bn_bias, conv_weight):
    """``conv1x1(relu(bn(buffer[:, :C])), conv_weight)`` (contract in ``schema.py``)."""
    return _run("bn_relu_conv1x1", buffer, mean, invstd, bn_weight, bn_bias, conv_weight)


def bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, bn_weight, bn_bias, conv_weight,
                             stats_grad, grad_buffer):
    """The fused op's backward (contract in ``schema.py``); adds into ``grad_buffer``."""
    return _run("bn_relu_conv1x1_backward", grad_out, buffer, mean, invstd, bn_weight,
                bn_bias, conv_weight, stats_grad, grad_buffer)


def bn_relu(x, mean, invstd, bn_weight, bn_bias, dtype=None):
    """``relu(bn(x))`` rounded to ``x``'s dtype, stored as ``dtype`` (contract in
    ``schema.py``)."""
    return _run("bn_relu", x, mean, invstd, bn_weight, bn_bias, dtype)


def bn_relu_inplace(x, mean, invstd, bn_weight, bn_bias) -> None:
    """``bn_relu`` written over ``x`` (dense; contract in ``schema.py``)."""
    _run("bn_relu_inplace", x, mean, invstd, bn_weight, bn_bias)


def add_stats_term(grad, x, kx, k0):
    """``grad + kx * x + k0`` per channel, dense in ``x``'s memory format (contract in
    ``schema.py``)."""
    return _run("add_stats_term", grad, x, kx, k0)


def add_stats_coefficients(kx, k0, mean, invstd, bn_weight, grad_bn_weight, grad_bn_bias,
                           count: int) -> None:
    """Add one BN's coefficients of the statistics' gradient term to ``kx``, ``k0`` in place
    (contract in ``schema.py``)."""
    _run("add_stats_coefficients", kx, k0, mean, invstd, bn_weight, grad_bn_weight,
         grad_bn_bias, count)


def bn_relu_max_pool2d(x, mean, invstd, bn_weight, bn_bias, pool_args):
    """``max_pool2d(relu(bn(x)), *pool_args)`` (contract in ``schema.py``)."""
    return _run("bn_relu_max_pool2d", x, mean, invstd, bn_weight, bn_bias, *pool_args)


def bn_relu_max_pool2d_backward(grad_out, x, mean, invstd, bn_weight, bn_bias, pool_args):
    """The gradient at the BN's output of :func:`bn_relu_max_pool2d` (contract in
    ``schema.py``)."""
    return _run("bn_relu_max_pool2d_backward", grad_out, x, mean, invstd, bn_weight, bn_bias,
                *pool_args)


def channel_stats(x, scratch=None):
    """Per-channel ``(mean, biased var)`` of ``x`` over N, H, W (contract in ``schema.py``)."""
    return _run("channel_stats", x, scratch)


def bn_backward(grad, x, mean, invstd, bn_weight, stats_grad: bool):
    """A BN's ``(dx, grad_bn_weight, grad_bn_bias)`` (contract in ``schema.py``)."""
    return _run("bn_backward", grad, x, mean, invstd, bn_weight, stats_grad)


__all__ = ["add_stats_coefficients", "add_stats_term", "bn_backward", "bn_relu",
           "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "bn_relu_max_pool2d",
           "bn_relu_max_pool2d_backward", "channel_stats", "reference_kernels"]
