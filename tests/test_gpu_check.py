"""benchmarks/gpu_check.py end to end on the CPU: every stage in its dry-run mode (tiny
model, Triton's interpreter), and a failing stage that leaves the others' results."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _main(gpu_check, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    return gpu_check.main()


def test_dry_run_runs_every_stage_and_writes_the_report(gpu_check, monkeypatch, tmp_path,
                                                        capsys):
    assert _main(gpu_check, monkeypatch, "--dry-run", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert list(report["stages"]) == ["parity", "op", "model", "max_batch", "compile_time"]
    assert all("error" not in stage for stage in report["stages"].values()), report["stages"]
    assert report["stages"]["parity"]["passed"]
    assert set(report["stages"]["model"]["rows"]) == {
        "torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-recompute",
        "densenet_fast-torch", "torchvision-compiled", "densenet_fast-compiled"}
    assert all(b >= 1 for b in report["stages"]["max_batch"]["max_batch"].values())
    assert report["stages"]["compile_time"]["warm_cache"]["first_step_s"] > 0
    printed = capsys.readouterr().out
    assert "goal: fused op >= 1.3x eager" in printed and "results written to" in printed


def test_a_stage_that_times_out_leaves_the_others(gpu_check, monkeypatch, tmp_path):
    mode = gpu_check.MODES["dry-run"]
    timeouts = tuple((name, 1 if name == "model" else limit) for name, limit in mode.timeouts)
    monkeypatch.setitem(gpu_check.MODES, "dry-run", dataclasses.replace(mode, timeouts=timeouts))
    assert _main(gpu_check, monkeypatch, "--dry-run", "--only", "op", "model",
                 "--out", str(tmp_path)) == 1
    stages = json.loads((tmp_path / "cpu-dry-run.json").read_text())["stages"]
    assert "error" not in stages["op"] and stages["op"]["rows"]
    assert stages["model"]["error"].startswith("timed out")


def test_without_a_gpu_the_full_check_refuses_clearly(gpu_check, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(gpu_check, monkeypatch, "--quick") == 2
    assert "no CUDA device" in capsys.readouterr().err
