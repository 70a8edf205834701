"""The BN-ReLU ops beside the fused 1x1 convolution: ``bn_relu`` (a dense layer's norm2-relu2)
and its in-place form, and the stem's ``bn_relu_max_pool2d``. The compiled CPU kernels against
the reference kernels (``ops/torch_impl.py``): values, the pool's winners in tied and NaN
windows, output dtypes and layouts, and errors."""

import pytest
import torch
from tolerances import assert_close

import densenet_fast
from densenet_fast.ops import torch_impl

cpp_active = densenet_fast.backend_info()["active"].get("cpu") == "cpp"
needs_cpp = pytest.mark.skipif(
    not cpp_active,
    reason="C++ backend not active here (test_backends.py fails where it should be)")

# (kernel_size, stride, padding, dilation, ceil_mode): the stem's; overlapping windows with
# ceil mode and unequal axes; dilation; windows that do not overlap, without padding.
POOLS = [((3, 3), (2, 2), (1, 1), (1, 1), False),
         ((2, 3), (1, 2), (1, 0), (1, 1), True),
         ((3, 3), (2, 2), (1, 1), (2, 2), True),
         ((2, 2), (2, 2), (0, 0), (1, 1), False)]
POOL_IDS = ["stem", "ceil-uneven", "dilated", "disjoint"]
# (N, C, H, W): odd planes, a plane smaller than the kernel's reach, one image, more channels
# than one of the channels-last kernels' channel blocks (32) and not a multiple of it.
SHAPES = [(3, 5, 13, 11), (2, 3, 2, 3), (1, 4, 9, 8), (2, 37, 6, 7)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def exact_case(shape, dtype, layout):
    """Data whose BN is exact in every dtype (scale 2, shift -1/2 on values of the data's
    precision), so both implementations see the same activations and the same ties: one
    channel is constant (every window a tie), one value is NaN."""
    n, c, h, w = shape
    x = torch.randint(-8, 8, shape).to(dtype) / 4
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.zeros(c, dtype=stats)
    invstd = torch.ones(c, dtype=stats)
    weight, bias = torch.full((c,), 2.0), torch.full((c,), -0.5)
    weight[0], bias[0] = 0.0, 1.0  # channel 0: relu(1) everywhere
    x[-1, -1, h // 2, w // 2] = float("nan")
    return _layout(x, layout), mean, invstd, weight, bias


def _both(name, *args):
    compiled = getattr(torch.ops.densenet_fast, name)(*args)
    return compiled, getattr(torch_impl, name)(*args)


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@needs_cpp
@pytest.mark.parametrize("op", ["bn_relu", "bn_relu_inplace", "bn_relu_max_pool2d",
                                "bn_relu_max_pool2d_backward"])
def test_compiled_kernel_serves_the_op_on_cpu(op):
    # Else the dispatcher would fall back to the reference kernels, and every comparison
    # below would compare them with themselves.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "CPU")


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("to_stats_dtype", [False, True], ids=["same-dtype", "stats-dtype"])
def test_bn_relu_matches_reference(shape, layout, dtype, to_stats_dtype):
    x, mean, invstd, weight, bias = exact_case(shape, dtype, layout)
    out_dtype = mean.dtype if to_stats_dtype else None
    out, expected = _both("bn_relu", x, mean, invstd, weight, bias, out_dtype)
    assert out.dtype == expected.dtype == (out_dtype or dtype)
    layout_kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout_kept)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_inplace_writes_bn_relus_values_over_x(kernels, shape, layout, dtype):
    """Any statistics: the same bits as the same kernels' ``bn_relu``, NaN included, in
    ``x``'s own memory and layout."""
    torch.manual_seed(0)
    c = shape[1]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout(torch.randn(shape).to(dtype), layout)
    x[-1, -1, -1, -1] = float("nan")
    vectors = (torch.randn(c, dtype=stats), torch.rand(c, dtype=stats) + 0.5, torch.randn(c),
               torch.randn(c))
    expected = _compiled_or_reference(kernels, "bn_relu")(x, *vectors)
    address, strides = x.data_ptr(), x.stride()
    assert _compiled_or_reference(kernels, "bn_relu_inplace")(x, *vectors) is None
    assert x.data_ptr() == address and x.stride() == strides
    assert torch.equal(x.isnan(), expected.isnan()) and x.isnan().any()
    assert torch.equal(x.nan_to_num(), expected.nan_to_num())


def test_bn_relu_inplace_opcheck():
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    vectors = (torch.randn(5), torch.rand(5) + 0.5, torch.randn(5), torch.randn(5))
    torch.library.opcheck(torch.ops.densenet_fast.bn_relu_inplace.default, (x, *vectors))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bn_relu_rounds_to_the_data_dtype_before_widening(dtype):
    # Any statistics: the float32 output holds exactly the values of the low-precision one.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7).to(dtype)
    mean, invstd = torch.randn(5), torch.rand(5) + 0.5
    weight, bias = torch.randn(5), torch.randn(5)
    op = torch.ops.densenet_fast.bn_relu
    wide = op(x, mean, invstd, weight, bias, torch.float32)
    narrow = op(x, mean, invstd, weight, bias)
    assert wide.dtype == torch.float32 and torch.equal(wide, narrow.float())
    assert_close(narrow, torch_impl.bn_relu(x, mean, invstd, weight, bias), dtype, "bn_relu")


@needs_cpp
@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_matches_reference_with_ties_and_nan(pool, shape, layout, dtype):
    x, mean, invstd, weight, bias = exact_case(shape, dtype, layout)
    out, expected = _both("bn_relu_max_pool2d", x, mean, invstd, weight, bias, *pool)
    assert out.dtype == dtype and out.shape == expected.shape
    layout_kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout_kept)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    grad_out = torch.randn(expected.shape).to(dtype)
    grad, expected_grad = _both("bn_relu_max_pool2d_backward", grad_out, x, mean, invstd, weight,
                                bias, *pool)
    # The same winners: gradient in the same places (overlapping windows may sum in
    # another order in low precision).
    assert torch.equal(grad != 0, expected_grad != 0)
    assert_close(grad, expected_grad, dtype, "gradient at the BN output")
    assert grad.is_contiguous(memory_format=layout_kept)


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_matches_reference_with_any_statistics(layout):
    torch.manual_seed(0)
    x = _layout(torch.randn(2, 6, 15, 14, dtype=torch.float64), layout)
    mean, invstd = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(6), torch.randn(6)
    pool = POOLS[0]
    out, expected = _both("bn_relu_max_pool2d", x, mean, invstd, weight, bias, *pool)
    assert_close(out, expected, torch.float64, "pooled activation")
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    grad, expected_grad = _both("bn_relu_max_pool2d_backward", grad_out, x, mean, invstd, weight,
                                bias, *pool)
    assert_close(grad, expected_grad, torch.float64, "gradient at the BN output")


@needs_cpp
@pytest.mark.parametrize("pool", POOLS + [((5, 5), (1, 1), (2, 2), (1, 1), False)],
                         ids=POOL_IDS + ["5x5-stride-1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pool_gradient_over_a_tall_image(pool, layout):
    # Many more input rows than a window spans (the channels-last backward keeps only the rows
    # the current windows reach), two and a half channel blocks, pixels that win up to 25
    # windows; float64, so any order of summation agrees.
    torch.manual_seed(0)
    x = _layout(torch.randn(2, 70, 41, 37, dtype=torch.float64), layout)
    mean, invstd = torch.randn(70, dtype=torch.float64), torch.rand(70, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(70), torch.randn(70)
    out, expected = _both("bn_relu_max_pool2d", x, mean, invstd, weight, bias, *pool)
    assert torch.equal(out, expected)
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    grad, expected_grad = _both("bn_relu_max_pool2d_backward", grad_out, x, mean, invstd, weight,
                                bias, *pool)
    assert_close(grad, expected_grad, torch.float64, "gradient at the BN output")


def _largest_live_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once while fn ran."""
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    allocations = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pool_allocates_only_its_result(layout, dtype):
    # The point of the fused op: no full-size activation and no int64 indices beside the
    # result (ATen's channels-last pool needs both), in the forward and in the backward.
    x, mean, invstd, weight, bias = exact_case((4, 40, 24, 24), dtype, layout)
    pool = POOLS[0]
    op = torch.ops.densenet_fast
    out = op.bn_relu_max_pool2d(x, mean, invstd, weight, bias, *pool)
    grad_out = torch.randn(out.shape).to(dtype).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    small = 4096  # the BN's scale and shift
    forward = _largest_live_bytes(lambda: op.bn_relu_max_pool2d(x, mean, invstd, weight, bias,
                                                                 *pool))
    assert forward <= out.nbytes + small, (forward, out.nbytes)
    backward = _largest_live_bytes(lambda: op.bn_relu_max_pool2d_backward(
        grad_out, x, mean, invstd, weight, bias, *pool))
    assert backward <= x.nbytes + small, (backward, x.nbytes)


BAD_ARGS = [
    # (what is wrong, change to the arguments, exception, message)
    ("3-D x", lambda a: {"x": a["x"][0]}, ValueError, "4-D"),
    ("integer x", lambda a: {"x": a["x"].long()}, TypeError, "floating-point"),
    ("mean of the wrong length", lambda a: {"mean": a["mean"][:2]}, ValueError, "mean"),
    ("float64 statistics for float32 data",
     lambda a: {"invstd": a["invstd"].double()}, TypeError, "invstd"),
    ("padding over half the kernel", lambda a: {"padding": (2, 2)}, ValueError, "pad"),
    # max_pool2d refuses it on every device, though its meta function accepts it
    ("padding over half the kernel, dilated", lambda a: {"padding": (2, 2), "dilation": (2, 2)},
     ValueError, "pad"),
    ("a kernel larger than the padded plane", lambda a: {"kernel_size": (9, 9), "padding": (0, 0)},
     ValueError, "small"),
]


def _compiled_or_reference(kernels: str, name: str):
    if kernels == "compiled" and not cpp_active:
        pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
    return (getattr(torch.ops.densenet_fast, name) if kernels == "compiled"
            else getattr(torch_impl, name))


def _good_args():
    x, mean, invstd, weight, bias = exact_case((2, 3, 7, 7), torch.float32, "contiguous")
    return dict(x=x, mean=mean, invstd=invstd, weight=weight, bias=bias)


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("bad", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_pool_rejects_bad_arguments_before_computing(bad, kernels):
    op = _compiled_or_reference(kernels, "bn_relu_max_pool2d")
    _, change, error, message = bad
    args = dict(_good_args(), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
                dilation=(1, 1), ceil_mode=False)
    args.update(change(args))
    with pytest.raises(error, match=message):
        op(*args.values())


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("bad", BAD_ARGS[:4] + [
    ("float16 output of float32 data", lambda a: {"dtype": torch.float16}, TypeError, "dtype"),
], ids=[b[0] for b in BAD_ARGS[:4]] + ["float16 output of float32 data"])
def test_bn_relu_rejects_bad_arguments_before_computing(bad, kernels):
    op = _compiled_or_reference(kernels, "bn_relu")
    _, change, error, message = bad
    args = dict(_good_args(), dtype=None)
    args.update(change(args))
    with pytest.raises(error, match=message):
        op(*args.values())


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("bad", BAD_ARGS[:4] + [
    ("strided x", lambda a: {"x": _layout(a["x"], "strided")}, ValueError, "dense"),
], ids=[b[0] for b in BAD_ARGS[:4]] + ["strided x"])
def test_bn_relu_inplace_rejects_bad_arguments_before_writing(bad, kernels):
    op = _compiled_or_reference(kernels, "bn_relu_inplace")
    _, change, error, message = bad
    args = _good_args()
    args.update(change(args))
    before = args["x"].clone()
    with pytest.raises(error, match=message):
        op(*args.values())
    assert torch.equal(args["x"].nan_to_num(), before.nan_to_num())
