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
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = ""):
    """Compare with the tolerances of ``dtype`` (default: ``expected``'s dtype)."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max abs error {err:.3e} exceeds {bound:.3e}"
