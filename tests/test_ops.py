"""The fused op's pure-PyTorch kernels against unfused autograd, and its registration."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward, torch_impl

EPS = 1e-5
# (N, C_total, C, C_out, H, W): odd widths, a prefix shorter than the buffer, 1x1 planes
SHAPES = [(2, 7, 5, 3, 3, 3), (3, 13, 11, 8, 5, 4), (4, 6, 6, 4, 1, 1), (2, 33, 17, 12, 6, 7)]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _case(shape, dtype, memory_format, batch_stats):
    n, total, c, c_out, h, w = shape
    buffer = torch.randn(n, total, h, w, dtype=dtype).contiguous(memory_format=memory_format)
    gamma = torch.rand(c, dtype=dtype) + 0.5
    beta = torch.randn(c, dtype=dtype)
    weight = torch.randn(c_out, c, 1, 1, dtype=dtype)
    prefix = buffer[:, :c]
    if batch_stats:
        var, mean = torch.var_mean(prefix, dim=(0, 2, 3), correction=0)
    else:
        mean, var = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    invstd = torch.rsqrt(var + EPS)
    return buffer, mean, var, invstd, gamma, beta, weight


def _unfused(buffer, c, mean, var, gamma, beta, weight, batch_stats, grad_out):
    x = buffer[:, :c].detach().clone().requires_grad_()
    g, b, w = (t.detach().clone().requires_grad_() for t in (gamma, beta, weight))
    if batch_stats:
        y = F.batch_norm(x, None, None, g, b, training=True, eps=EPS)
    else:
        y = F.batch_norm(x, mean, var, g, b, training=False, eps=EPS)
    out = F.conv2d(F.relu(y), w)
    out.backward(grad_out)
    return out.detach(), x.grad, w.grad, g.grad, b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_backward_match_unfused(shape, memory_format, batch_stats, dtype):
    n, total, c, c_out, h, w = shape
    buffer, mean, var, invstd, gamma, beta, weight = _case(shape, dtype, memory_format,
                                                           batch_stats)
    grad_out = torch.randn(n, c_out, h, w, dtype=dtype)
    expected = _unfused(buffer, c, mean, var, gamma, beta, weight, batch_stats, grad_out)

    out = bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight)
    assert_close(out, expected[0], dtype, "output")

    start = torch.randn_like(buffer)  # the op must add into a non-zero gradient buffer
    grad_buffer = start.clone()
    grad_w, grad_gamma, grad_beta = bn_relu_conv1x1_backward(
        grad_out, buffer, mean, invstd, gamma, beta, weight, batch_stats, grad_buffer)
    assert_close(grad_buffer[:, :c] - start[:, :c], expected[1], dtype, "input gradient")
    assert torch.equal(grad_buffer[:, c:], start[:, c:]), "channels past the prefix changed"
    assert_close(grad_w, expected[2], dtype, "conv weight gradient")
    assert_close(grad_gamma, expected[3], dtype, "bn weight gradient")
    assert_close(grad_beta, expected[4], dtype, "bn bias gradient")


@pytest.mark.parametrize("memory_format", FORMATS)
def test_backward_in_channel_chunks_matches_whole(monkeypatch, memory_format):
    shape = (2, 33, 17, 12, 6, 7)
    buffer, mean, _, invstd, gamma, beta, weight = _case(shape, torch.float64, memory_format,
                                                         True)
    grad_out = torch.randn(2, 12, 6, 7, dtype=torch.float64)
    args = (grad_out, buffer, mean, invstd, gamma, beta, weight, True)
    whole = torch.zeros_like(buffer)
    expected = bn_relu_conv1x1_backward(*args, whole)
    monkeypatch.setattr(torch_impl, "BACKWARD_CHUNK_ELEMENTS", 2 * 6 * 7 * 5)  # 5 channels
    assert len(torch_impl.channel_chunks(17, 2 * 6 * 7)) == 4
    chunked = torch.zeros_like(buffer)
    got = bn_relu_conv1x1_backward(*args, chunked)
    assert_close(chunked, whole, torch.float64, "chunked input gradient")
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, torch.float64, "chunked parameter gradient")


def test_channel_chunks_cover_range_without_gaps():
    for channels in (1, 7, 64, 1000):
        for plane in (1, 13, 25088):
            chunks = torch_impl.channel_chunks(channels, plane, limit=4096)
            assert chunks[0][0] == 0 and chunks[-1][1] == channels
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
            assert all((stop - start) * plane <= max(4096, plane) for start, stop in chunks)


def test_bfloat16_data_with_float32_statistics():
    shape = (2, 9, 7, 5, 4, 4)
    buffer, mean, var, invstd, gamma, beta, weight = _case(shape, torch.float32,
                                                           torch.contiguous_format, True)
    grad_out = torch.randn(2, 5, 4, 4)
    expected = _unfused(buffer, 7, mean, var, gamma, beta, weight, True, grad_out)
    low = buffer.bfloat16()
    out = bn_relu_conv1x1(low, mean, invstd, gamma, beta, weight.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out, expected[0], torch.bfloat16, "bf16 output")
    grad_buffer = torch.zeros_like(low)
    grads = bn_relu_conv1x1_backward(grad_out.bfloat16(), low, mean, invstd, gamma, beta,
                                     weight.bfloat16(), True, grad_buffer)
    assert_close(grad_buffer[:, :7], expected[1], torch.bfloat16, "bf16 input gradient")
    for got, want, what in zip(grads, expected[2:], ("weight", "gamma", "beta"), strict=True):
        assert_close(got, want, torch.bfloat16, f"bf16 {what} gradient")


def _op_args(batch_stats=True):
    buffer, mean, _, invstd, gamma, beta, weight = _case((2, 9, 6, 4, 3, 5), torch.float32,
                                                         torch.contiguous_format, batch_stats)
    return buffer, mean, invstd, gamma, beta, weight


def test_opcheck_forward_and_backward():
    buffer, mean, invstd, gamma, beta, weight = _op_args()
    torch.library.opcheck(torch.ops.densenet_fast.bn_relu_conv1x1.default,
                          (buffer, mean, invstd, gamma, beta, weight))
    grad_out = torch.randn(2, 4, 3, 5)
    for batch_stats in (True, False):
        torch.library.opcheck(
            torch.ops.densenet_fast.bn_relu_conv1x1_backward.default,
            (grad_out, buffer, mean, invstd, gamma, beta, weight, batch_stats,
             torch.randn_like(buffer)))


def test_op_traces_under_torch_compile():
    buffer, mean, invstd, gamma, beta, weight = _op_args()
    compiled = torch.compile(bn_relu_conv1x1, backend="aot_eager", fullgraph=True)
    assert_close(compiled(buffer, mean, invstd, gamma, beta, weight),
                 bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight), torch.float32,
                 "compiled output")


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
    args = dict(zip(names, _op_args(), strict=True))
    mutate(args)
    with pytest.raises(error, match=match):
        bn_relu_conv1x1(*(args[n] for n in names))
