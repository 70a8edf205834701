"""benchmarks/profile_step.py end to end on the CPU (a tiny model): both implementations
profiled, their figures and tables in the report."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _profile_step():
    spec = importlib.util.spec_from_file_location("profile_step",
                                                  ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_step_reports_both_implementations(tmp_path):
    module = _profile_step()
    out = tmp_path / "profile.txt"
    assert module.main(["--device", "cpu", "--model", "tiny", "--batch", "2", "--image", "32",
                        "--warmup", "1", "--repeats", "1", "--rows", "100",
                        "--out", str(out)]) == 0
    report = out.read_text()
    for kind in ("torchvision", "densenet_fast"):
        line = next(row for row in report.splitlines() if row.startswith(kind + " "))
        wall = float(line.split("wall")[1].split("ms")[0])
        assert wall > 0, line
        assert f"--- {kind}: by own host time" in report
    assert "densenet_fast::dense_block_forward" in report  # the fused op ran, and was seen


def test_cuda_graph_timing_needs_a_cuda_device(capsys):
    with pytest.raises(SystemExit):
        _profile_step().main(["--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_compiled_profile_says_how_many_cuda_graphs_were_skipped(tmp_path):
    """``--compile-mode reduce-overhead``: both models profiled under torch.compile, and the
    report says how many graphs inductor declined to capture (on a CPU: every one, there
    being no CUDA graphs; on a GPU a skip means the mode gives nothing)."""
    out = tmp_path / "profile.txt"
    assert _profile_step().main(["--device", "cpu", "--model", "tiny", "--batch", "2",
                                 "--image", "32", "--warmup", "2", "--repeats", "1",
                                 "--rows", "5", "--compile-mode", "reduce-overhead",
                                 "--out", str(out)]) == 0
    report = out.read_text()
    assert "torch.compile mode reduce-overhead" in report.splitlines()[0]
    for kind in ("torchvision", "densenet_fast"):
        line = next(row for row in report.splitlines() if row.startswith(kind + " "))
        assert int(line.split("cudagraph skips")[1]) >= 1, line
