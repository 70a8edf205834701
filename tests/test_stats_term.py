"""``add_stats_term``: a layer's new channels' gradient out of the block's gradient buffer,
with the gradient through the batch statistics added. The compiled CPU kernel against the
reference kernel (``ops/torch_impl.py``) on channel slices of both buffer layouts, strided and
dense inputs, every dtype; the result's layout; errors; the op's registration."""

import pytest
import torch
from helpers import laid_out_data
from tolerances import assert_close

import densenet_fast
from densenet_fast.ops import torch_impl

cpp_active = densenet_fast.backend_info()["active"].get("cpu") == "cpp"
KERNELS = ["compiled", "reference"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N, C_total, H, W, start, stop): a slice inside the buffer, odd sizes; the whole buffer;
# one image with 1x1 planes; a single channel.
CASES = [(2, 13, 5, 7, 4, 9), (3, 6, 4, 4, 0, 6), (1, 9, 1, 1, 2, 7), (2, 5, 3, 2, 4, 5)]
CASE_IDS = ["slice", "whole", "1x1-planes", "one-channel"]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _op(kernels: str, name: str = "add_stats_term"):
    if kernels == "compiled":
        if not cpp_active:
            pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
        return getattr(torch.ops.densenet_fast, name)
    return getattr(torch_impl, name)


def _case(case, dtype, layout, seed=0):
    n, total, h, w, start, stop = case
    torch.manual_seed(seed)
    grad = laid_out_data((n, total, h, w), dtype, layout)[:, start:stop]
    x = laid_out_data((n, total, h, w), dtype, layout)[:, start:stop]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    kx, k0 = torch.randn(stop - start, dtype=stats), torch.randn(stop - start, dtype=stats)
    return grad, x, kx, k0


@pytest.mark.parametrize("name", ["add_stats_term", "add_stats_coefficients"])
def test_compiled_kernel_serves_the_op_on_cpu(name):
    if not cpp_active:
        pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{name}", "CPU")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_matches_float64_formula(case, layout, dtype):
    grad, x, kx, k0 = _case(case, dtype, layout)
    out = _op("compiled")(grad, x, kx, k0)
    expected = grad.double() + kx.double().view(1, -1, 1, 1) * x.double() \
        + k0.double().view(1, -1, 1, 1)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, dtype, "grad + kx * x + k0")
    assert_close(out, torch_impl.add_stats_term(grad, x, kx, k0), dtype, "against reference")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_result_is_dense_in_the_buffers_layout_and_inputs_untouched(kernels, layout):
    grad, x, kx, k0 = _case(CASES[0], torch.bfloat16, layout)
    before = grad.clone(), x.clone()
    out = _op(kernels)(grad, x, kx, k0)
    kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=kept)
    assert torch.equal(grad, before[0]) and torch.equal(x, before[1])


@pytest.mark.parametrize("kernels", KERNELS)
def test_low_precision_is_computed_in_float32_and_rounded_once(kernels):
    # 1 + 2^-8 is a tie between two bfloat16 values that rounds to 1: rounding after adding
    # each addend would return 1, one rounding of the float32 sum 1 + 2^-7 returns that.
    grad = torch.ones(1, 1, 1, 2, dtype=torch.bfloat16)
    x = torch.ones(1, 1, 1, 2, dtype=torch.bfloat16)
    kx, k0 = torch.tensor([2.0 ** -8]), torch.tensor([2.0 ** -8])
    out = _op(kernels)(grad, x, kx, k0)
    assert torch.equal(out, torch.full_like(out, 1 + 2.0 ** -7))


@pytest.mark.parametrize("kernels", KERNELS)
def test_nan_and_inf_propagate(kernels):
    grad, x, kx, k0 = _case(CASES[0], torch.float32, "channels_last")
    grad[0, 1, 2, 3], x[1, 0, 0, 0] = float("nan"), float("inf")
    out = _op(kernels)(grad, x, kx, k0)
    assert out[0, 1, 2, 3].isnan()
    assert out[1, 0, 0, 0].isinf() or kx[0] == 0
    assert out.isfinite().sum() == out.numel() - 2


BAD_ARGS = [
    # (what is wrong, change to the arguments, exception, message)
    ("3-D x", lambda a: {"x": a["x"][0], "grad": a["grad"][0]}, ValueError, "4-D"),
    ("integer x", lambda a: {"x": a["x"].long(), "grad": a["grad"].long()}, TypeError,
     "floating-point"),
    ("grad of another shape", lambda a: {"grad": a["grad"][:, :2]}, ValueError, "grad must have"),
    ("grad of another dtype", lambda a: {"grad": a["grad"].double()}, TypeError, "grad dtype"),
    ("kx of the wrong length", lambda a: {"kx": a["kx"][:2]}, ValueError, "kx must have shape"),
    ("float64 k0 for float32 data", lambda a: {"k0": a["k0"].double()}, TypeError,
     "k0 must be (torch.)?float32"),
    ("k0 on another device", lambda a: {"k0": a["k0"].to("meta")}, RuntimeError, "k0 is on meta"),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("bad", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_rejects_bad_arguments_before_computing(bad, kernels):
    op = _op(kernels)
    _, change, error, message = bad
    grad, x, kx, k0 = _case(CASES[0], torch.float32, "contiguous")
    args = dict(grad=grad, x=x, kx=kx, k0=k0)
    args.update(change(args))
    with pytest.raises(error, match=message):
        op(*args.values())


def test_opcheck():
    grad, x, kx, k0 = _case(CASES[0], torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.densenet_fast.add_stats_term.default, (grad, x, kx, k0))


# ---- add_stats_coefficients: one BN's coefficients of the map above -------------------------

def _coefficient_args(channels=6, stats=torch.float32, params=torch.float32, seed=0):
    torch.manual_seed(seed)
    kx, k0 = torch.randn(2, channels + 3, dtype=stats)  # the op gets views of their heads
    mean, invstd = torch.randn(channels, dtype=stats), torch.rand(channels, dtype=stats) + 0.5
    weight, dweight, dbias = (torch.randn(channels, dtype=torch.float64).to(params)
                              for _ in range(3))
    return dict(kx=kx[:channels], k0=k0[:channels], mean=mean, invstd=invstd, weight=weight,
                dweight=dweight, dbias=dbias, count=37)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("stats, params", [(torch.float64, torch.float64),
                                           (torch.float32, torch.float32),
                                           (torch.float32, torch.bfloat16),
                                           (torch.float32, torch.float64)], ids=str)
def test_coefficients_add_the_gradient_through_the_statistics(stats, params, kernels):
    """``kx -= w invstd^2 dw / n`` and ``k0 += w invstd (mean invstd dw - db) / n``, in place
    on the heads of longer vectors, against the formula in float64."""
    args = _coefficient_args(stats=stats, params=params)
    whole = args["kx"]._base  # [kx, k0], each three entries longer than the op sees
    before = whole.clone()
    wide = {k: v.double() for k, v in args.items() if isinstance(v, torch.Tensor)}
    s = wide["weight"] * wide["invstd"]
    want_kx = wide["kx"] - s * wide["invstd"] * wide["dweight"] / 37
    want_k0 = wide["k0"] + s * (wide["mean"] * wide["invstd"] * wide["dweight"]
                                - wide["dbias"]) / 37
    _op(kernels, "add_stats_coefficients")(*args.values())
    assert_close(args["kx"], want_kx, stats, "kx")
    assert_close(args["k0"], want_k0, stats, "k0")
    assert torch.equal(whole[:, 6:], before[:, 6:])  # past the heads: untouched


def test_coefficients_of_strided_views_match_the_reference():
    """Coefficients that are every other element of a wider tensor (the contract takes any
    1-D vectors), and a count whose reciprocal float32 rounds: the compiled kernel gives the
    reference kernel's values."""
    if not cpp_active:
        pytest.skip("C++ backend not active here (test_backends.py fails where it should be)")
    args = _coefficient_args(channels=7)
    results = []
    for kernels in KERNELS:
        pairs = torch.randn(7, 2, generator=torch.Generator().manual_seed(3))
        case = {**args, "kx": pairs[:, 0], "k0": pairs[:, 1], "count": 3 * 7 * 11}
        _op(kernels, "add_stats_coefficients")(*case.values())
        results.append(pairs)
    torch.testing.assert_close(results[0], results[1], rtol=2e-6, atol=1e-6)


COEFFICIENT_BAD_ARGS = [
    ("k0 of the wrong length", lambda a: {"k0": a["k0"][:2]}, ValueError, "k0 must have shape"),
    ("2-D kx", lambda a: {"kx": a["kx"][None]}, ValueError, "kx must have shape 1-D"),
    ("float64 mean for float32 kx", lambda a: {"mean": a["mean"].double()}, TypeError,
     "mean must have kx's dtype"),
    ("bfloat16 coefficients", lambda a: {"kx": a["kx"].bfloat16(), "k0": a["k0"].bfloat16(),
                                         "mean": a["mean"].bfloat16(),
                                         "invstd": a["invstd"].bfloat16()},
     TypeError, "kx must be torch.float32 or torch.float64"),
    ("integer dweight", lambda a: {"dweight": a["dweight"].long()}, TypeError,
     "grad_bn_weight must be floating point"),
    ("dbias on another device", lambda a: {"dbias": a["dbias"].to("meta")}, RuntimeError,
     "grad_bn_bias is on meta"),
    ("no values per channel", lambda a: {"count": 0}, ValueError, "count must be a positive"),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("bad", COEFFICIENT_BAD_ARGS, ids=[b[0] for b in COEFFICIENT_BAD_ARGS])
def test_coefficients_reject_bad_arguments_before_computing(bad, kernels):
    op = _op(kernels, "add_stats_coefficients")
    _, change, error, message = bad
    args = _coefficient_args()
    whole = args["kx"]._base
    before = whole.clone()
    args.update(change(args))
    with pytest.raises(error, match=message):
        op(*args.values())
    assert torch.equal(whole, before)


def test_coefficients_opcheck():
    args = _coefficient_args()
    torch.library.opcheck(torch.ops.densenet_fast.add_stats_coefficients.default,
                          tuple(args.values()))
