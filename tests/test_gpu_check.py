"""benchmarks/gpu_check.py end to end on the CPU: every stage in its dry-run mode (tiny
model, Triton's interpreter); a stage that hangs, which leaves its log and the others'
results; the op stage's check of the fused results; the tuning estimate the stage limits are
sized from.

No test here races the clock: the dry run's stages get limits that only a hang reaches (how
long they take depends on the machine's load), and the stage that times out is one that
sleeps, not a real stage against a short limit."""

import dataclasses
import importlib.util
import json
import os
import subprocess
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
    passes each stage its limit, so the stages' own processes need no patching (the
    interpreter tunes nothing: the limits are the base limits)."""
    mode = gpu_check.MODES["dry-run"]
    timeouts = tuple((name, limits.get(name, HOUR)) for name, _ in mode.timeouts)
    monkeypatch.setitem(gpu_check.MODES, "dry-run", dataclasses.replace(mode, timeouts=timeouts))


def test_dry_run_runs_every_stage_and_writes_the_report(gpu_check, monkeypatch, tmp_path,
                                                        capsys):
    _dry_run_with_limits(gpu_check, monkeypatch)
    assert _main(gpu_check, monkeypatch, "--dry-run", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["parity", "op", "model", "max_batch", "compile_time"]
    assert all("error" not in stage for stage in stages.values()), stages
    budget = report["budget"]
    assert budget["total_s"] == sum(row["limit_s"] for row in budget["stages"].values())
    assert all(row["estimate"]["seconds"] == 0 and row["limit_s"] == HOUR
               for row in budget["stages"].values())  # the interpreter tunes nothing
    for name, stage in stages.items():  # every stage's output went to its log
        assert Path(stage["log"]) == tmp_path / "cpu-dry-run-logs" / f"{name}.log"
    assert " passed" in Path(stages["parity"]["log"]).read_text()
    assert stages["parity"]["passed"]
    assert " passed" in stages["parity"]["summary"]

    op = stages["op"]
    assert [(row["shape"], row["memory_format"]) for row in op["rows"]] == [
        ("tiny-4x4", "channels_last"), ("tiny-odd", "channels_last"),
        ("tiny-4x4", "contiguous"), ("tiny-odd", "contiguous")]
    assert all(row["check"]["passed"] for row in op["rows"]), op["rows"]
    assert set(op["rows"][0]["check"]["errors"]) == {
        "out", "grad_input", "grad_conv_weight", "grad_bn_weight", "grad_bn_bias"}
    assert all(op["formats"][f]["speedup_in_block"] > 0 for f in ("channels_last", "contiguous"))

    model = stages["model"]
    assert model["memory_format"] == "channels_last"
    rows = model["rows"]
    assert set(rows) == {
        "torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-recompute",
        "densenet_fast-torch", "torchvision-compiled", "densenet_fast-compiled"}
    assert all(row["median_s"] > 0 and "time_vs_torchvision" in row for row in rows.values())
    assert "memory_vs_eager" in rows["densenet_fast-compiled"]
    assert all(b >= 1 for b in stages["max_batch"]["max_batch"].values())

    cold, warm = stages["compile_time"]["cold_cache"], stages["compile_time"]["warm_cache"]
    assert cold["caches_before"] == {"tuning_cache_entries": 0, "triton_cache_files": 0}
    for run in (cold, warm):
        assert 0 < run["first_step_s"] <= run["to_first_step_s"] <= run["process_s"]
        assert set(run["tuning"]) == {"tunings", "trials", "seconds", "from_disk"}
    printed = capsys.readouterr().out
    assert "budget:" in printed and "goal: fused op results within" in printed
    assert "goal: fused op >= 1.3x eager" in printed and "results written to" in printed


# A stage that hangs, with a process of its own that hangs too; MARK (an argument of both)
# finds them. It says so and saves a partial result first (as a stage's _progress does).
HANG = """
import json, subprocess, sys, time
print("before the hang", flush=True)
with open(sys.argv[2], "w") as f:
    json.dump({"rows": ["measured before the hang"]}, f)
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
def test_a_stage_that_times_out_leaves_its_log_and_the_others(gpu_check, monkeypatch,
                                                              tmp_path):
    mark = f"gpu-check-hang-{os.getpid()}-{tmp_path.name}"

    def command(name, mode_name, timeout, result):  # the other stages report at once
        if name == "model":
            return [sys.executable, "-c", HANG, mark, str(gpu_check._partial_path(result))]
        return [sys.executable, "-c", "import json, sys; json.dump({'ran': sys.argv[1]}, "
                "open(sys.argv[2], 'w'))", name, str(result)]

    monkeypatch.setattr(gpu_check, "_stage_command", command)
    # 5 s: time enough for the stage to print (a Python start); the test waits it out.
    _dry_run_with_limits(gpu_check, monkeypatch, model=5)
    assert _main(gpu_check, monkeypatch, "--dry-run", "--only", "op", "model", "compile_time",
                 "--out", str(tmp_path)) == 1
    stages = json.loads((tmp_path / "cpu-dry-run.json").read_text())["stages"]
    assert list(stages) == ["op", "model", "compile_time"]
    assert stages["op"]["ran"] == "op" and stages["compile_time"]["ran"] == "compile_time"
    model = stages["model"]
    assert model["error"] == "timed out after 5 s"
    assert "before the hang" in Path(model["log"]).read_text()
    assert "before the hang" in model["output_tail"]
    assert model["partial"] == {"rows": ["measured before the hang"]}
    assert "output_tail" not in stages["op"]
    assert _alive(mark) == []  # the stage's own process ended with it


def test_without_a_gpu_the_full_check_refuses_clearly(gpu_check, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(gpu_check, monkeypatch, "--quick") == 2
    assert "no CUDA device" in capsys.readouterr().err


# densenet121 at 224x224, independently of gpu_check.conv1x1_layers: (layers, first layer's
# channels, plane) of each block, growth 32, bottlenecks of 128; transitions halve.
D121_BLOCKS = [(6, 64, 56), (12, 128, 28), (24, 256, 14), (16, 512, 7)]


def _d121_layers(batch):
    """(pixels, channels, out_channels, plane) of densenet121's 1x1 convolutions at
    ``batch``."""
    layers = [(batch * s * s, c0 + 32 * i, 128, s)
              for n, c0, s in D121_BLOCKS for i in range(n)]
    transitions = [(batch * s * s, c0 + 32 * n, (c0 + 32 * n) // 2, s)
                   for n, c0, s in D121_BLOCKS[:-1]]
    return layers + transitions


@pytest.fixture
def empty_tuning_cache(monkeypatch, tmp_path):
    from densenet_fast.ops import triton_tuning

    monkeypatch.setenv(triton_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    return tmp_path / "tuning.json"


def test_conv1x1_layers_are_densenet121s(gpu_check):
    layers = gpu_check.conv1x1_layers(gpu_check.MODES["full"].config(batch=64))
    assert len(layers) == 61  # 58 dense layers, 3 transitions
    assert sorted((layer.pixels, layer.channels, layer.out_channels, layer.size)
                  for layer in layers) == sorted(_d121_layers(64))


@pytest.mark.parametrize("batch", [64, 16, 7])
def test_the_estimate_counts_densenet121s_shape_classes(gpu_check, empty_tuning_cache, batch):
    """Channels-last: every kernel walks pixels flat, the transitions' backward too."""
    from densenet_fast.ops.triton_tuning import size_class

    layers = _d121_layers(batch)
    classes = {(size_class(p), size_class(c), size_class(co)) for p, c, co, _ in layers}
    launches = [gpu_check._model_launches(gpu_check.MODES["full"], [batch])]
    estimate = gpu_check.tuning_estimate(launches, "cpu", interpreted=False)
    # Three kernels (the input gradient's only with stats_grad=False); every class new.
    assert estimate["classes"] == estimate["to_tune"] == 3 * len(classes)
    assert estimate["trials"] == 3 * estimate["classes"]  # three configs per kernel
    # Compiled once per kernel, config and pattern of sizes that are multiples of 16 (pixels,
    # plane, channels, out channels, the buffer's channels: a block's, or the transition's).
    totals = {s: c0 + 32 * n for n, c0, s in D121_BLOCKS}
    variants = {tuple(v % 16 == 0 for v in (p, s * s, c, co, totals[s] if co == 128 else c))
                for p, c, co, s in layers}
    assert estimate["compiles"] == 3 * 3 * len(variants)
    assert estimate["seconds"] == pytest.approx(
        estimate["compiles"] * gpu_check.COMPILE_SECONDS
        + estimate["trials"] * gpu_check.TRIAL_SECONDS, abs=0.05)


# Records the (tuner, shape class) pairs a densenet_fast training step of the dry run's tiny
# model meets (channels-last, bf16 autocast), through the interpreter.
MET_CLASSES = """
import json, sys
from densenet_fast.benchmark.runner import Runner, RunSettings
from densenet_fast.benchmark.implementations import ModelConfig
from densenet_fast.ops import triton_impl, triton_tuning

met, choose = set(), triton_tuning.Tuner.choose

def recording(self, shape_class, device, trial):
    met.add((triton_impl.TUNERS.index(self), tuple(shape_class)))
    return choose(self, shape_class, device, trial)

triton_tuning.Tuner.choose = recording
config = ModelConfig.from_json(json.loads(sys.argv[1]))
settings = RunSettings(device="cpu", autocast="bfloat16", channels_last=True)
Runner("densenet_fast", config, settings).step("train")
print(json.dumps(sorted(met)))
"""


def test_the_estimate_counts_the_classes_a_training_step_meets(gpu_check):
    """The estimate's (kernel, shape class) pairs are the ones the tuners are asked for."""
    pytest.importorskip("triton")
    mode = gpu_check.MODES["dry-run"]
    env = dict(os.environ, DENSENET_FAST_BACKEND="triton", TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MET_CLASSES, json.dumps(
        mode.config().to_json())], cwd=SCRIPT.parent.parent, env=env, capture_output=True,
        text=True, timeout=HOUR, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    met = {(kernel, tuple(shape_class))
           for kernel, shape_class in json.loads(proc.stdout.splitlines()[-1])}
    launches = gpu_check._model_launches(mode, [mode.batch])
    assert met == {(kernel, shape_class)
                   for kernel, shape_class, _ in gpu_check._launch_classes(launches)}


def test_the_estimate_leaves_out_classes_in_the_cache(gpu_check, empty_tuning_cache):
    """Classes in the tuning cache cost nothing; the interpreter tunes nothing at all."""
    import torch

    from densenet_fast.ops import triton_impl, triton_tuning

    launches = gpu_check.stage_launches(gpu_check.MODES["full"], "model")
    cold = gpu_check.tuning_estimate(launches, "cpu", interpreted=False)
    assert cold["to_tune"] > 0
    for kernel, shape_class, _ in gpu_check._launch_classes(launches[0]):
        tuner = triton_impl.TUNERS[kernel]
        triton_tuning.DISK.put(tuner._key(shape_class, torch.device("cpu")),
                               triton_tuning._describe(tuner.configs[0]))
    warm = gpu_check.tuning_estimate(launches, "cpu", interpreted=False)
    assert warm == {**cold, "to_tune": 0, "trials": 0, "compiles": 0, "seconds": 0}
    # compile_time's first process gets an empty cache of its own.
    assert gpu_check.tuning_estimate(launches, "cpu", interpreted=False, cold=True) == cold
    assert gpu_check.tuning_estimate(launches, "cpu", interpreted=True)["seconds"] == 0


def test_the_documented_budget_is_the_modes(gpu_check, empty_tuning_cache):
    """The module docstring's base limits and cold estimates are what the modes add up to."""
    doc = " ".join(gpu_check.__doc__.split())
    cold = {}
    for name in ("full", "quick"):
        mode = gpu_check.MODES[name]
        plan = gpu_check.plan_limits(mode, list(mode.stages), "cpu")
        base = sum(limit for _, limit in mode.timeouts)
        assert base == sum(row["base_s"] for row in plan.values())
        command = {"full": "gpu_check.py", "quick": "gpu_check.py --quick"}[name]
        assert f"{command} # stage limits: {base} s" in doc
        cold[name] = (sum(row["limit_s"] for row in plan.values()) - base, base)
    assert (f"the estimate adds {cold['full'][0]} s to the full check's {cold['full'][1]} s "
            f"and {cold['quick'][0]} s to the quick check's {cold['quick'][1]} s") in doc


def _perturbed(op, factor):
    def perturbed(*args):
        return op(*args) * factor
    return perturbed


@pytest.mark.parametrize("factor", [1.0, 1.1])
def test_the_op_stage_fails_when_the_fused_result_is_off(gpu_check, monkeypatch, factor):
    """The op stage's check, in this process (whatever backend the CPU has): the fused op
    passes as it is, and fails, naming the shape, with its forward output 10% off."""
    import densenet_fast.ops

    monkeypatch.setattr(densenet_fast.ops, "bn_relu_conv1x1",
                        _perturbed(densenet_fast.ops.bn_relu_conv1x1, factor))
    mode = dataclasses.replace(gpu_check.MODES["dry-run"], op_shapes=(("tiny-odd", 40, 35, 5),))
    result = gpu_check.stage_op(mode, HOUR)
    errors = [row["check"]["errors"] for row in result["rows"]]
    bound = gpu_check.REL_L2_BOUNDS["bfloat16"]
    if factor == 1.0:
        assert "error" not in result and all(row["check"]["passed"] for row in result["rows"])
        assert all(max(e.values()) <= bound for e in errors)
    else:
        assert result["error"].endswith("tiny-odd channels_last, tiny-odd contiguous")
        assert not any(row["check"]["passed"] for row in result["rows"])
        assert all(e["out"] == pytest.approx(0.1, rel=0.1) for e in errors)
        assert all(e["grad_input"] <= bound for e in errors)  # the backward is untouched


def test_untuned_stages_run_pinned_configs_and_count_only_compiles(gpu_check,
                                                                   empty_tuning_cache):
    from densenet_fast.ops.triton_tuning import TUNING_ENV

    mode = gpu_check.MODES["full"]
    assert gpu_check._stage_env("parity", mode)[TUNING_ENV] == "off"
    assert gpu_check._stage_env("max_batch", mode)[TUNING_ENV] == "off"
    assert gpu_check._stage_env("op", mode).get(TUNING_ENV) == os.environ.get(TUNING_ENV)
    launches = gpu_check.stage_launches(mode, "parity")
    tuned = gpu_check.tuning_estimate(launches, "cpu", interpreted=False)
    pinned = gpu_check.tuning_estimate(launches, "cpu", interpreted=False, tuned=False)
    assert pinned["classes"] == tuned["classes"] and pinned["to_tune"] == pinned["trials"] == 0
    # One compile per kernel variant instead of one per config of it.
    assert 0 < pinned["compiles"] == tuned["compiles"] // 3
    plan = gpu_check.plan_limits(mode, ["parity", "op"], "cpu")
    assert not plan["parity"]["tuned"] and plan["op"]["tuned"]
    assert "pinned configs" in gpu_check.format_plan(plan, empty_tuning_cache)


def test_an_only_run_keeps_the_other_stages_of_the_same_check(gpu_check, tmp_path):
    out = tmp_path / "gpu-x.json"
    out.write_text(json.dumps({"mode": "full", "device": "X", "date": "then",
                               "budget": {"stages": {"parity": {"limit_s": 500},
                                                     "op": {"limit_s": 60}}},
                               "stages": {"parity": {"seconds": 1}, "op": {"seconds": 2}}}))
    kept = gpu_check._earlier_stages(out, "full", "X", ["op"])
    assert kept == {"parity": {"seconds": 1, "run": "then", "limit_s": 500}}
    # The report shows a kept stage's limit from the run that ran it, not 0.
    report = {"mode": "full", "device": "X", "torch": "t", "triton": "t",
              "budget": {"stages": {"op": {"limit_s": 70, "estimate": {
                  "to_tune": 0, "classes": 0, "trials": 0, "seconds": 0.0}}}},
              "stages": {**kept, "op": {"seconds": 3}}}
    text = gpu_check.format_report(report)
    assert "1.0 s of   500 s" in text and "3.0 s of    70 s" in text
    # Kept again by a third command, a stage keeps the limit it first ran under.
    out.write_text(json.dumps({**report, "date": "later"}))
    assert gpu_check._earlier_stages(out, "full", "X", ["model"])["parity"]["limit_s"] == 500
    assert gpu_check._earlier_stages(out, "quick", "X", ["op"]) == {}
    assert gpu_check._earlier_stages(out, "full", "Y", ["op"]) == {}
    assert gpu_check._earlier_stages(tmp_path / "none.json", "full", "X", ["op"]) == {}


def test_parity_command_adds_a_selection_to_the_modes_own(gpu_check):
    """``--parity-k`` narrows the parity stage to the tests an earlier command did not reach;
    verbose output, so the stamped log says when each test ended."""
    full, dry = gpu_check.MODES["full"], gpu_check.MODES["dry-run"]
    command = gpu_check.parity_command(full)
    assert "-v" in command and "-k" not in command and command[-1] == "tests/with_triton"
    command = gpu_check.parity_command(full, "gpu_layer_shapes")
    assert command[-2:] == ["-k", "gpu_layer_shapes"]
    command = gpu_check.parity_command(dry, "not nan")
    assert command[command.index("-k") + 1] == "(active_backend or nan_propagates) and (not nan)"
    assert command.count("-k") == 1
