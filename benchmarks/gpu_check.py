"""GPU check: everything the first GPU run must prove, in one call.

    python benchmarks/gpu_check.py            # about 5 minutes on an H100, at most 8
    python benchmarks/gpu_check.py --quick    # at most 3 minutes
    python benchmarks/gpu_check.py --dry-run  # on the CPU, tiny shapes, Triton's interpreter
                                              # (2-3 minutes on 2 cores)

Stages, each in a subprocess of its own with its own timeout (and all within the mode's
total), so a crash, a hang or an out-of-memory in one still leaves the others' results:

- ``parity``: the Triton tests (``tests/with_triton``), GPU-only ones included: densenet121's
  layer shapes in float32, float16 and bfloat16, and ``cuda:1`` where there is one.
- ``op``: the fused op against eager BatchNorm2d -> ReLU -> Conv2d(1x1), bf16 autocast,
  channels-last, forward + backward, on densenet121's layer shapes.
- ``model``: one densenet121 training step (bf16 autocast, channels-last) per implementation
  (densenet_fast in both memory settings, and compiled), peak memory
  (``max_memory_allocated``) and time, against torchvision eager, ``memory_efficient=True``
  and ``torch.compile`` of torchvision, measured in the same run.
- ``max_batch``: the largest training batch within a fixed memory budget, per implementation.
- ``compile_time``: the first training step's time (Triton compilation and autotuning) in a
  fresh process with an empty Triton cache, then in a second process with that cache warm.

It prints a table of the goals (the GPU readiness issue) and writes
``benchmarks/results/gpu-<device>.json`` (``cpu-dry-run.json`` for a dry run) after every
stage. ``--dry-run`` runs every stage on the CPU, with the Triton kernels in the interpreter
and a tiny DenseNet, to prove the script end to end without a GPU: on the smallest shapes
that run every stage's code, one timed round, one thread per process (tiny shapes gain nothing
from more, and on a busy machine threads that wait for each other's cores make a step up to
100x slower), with stage limits that only catch a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, C_total, C_prefix, H) of densenet121's layers, at 224x224.
OP_SHAPES = [("block1-last", 256, 224, 56), ("block2-last", 512, 480, 28),
             ("block3-mid", 1024, 640, 14), ("block3-last", 1024, 992, 14),
             ("block4-last", 1024, 992, 7), ("transition1", 256, 256, 56)]
GOALS = {"op_speedup": 1.3, "time_vs_torchvision": 0.9, "time_vs_compiled": 1.0,
         "memory_vs_memeff": 0.4}
# Issue 12's goals: recompute_bottleneck=True, and densenet_fast under torch.compile.
RECOMPUTE_GOALS = {"time_vs_torchvision": 1.15, "memory_vs_memeff": 0.3}
COMPILED_GOALS = {"memory_vs_eager": 1.05, "time_vs_compiled": 1.0}


@dataclasses.dataclass(frozen=True)
class Mode:
    """What one mode measures, and how long each stage may take (seconds). ``parity_tests``:
    the parity stage's pytest arguments."""

    device: str = "cuda"
    model: str = "densenet121"
    batch: int = 64
    image: int = 224
    repeats: int = 10
    op_shapes: tuple = tuple(OP_SHAPES)
    op_batch: int = 64
    compiled_baseline: bool = True
    max_batch_budget_gib: float = 16.0
    max_batch_cap: int = 1024
    stages: tuple = ("parity", "op", "model", "max_batch", "compile_time")
    parity_tests: tuple = ("tests/with_triton",)
    timeouts: tuple = (("parity", 150), ("op", 60), ("model", 200), ("max_batch", 120),
                       ("compile_time", 90))
    total: int = 470

    def config(self, batch: int | None = None):
        from densenet_fast.benchmark.implementations import ModelConfig

        if self.model == "tiny":
            return ModelConfig(growth_rate=8, block_config=(2, 2), num_init_features=16,
                               num_classes=10, batch_size=batch or self.batch,
                               image_size=self.image)
        return ModelConfig.named(self.model, num_classes=1000, batch_size=batch or self.batch,
                                 image_size=self.image)


MODES = {
    "full": Mode(),
    "quick": Mode(batch=32, repeats=5, compiled_baseline=False,
                  stages=("parity", "op", "model", "compile_time"),
                  timeouts=(("parity", 80), ("op", 30), ("model", 60), ("compile_time", 60)),
                  total=175),
    # The dry run proves the script, so each stage does the least that runs all of it: the
    # tiny model (two blocks of two layers, a transition between) at batch 2 and 32x32, whose
    # last block still sees 4x4 (batch 1 trains, so max_batch's search stops at its cap of 1);
    # one timed round; the parity stage leaves out the tests/with_triton tests of the tiny
    # model (the model stage runs it through the interpreter, and tests/test_triton_interpreter
    # .py runs them all). On the CPU the time depends on the machine's load, so the limits are
    # there to catch a hang, not to bound a run (2-3 minutes on a quiet 2-core machine).
    "dry-run": Mode(device="cpu", model="tiny", batch=2, image=32, repeats=1,
                    op_shapes=(("tiny-nchw", 24, 19, 6), ("tiny-odd", 40, 35, 5)), op_batch=1,
                    compiled_baseline=True, max_batch_budget_gib=0.25, max_batch_cap=1,
                    parity_tests=("tests/with_triton", "-k", "not tiny_model"),
                    timeouts=(("parity", 900), ("op", 600), ("model", 1800), ("max_batch", 900),
                              ("compile_time", 900)),
                    total=3600),
}


def _env(mode: Mode, **extra) -> dict:
    env = dict(os.environ, DENSENET_FAST_BACKEND="triton", **extra)
    if mode.device == "cpu":  # the dry run: see the module's docstring for the one thread
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


# --- stages (each runs in its own process) ---------------------------------------------

def stage_parity(mode: Mode, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *mode.parity_tests], cwd=ROOT, env=_env(mode), capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "failures": re.findall(r"^FAILED .*$", proc.stdout, flags=re.M)[:20],
            "passed": proc.returncode == 0, "tail": proc.stdout[-3000:] if proc.returncode else ""}


def _op_row(mode: Mode, name: str, total: int, prefix: int, size: int) -> dict:
    """The fused op against eager BN-ReLU-Conv1x1 on one layer shape, forward + backward.
    ``in_block``: statistics given, their gradient left to the block (as the dense block
    calls it); ``standalone``: statistics computed and the full BN backward."""
    import torch
    import torch.nn as nn

    from densenet_fast.benchmark.timing import time_interleaved
    from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward
    from densenet_fast.ops.batchnorm import channel_stats

    device, co, fmt = mode.device, 128, torch.channels_last
    dtype = torch.bfloat16
    make = dict(device=device)
    buffer = torch.randn(mode.op_batch, total, size, size, **make).to(dtype)
    buffer = buffer.contiguous(memory_format=fmt)
    grad_out = torch.randn(mode.op_batch, co, size, size, **make).to(dtype).contiguous(
        memory_format=fmt)
    gamma, beta = torch.ones(prefix, **make), torch.zeros(prefix, **make)
    weight = (torch.randn(co, prefix, 1, 1, **make) / prefix ** 0.5).to(dtype)
    stats = channel_stats(buffer[:, :prefix])
    grad_buffer = torch.zeros_like(buffer)

    def fused(standalone: bool):
        mean, var = channel_stats(buffer[:, :prefix]) if standalone else stats
        invstd = torch.rsqrt(var + 1e-5)
        bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight)
        bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, gamma, beta, weight,
                                 standalone, grad_buffer)

    layer = nn.Sequential(nn.BatchNorm2d(prefix), nn.ReLU(inplace=True),
                          nn.Conv2d(prefix, co, 1, bias=False)).to(device).to(
        memory_format=fmt)
    x = buffer[:, :prefix].contiguous(memory_format=fmt).requires_grad_()

    def eager():
        with torch.autocast(device, dtype=dtype):
            out = layer(x)
        out.backward(grad_out)

    times = time_interleaved({"eager": eager, "in_block": lambda: fused(False),
                              "standalone": lambda: fused(True)}, mode.repeats, warmup=2,
                             device=device)
    median = {key: statistics.median(seconds) for key, seconds in times.items()}
    return {"shape": name, "batch": mode.op_batch, "prefix": prefix, "size": size,
            **{f"{k}_ms": v * 1e3 for k, v in median.items()},
            "speedup_in_block": median["eager"] / median["in_block"],
            "speedup_standalone": median["eager"] / median["standalone"]}


def stage_op(mode: Mode, timeout: float) -> dict:
    rows = [_op_row(mode, *shape) for shape in mode.op_shapes]
    total = {k: sum(r[f"{k}_ms"] for r in rows) for k in ("eager", "in_block", "standalone")}
    return {"rows": rows, "speedup_in_block": total["eager"] / total["in_block"],
            "speedup_standalone": total["eager"] / total["standalone"]}


def stage_model(mode: Mode, timeout: float) -> dict:
    import torch

    from densenet_fast.benchmark.memory import measure_in_process
    from densenet_fast.benchmark.runner import Runner, RunSettings
    from densenet_fast.benchmark.timing import summarize, time_interleaved

    config = mode.config()
    settings = RunSettings(device=mode.device, autocast="bfloat16", channels_last=True)
    names = ["torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-recompute",
             "densenet_fast-torch"]
    if mode.compiled_baseline:
        names += ["torchvision-compiled", "densenet_fast-compiled"]
    rows = {}
    for name in names:
        runner = None
        try:
            memory = measure_in_process(name, config, "train", settings)
            runner = Runner(name, config, settings)
            timing = summarize(time_interleaved({name: lambda r=runner: r.step("train")},
                                                mode.repeats, device=mode.device)[name])
            rows[name] = {"peak_bytes": memory["peak_bytes"], **timing,
                          "images_per_s": config.batch_size / timing["median_s"]}
        except Exception as exc:  # one implementation's failure (OOM) is its row's result
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        del runner
        if mode.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base, memeff = rows.get("torchvision", {}), rows.get("torchvision-memeff", {})
    for row in rows.values():
        if "median_s" in row and "median_s" in base:
            row["time_vs_torchvision"] = row["median_s"] / base["median_s"]
        if "peak_bytes" in row and memeff.get("peak_bytes"):
            row["memory_vs_memeff"] = row["peak_bytes"] / memeff["peak_bytes"]
    compiled = rows.get("torchvision-compiled", {})
    fast, fast_compiled = rows.get("densenet_fast", {}), rows.get("densenet_fast-compiled", {})
    for row in (fast, fast_compiled):
        if "median_s" in row and "median_s" in compiled:
            row["time_vs_compiled"] = row["median_s"] / compiled["median_s"]
    if "peak_bytes" in fast_compiled and fast.get("peak_bytes"):
        fast_compiled["memory_vs_eager"] = fast_compiled["peak_bytes"] / fast["peak_bytes"]
    return {"config": config.to_json(), "autocast": "bfloat16",
            "memory_format": "channels_last", "rows": rows}


def stage_max_batch(mode: Mode, timeout: float) -> dict:
    from densenet_fast.benchmark.runner import RunSettings
    from densenet_fast.benchmark.sweeps import sweep_batch

    settings = RunSettings(device=mode.device, autocast="bfloat16", channels_last=True)
    budget = int(mode.max_batch_budget_gib * 2**30)
    result = sweep_batch(mode.config(), ["torchvision", "torchvision-memeff", "densenet_fast",
                                         "densenet_fast-recompute"],
                         budget, settings, max_batch=mode.max_batch_cap, show_progress=False)
    return {"budget_bytes": budget, "cap": mode.max_batch_cap,
            "max_batch": {name: row["max_batch"] for name, row in result["rows"].items()}}


_FIRST_STEP = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from densenet_fast.benchmark.runner import Runner, RunSettings
from densenet_fast.benchmark.implementations import ModelConfig
config = ModelConfig.from_json(json.loads({config!r}))
settings = RunSettings(device={device!r}, autocast="bfloat16", channels_last=True)
runner = Runner("densenet_fast", config, settings)
start = time.perf_counter()
runner.step("train")
if {device!r}.startswith("cuda"):
    torch.cuda.synchronize()
first = time.perf_counter() - start
start = time.perf_counter()
runner.step("train")
if {device!r}.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({{"first_step_s": first, "second_step_s": time.perf_counter() - start}}))
"""


def stage_compile_time(mode: Mode, timeout: float) -> dict:
    config = mode.config(batch=min(mode.batch, 16))
    code = _FIRST_STEP.format(root=str(ROOT), config=json.dumps(config.to_json()),
                              device=mode.device)
    result = {"batch": config.batch_size}
    with tempfile.TemporaryDirectory() as cache:
        for run in ("cold_cache", "warm_cache"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                                  env=_env(mode, TRITON_CACHE_DIR=cache), capture_output=True,
                                  text=True, timeout=timeout / 2, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"the {run} step's process exited with {proc.returncode}:\n"
                                   + proc.stderr[-1500:])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - start
            result[run] = row
    return result


STAGES = {"parity": stage_parity, "op": stage_op, "model": stage_model,
          "max_batch": stage_max_batch, "compile_time": stage_compile_time}


# --- the parent: stages in subprocesses, the report ------------------------------------

def _stage_command(name: str, mode_name: str, timeout: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--mode", mode_name,
            "--timeout", str(timeout)]


def _end_group(proc: subprocess.Popen) -> None:
    """Kill the stage's process group (the stage and the processes it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_stage(name: str, mode_name: str, timeout: float) -> dict:
    """One stage in a process of its own, in a process group of its own: a stage that runs
    past its limit (or a Ctrl-C) ends with every process it started, which would otherwise
    go on taking the CPU or GPU from the stages after it."""
    start = time.perf_counter()
    with subprocess.Popen(_stage_command(name, mode_name, timeout), cwd=ROOT,
                          env=_env(MODES[mode_name]), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return {"error": f"timed out after {timeout:.0f} s",
                    "seconds": round(time.perf_counter() - start, 1)}
        except BaseException:
            _end_group(proc)
            raise
    seconds = round(time.perf_counter() - start, 1)
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "seconds": seconds,
                "stderr_tail": stderr[-2000:]}
    return {**json.loads(lines[-1]), "seconds": seconds}


def goals(report: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) rows; ``met`` is None where the stage has no figure."""
    stages = report["stages"]
    rows = []
    parity = stages.get("parity", {})
    rows.append(("parity tests pass", parity.get("summary", parity.get("error", "-")),
                 parity.get("passed") if "passed" in parity else None))
    op = stages.get("op", {})
    speed = op.get("speedup_in_block")
    rows.append((f"fused op >= {GOALS['op_speedup']}x eager (in block, summed)",
                 f"{speed:.2f}x" if speed else op.get("error", "-"),
                 None if speed is None else speed >= GOALS["op_speedup"]))
    model_rows = stages.get("model", {}).get("rows", {})
    texts = {"time_vs_torchvision": "step time vs torchvision eager",
             "time_vs_compiled": "step time vs compiled torchvision",
             "memory_vs_memeff": "peak memory vs torchvision memory_efficient",
             "memory_vs_eager": "peak memory vs its eager step"}
    for name, goals_of_row in (("densenet_fast", GOALS), ("densenet_fast-recompute",
                                                          RECOMPUTE_GOALS),
                               ("densenet_fast-compiled", COMPILED_GOALS)):
        row = model_rows.get(name, {})
        for key, limit in goals_of_row.items():
            if key == "op_speedup":
                continue
            value = row.get(key)
            label = "" if name == "densenet_fast" else f"{name.split('-', 1)[1]}: "
            rows.append((f"{label}{texts[key]} <= {limit}", f"{value:.2f}x" if value else "-",
                         None if value is None else value <= limit))
    return rows


def format_report(report: dict) -> str:
    lines = [f"gpu_check {report['mode']}: {report['device']}, torch {report['torch']}, "
             f"Triton {report['triton']}"]
    for name, stage in report["stages"].items():
        status = stage.get("error", "ok")
        lines.append(f"  stage {name:12s} {stage.get('seconds', 0):7.1f} s  {status}")
    model = report["stages"].get("model", {}).get("rows", {})
    if model:
        lines.append(f"  {'implementation':22s} {'peak MiB':>9s} {'median ms':>10s} "
                     f"{'x tv time':>9s} {'x memeff mem':>12s}")
        for name, row in model.items():
            if "error" in row:
                lines.append(f"  {name:22s} {row['error']}")
                continue
            lines.append(f"  {name:22s} {row['peak_bytes'] / 2**20:9.1f} "
                         f"{row['median_s'] * 1e3:10.1f} {row.get('time_vs_torchvision', 0):9.2f}"
                         f" {row.get('memory_vs_memeff', 0):12.2f}")
    for goal, measured, met in goals(report):
        mark = {True: "met", False: "NOT MET", None: "no figure"}[met]
        lines.append(f"  goal: {goal:55s} {measured:>14s}  {mark}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="at most 3 minutes")
    group.add_argument("--dry-run", action="store_true",
                       help="every stage on the CPU: tiny model, Triton's interpreter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run these stages")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:  # inside a stage's own process
        print(json.dumps(STAGES[args.stage](MODES[args.mode], args.timeout)))
        return 0

    mode_name = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    import torch
    import triton

    if mode.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to exercise the script on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if mode.device == "cuda" else "cpu (dry run)"
    slug = "cpu-dry-run" if mode.device == "cpu" else \
        "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(args.out) / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"mode": mode_name, "device": device, "torch": torch.__version__,
              "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "goals": GOALS, "stages": {}}
    deadline = time.monotonic() + mode.total
    for name, limit in mode.timeouts:
        if name not in mode.stages or (args.only and name not in args.only):
            continue
        left = deadline - time.monotonic()
        if left < 10:
            report["stages"][name] = {"error": "skipped: the mode's total time is spent"}
        else:
            report["stages"][name] = _run_stage(name, mode_name, min(limit, left))
        print(f"stage {name}: {report['stages'][name].get('error', 'ok')} "
              f"({report['stages'][name].get('seconds', 0)} s)", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every stage
    print(format_report(report))
    print(f"results written to {out}")
    return 0 if all("error" not in s for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
