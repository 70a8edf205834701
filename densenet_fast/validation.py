"""Input checks run before any computation, with messages that name what is wrong.

A DenseNet forward that would fail halfway (too small an image, one value per channel in
training) must fail before the first BatchNorm has touched its running statistics.

Each error is an instance of the class torchvision's DenseNet raises for the same input, so
code that catches torchvision's errors catches these: where torchvision's comes from deep
inside a layer (a ``RuntimeError`` from a convolution or pooling), the error is
:class:`InputError` or :class:`InputTypeError`, which are both the class this package has
always raised and a ``RuntimeError``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ops.formats import autocast_dtype_of, autocast_enabled

# What a class that only wraps another may redefine without changing what a call computes:
# construction, class metadata, and ``_apply`` (FSDP2's, which keeps its sharded parameters
# in step with ``.to()`` and the like).
_WRAPPER_NAMES = frozenset({
    "__new__", "__init__", "__doc__", "__module__", "__qualname__", "__dict__", "__weakref__",
    "__annotations__", "__annotate_func__", "__annotations_cache__", "__firstlineno__",
    "__static_attributes__", "__orig_bases__", "__parameters__", "_apply"})
_wrappers: dict[tuple[type, type], bool] = {}
# (type, qualified class name) -> the base of that type with that name, or None
_named_classes: dict[tuple[type, str], type | None] = {}


def is_type(module, cls: type) -> bool:
    """Whether ``module`` is a ``cls`` where the fused path checks for exactly that type:
    ``type(module) is cls``, or a subclass that only adds hooks or state around it, such as
    the ``FSDP<cls>`` that ``torch.distributed.fsdp.fully_shard`` creates: one whose added
    classes redefine nothing that ``cls`` or its bases define (``forward``, ``__call__``,
    ``_conv_forward``...) beyond :data:`_WRAPPER_NAMES`, and add no property or other data
    descriptor (``torch.nn.utils.parametrize`` computes ``weight`` in one). Hooks and a
    ``forward`` set on the instance are the caller's to check."""
    kind = type(module)
    if kind is cls:
        return True
    if not isinstance(module, cls):  # before the cache, whose growth dynamo would guard on
        return False
    known = _wrappers.get((kind, cls))
    if known is None:
        known = _wrappers[kind, cls] = _only_wraps(kind, cls)
    return known


def member(module: nn.Module, name: str, *default):
    """``getattr(module, name)`` for a parameter, buffer or child module, read from the
    module's own tables first (as ``Module.__getattr__`` reads them): ``Module.__getattr__``
    runs only after ordinary attribute lookup has failed, which costs about a microsecond a
    call, and the fusion checks and the fused call read several hundred members on every
    forward. The same as ``getattr`` (``default`` included) unless a module's class defines
    a property of a name its tables also hold (``torch.nn.utils.parametrize`` removes the
    parameter it computes from the table: its property is found)."""
    for table in (module._parameters, module._buffers, module._modules):
        if name in table:
            return table[name]
    return getattr(module, name, *default)


def is_named_type(module, qualified_name: str) -> bool:
    """:func:`is_type` for the class named ``qualified_name`` (``"package.module.Class"``)
    found among the bases of ``module``'s type: a class of a library that need not be
    imported (a module of that class exists only where it is), recognised without looking the
    library up. Eager calls read the answer per type from a cache (the fusion check asks it
    of every BatchNorm on every forward); dynamo traces the walk itself, once."""
    kind = type(module)
    if torch.compiler.is_compiling():
        cls = _class_named(kind, qualified_name)
    else:
        key = (kind, qualified_name)
        if key not in _named_classes:
            _named_classes[key] = _class_named(kind, qualified_name)
        cls = _named_classes[key]
    return cls is not None and is_type(module, cls)


def _class_named(kind: type, qualified_name: str) -> type | None:
    for cls in kind.__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" == qualified_name:
            return cls
    return None


# A fact of two classes: dynamo calls it instead of tracing it (torch 2.11's cannot trace
# the union of the classes' __dict__s, so a fullgraph compile failed where the cache was
# still cold, as in a fresh process).
@torch.compiler.assume_constant_result
def _only_wraps(kind: type, cls: type) -> bool:
    """For a subclass ``kind`` of ``cls``: see :func:`is_type`."""
    defined = set().union(*(vars(base) for base in cls.__mro__))
    for added in kind.__mro__:
        if added in cls.__mro__:
            continue
        for name, value in vars(added).items():
            if name in _WRAPPER_NAMES:
                continue
            if name in defined or hasattr(type(value), "__set__") \
                    or hasattr(type(value), "__delete__"):
                return False
    return True


class InputError(ValueError, RuntimeError):
    """An input of the wrong rank, channel count or size: a ``ValueError``, and a
    ``RuntimeError`` as torchvision's DenseNet raises for it (from ``conv2d`` or a pool)."""


class InputTypeError(TypeError, RuntimeError):
    """An input of the wrong dtype: a ``TypeError``, and a ``RuntimeError`` as torchvision's
    DenseNet raises for it (``expected scalar type ...``)."""


def stored_tensor(module: nn.Module) -> torch.Tensor:
    """A tensor ``module`` holds (its first parameter, else buffer), for its device and dtype,
    read without evaluating a parametrization: ``torch.nn.utils.parametrize`` computes
    ``weight`` on every read, and spectral_norm's power iteration then takes, in training
    mode, a step that torchvision's forward does not (its vectors, and what the model
    computes, drift apart)."""
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
    raise ValueError(f"{type(module).__name__} holds no tensor to check an input against")


def check_input_tensor(x, *, expected_channels: int, reference: torch.Tensor,
                       where: str) -> None:
    """Type, rank, dtype, channel count and device of ``x`` against a parameter of the model."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(
            f"{where} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputTypeError(f"{where} expects a floating-point input, got dtype {x.dtype}")
    if x.shape[1] != expected_channels:
        raise InputError(
            f"{where} expects {expected_channels} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})")
    if x.device != reference.device:
        raise RuntimeError(
            f"{where}: input is on {x.device} but the model's parameters are on "
            f"{reference.device}; move one of them with .to()")
    if autocast_dtype_of(x) != autocast_dtype_of(reference):
        if not autocast_enabled(x.device.type):
            raise InputTypeError(
                f"{where}: input dtype {x.dtype} differs from the parameters' dtype "
                f"{reference.dtype}; convert one of them or run under torch.autocast")
        raise InputTypeError(
            f"{where}: under torch.autocast the input (dtype {x.dtype}) computes in "
            f"{autocast_dtype_of(x)} but the parameters (dtype {reference.dtype}) in "
            f"{autocast_dtype_of(reference)}: autocast leaves float64 alone; convert one "
            f"of them")


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                ceil_mode: bool = False) -> int:
    """A convolution's or pool's output size along one axis, as torch computes it: in ceil
    mode a last, partial window counts unless it would start in the right padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def as_pair(v) -> tuple[int, int]:
    """A module's (or a pool op's) ``int``, one-value or pair setting (``kernel_size``,
    ``stride``...) as a pair."""
    v = (v,) if isinstance(v, int) else tuple(v)
    return v * 2 if len(v) == 1 else v


def pads_over_half_kernel(kernel, padding) -> bool:
    """Whether a pool's ``padding`` exceeds half its ``kernel`` size on some axis (``int`` or
    pair settings): ``max_pool2d`` and ``avg_pool2d`` refuse it on every device, whatever the
    dilation, though ``max_pool2d``'s meta function accepts it with one."""
    return any(p > k // 2 for p, k in zip(as_pair(padding), as_pair(kernel), strict=True))


def _check_bn(bn: nn.Module, name: str, n: int, h: int, w: int, c: int,
              values_over_ranks=None) -> None:
    if not isinstance(bn, _BatchNorm):
        return  # FrozenBatchNorm2d and the like never use batch statistics
    if not (bn.training or member(bn, "running_mean") is None):
        return
    values = n * h * w
    total = values_over_ranks(bn, n, h * w) if values_over_ranks is not None else None
    if total is None and values == 0:
        return  # an empty batch: BatchNorm accepts it (and only counts it in training)
    if (values if total is None else total) <= 1:
        over = "" if total is None else f" ({total} over all processes)"
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"[{n}, {c}, {h}, {w}]{over} at {name}: use a larger batch or image, or call "
            f".eval()")


def _is_halving_pool(pool) -> bool:
    return (isinstance(pool, nn.AvgPool2d) and as_pair(pool.kernel_size) == (2, 2)
            and as_pair(pool.stride) == (2, 2) and as_pair(pool.padding) == (0, 0)
            and not pool.ceil_mode)


def check_spatial_plan(named_roles, x: torch.Tensor, values_over_ranks=None) -> None:
    """Walk the feature modules (``(name, module, role)`` in order, the role a fusion plan
    gave: ``"block"``, ``"transition"`` or None) with the input's size and refuse, before
    running anything,
    a size that some stride/pool cannot reduce or that leaves a training BN one value per
    channel. Stops checking at the first module whose shape it does not know (a swapped or
    custom module: that module's own error, if any, is then raised when it runs).

    ``values_over_ranks(bn, n, area)``: the values per channel a synchronised ``bn`` sees over
    every process, or None for a BN that normalises per process."""
    n, c, h, w = x.shape
    for name, m, role in named_roles:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            if isinstance(m.padding, str):
                return
            kernel, stride = as_pair(m.kernel_size), as_pair(m.stride)
            padding = as_pair(m.padding)
            if not isinstance(m, nn.Conv2d) and pads_over_half_kernel(kernel, padding):
                # Pools refuse it after the modules before them have run and updated their
                # statistics: refused here, before anything runs.
                raise RuntimeError(
                    f"{name}: pad should be at most half of kernel size, got padding "
                    f"{tuple(padding)} for kernel_size {tuple(kernel)}")
            dilation = as_pair(getattr(m, "dilation", 1))
            ceil_mode = getattr(m, "ceil_mode", False)
            new_h = output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
            new_w = output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
            if new_h < 1 or new_w < 1:
                raise InputError(
                    f"input spatial size {x.shape[2]}x{x.shape[3]} is too small for this "
                    f"DenseNet: "
                    f"{name} receives {h}x{w}, which its kernel {kernel} cannot reduce")
            h, w = new_h, new_w
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
        elif isinstance(m, _BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
            _check_bn(m, name, n, h, w, c, values_over_ranks)
        elif isinstance(m, nn.ReLU | nn.Identity | nn.Dropout):
            continue
        elif role == "block":
            for layer_name, layer in m.named_children():
                for bn_name in ("norm1", "norm2"):
                    bn = member(layer, bn_name, None)
                    if not isinstance(bn, nn.Module):
                        return
                    _check_bn(bn, f"{name}.{layer_name}.{bn_name}", n, h, w,
                              getattr(bn, "num_features", c), values_over_ranks)
            layers = list(m.children())
            if layers:  # a block of no layers returns its input
                c = getattr(getattr(layers[-1], "norm1", None), "num_features", 0) + getattr(
                    getattr(layers[-1], "conv2", None), "out_channels", 0)
        elif role == "transition" and _is_halving_pool(getattr(m, "pool", None)) \
                and isinstance(getattr(m, "conv", None), nn.Conv2d) \
                and getattr(m.conv, "stride", None) == (1, 1):
            _check_bn(getattr(m, "norm", None), f"{name}.norm", n, h, w, c, values_over_ranks)
            if h < 2 or w < 2:
                raise InputError(
                    f"input spatial size {x.shape[2]}x{x.shape[3]} is too small for this "
                    f"DenseNet: "
                    f"{name} receives {h}x{w} but its 2x2 average pool needs at least 2x2")
            h, w, c = h // 2, w // 2, m.conv.out_channels
        else:
            return
