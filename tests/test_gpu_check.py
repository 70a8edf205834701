"""benchmarks/gpu_check.py end to end on the CPU: every stage in its dry-run mode (tiny
model, Triton's interpreter), and a stage that hangs, which leaves the others' results.

No test here races the clock: the dry run's stages get limits that only a hang reaches (how
long they take depends on the machine's load), and the stage that times out is one that
sleeps, not a real stage against a short limit."""

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
HOUR = 3600


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


def _dry_run_with_limits(gpu_check, monkeypatch, **limits):
    """The dry-run mode with an hour per stage (``limits`` names the exceptions): the parent
    passes each stage its limit, so the stages' own processes need no patching."""
    mode = gpu_check.MODES["dry-run"]
    timeouts = tuple((name, limits.get(name, HOUR)) for name, _ in mode.timeouts)
    monkeypatch.setitem(gpu_check.MODES, "dry-run", dataclasses.replace(
        mode, timeouts=timeouts, total=HOUR * len(timeouts)))


def test_dry_run_runs_every_stage_and_writes_the_report(gpu_check, monkeypatch, tmp_path,
                                                        capsys):
    _dry_run_with_limits(gpu_check, monkeypatch)
    assert _main(gpu_check, monkeypatch, "--dry-run", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert list(report["stages"]) == ["parity", "op", "model", "max_batch", "compile_time"]
    assert all("error" not in stage for stage in report["stages"].values()), report["stages"]
    assert report["stages"]["parity"]["passed"]
    assert " passed" in report["stages"]["parity"]["summary"]
    assert [row["shape"] for row in report["stages"]["op"]["rows"]] == ["tiny-nchw", "tiny-odd"]
    assert report["stages"]["op"]["speedup_in_block"] > 0
    rows = report["stages"]["model"]["rows"]
    assert set(rows) == {
        "torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-recompute",
        "densenet_fast-torch", "torchvision-compiled", "densenet_fast-compiled"}
    assert all(row["median_s"] > 0 and "time_vs_torchvision" in row for row in rows.values())
    assert "memory_vs_eager" in rows["densenet_fast-compiled"]
    assert all(b >= 1 for b in report["stages"]["max_batch"]["max_batch"].values())
    assert report["stages"]["compile_time"]["warm_cache"]["first_step_s"] > 0
    printed = capsys.readouterr().out
    assert "goal: fused op >= 1.3x eager" in printed and "results written to" in printed


# A stage that hangs, with a process of its own that hangs too; MARK (an argument of both)
# finds them. The stage writes nothing before it hangs, so its limit can be short.
HANG = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]])
time.sleep(600)
"""


def _alive(mark: str) -> list[int]:
    """Processes (zombies aside: their command line is empty) whose arguments include mark."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that just ended
            continue
        if mark.encode() in args:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_stage_that_times_out_leaves_the_others(gpu_check, monkeypatch, tmp_path):
    mark = f"gpu-check-hang-{os.getpid()}-{tmp_path.name}"

    def command(name, mode_name, timeout):  # the other stages report at once
        if name == "model":
            return [sys.executable, "-c", HANG, mark]
        return [sys.executable, "-c", f"import json; print(json.dumps({{'ran': {name!r}}}))"]

    monkeypatch.setattr(gpu_check, "_stage_command", command)
    _dry_run_with_limits(gpu_check, monkeypatch, model=1)
    assert _main(gpu_check, monkeypatch, "--dry-run", "--only", "op", "model", "compile_time",
                 "--out", str(tmp_path)) == 1
    stages = json.loads((tmp_path / "cpu-dry-run.json").read_text())["stages"]
    assert list(stages) == ["op", "model", "compile_time"]
    assert stages["op"]["ran"] == "op" and stages["compile_time"]["ran"] == "compile_time"
    assert stages["model"]["error"] == "timed out after 1 s"
    assert _alive(mark) == []  # the stage's own process ended with it


def test_without_a_gpu_the_full_check_refuses_clearly(gpu_check, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(gpu_check, monkeypatch, "--quick") == 2
    assert "no CUDA device" in capsys.readouterr().err
