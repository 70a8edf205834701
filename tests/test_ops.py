"""The fused op's pure-PyTorch kernels against unfused autograd, and its registration."""

import pytest
import torch
from op_cases import (
    ACTIVE_KERNELS,
    FORMAT_IDS,
    FORMATS,
    TORCH_KERNELS,
    OpResult,
    assert_nan_propagates_as_in_torch,
    assert_op_matches,
    op_case,
    run_kernels,
)
from tolerances import assert_close

from densenet_fast.ops import bn_relu_conv1x1, torch_impl

# (N, C_total, C, C_out, H, W): odd widths, a prefix shorter than the buffer, 1x1 planes
SHAPES = [(2, 7, 5, 3, 3, 3), (3, 13, 11, 8, 5, 4), (4, 6, 6, 4, 1, 1), (2, 33, 17, 12, 6, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_backward_match_unfused(shape, memory_format, batch_stats, dtype):
    # grad_out stays contiguous: a buffer in the other layout than its output gradient
    case = op_case(shape, dtype, memory_format, batch_stats=batch_stats, bn_dtype=dtype,
                   grad_out_format=torch.contiguous_format)
    assert_op_matches(case, batch_stats, "unfused")


@pytest.mark.parametrize("memory_format", FORMATS)
def test_backward_in_channel_chunks_matches_whole(monkeypatch, memory_format):
    case = op_case((2, 33, 17, 12, 6, 7), torch.float64, memory_format, batch_stats=True,
                   bn_dtype=torch.float64)
    whole = run_kernels(TORCH_KERNELS, case, True)
    monkeypatch.setattr(torch_impl, "BACKWARD_CHUNK_ELEMENTS", 2 * 6 * 7 * 5)  # 5 channels
    assert len(torch_impl.channel_chunks(17, 2 * 6 * 7)) == 4
    chunked = run_kernels(TORCH_KERNELS, case, True)
    for a, b, what in zip(chunked, whole, OpResult._fields, strict=True):
        assert_close(a, b, torch.float64, f"chunked {what}")


def test_channel_chunks_cover_range_without_gaps():
    for channels in (1, 7, 64, 1000):
        for plane in (1, 13, 25088):
            chunks = torch_impl.channel_chunks(channels, plane, limit=4096)
            assert chunks[0][0] == 0 and chunks[-1][1] == channels
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
            assert all((stop - start) * plane <= max(4096, plane) for start, stop in chunks)


def test_bfloat16_data_with_float32_statistics():
    assert_op_matches(op_case((2, 9, 7, 5, 4, 4), torch.bfloat16, batch_stats=True), True,
                      "unfused")


@pytest.mark.parametrize("kernels", [ACTIVE_KERNELS, TORCH_KERNELS], ids=["active", "torch"])
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_as_through_torchs_ops(kernels, memory_format, dtype):
    """The CPU's active kernels (C++ where built) and the reference ones."""
    assert_nan_propagates_as_in_torch(op_case((2, 13, 11, 8, 5, 4), dtype, memory_format),
                                      kernels)


def _op_case():
    return op_case((2, 9, 6, 4, 3, 5), torch.float32, batch_stats=True)


def test_opcheck_forward_and_backward():
    case = _op_case()
    torch.library.opcheck(torch.ops.densenet_fast.bn_relu_conv1x1.default, case.args)
    for stats_grad in (True, False):
        torch.library.opcheck(
            torch.ops.densenet_fast.bn_relu_conv1x1_backward.default,
            (case.grad_out, *case.args, stats_grad, case.grad_buffer.clone()))


def test_op_traces_under_torch_compile():
    args = _op_case().args
    compiled = torch.compile(bn_relu_conv1x1, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*args), bn_relu_conv1x1(*args), torch.float32, "compiled output")


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(buffer=a["buffer"][0]), ValueError, "buffer must be 4-D"),
    (lambda a: a.update(buffer=a["buffer"].long()), TypeError, "floating-point"),
    (lambda a: a.update(weight=torch.randn(4, 12, 1, 1)), ValueError, "reads 12 input channels"),
    (lambda a: a.update(weight=torch.randn(4, 6, 3, 3)), ValueError, r"\[C_out, C, 1, 1\]"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, "conv_weight dtype"),
    (lambda a: a.update(mean=a["mean"][:5]), ValueError, "mean must have shape"),
    (lambda a: a.update(invstd=a["invstd"].double()), TypeError, "invstd must be (torch.)?float32"),
    (lambda a: a.update(gamma=a["gamma"].to("meta")), RuntimeError, "bn_weight is on meta"),
])
def test_bad_arguments_name_the_problem(mutate, error, match):
    names = ("buffer", "mean", "invstd", "gamma", "beta", "weight")
    args = dict(zip(names, _op_case().args, strict=True))
    mutate(args)
    with pytest.raises(error, match=match):
        bn_relu_conv1x1(*(args[n] for n in names))
