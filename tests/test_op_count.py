"""benchmarks/op_count.py end to end on a tiny model: densenet_fast's GPU path on CPU tensors,
every Triton launch counted (and skipped), the ATen operations beside them, torchvision's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_counts_each_implementations_operations_and_the_triton_launches(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed")
    out = tmp_path / "counts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_count.py"),
                           "--model", "tiny", "--json", str(out)],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(out.read_text())["counts"]
    torchvision, fast = counts["torchvision"], counts["densenet_fast"]
    assert torchvision["triton"] == 0 and torchvision["aten"] > 0
    assert "aten::threshold_backward" in torchvision["by_op"]  # its ReLUs' backward
    # The tiny model: two blocks of two layers and a transition, so five fused
    # BN-ReLU-Conv1x1 (forward, both backward kernels and the BN gradients' sums), four
    # norm2-relu2 (forward and again in backward), each layer's and block input's gradient
    # with its statistics' term, and that term's coefficients from the six BNs that read the
    # buffers (four norm1, the transition's, the final norm): the Triton path launches each
    # of them once.
    launches = {op: n for op, n in fast["by_op"].items() if op.startswith("triton::")}
    assert launches == {"triton::forward_kernel": 5, "triton::weight_grad_kernel": 5,
                        "triton::input_grad_kernel": 5, "triton::bn_grads_kernel": 5,
                        "triton::bn_relu_kernel": 8, "triton::stats_term_kernel": 6,
                        "triton::stats_coefficients_kernel": 6}
    # The coefficients were six torch ops per reader, two of them addcmul_.
    assert "aten::addcmul_" not in fast["by_op"]
    assert fast["triton"] == sum(launches.values())
    assert fast["aten"] == sum(n for op, n in fast["by_op"].items() if op.startswith("aten::"))
    # Running statistics: per update (the stem's, each block's) one _foreach op per quantity,
    # not one op per BN (the tiny model has eleven); each block's backward computes its
    # norm2s' invstd in one _foreach add and rsqrt, not two ops per layer; the statistics of
    # each block's input and of each layer's new channels are stored with one _foreach copy.
    assert {op: n for op, n in fast["by_op"].items() if "_foreach" in op} == {
        "aten::_foreach_add_": 9, "aten::_foreach_mul_": 6, "aten::_foreach_mul": 3,
        "aten::_foreach_add": 2, "aten::_foreach_rsqrt_": 2, "aten::_foreach_copy_": 6}
    assert f"densenet_fast  {fast['aten'] + fast['triton']:6d}" in proc.stdout
