"""How every op of this package is registered: one way, with ``torch.library``'s API.

As in pytorch/extension-cpp, an op is defined once by its schema, with a default kernel
under ``CompositeExplicitAutograd`` (it serves every device) and a fake implementation for
tracing; compiled backends register device kernels against the same schema (C++:
``TORCH_LIBRARY_IMPL(densenet_fast, CPU, m)`` in ``csrc/``; Triton: ``torch.library.impl``
for CUDA in ``triton_impl.py``), and the dispatcher prefers those for their device. Ops that
autograd differentiates get their backward with ``torch.library.register_autograd``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

NAMESPACE = "densenet_fast"


def qualified(name: str) -> str:
    """``densenet_fast::name``."""
    return f"{NAMESPACE}::{name}"


def define(name: str, schema: str, *, kernel: Callable, fake: Callable,
           flops: Callable | None = None, autograd: tuple[Callable, Callable] | None = None):
    """Define op ``densenet_fast::name`` with ``schema`` (``"(args) -> returns"``), its
    default ``kernel`` for every device, its ``fake`` implementation (shapes, dtypes and
    strides of the outputs), optionally its FLOP formula (``FlopCounterMode``) and its
    ``autograd`` ``(backward, setup_context)``. Returns ``torch.ops.densenet_fast.<name>``."""
    qualname = qualified(name)
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, "CompositeExplicitAutograd")(kernel)
    torch.library.register_fake(qualname)(fake)
    op = getattr(torch.ops.densenet_fast, name)
    if flops is not None:
        register_flop_formula(op)(flops)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return op
