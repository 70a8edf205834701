"""Every numerical tolerance of the test suite, per dtype, in one place.

A tensor passes when ``max|actual - expected| <= atol + rtol * max|expected|``: errors of
deep networks scale with the magnitude of the tensor, not with each element's.
"""

import torch

TOLERANCES = {
    # dtype: (rtol, atol)
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
    # float32 data through TF32 GEMMs (torch's default for convolutions, and the Triton
    # kernels', on Ampere and later): each product's operands keep 10 mantissa bits (relative
    # rounding 2^-11, fp16's) while data and sums stay float32, so below fp16's bar.
    "tf32": (5e-3, 1e-4),
}

# (rtol, atol) of the per-instruction-set C++ builds against the reference kernels on one small
# case (test_backends.py): the same source and math, so absolute and tighter than TOLERANCES.
BUILD_TOLERANCES = {torch.float32: (0.0, 1e-5)}

# (factor, slack) for gradients under autocast (test_amp.py): low-precision gradients are far
# from float32 ones in any implementation, so the bar is relative to the unfused model's own
# distance (relative L2) from float32 under the same autocast: at most factor times it + slack.
AUTOCAST_GRAD_MARGINS = {torch.bfloat16: (1.5, 0.02), torch.float16: (1.5, 0.005),
                         # float32 against float64, per parameter, where a deep model's ReLU
                         # masks make elementwise bars ill-conditioned (GPU densenet121).
                         torch.float32: (4.0, 1e-4)}

# torch.autograd.gradcheck in float64 (test_block.py): central differences of step eps agree
# with the analytic gradient elementwise within atol + rtol |analytic| (rtol: gradcheck's
# default), and two backward runs agree exactly.
GRADCHECK = dict(eps=1e-6, atol=1e-6, rtol=1e-3, nondet_tol=0.0)


def assert_error_within(err: float, scale: float, dtype, what: str = "", table=TOLERANCES):
    """``err`` (a max abs error) against the bound of ``table[dtype]`` for tensors whose max
    abs value is ``scale``."""
    rtol, atol = table[dtype]
    bound = atol + rtol * scale
    assert err <= bound, f"{what}: max abs error {err:.3e} exceeds {bound:.3e}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "",
                 equal_nan: bool = False):
    """Compare with the tolerances of ``dtype`` (default: ``expected``'s dtype). With
    ``equal_nan``, NaN must sit exactly where ``expected`` has it, and the rest is compared."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    dtype = dtype or expected.dtype
    actual, expected = actual.detach().double(), expected.detach().double()
    if equal_nan:
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), \
            f"{what}: NaN at {actual.isnan().sum()} places, expected at {nan.sum()} " \
            f"(first differing index {(actual.isnan() != nan).nonzero()[:1].tolist()})"
        actual, expected = actual[~nan], expected[~nan]
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_error_within(err, scale, dtype, what)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_as_accurate(actual: torch.Tensor, baseline: torch.Tensor, exact: torch.Tensor, dtype,
                       what: str = ""):
    """``actual`` is about as close to ``exact`` (relative L2) as ``baseline``, both computed
    in (or under autocast to) ``dtype`` (``AUTOCAST_GRAD_MARGINS``)."""
    factor, slack = AUTOCAST_GRAD_MARGINS[dtype]
    err, baseline_err = _relative(actual, exact), _relative(baseline, exact)
    assert err <= factor * baseline_err + slack, \
        f"{what}: relative error {err:.3e}, the baseline's {baseline_err:.3e}"


def assert_gradcheck(fn, inputs):
    """``torch.autograd.gradcheck`` with ``GRADCHECK``."""
    assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)
