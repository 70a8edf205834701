"""Cases of the fused BN-ReLU-Conv1x1 op and one comparison of a kernel pair against a reference.

Shared by test_ops.py (the op against unfused autograd), test_cpp_kernels.py and
with_triton/test_triton_kernels.py (compiled kernels against the pure-PyTorch ones).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tolerances import assert_close

from densenet_fast.ops import torch_impl

EPS = 1e-5  # BatchNorm's epsilon, not a tolerance
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["nchw", "nhwc"]
STATS_GRAD_IDS = ["stats-grad", "direct"]


def shape_id(shape) -> str:
    """``(2, 13, 11, 8, 5, 4)`` -> ``"2x13x11x8x5x4"``."""
    return "x".join(map(str, shape))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it is float64: the precision references compute in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass(frozen=True)
class OpCase:
    """The op's arguments; ``grad_buffer`` is the non-zero gradient buffer that the backward
    adds into (each run adds into a copy of it)."""

    buffer: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor  # 1 / invstd**2 - EPS, for F.batch_norm in eval mode
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    weight: torch.Tensor
    grad_out: torch.Tensor
    grad_buffer: torch.Tensor
    memory_format: torch.memory_format  # the output's layout
    batch_stats: bool  # mean and invstd are the prefix's own statistics

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    @property
    def args(self) -> tuple:
        """The forward's arguments: ``(buffer, mean, invstd, gamma, beta, weight)``."""
        return self.buffer, self.mean, self.invstd, self.gamma, self.beta, self.weight

    def widened(self) -> OpCase:
        """The same values with the data in float32 (float64 stays): what references read."""
        return replace(self, buffer=_wide(self.buffer), weight=_wide(self.weight),
                       grad_out=_wide(self.grad_out), grad_buffer=_wide(self.grad_buffer))


def op_case(shape, dtype=torch.float32, memory_format=torch.contiguous_format, *,
            batch_stats=False, strided=False, grad_out_format=None, grad_buffer_format=None,
            bn_dtype=torch.float32, device="cpu") -> OpCase:
    """Random arguments of the op for ``shape = (N, C_total, C, C_out, H, W)``.

    The buffer, conv weight and gradients are ``dtype`` and the statistics float32 (float64
    for float64 data); the BN parameters are ``bn_dtype``. ``batch_stats``: the statistics
    are the prefix's own, as in training (else random, as in eval). ``strided``: a buffer in
    neither layout (every other row of a taller tensor). The gradients are laid out as the
    buffer unless ``grad_out_format`` / ``grad_buffer_format`` say otherwise.
    """
    n, total, c, c_out, h, w = shape
    make = dict(device=device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    buffer = torch.randn(n, total, h, w, **make).to(dtype).contiguous(memory_format=memory_format)
    if strided:
        rows = torch.empty(n, total, 2 * h, w, dtype=dtype, **make)[:, :, ::2]
        buffer = rows.copy_(buffer)
        assert not buffer.is_contiguous() and not buffer.is_contiguous(
            memory_format=torch.channels_last)
        memory_format = torch.contiguous_format
    if batch_stats:
        var, mean = torch.var_mean(buffer[:, :c].to(stats_dtype), dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + EPS)
    else:
        mean = torch.randn(c, dtype=stats_dtype, **make) * 0.1
        invstd = torch.rand(c, dtype=stats_dtype, **make) + 0.5
        var = invstd.pow(-2) - EPS
    gamma = torch.rand(c, dtype=bn_dtype, **make) + 0.5
    beta = torch.randn(c, dtype=bn_dtype, **make)
    weight = (torch.randn(c_out, c, 1, 1, **make) / c ** 0.5).to(dtype)
    grad_out = torch.randn(n, c_out, h, w, **make).to(dtype).contiguous(
        memory_format=grad_out_format or memory_format)
    grad_buffer = torch.randn(n, total, h, w, **make).to(dtype).contiguous(
        memory_format=grad_buffer_format or memory_format)
    return OpCase(buffer, mean, var, invstd, gamma, beta, weight, grad_out, grad_buffer,
                  memory_format, batch_stats)


class OpResult(NamedTuple):
    output: torch.Tensor
    input_grad: torch.Tensor  # what the backward added to the prefix of the gradient buffer
    conv_weight_grad: torch.Tensor
    bn_weight_grad: torch.Tensor
    bn_bias_grad: torch.Tensor


# (forward, backward) kernel pairs
ACTIVE_KERNELS = (torch.ops.densenet_fast.bn_relu_conv1x1,
                  torch.ops.densenet_fast.bn_relu_conv1x1_backward)  # through the dispatcher
TORCH_KERNELS = (torch_impl.bn_relu_conv1x1, torch_impl.bn_relu_conv1x1_backward)


def run_kernels(kernels, case: OpCase, stats_grad: bool) -> OpResult:
    """The forward and the backward of one kernel pair on ``case``."""
    forward, backward = kernels
    output = forward(*case.args)
    grad_buffer = case.grad_buffer.clone()
    grads = backward(case.grad_out, *case.args, stats_grad, grad_buffer)
    c = case.channels
    assert torch.equal(grad_buffer[:, c:], case.grad_buffer[:, c:]), \
        "channels past the prefix changed"
    added = _wide(grad_buffer[:, :c]) - _wide(case.grad_buffer[:, :c])
    return OpResult(output, added, *grads)


def _unfused(case: OpCase, stats_grad: bool) -> OpResult:
    """BatchNorm (batch statistics with ``stats_grad``, else constant ones), ReLU and a 1x1
    convolution under autograd."""
    wide = case.widened()
    x = wide.buffer[:, :case.channels].detach().clone().requires_grad_()
    g, b, w = (t.detach().clone().requires_grad_() for t in (case.gamma, case.beta, wide.weight))
    if stats_grad:
        assert case.batch_stats, "the gradient through batch statistics needs batch statistics"
        y = F.batch_norm(x, None, None, g, b, training=True, eps=EPS)
    else:
        y = F.batch_norm(x, case.mean, case.var, g, b, training=False, eps=EPS)
    out = F.conv2d(F.relu(y), w)
    out.backward(wide.grad_out)
    return OpResult(out.detach(), x.grad, w.grad, g.grad, b.grad)


REFERENCES = {
    # the pure-PyTorch kernels on the same arguments
    "torch": lambda case, stats_grad: run_kernels(TORCH_KERNELS, case, stats_grad),
    # the pure-PyTorch kernels in float32 on the same (rounded) values
    "torch-float32": lambda case, stats_grad: run_kernels(TORCH_KERNELS, case.widened(),
                                                          stats_grad),
    # unfused autograd in float32 (float64 for float64) on the same values
    "unfused": _unfused,
}


def assert_op_matches(case: OpCase, stats_grad: bool, reference: str, kernels=ACTIVE_KERNELS):
    """Run ``kernels`` (default: the op through the dispatcher) forward and backward on
    ``case``: the results have the op's dtypes and layout and are close, with the tolerances of
    the data's dtype, to those of ``REFERENCES[reference]``."""
    got = run_kernels(kernels, case, stats_grad)
    want = REFERENCES[reference](case, stats_grad)
    assert got.output.dtype == case.buffer.dtype, got.output.dtype
    assert got.output.is_contiguous(memory_format=case.memory_format), "output layout"
    for grad, param in zip(got[2:], (case.weight, case.gamma, case.beta), strict=True):
        assert grad.dtype == param.dtype, (grad.dtype, param.dtype)
    for g, w, what in zip(got, want, OpResult._fields, strict=True):
        assert_close(g, w, case.buffer.dtype, what)


def assert_nan_propagates_as_in_torch(case: OpCase, kernels=ACTIVE_KERNELS):
    """A NaN in the prefix reaches the results where unfused BatchNorm, ReLU and convolution
    under autograd send it, and only there: ReLU keeps NaN, and its backward
    (``threshold_backward``, which zeroes only where ``y <= 0``) lets the gradient through
    where ``y`` is NaN. So the output's pixel, the conv and BN weight gradients of that
    channel are NaN, while the input gradient stays finite and is not zeroed there."""
    buffer = case.buffer.clone()
    buffer[0, 1, 0, 0] = float("nan")
    case = replace(case, buffer=buffer, batch_stats=False)
    got, want = run_kernels(kernels, case, False), _unfused(case, False)
    assert want.output[0, :, 0, 0].isnan().all() and not want.input_grad.isnan().any()
    assert want.input_grad[0, 1, 0, 0] != 0
    for g, w, what in zip(got, want, OpResult._fields, strict=True):
        assert_close(g, w, case.buffer.dtype, what, equal_nan=True)


# ---- output layouts: every kernel lays its outputs out as the op's fake says ---------------

# How a 4-D argument is laid out: dense in either format, a channel slice of a tensor dense in
# either (not dense itself: channels-last order without being channels-last), every other row
# of a taller tensor, a transposed plane, and one image dense in channels-last (whose strides
# of size-1 dimensions are ambiguous).
LAYOUT_KINDS = ["nchw", "nhwc", "slice-of-nhwc", "slice-of-nchw", "rows", "transposed",
                "one-image-nhwc"]


def laid_out(shape, dtype: torch.dtype, kind: str, device="cpu") -> torch.Tensor:
    """Random data of ``shape`` laid out as ``LAYOUT_KINDS``' ``kind`` says."""
    n, c, h, w = shape
    make = dict(device=device)
    if kind in ("nchw", "nhwc", "one-image-nhwc"):
        fmt = torch.contiguous_format if kind == "nchw" else torch.channels_last
        return torch.randn(shape, **make).to(dtype).contiguous(memory_format=fmt)
    if kind.startswith("slice-of-"):
        fmt = torch.channels_last if kind.endswith("nhwc") else torch.contiguous_format
        wide = torch.randn(n, c + 5, h, w, **make).to(dtype).contiguous(memory_format=fmt)
        return wide[:, 2:2 + c]
    if kind == "rows":
        return torch.randn(n, c, 2 * h, w, **make).to(dtype)[:, :, ::2]
    if kind == "transposed":
        return torch.randn(n, c, w, h, **make).to(dtype).transpose(2, 3)
    raise ValueError(kind)


def layout_cases(kind: str, dtype: torch.dtype, device="cpu") -> dict:
    """``{op name: arguments}`` for every fused op, its data laid out as ``kind`` and the
    gradients it reads or adds into as other kinds (each case pairs different ones)."""
    torch.manual_seed(LAYOUT_KINDS.index(kind))
    n = 1 if kind == "one-image-nhwc" else 2
    c, total, c_out, h, w = 5, 7, 3, 5, 4
    other = LAYOUT_KINDS[(LAYOUT_KINDS.index(kind) + 3) % len(LAYOUT_KINDS)]
    if n == 1 or other == "one-image-nhwc":
        other = "nhwc"
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = (torch.randn(c, dtype=stats, device=device),
               torch.rand(c, dtype=stats, device=device) + 0.5,
               torch.randn(c, device=device), torch.randn(c, device=device))
    x = laid_out((n, c, h, w), dtype, kind, device)
    buffer = laid_out((n, total, h, w), dtype, kind, device)
    conv_weight = torch.randn(c_out, c, 1, 1, device=device).to(dtype)
    grad_out = laid_out((n, c_out, h, w), dtype, other, device)
    grad_buffer = laid_out((n, total, h, w), dtype, other, device)
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    pooled = (n, c, h // 2 + 1, w // 2 + 1)  # ceil mode: (h + 2 - 3 + 1) // 2 + 1
    return {
        "bn_relu": (x, *vectors, None),
        "add_stats_term": (laid_out((n, c, h, w), dtype, other, device), x, *vectors[:2]),
        "bn_relu_conv1x1": (buffer, *vectors, conv_weight),
        "bn_relu_conv1x1_backward": (grad_out, buffer, *vectors, conv_weight, True,
                                     grad_buffer),
        "bn_relu_max_pool2d": (x, *vectors, *pool),
        "bn_relu_max_pool2d_backward": (laid_out(pooled, dtype, other, device), x, *vectors,
                                        *pool),
        "channel_stats": (x, None),
        "bn_backward": (laid_out((n, c, h, w), dtype, other, device), x, *vectors[:3], True),
    }


def expanded(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape with every image (or element, for a vector) at one address: what an
    op that adds into a tensor in place must refuse."""
    return t[:1].expand(t.shape)


def _outputs(result) -> tuple:
    """An op's result as a tuple of its outputs."""
    return result if isinstance(result, tuple) else (result,)


def _significant_strides(t: torch.Tensor) -> tuple:
    """The strides that address something: those of dimensions longer than one."""
    return tuple(s if n > 1 else None for s, n in zip(t.stride(), t.shape, strict=True))


def assert_laid_out_as_fake(name: str, kernel, args) -> None:
    """``kernel`` (a kernel of op ``name``) returns what the op's fake describes: shapes,
    dtypes, and the strides ``torch.compile`` plans with (a kernel that follows a
    non-dense input's strides where the fake makes it dense would break the plan)."""
    from densenet_fast.ops import schema

    fake = schema.FAKES[name][0]
    # the fakes allocate only: on the real tensors
    got, want = _outputs(kernel(*args)), _outputs(fake(*args))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        what = f"{name} output {i}"
        assert (g.shape, g.dtype) == (w.shape, w.dtype), (what, g.shape, g.dtype, w.shape,
                                                          w.dtype)
        assert _significant_strides(g) == _significant_strides(w), (
            what, g.stride(), w.stride())


def assert_kernels_match_reference(kind: str, dtype: torch.dtype, device="cpu") -> None:
    """Every op through the dispatcher on ``layout_cases(kind, dtype)``: its outputs, and what
    the backward added into its gradient buffer, equal the reference kernels' on the same
    values (the cases are seeded: built twice, the same) within ``dtype``'s tolerance."""
    got_cases, want_cases = layout_cases(kind, dtype, device), layout_cases(kind, dtype, device)
    for name, args in got_cases.items():
        got = _outputs(getattr(torch.ops.densenet_fast, name)(*args))
        want = _outputs(getattr(torch_impl, name)(*want_cases[name]))
        if name == "bn_relu_conv1x1_backward":
            got, want = (*got, args[-1]), (*want, want_cases[name][-1])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, dtype, f"{name} on {kind} data, output {i}")
