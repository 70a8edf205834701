"""``channel_stats`` and ``bn_backward``: a BN's batch statistics and the backward of a BN on
its own (norm0, a block's last norm). Both kernels (the C++ one through the dispatcher, the
reference of ``ops/torch_impl.py``) against float64 formulas over dtypes, layouts and odd
shapes; the C++ kernel's float64 sums on data where ATen's channels-last kernels lose digits;
NaN; errors; independence of the thread count. Layouts against the fakes: test_op_layouts.py.
"""

import pytest
import torch
from helpers import laid_out_data
from tolerances import assert_close

import densenet_fast
from densenet_fast.ops import torch_impl

cpp_active = densenet_fast.backend_info()["active"].get("cpu") == "cpp"
KERNELS = ["compiled", "reference"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N, C, H, W): odd sizes, one image of 1x1 planes, one channel, batch 1 with a wide plane.
SHAPES = [(2, 13, 5, 7), (3, 1, 4, 4), (4, 9, 1, 1), (1, 6, 9, 17)]
SHAPE_IDS = ["odd", "one-channel", "1x1-planes", "one-image"]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# The statistics read channel slices in place (a block buffer's prefix).
STATS_LAYOUTS = [*LAYOUTS, "slice-of-contiguous", "slice-of-channels_last"]


def _op(kernels: str, name: str):
    if kernels == "compiled":
        if not cpp_active:
            pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
        return getattr(torch.ops.densenet_fast, name)
    return getattr(torch_impl, name)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact_stats(x):
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    return mean, var


@pytest.mark.parametrize("name", ["channel_stats", "bn_backward"])
def test_compiled_kernel_serves_the_op_on_cpu(name):
    if not cpp_active:
        pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{name}", "CPU")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", STATS_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_match_float64(kernels, shape, layout, dtype):
    torch.manual_seed(0)
    x = laid_out_data(shape, dtype, layout, scale=1.5, offset=0.5)
    mean, var = _op(kernels, "channel_stats")(x)
    stats = _stats_dtype(dtype)
    assert mean.dtype == var.dtype == stats and mean.shape == var.shape == (shape[1],)
    exact_mean, exact_var = _exact_stats(x)  # of the values x holds, rounded or not
    assert_close(mean, exact_mean, stats, "mean")
    assert_close(var, exact_var, stats, "var")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice-of-channels_last"])
@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "offset-1e3"])
def test_compiled_float32_statistics_keep_float64_sums(layout, offset):
    """100k values per channel: the C++ kernel's sums are float64 in both layouts, and its
    one pass shifts by a value of the channel, so a mean 1e5 times the spread cancels no
    digits of the variance. ATen's channels-last kernel accumulates float32 in float32 (about
    1e-5 relative error here, centred)."""
    torch.manual_seed(0)
    scale = 1e-2 if offset else 1.0
    x = laid_out_data((8, 4, 112, 112), torch.float32, layout, scale=scale, offset=offset)
    mean, var = _op("compiled", "channel_stats")(x)
    exact_mean, exact_var = _exact_stats(x)
    assert ((mean.double() - exact_mean).abs() / exact_mean.abs().clamp_min(1)).max() <= 1e-7
    assert ((var.double() - exact_var) / exact_var).abs().max() <= 1e-6


def _exact_backward(grad, x, mean, invstd, weight, stats_grad):
    """``(dx, dweight, dbias)`` of the BN in float64 under autograd: batch statistics of
    ``x`` (eps 0) with ``stats_grad`` (``mean``, ``invstd`` must then be ``x``'s), else
    ``mean`` and ``invstd`` as constants."""
    xd = x.double().requires_grad_()
    wd = weight.double().requires_grad_()
    bd = torch.zeros_like(wd, requires_grad=True)
    shape = (1, -1, 1, 1)
    if stats_grad:
        var, mean = torch.var_mean(xd, dim=(0, 2, 3), correction=0)
        invstd = var.rsqrt()
    y = (xd - mean.double().view(shape)) * invstd.double().view(shape) * wd.view(shape) \
        + bd.view(shape)
    return torch.autograd.grad(y, (xd, wd, bd), grad.double())


def _backward_case(shape, dtype, layout, grad_layout, stats_grad, weight_dtype=None):
    torch.manual_seed(1)
    x = laid_out_data(shape, dtype, layout, scale=2.0, offset=1.0)
    grad = laid_out_data(shape, dtype, grad_layout)
    stats = _stats_dtype(dtype)
    if stats_grad:  # x's own statistics, eps 0: what _exact_backward differentiates
        exact_mean, exact_var = _exact_stats(x)
        mean, invstd = exact_mean.to(stats), exact_var.rsqrt().to(stats)
    else:
        mean = torch.randn(shape[1], dtype=stats)
        invstd = torch.rand(shape[1], dtype=stats) + 0.5
    weight = (torch.rand(shape[1]) + 0.5).to(weight_dtype or stats)  # a model's parameters
    return grad, x, mean, invstd, weight


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("stats_grad", [True, False], ids=["stats-grad", "direct"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_float64_autograd(kernels, stats_grad, shape, layout, dtype):
    if stats_grad and shape[0] * shape[2] * shape[3] < 2:
        pytest.skip("batch statistics of one value per channel have no gradient")
    args = _backward_case(shape, dtype, layout, layout, stats_grad)
    dx, dweight, dbias = _op(kernels, "bn_backward")(*args, stats_grad)
    want = _exact_backward(*args, stats_grad)
    assert dx.dtype == dtype and dweight.dtype == dbias.dtype == _stats_dtype(dtype)
    for got, exact, what in zip((dx, dweight, dbias), want, ("dx", "dweight", "dbias"),
                                strict=True):
        # dx through the statistics is a small residual of g's size in low precision:
        # judged against the data's dtype, the parameter gradients against float32 sums.
        assert_close(got, exact, dtype if what == "dx" else _stats_dtype(dtype), what)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("grad_layout", LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_of_mixed_layouts_and_parameter_dtypes(kernels, layout, grad_layout):
    """A gradient laid out unlike the data (a classifier's NCHW gradient at a channels-last
    buffer), a bfloat16 BN weight: dx dense in the data's layout, the parameters' gradients
    in their dtype, the inputs untouched."""
    args = _backward_case((2, 7, 5, 6), torch.float32, layout, grad_layout, True,
                          weight_dtype=torch.bfloat16)
    before = [a.clone() for a in args]
    dx, dweight, dbias = _op(kernels, "bn_backward")(*args, True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert dx.is_contiguous(memory_format=fmt)
    assert dweight.dtype == dbias.dtype == torch.bfloat16
    want = _exact_backward(*args, True)
    assert_close(dx, want[0], torch.float32, "dx")
    assert_close(dweight, want[1], torch.bfloat16, "dweight")
    assert all(torch.equal(a, b) for a, b in zip(args, before, strict=True))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_float32_backward_keeps_float64_sums(layout):
    """The parameter gradients over 100k values per channel within 1e-6 of float64 in both
    layouts (ATen's channels-last kernel sums float32 in float32)."""
    args = _backward_case((8, 4, 112, 112), torch.float32, layout, layout, True)
    dx, dweight, dbias = _op("compiled", "bn_backward")(*args, True)
    want = _exact_backward(*args, True)
    for got, exact in zip((dweight, dbias), want[1:], strict=True):
        assert ((got.double() - exact).abs() / exact.abs().max()).max() <= 1e-6
    assert_close(dx, want[0], torch.float32, "dx")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_stays_in_its_channel(kernels, layout):
    """A NaN in the data makes its channel's statistics NaN and no other's; in the backward
    through the statistics it reaches every gradient of its channel, with constant statistics
    it does not reach dx (x is not read, as in ATen's), and a NaN gradient stays where it
    is. The reference kernels (ATen's) say where."""
    torch.manual_seed(2)
    x = laid_out_data((2, 5, 4, 3), torch.float32, layout)
    x[1, 2, 3, 1] = float("nan")
    mean, var = _op(kernels, "channel_stats")(x)
    assert mean.isnan().tolist() == var.isnan().tolist() == [False, False, True, False, False]
    grad = laid_out_data((2, 5, 4, 3), torch.float32, layout)
    grad[0, 4, 0, 0] = float("nan")
    clean_x = x.nan_to_num()
    args = (grad, clean_x, *_exact_stats(clean_x))
    args = (*args[:2], args[2].float(), args[3].rsqrt().float(), torch.rand(5) + 0.5)
    for data in (x, clean_x):
        for stats_grad in (True, False):
            got = _op(kernels, "bn_backward")(args[0], data, *args[2:], stats_grad)
            want = torch_impl.bn_backward(args[0], data, *args[2:], stats_grad)
            for g, w in zip(got, want, strict=True):
                assert_close(g, w, torch.float32, f"stats_grad={stats_grad}", equal_nan=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_sums_do_not_depend_on_the_thread_count(threads):
    """Work splits fixed by the shape: the same bits on any number of threads."""
    torch.manual_seed(3)
    x = laid_out_data((4, 24, 40, 40), torch.float32, "channels_last", offset=0.3)
    grad = torch.randn_like(x)
    mean, var = _op("compiled", "channel_stats")(x)
    args = (grad, x, mean, torch.rsqrt(var + 1e-5), torch.rand(24) + 0.5, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = (*_op("compiled", "channel_stats")(x), *_op("compiled", "bn_backward")(*args))
        torch.set_num_threads(threads)
        got = (*_op("compiled", "channel_stats")(x), *_op("compiled", "bn_backward")(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _good_backward_args():
    x = torch.randn(2, 3, 4, 4)
    return [torch.randn(2, 3, 4, 4), x, torch.zeros(3), torch.ones(3), torch.ones(3)]


BAD_BACKWARD = [
    (0, torch.randn(2, 3, 4, 5), ValueError, "grad must have x's shape"),
    (0, torch.randn(2, 3, 4, 4, dtype=torch.float64), TypeError, "grad dtype"),
    (1, torch.randn(2, 3, 4), ValueError, "x must be 4-D"),
    (1, torch.zeros(2, 3, 4, 4, dtype=torch.int32), TypeError, "x must be a floating"),
    (2, torch.zeros(4), ValueError, r"mean must have shape \(3,\)"),
    (3, torch.ones(3, dtype=torch.float64), TypeError, "invstd must be torch.float32|invstd "
     "must be float32"),
    (4, torch.ones(3, dtype=torch.int64), TypeError, "bn_weight must be floating point"),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("case", range(len(BAD_BACKWARD)))
def test_bad_backward_arguments_are_named(kernels, case):
    index, value, error, message = BAD_BACKWARD[case]
    args = _good_backward_args()
    args[index] = value
    with pytest.raises(error, match=message):
        _op(kernels, "bn_backward")(*args, True)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(("x", "scratch", "error", "message"), [
    (torch.randn(2, 3, 4), None, ValueError, "x must be 4-D"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int64), None, TypeError, "x must be a floating"),
    (torch.randn(2, 3, 4, 4).bfloat16(), torch.zeros(2, 2), ValueError,
     r"scratch must have shape \(2, >=3\)"),
    (torch.randn(2, 3, 4, 4).bfloat16(), torch.zeros(2, 3).bfloat16(), TypeError,
     "scratch must be torch.float32|scratch must be float32"),
], ids=["3-d", "integer", "short-scratch", "scratch-dtype"])
def test_bad_statistics_arguments_are_named(kernels, x, scratch, error, message):
    with pytest.raises(error, match=message):
        _op(kernels, "channel_stats")(x, scratch)


def test_scratch_is_left_as_it_was():
    """The reference's mixed-dtype path reads the block's scratch as running statistics with
    momentum 0 (it writes them back unchanged): zeros and ones after any number of calls."""
    from densenet_fast.ops.batchnorm import stats_scratch

    x = torch.randn(2, 5, 3, 3).bfloat16()
    scratch = stats_scratch(8, x)
    for kernels in ("reference", "compiled" if cpp_active else "reference"):
        mean, var = _op(kernels, "channel_stats")(x, scratch)
        assert_close(var, _exact_stats(x)[1], torch.float32, kernels)
    assert torch.equal(scratch, torch.stack([torch.zeros(8), torch.ones(8)]))


def test_opcheck():
    x = laid_out_data((2, 5, 3, 4), torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.densenet_fast.channel_stats.default, (x, None))
    args = _backward_case((2, 5, 3, 4), torch.float32, "channels_last", "contiguous", True)
    torch.library.opcheck(torch.ops.densenet_fast.bn_backward.default, (*args, True))


@pytest.mark.parametrize("layout", ["slice-of-contiguous", "slice-of-channels_last"])
def test_compiled_statistics_read_a_channel_slice_in_place(layout):
    """A block buffer's channel prefix is read where it lies: no copy of it is made (the
    statistics of a strided tensor in neither walk's order are of an NCHW copy)."""
    from torch.profiler import ProfilerActivity, profile

    x = laid_out_data((2, 6, 5, 4), torch.float32, layout)
    op = _op("compiled", "channel_stats")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op(x)
    names = {e.name for e in prof.events()}
    assert "densenet_fast::channel_stats" in names
    assert not names & {"aten::contiguous", "aten::clone", "aten::copy_"}, names
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op(laid_out_data((2, 6, 5, 4), torch.float32, "strided"))
    assert "aten::copy_" in {e.name for e in prof.events()}, "the test sees copies"
