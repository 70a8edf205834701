"""The Triton kernels compile for a Hopper GPU (sm_90) on this machine, through the real
launchers (``benchmarks/ptx_check.py``), and their PTX shows what the kernels rely on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")
ROOT = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm90_with_nan_keeping_relu_and_flat_channels_last(tmp_path):
    out = tmp_path / "ptx.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptx_check.py"),
                           "--arch", "90", "--case", "nhwc-56", "--case", "nchw-14",
                           "--dtype", "bfloat16", "--json", str(out)],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {"forward_kernel", "weight_grad_kernel", "input_grad_kernel", "add_dx_kernel",
               "bn_grads_kernel", "bn_relu_kernel", "stats_term_kernel",
               "stats_coefficients_kernel"}
    for case in ("nhwc-56", "nchw-14"):
        by_kernel = {r["kernel"]: r for r in rows if r["case"] == case}
        assert set(by_kernel) == kernels, (case, sorted(by_kernel))
        # ReLU keeps NaN on the GPU as torch's does (Triton's default max drops it).
        assert by_kernel["forward_kernel"]["nan_max"] > 0
        assert by_kernel["weight_grad_kernel"]["nan_max"] > 0
        assert by_kernel["bn_relu_kernel"]["nan_max"] > 0
        assert by_kernel["forward_kernel"]["wide_accesses"] > 0
    # Kernels over pixels address channels-last data without dividing; those over channel
    # vectors only (the BN gradients' sums, the statistics' coefficients) have no layout.
    per_channel = {"bn_grads_kernel", "stats_coefficients_kernel"}
    flat = [r for r in rows if r["case"] == "nhwc-56"]
    assert all(r["divisions"] == 0 for r in flat), flat
    assert all(r["flat"] for r in flat if r["kernel"] not in per_channel), flat
    assert not any(r["flat"] for r in rows if r["case"] == "nchw-14")
