"""benchmarks/host_proxy.py end to end, a few steps: torchvision's and densenet_fast's steps
timed side by side, on the C++ kernels and on the Triton path with its launches skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import densenet_fast

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_times_both_implementations_on_each_backend(tmp_path, backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is not installed")
    elif densenet_fast.backend_info()["active"].get("cpu") != "cpp":
        pytest.skip("the C++ kernels are not built here")
    out = tmp_path / "proxy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_proxy.py"),
                           "--backend", backend, "--warmup", "1", "--steps", "2",
                           "--json", str(out)],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"torchvision", "densenet_fast"}
    assert all(row["steps"] == 2 and 0 < row["min_ms"] <= row["median_ms"]
               for row in result["rows"].values())
    launches = result["triton_launches_per_step"]
    # On the Triton path every fused call is a skipped launch; the C++ kernels launch none.
    assert (launches > 0) if backend == "triton" else launches is None
    assert result["densenet_fast_backend"] == backend
    assert f"densenet_fast on {backend}" in proc.stdout
