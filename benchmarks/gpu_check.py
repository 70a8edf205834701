"""GPU check: everything the first GPU run must prove, in one call.

    python benchmarks/gpu_check.py            # stage limits: 825 s + the tuning estimate
    python benchmarks/gpu_check.py --quick    # stage limits: 425 s + the tuning estimate
    python benchmarks/gpu_check.py --dry-run  # on the CPU, tiny shapes, Triton's interpreter
                                              # (2-3 minutes on 2 cores)

Stages, each in a subprocess of its own with its own time limit, so a crash, a hang or an
out-of-memory in one still leaves the others' results:

- ``parity``: the Triton tests (``tests/with_triton``), GPU-only ones included: densenet121's
  layer shapes in float32, float16 and bfloat16, and ``cuda:1`` where there is one.
- ``op``: the fused op against eager BatchNorm2d -> ReLU -> Conv2d(1x1) on densenet121's layer
  shapes, bf16 autocast, channels-last and NCHW. First the results: the forward output and
  the gradients of the input, the conv weight and the BN weight and bias, each within a
  relative L2 error of the eager ones (``REL_L2_BOUNDS``, per dtype); a shape out of bounds
  fails the stage. Then forward + backward, timed.
- ``model``: one densenet121 training step (bf16 autocast, channels-last) per implementation
  (densenet_fast in both memory settings, and compiled), peak memory
  (``max_memory_allocated``) and time, against torchvision eager, ``memory_efficient=True``
  and ``torch.compile`` of torchvision, measured in the same run.
- ``max_batch``: the largest training batch within a fixed memory budget, per implementation,
  each batch tried in the stage's own process (CUDA's allocator counts a step's peak
  exactly there), the search starting where two small batches' peaks guess the budget is
  reached; every try is logged as it ends.
- ``compile_time``: a densenet_fast densenet121 training process with an empty tuning cache
  (``DENSENET_FAST_TRITON_CACHE``) and an empty Triton cache (``TRITON_CACHE_DIR``), then a
  second with both as the first left them: the time to the first finished step, and each
  process's ``tuning_stats()`` (shape classes tuned, configs timed, seconds spent).

Time limits. A stage's limit is its base limit (``Mode.timeouts``) plus an estimate of the
Triton tuning it will do (``tuning_estimate``): the shape classes of its fused-op launches
that the tuning cache does not hold yet, each timed over every config of each kernel, and
the kernel variants those trials compile. The budget, the sum of the limits, is printed
before the first stage and kept in the results. ``parity`` and ``max_batch`` check numbers
and memory, not speed: their kernels run the pinned configs (``DENSENET_FAST_TRITON_TUNING=off``),
so only their compiles count. With an empty tuning cache the estimate adds 164 s to the full
check's 825 s and 155 s to the quick check's 425 s; with every class in the cache, only
the compiles of the untuned stages. A GPU session whose commands may run 10 minutes runs
``--quick`` in one command, the full check as ``--only parity op`` and
``--only model max_batch compile_time`` (522 s and 467 s). What the first H200 run took, stage
by stage: docs/benchmarks.md.

Output. Each stage's stdout and stderr go to a log as they come
(``benchmarks/results/<results>-logs/<stage>.log``): a stage that runs out of time still
leaves what it printed, and what it had measured so far (``partial``). The results name each
stage's log and keep the tail of a failed or timed-out stage's.

It prints a table of the goals (the GPU readiness issue) and writes
``benchmarks/results/gpu-<device>.json`` (``cpu-dry-run.json`` for a dry run) after every
stage. ``--dry-run`` runs every stage on the CPU, with the Triton kernels in the interpreter
and a tiny DenseNet, to prove the script end to end without a GPU: on the smallest shapes
that run every stage's code, one timed round, one thread per process (tiny shapes gain nothing
from more, and on a busy machine threads that wait for each other's cores make a step up to
100x slower), with stage limits that only catch a hang. The interpreter runs one config per
kernel, so a dry run tunes nothing (its estimate is 0 s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, C_total, C_prefix, H) of densenet121's layers, at 224x224.
OP_SHAPES = [("block1-last", 256, 224, 56), ("block2-last", 512, 480, 28),
             ("block3-mid", 1024, 640, 14), ("block3-last", 1024, 992, 14),
             ("block4-last", 1024, 992, 7), ("transition1", 256, 256, 56)]
OP_OUT_CHANNELS = 128  # bn_size * growth_rate of densenet121's bottlenecks
FORMATS = ("channels_last", "contiguous")  # torch.channels_last, torch.contiguous_format (NCHW)
GOALS = {"op_speedup": 1.3, "time_vs_torchvision": 0.9, "time_vs_compiled": 1.0,
         "memory_vs_memeff": 0.4}
# Issue 12's goals: recompute_bottleneck=True, and densenet_fast under torch.compile.
RECOMPUTE_GOALS = {"time_vs_torchvision": 1.15, "memory_vs_memeff": 0.3}
COMPILED_GOALS = {"memory_vs_eager": 1.05, "time_vs_compiled": 1.0}

# The op stage's bound on ||fused - eager|| / ||eager|| per tensor. Both round to the dtype,
# in different places (eager rounds the BN-ReLU activation and the conv's input gradient to
# it; the fused kernels keep more in float32): about one unit in the last place apart,
# relative L2 7e-3 in bfloat16 through the interpreter. The bounds are four of the dtype's
# eps: 2^-7 for bfloat16, 2^-10 for float16 and for float32 convolutions in TF32 (torch's
# default on a GPU, which the kernels follow). A wrong kernel is off by order 1 (without the
# gradient through the batch statistics, the input gradient is 40% off).
REL_L2_BOUNDS = {"bfloat16": 4 * 2**-7, "float16": 4 * 2**-10, "float32": 4 * 2**-10}

# The tuning estimate: seconds to compile one config of a kernel variant with an empty Triton
# cache (an upper figure: a warm cache only loads it), and to time one config on one class
# (an untimed launch, then launches for 2 ms: triton_tuning.TRIAL_SECONDS, plus the syncs).
# Measured on an H200 (torch 2.11, Triton 3.6, 2026-12-04): densenet121's 39 classes with
# empty caches tuned in 10.4 s, 117 trials and 18 compiles (about 0.25 s a compile); the op
# stage's 32 classes in 28.9 s against an estimate of 100.8 s at 2 s a compile.
COMPILE_SECONDS = 1.0
TRIAL_SECONDS = 0.05

# The parity stage's -k expression on top of the mode's (``--parity-k``: a GPU session whose
# earlier command ran part of the tests runs the rest), and its limit per test.
PARITY_K_ENV = "GPU_CHECK_PARITY_K"
PARITY_TEST_LIMIT_S = 120


@dataclasses.dataclass(frozen=True)
class Mode:
    """What one mode measures, and each stage's base time limit in seconds (``timeouts``; the
    tuning estimate is added to it). ``parity_tests``: the parity stage's pytest arguments."""

    device: str = "cuda"
    model: str = "densenet121"
    batch: int = 64
    image: int = 224
    repeats: int = 10
    op_shapes: tuple = tuple(OP_SHAPES)
    op_batch: int = 64
    op_dtype: str = "bfloat16"
    compiled_baseline: bool = True
    max_batch_budget_gib: float = 16.0
    max_batch_cap: int = 1024
    stages: tuple = ("parity", "op", "model", "max_batch", "compile_time")
    # Stages that check numbers or memory, not speed: their kernels run the pinned configs
    # (DENSENET_FAST_TRITON_TUNING=off) instead of tuning hundreds of shape classes.
    untuned: tuple = ("parity", "max_batch")
    parity_tests: tuple = ("tests/with_triton",)
    # parity: the first H200 run took about 250 s over tests/with_triton (53 small-shape
    # tests in about 170 s, each compiling kernel variants of its own; the 22 GPU-sized ones
    # in 88 s), most of it compiles that the estimate counts only for the GPU-sized tests;
    # 25 s more for the elementwise kernels' tests since (73, compiling each dtype and layout);
    # 30 s more for the eleven tests of every op over seven input layouts and of the weight
    # gradient's split (small shapes, compiling the variants of their strides), which
    # ``--quick`` leaves out (QUICK_LEAVES_OUT).
    timeouts: tuple = (("parity", 355), ("op", 60), ("model", 200), ("max_batch", 120),
                       ("compile_time", 90))

    @property
    def interpreted(self) -> bool:
        """Whether the stages run Triton's interpreter (the CPU dry run)."""
        return self.device == "cpu"

    def config(self, batch: int | None = None):
        from densenet_fast.benchmark.implementations import ModelConfig

        if self.model == "tiny":
            return ModelConfig(growth_rate=8, block_config=(2, 2), num_init_features=16,
                               num_classes=10, batch_size=batch or self.batch,
                               image_size=self.image)
        return ModelConfig.named(self.model, num_classes=1000, batch_size=batch or self.batch,
                                 image_size=self.image)


# The parity tests ``--quick`` leaves out, so that it still fits one 10-minute command.
QUICK_LEAVES_OUT = "not laid_out and not split_over and not expanded_tensors"

MODES = {
    "full": Mode(),
    "quick": Mode(batch=32, repeats=5, compiled_baseline=False,
                  stages=("parity", "op", "model", "compile_time"),
                  parity_tests=("tests/with_triton", "-k", QUICK_LEAVES_OUT),
                  timeouts=(("parity", 275), ("op", 30), ("model", 60),
                            ("compile_time", 60))),
    # The dry run proves the script, so each stage does the least that runs all of it: the
    # tiny model (two blocks of two layers, a transition between) at batch 1 and 32x32, whose
    # last block still sees 4x4, 16 values per channel for its BNs (batch 2 took a third
    # longer in the interpreter; max_batch's search stops at its cap of 1);
    # one timed round; op shapes with NCHW planes of a multiple of 16 pixels (4x4) and not
    # (5x5); the parity stage runs seven of tests/with_triton (its plumbing is the point:
    # tests/test_triton_interpreter.py runs them all through the interpreter, and the
    # interpreted stage took 28 s of the dry run's 130 with all of them). On the CPU the time
    # depends on the machine's load, so the limits are there to catch a hang, not to bound a
    # run.
    "dry-run": Mode(device="cpu", model="tiny", batch=1, image=32, repeats=1,
                    op_shapes=(("tiny-4x4", 24, 19, 4), ("tiny-odd", 40, 35, 5)), op_batch=1,
                    compiled_baseline=True, max_batch_budget_gib=0.25, max_batch_cap=1,
                    parity_tests=("tests/with_triton", "-k", "active_backend or nan_propagates"),
                    timeouts=(("parity", 900), ("op", 600), ("model", 1800), ("max_batch", 900),
                              ("compile_time", 900))),
}


def _memory_format(name: str):
    """The torch memory format of one of ``FORMATS``."""
    import torch

    return {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[name]


def _env(mode: Mode, **extra) -> dict:
    # Unbuffered: a stage's output reaches its log as it is printed, not when it exits.
    env = dict(os.environ, DENSENET_FAST_BACKEND="triton", PYTHONUNBUFFERED="1", **extra)
    if mode.interpreted:  # the dry run: see the module's docstring for the one thread
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


# --- the tuning estimate -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conv1x1:
    """One BN-ReLU-Conv1x1 launch shape: ``batch`` images of ``size`` x ``size`` pixels, the
    first ``channels`` of a ``total``-channel buffer in, ``out_channels`` out."""

    batch: int
    size: int
    channels: int
    out_channels: int
    total: int

    @property
    def hw(self) -> int:
        return self.size * self.size

    @property
    def pixels(self) -> int:
        return self.batch * self.hw


@dataclasses.dataclass(frozen=True)
class Launches:
    """Fused-op launches a stage makes: ``layers`` in ``dtype`` and ``memory_format`` (one of
    ``FORMATS``), the backward with each of ``stats_grad``."""

    layers: tuple
    dtype: str
    memory_format: str = "channels_last"
    stats_grad: tuple = (False,)


def conv1x1_layers(config) -> tuple[Conv1x1, ...]:
    """The BN-ReLU-Conv1x1 of a DenseNet-BC ``config``'s training step, at its batch and image
    size: each dense layer's bottleneck (the buffer's prefix in, ``bn_size * growth_rate``
    out) and each transition (the block's channels in, half out; at the block's resolution,
    before its 2x2 pooling)."""
    from densenet_fast.validation import output_size

    size = output_size(config.image_size, 7, 2, 3)  # conv0
    size = output_size(size, 3, 2, 1)  # pool0
    channels, layers = config.num_init_features, []
    for index, depth in enumerate(config.block_config):
        total = channels + depth * config.growth_rate
        layers += [Conv1x1(config.batch_size, size, channels + layer * config.growth_rate,
                           config.bn_size * config.growth_rate, total) for layer in range(depth)]
        channels = total
        if index < len(config.block_config) - 1:
            layers.append(Conv1x1(config.batch_size, size, channels, channels // 2, channels))
            channels, size = channels // 2, output_size(size, 2, 2, 0)
    return tuple(layers)


def _model_launches(mode: Mode, batches, image: int | None = None, dtype: str = "bfloat16",
                    memory_format: str = "channels_last", stats_grad=(False,)) -> Launches:
    """``mode``'s model trained at each of ``batches``: the block backward passes the
    statistics' gradient itself (``stats_grad=False``)."""
    config = mode.config()
    if image is not None:
        config = dataclasses.replace(config, image_size=image)
    layers = [layer for batch in batches
              for layer in conv1x1_layers(dataclasses.replace(config, batch_size=batch))]
    return Launches(tuple(layers), dtype, memory_format, tuple(stats_grad))


def _distinct_batches(mode: Mode, cap: int) -> list[int]:
    """The smallest batch in ``[1, cap]`` of each distinct set of launches: a batch changes
    only the pixel counts, so batches whose pixel counts share size classes and multiples
    of 16 on every plane launch the same shape classes and compile the same variants."""
    from densenet_fast.ops.triton_tuning import size_class

    planes = sorted({layer.hw for layer in conv1x1_layers(mode.config(batch=1))})
    batches, seen = [], set()
    for batch in range(1, cap + 1):
        key = tuple((size_class(batch * hw), batch * hw % 16 == 0) for hw in planes)
        if key not in seen:
            seen.add(key)
            batches.append(batch)
    return batches


def stage_launches(mode: Mode, name: str) -> list[Launches]:
    """The fused-op launches that stage ``name`` tunes for, as ``tuning_estimate`` counts them."""
    if name == "parity":
        if mode.interpreted:  # the GPU-only tests are skipped, and nothing else is large
            return []
        # test_gpu_densenet121_matches_torchvision: densenet121 at batch 8, 128x128, float32
        # and bf16 autocast, channels-last; test_gpu_layer_shapes: four of its layers at
        # 224x224 in three dtypes, channels-last and NCHW (counted as all of them: an upper
        # figure). The interpreter's small shapes and the tiny models are left to the base.
        d121 = dataclasses.replace(mode, model="densenet121")
        return ([_model_launches(d121, [8], 128, dtype) for dtype in ("float32", "bfloat16")]
                + [_model_launches(d121, [8], 224, dtype, fmt, [stats])
                   for dtype in ("float32", "float16", "bfloat16")
                   for fmt, stats in (("channels_last", False), ("contiguous", True))])
    if name == "op":
        layers = tuple(Conv1x1(mode.op_batch, size, prefix, OP_OUT_CHANNELS, total)
                       for _, total, prefix, size in mode.op_shapes)
        return [Launches(layers, mode.op_dtype, fmt, (False, True)) for fmt in FORMATS]
    if name == "model":
        return [_model_launches(mode, [mode.batch])]
    if name == "max_batch":  # any batch the search may try: an upper figure
        return [_model_launches(mode, _distinct_batches(mode, mode.max_batch_cap))]
    if name == "compile_time":
        return [_model_launches(mode, [_compile_time_batch(mode)])]
    raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")


def _launch_classes(launches: Launches):
    """``(tuner index, shape class, compile variant)`` of each kernel launch: the tuners'
    order and shape classes are triton_impl's own; the variant is what Triton compiles once
    for (dtype, whether pixels are flat, the input gradient's stats_grad, and which sizes are
    multiples of 16, on which Triton specializes)."""
    import torch

    from densenet_fast.ops import triton_impl

    dtype, memory_format = getattr(torch, launches.dtype), _memory_format(launches.memory_format)

    def probe(size: int, fmt):  # the strides of a tensor of that plane, not its data
        return torch.empty((1, 2, size, size), device="meta", memory_format=fmt)

    def launch(kernel: int, flat: bool, layer: Conv1x1, stats_grad=()):
        shape_class = triton_impl._shape_class(dtype, flat, layer.pixels, layer.channels,
                                               layer.out_channels)
        divisible = tuple(n % 16 == 0 for n in (layer.pixels, layer.hw, layer.channels,
                                                layer.out_channels, layer.total))
        return kernel, (*shape_class, *stats_grad), (launches.dtype, flat, divisible,
                                                     *stats_grad)

    for layer in set(launches.layers):
        # The op's gradients come in the buffer's layout (block.py makes the transitions' so).
        flat = triton_impl.pixels_flat(layer.hw, probe(layer.size, memory_format))
        yield launch(0, flat, layer)
        for stats_grad in launches.stats_grad:
            yield launch(1, flat, layer, (stats_grad,))
        yield launch(2, flat, layer)


def tuning_estimate(launches: list[Launches], device: str, interpreted: bool,
                    cold: bool = False, tuned: bool = True) -> dict:
    """How much Triton tuning ``launches`` cost on ``device``: ``classes``, the distinct
    (kernel, shape class) pairs; ``to_tune``, those not in the tuning cache file (all with
    ``cold``: a process given an empty one); ``trials``, one per config of each to tune;
    ``compiles``, every config of each kernel variant those trials run; ``seconds``,
    ``compiles * COMPILE_SECONDS + trials * TRIAL_SECONDS``. The interpreter runs one config
    per kernel and so tunes nothing. Without ``tuned`` (``DENSENET_FAST_TRITON_TUNING=off``)
    nothing is timed and each kernel variant compiles its pinned config only."""
    import torch

    from densenet_fast.ops import triton_impl, triton_tuning

    found = {(kernel, shape_class): variant for group in launches
             for kernel, shape_class, variant in _launch_classes(group)}
    tuners = triton_impl.TUNERS
    configs = [1 if interpreted else len(tuner.configs) for tuner in tuners]
    where = torch.device(device)

    def cached(kernel: int, shape_class: tuple) -> bool:
        # The tuner's own key: the estimate sees what the stage's lookup will find.
        return not cold and triton_tuning.DISK.get(
            tuners[kernel]._key(shape_class, where)) is not None

    if tuned:
        to_tune = [(kernel, shape_class) for kernel, shape_class in found
                   if configs[kernel] > 1 and not cached(kernel, shape_class)]
        variants = {(kernel, found[kernel, shape_class]) for kernel, shape_class in to_tune}
    else:
        to_tune, configs = [], [1] * len(tuners)
        variants = set() if interpreted else {(kernel, variant)
                                              for (kernel, _), variant in found.items()}
    trials = sum(configs[kernel] for kernel, _ in to_tune)
    compiles = sum(configs[kernel] for kernel, _ in variants)
    return {"classes": len(found), "to_tune": len(to_tune), "trials": trials,
            "compiles": compiles,
            "seconds": round(compiles * COMPILE_SECONDS + trials * TRIAL_SECONDS, 1)}


def plan_limits(mode: Mode, names: list[str], device: str) -> dict[str, dict]:
    """Each of stage ``names``' base limit, tuning estimate and limit (their sum, whole
    seconds). Every stage is estimated against the tuning cache as it is now, without the
    classes the stages before it will add: an upper figure where stages share classes."""
    plan = {}
    base = dict(mode.timeouts)
    for name in names:
        estimate = tuning_estimate(stage_launches(mode, name), device, mode.interpreted,
                                   cold=name == "compile_time",  # its first process: empty
                                   tuned=name not in mode.untuned)
        plan[name] = {"base_s": base[name], "estimate": estimate,
                      "tuned": name not in mode.untuned,
                      "limit_s": base[name] + math.ceil(estimate["seconds"])}
    return plan


def format_plan(plan: dict[str, dict], cache: Path) -> str:
    lines = [f"stage limits: base + tuning estimate (classes not in {cache}; compile_time: "
             f"an empty cache)"]
    for name, row in plan.items():
        e = row["estimate"]
        lines.append(f"  {name:12s} {row['base_s']:5d} s + {e['seconds']:7.1f} s = "
                     f"{row['limit_s']:5d} s  ({e['classes']} classes, "
                     + (f"{e['to_tune']} to tune: {e['trials']} trials, " if row["tuned"]
                        else "pinned configs: ") + f"{e['compiles']} compiles)")
    lines.append(f"  budget: {sum(row['limit_s'] for row in plan.values())} s")
    return "\n".join(lines)


# --- a stage's output ------------------------------------------------------------------

_RESULT: Path | None = None  # in a stage's process: where its result goes


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` whole or not at all (the parent may read it while the stage is killed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _partial_path(result: Path) -> Path:
    return result.with_name(result.name + ".partial")


def _progress(message: str, partial: dict | None = None) -> None:
    """Print how far the stage got (its log) and keep ``partial``, its result so far, where
    the parent finds it if the stage runs out of time."""
    print(message, flush=True)
    if partial is not None and _RESULT is not None:
        _write_json(_partial_path(_RESULT), partial)


def _run_logged(command: list[str], env: dict, timeout: float,
                stamp: bool = False) -> tuple[int | None, str]:
    """Run ``command`` with its stdout and stderr copied line by line to this process's
    stdout (the stage's log) as they come, each prefixed with the seconds since the start
    where ``stamp``; return its exit code (None when it ran past ``timeout`` and was killed)
    and its output (unprefixed). It stays in this stage's process group, so it ends with the
    stage if the parent ends the stage."""
    lines: list[str] = []
    start = time.perf_counter()

    def copy(stream) -> None:
        for line in stream:
            lines.append(line)
            sys.stdout.write(f"[{time.perf_counter() - start:6.1f} s] {line}" if stamp
                             else line)
            sys.stdout.flush()

    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        reader = threading.Thread(target=copy, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        reader.join(timeout=10)  # a process it started may still hold the pipe
    return code, "".join(lines)


def _child_timeout(timeout: float) -> float:
    """A stage's own subprocess ends before the stage does, so the stage can say why."""
    return max(timeout - 15, 0.9 * timeout)


# --- stages (each runs in its own process) ---------------------------------------------

def parity_command(mode: Mode, select: str | None = None) -> list[str]:
    """The parity stage's pytest command: verbose, so the log's time stamps say when each
    test ended (the first GPU run's parity stage timed out after 53 of 75 tests with a log of
    dots), the slowest tests' durations at the end, a per-test limit where pytest-timeout is
    installed (a hung test fails with its stack instead of taking the stage's time), and
    ``select`` (a ``-k`` expression, ``--parity-k``) on top of the mode's own selection."""
    args = list(mode.parity_tests)
    if select:
        if "-k" in args:
            at = args.index("-k") + 1
            args[at] = f"({args[at]}) and ({select})"
        else:
            args += ["-k", select]
    limit = []
    with contextlib.suppress(ImportError):
        import pytest_timeout  # noqa: F401

        limit = [f"--timeout={PARITY_TEST_LIMIT_S}"]  # the plugin loads itself
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=15",
            *limit, *args]


def stage_parity(mode: Mode, timeout: float) -> dict:
    select = os.environ.get(PARITY_K_ENV) or None
    code, output = _run_logged(parity_command(mode, select), _env(mode),
                               _child_timeout(timeout), stamp=True)
    lines = output.strip().splitlines()
    result = {"returncode": code, "summary": lines[-1] if lines else "", "select": select,
              "failures": re.findall(r"^FAILED .*$", output, flags=re.M)[:20],
              "passed": code == 0}
    if code is None:
        result["error"] = f"pytest timed out after {_child_timeout(timeout):.0f} s"
    elif code != 0:
        result["error"] = f"tests failed: {result['summary']}"
    return result


def relative_l2(got, want) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero)."""
    got, want = got.detach().double(), want.detach().double()
    diff, norm = (got - want).norm().item(), want.norm().item()
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def _op_inputs(mode: Mode, total: int, prefix: int, size: int, memory_format: str) -> dict:
    """One layer's inputs, seeded: data and output gradient with a mean (so the normalisation
    and the gradient through the batch statistics both count), BN parameters off 1 and 0."""
    import torch

    fmt = _memory_format(memory_format)
    dtype, device = getattr(torch, mode.op_dtype), mode.device
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    buffer = (randn(mode.op_batch, total, size, size) + 0.5).to(dtype)
    grad_out = (randn(mode.op_batch, OP_OUT_CHANNELS, size, size) + 0.5).to(dtype)
    return {"buffer": buffer.contiguous(memory_format=fmt),
            "grad_out": grad_out.contiguous(memory_format=fmt),
            "gamma": 1 + 0.2 * randn(prefix), "beta": 0.2 * randn(prefix),
            "weight": (randn(OP_OUT_CHANNELS, prefix, 1, 1) / prefix ** 0.5).to(dtype),
            "prefix": prefix, "format": fmt, "dtype": dtype}


def _eager_layer(t: dict):
    """BatchNorm2d -> ReLU -> Conv2d(1x1) with ``t``'s parameters, in training mode."""
    import torch
    import torch.nn as nn

    prefix = t["prefix"]
    layer = nn.Sequential(nn.BatchNorm2d(prefix), nn.ReLU(inplace=True),
                          nn.Conv2d(prefix, OP_OUT_CHANNELS, 1, bias=False))
    layer = layer.to(t["buffer"].device).to(memory_format=t["format"])
    with torch.no_grad():
        layer[0].weight.copy_(t["gamma"])
        layer[0].bias.copy_(t["beta"])
        layer[2].weight.copy_(t["weight"].float())  # autocast rounds it back: the same values
    return layer


def _eager_results(t: dict) -> dict:
    import torch

    layer = _eager_layer(t)
    x = t["buffer"][:, :t["prefix"]].contiguous(memory_format=t["format"]).requires_grad_()
    with torch.autocast(x.device.type, dtype=t["dtype"]):
        out = layer(x)
    out.backward(t["grad_out"])
    return {"out": out, "grad_input": x.grad, "grad_conv_weight": layer[2].weight.grad,
            "grad_bn_weight": layer[0].weight.grad, "grad_bn_bias": layer[0].bias.grad}


def _fused_results(t: dict) -> dict:
    """The fused op as a standalone layer: statistics of this batch, full BN backward."""
    import torch

    from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward, channel_stats

    buffer, prefix = t["buffer"], t["prefix"]
    mean, var = channel_stats(buffer[:, :prefix])
    invstd = torch.rsqrt(var + 1e-5)  # BatchNorm2d's eps
    out = bn_relu_conv1x1(buffer, mean, invstd, t["gamma"], t["beta"], t["weight"])
    grad_buffer = torch.zeros_like(buffer)
    grad_weight, grad_gamma, grad_beta = bn_relu_conv1x1_backward(
        t["grad_out"], buffer, mean, invstd, t["gamma"], t["beta"], t["weight"], True,
        grad_buffer)
    return {"out": out, "grad_input": grad_buffer[:, :prefix], "grad_conv_weight": grad_weight,
            "grad_bn_weight": grad_gamma, "grad_bn_bias": grad_beta}


def check_op(t: dict, dtype: str) -> dict:
    """The fused op's forward output and gradients against the eager layer's on the inputs
    ``t``: relative L2 error of each, and whether all are within ``REL_L2_BOUNDS[dtype]``."""
    fused, eager = _fused_results(t), _eager_results(t)
    errors = {name: relative_l2(fused[name], eager[name]) for name in eager}
    bound = REL_L2_BOUNDS[dtype]
    return {"passed": all(error <= bound for error in errors.values()), "bound": bound,
            "errors": errors}  # NaN is never <= bound: it fails


def _op_row(mode: Mode, name: str, total: int, prefix: int, size: int,
            memory_format: str) -> dict:
    """The fused op against eager BN-ReLU-Conv1x1 on one layer shape in one memory format:
    the results checked (``check_op``), then forward + backward timed. ``in_block``:
    statistics given, their gradient left to the block (as the dense block calls it);
    ``standalone``: statistics computed and the full BN backward."""
    import torch

    from densenet_fast.benchmark.timing import time_interleaved
    from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward, channel_stats

    t = _op_inputs(mode, total, prefix, size, memory_format)
    check = check_op(t, mode.op_dtype)
    buffer, grad_out, weight = t["buffer"], t["grad_out"], t["weight"]
    gamma, beta = t["gamma"], t["beta"]
    stats = channel_stats(buffer[:, :prefix])
    grad_buffer = torch.zeros_like(buffer)

    def fused(standalone: bool):
        mean, var = channel_stats(buffer[:, :prefix]) if standalone else stats
        invstd = torch.rsqrt(var + 1e-5)
        bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight)
        bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, gamma, beta, weight,
                                 standalone, grad_buffer)

    layer = _eager_layer(t)
    x = buffer[:, :prefix].contiguous(memory_format=t["format"]).requires_grad_()

    def eager():
        with torch.autocast(mode.device, dtype=t["dtype"]):
            out = layer(x)
        out.backward(grad_out)

    times = time_interleaved({"eager": eager, "in_block": lambda: fused(False),
                              "standalone": lambda: fused(True)}, mode.repeats, warmup=2,
                             device=mode.device)
    median = {key: statistics.median(seconds) for key, seconds in times.items()}
    return {"shape": name, "memory_format": memory_format, "batch": mode.op_batch,
            "prefix": prefix, "size": size, "check": check,
            **{f"{k}_ms": v * 1e3 for k, v in median.items()},
            "speedup_in_block": median["eager"] / median["in_block"],
            "speedup_standalone": median["eager"] / median["standalone"]}


def stage_op(mode: Mode, timeout: float) -> dict:
    """Every op shape in every memory format; speedups summed per format; an error naming
    the shapes whose results are out of bounds."""
    from densenet_fast.ops.triton_tuning import tuning_stats

    rows = []
    result = {"dtype": mode.op_dtype, "rows": rows}
    for memory_format in FORMATS:
        for shape in mode.op_shapes:
            rows.append(_op_row(mode, *shape, memory_format))
            row = rows[-1]
            worst = max(row["check"]["errors"].items(), key=lambda item: item[1])
            _progress(f"op {row['shape']} {memory_format}: check "
                      f"{'passed' if row['check']['passed'] else 'FAILED'} (worst {worst[0]} "
                      f"{worst[1]:.2e}), speedup in block {row['speedup_in_block']:.2f}x",
                      result)
    result["formats"] = {}
    for memory_format in FORMATS:
        own = [r for r in rows if r["memory_format"] == memory_format]
        total = {k: sum(r[f"{k}_ms"] for r in own) for k in ("eager", "in_block", "standalone")}
        result["formats"][memory_format] = {
            "speedup_in_block": total["eager"] / total["in_block"],
            "speedup_standalone": total["eager"] / total["standalone"]}
    result["tuning"] = tuning_stats()
    failed = [f"{r['shape']} {r['memory_format']}" for r in rows if not r["check"]["passed"]]
    if failed:
        result["error"] = (f"fused results differ from eager beyond the relative L2 bound "
                           f"{REL_L2_BOUNDS[mode.op_dtype]}: {', '.join(failed)}")
    return result


def stage_model(mode: Mode, timeout: float) -> dict:
    import torch

    from densenet_fast.benchmark.memory import measure_in_process
    from densenet_fast.benchmark.runner import Runner, RunSettings
    from densenet_fast.benchmark.timing import summarize, time_interleaved
    from densenet_fast.ops.triton_tuning import tuning_stats

    config = mode.config()
    settings = RunSettings(device=mode.device, autocast="bfloat16", channels_last=True)
    names = ["torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-recompute",
             "densenet_fast-torch"]
    if mode.compiled_baseline:
        names += ["torchvision-compiled", "densenet_fast-compiled"]
    rows = {}
    result = {"config": config.to_json(), "autocast": "bfloat16",
              "memory_format": "channels_last", "rows": rows}
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
        _progress(f"model {name}: {json.dumps(rows[name])}", result)
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
    if "peak_bytes" in fast_compiled:
        # No ratio where the eager peak reads 0: on the CPU (the dry run) a tiny model's step
        # can run in memory the process already holds.
        fast_compiled["memory_vs_eager"] = (fast_compiled["peak_bytes"] / fast["peak_bytes"]
                                            if fast.get("peak_bytes") else None)
    result["tuning"] = tuning_stats()
    return result


def stage_max_batch(mode: Mode, timeout: float) -> dict:
    from densenet_fast.benchmark.runner import RunSettings
    from densenet_fast.benchmark.sweeps import sweep_batch

    settings = RunSettings(device=mode.device, autocast="bfloat16", channels_last=True)
    budget = int(mode.max_batch_budget_gib * 2**30)
    result = {"budget_bytes": budget, "cap": mode.max_batch_cap, "max_batch": {}}

    result["tries"] = {}

    def on_row(sweep: dict) -> None:
        for name, row in sweep["rows"].items():
            result["max_batch"][name] = row["max_batch"]
        _progress(f"max_batch: {result['max_batch']}", result)

    def on_attempt(name: str, attempt: dict) -> None:
        result["tries"].setdefault(name, []).append(attempt)
        peak = attempt.get("total_peak_bytes")
        _progress(f"  {name} batch {attempt['batch']}: " + (
            f"{peak / 2**20:.0f} MiB" if peak is not None else attempt.get("error", "?")),
            result)

    sweep_batch(mode.config(), ["torchvision", "torchvision-memeff", "densenet_fast",
                                "densenet_fast-recompute"],
                budget, settings, max_batch=mode.max_batch_cap, show_progress=False,
                on_row=on_row, on_attempt=on_attempt)
    return result


# Run as ``python -c _FIRST_STEP RESULT_PATH``: the result goes to a file, the output to the
# stage's log.
_FIRST_STEP = """
import time
start = time.perf_counter()
import json, sys, torch
sys.path.insert(0, {root!r})
from densenet_fast.benchmark.runner import Runner, RunSettings
from densenet_fast.benchmark.implementations import ModelConfig
from densenet_fast.ops.triton_tuning import tuning_stats

def sync():
    if {device!r}.startswith("cuda"):
        torch.cuda.synchronize()

config = ModelConfig.from_json(json.loads({config!r}))
settings = RunSettings(device={device!r}, autocast="bfloat16", channels_last=True)
runner = Runner("densenet_fast", config, settings)
step_start = time.perf_counter()
runner.step("train")
sync()
first = time.perf_counter() - step_start
to_first = time.perf_counter() - start
tuning = tuning_stats()
print(f"first step finished {{to_first:.1f}} s after the start (the step: {{first:.1f}} s); "
      f"tuning: {{tuning}}", flush=True)
step_start = time.perf_counter()
runner.step("train")
sync()
with open(sys.argv[1], "w") as f:
    json.dump({{"to_first_step_s": to_first, "first_step_s": first,
               "second_step_s": time.perf_counter() - step_start, "tuning": tuning}}, f)
"""


def _compile_time_batch(mode: Mode) -> int:
    return min(mode.batch, 16)


def _cache_state(tuning_file: Path, triton_dir: Path) -> dict:
    """What the two caches hold: tuned classes in the file, files in Triton's cache."""
    try:
        entries = len(json.loads(tuning_file.read_text()))
    except (OSError, ValueError):
        entries = 0
    files = sum(len(names) for _, _, names in os.walk(triton_dir))
    return {"tuning_cache_entries": entries, "triton_cache_files": files}


def stage_compile_time(mode: Mode, timeout: float) -> dict:
    """The cold process (both caches empty) gets what the warm one does not need: the warm
    one gets half the base limit, the cold one the rest (the other half and the estimate)."""
    config = mode.config(batch=_compile_time_batch(mode))
    code = _FIRST_STEP.format(root=str(ROOT), config=json.dumps(config.to_json()),
                              device=mode.device)
    warm_limit = dict(mode.timeouts)["compile_time"] / 2
    result = {"batch": config.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tuning_file, triton_dir = Path(tmp) / "triton-tuning.json", Path(tmp) / "triton-cache"
        triton_dir.mkdir()
        env = _env(mode, TRITON_CACHE_DIR=str(triton_dir),
                   DENSENET_FAST_TRITON_CACHE=str(tuning_file))
        for run, limit in (("cold_cache", _child_timeout(timeout - warm_limit)),
                           ("warm_cache", _child_timeout(warm_limit))):
            before = _cache_state(tuning_file, triton_dir)
            out = Path(tmp) / f"{run}.json"
            start = time.perf_counter()
            returncode, _ = _run_logged([sys.executable, "-c", code, str(out)], env, limit)
            if returncode != 0:
                why = f"timed out after {limit:.0f} s" if returncode is None \
                    else f"exited with {returncode}"
                raise RuntimeError(f"the {run} process {why} (its output is in this log)")
            result[run] = {**json.loads(out.read_text()), "caches_before": before,
                           "process_s": time.perf_counter() - start}
            _progress(f"compile_time {run}: {json.dumps(result[run])}", result)
    return result


STAGES = {"parity": stage_parity, "op": stage_op, "model": stage_model,
          "max_batch": stage_max_batch, "compile_time": stage_compile_time}


# --- the parent: stages in subprocesses, the report ------------------------------------

def _stage_command(name: str, mode_name: str, timeout: float, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--mode", mode_name,
            "--timeout", str(timeout), "--result", str(result)]


def _end_group(proc: subprocess.Popen) -> None:
    """Kill the stage's process group (the stage and the processes it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _stage_env(name: str, mode: Mode) -> dict:
    from densenet_fast.ops.triton_tuning import TUNING_ENV

    return _env(mode, **{TUNING_ENV: "off"} if name in mode.untuned else {})


def _run_stage(name: str, mode_name: str, timeout: float, log: Path) -> dict:
    """One stage in a process of its own, in a process group of its own: a stage that runs
    past its limit (or a Ctrl-C) ends with every process it started, which would otherwise
    go on taking the CPU or GPU from the stages after it. Its stdout and stderr go straight
    to ``log``; a stage that failed or ran out of time keeps the log's tail and, where it
    saved one, its partial result."""
    start = time.perf_counter()
    timed_out = False
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / f"{name}.json"
        with open(log, "w") as out, subprocess.Popen(
                _stage_command(name, mode_name, timeout, result_path), cwd=ROOT,
                env=_stage_env(name, MODES[mode_name]), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True) as proc:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _end_group(proc)
            except BaseException:
                _end_group(proc)
                raise
        result = None if timed_out or proc.returncode else _read_json(result_path)
        if result is None:
            result = {"error": f"timed out after {timeout:.0f} s" if timed_out
                      else f"exit code {proc.returncode}" if proc.returncode
                      else "exited without writing its result"}
            partial = _read_json(_partial_path(result_path))
            if partial is not None:
                result["partial"] = partial
    result.update(seconds=round(time.perf_counter() - start, 1), log=str(log))
    if "error" in result:
        result["output_tail"] = _tail(log)
    return result


def goals(report: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) rows; ``met`` is None where the stage has no figure."""
    stages = report["stages"]
    rows = []
    parity = stages.get("parity", {})
    rows.append(("parity tests pass", parity.get("summary", parity.get("error", "-")),
                 parity.get("passed") if "passed" in parity else None))
    op = stages.get("op", {})
    checked = [row["check"]["passed"] for row in op.get("rows", [])]
    rows.append(("fused op results within the relative L2 bound of eager",
                 f"{sum(checked)}/{len(checked)} shapes" if checked else op.get("error", "-"),
                 all(checked) if checked else None))
    speed = op.get("formats", {}).get("channels_last", {}).get("speedup_in_block")
    rows.append((f"fused op >= {GOALS['op_speedup']}x eager (in block, summed, channels-last)",
                 op.get("error", "-")[:14] if speed is None else f"{speed:.2f}x",
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
            rows.append((f"{label}{texts[key]} <= {limit}",
                         "-" if value is None else f"{value:.2f}x",
                         None if value is None else value <= limit))
    return rows


def _format_tuning(report: dict) -> list[str]:
    """Each stage's tuning estimate beside what its process reports having tuned."""
    lines = []
    for name, row in report.get("budget", {}).get("stages", {}).items():
        stage = report["stages"].get(name, {})
        measured = stage.get("tuning") or stage.get("cold_cache", {}).get("tuning")
        got = (f"tuned {measured['tunings']}, {measured['trials']} trials, "
               f"{measured['seconds']:.1f} s" if measured else "its process does not report")
        e = row["estimate"]
        lines.append(f"  tuning {name:12s} estimated {e['to_tune']} of {e['classes']} classes "
                     f"to tune, {e['trials']} trials, {e['seconds']:.1f} s; {got}")
    return lines


def format_report(report: dict) -> str:
    lines = [f"gpu_check {report['mode']}: {report['device']}, torch {report['torch']}, "
             f"Triton {report['triton']}"]
    limits = report.get("budget", {}).get("stages", {})
    for name, stage in report["stages"].items():
        status = stage.get("error", "ok")
        limit = limits.get(name, {}).get("limit_s", stage.get("limit_s", 0))
        where = f"  (log: {stage['log']})" if "log" in stage and "error" in stage else ""
        lines.append(f"  stage {name:12s} {stage.get('seconds', 0):7.1f} s of {limit:5d} s  "
                     f"{status}{where}")
    lines += _format_tuning(report)
    for memory_format, speed in report["stages"].get("op", {}).get("formats", {}).items():
        lines.append(f"  op {memory_format:14s} speedup in block {speed['speedup_in_block']:.2f}x, "
                     f"standalone {speed['speedup_standalone']:.2f}x")
    model = report["stages"].get("model", {})
    if model.get("rows"):
        lines.append(f"  {'implementation':22s} {'peak MiB':>9s} {'median ms':>10s} "
                     f"{'x tv time':>9s} {'x memeff mem':>12s}  ({model['autocast']}, "
                     f"{model['memory_format']})")
        for name, row in model["rows"].items():
            if "error" in row:
                lines.append(f"  {name:22s} {row['error']}")
                continue
            lines.append(f"  {name:22s} {row['peak_bytes'] / 2**20:9.1f} "
                         f"{row['median_s'] * 1e3:10.1f} {row.get('time_vs_torchvision', 0):9.2f}"
                         f" {row.get('memory_vs_memeff', 0):12.2f}")
    for goal, measured, met in goals(report):
        mark = {True: "met", False: "NOT MET", None: "no figure"}[met]
        lines.append(f"  goal: {goal:60s} {measured:>14s}  {mark}")
    return "\n".join(lines)


def _run_one_stage(args) -> int:
    """Inside a stage's own process: run it, write its result where the parent reads it."""
    global _RESULT
    _RESULT = Path(args.result)
    result = STAGES[args.stage](MODES[args.mode], args.timeout)
    _write_json(_RESULT, result)
    return 0


def _earlier_stages(out: Path, mode_name: str, device: str, names: list[str]) -> dict:
    """The stages an earlier run of the same mode on the same device left in ``out`` and
    this ``--only`` run does not repeat, each marked with that run's date and the time limit
    it ran under (``limit_s``; this run's plan holds only its own stages): a check split over
    several commands ends with one report."""
    earlier = _read_json(out)
    if not earlier or earlier.get("mode") != mode_name or earlier.get("device") != device:
        return {}
    limits = earlier.get("budget", {}).get("stages", {})
    kept = {}
    for name, stage in earlier.get("stages", {}).items():
        if name in names:
            continue
        kept[name] = {**stage, "run": stage.get("run", earlier.get("date"))}
        limit = stage.get("limit_s", limits.get(name, {}).get("limit_s"))
        if limit is not None:
            kept[name]["limit_s"] = limit
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer stages, smaller batch")
    group.add_argument("--dry-run", action="store_true",
                       help="every stage on the CPU: tiny model, Triton's interpreter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run these stages")
    parser.add_argument("--parity-k", metavar="EXPR",
                        help="run only the parity tests this pytest -k expression selects")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:
        return _run_one_stage(args)

    mode_name = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    if args.parity_k:  # the parity stage's process reads it from its environment
        os.environ[PARITY_K_ENV] = args.parity_k
    mode = MODES[mode_name]
    import torch
    import triton

    if mode.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to exercise the script on the CPU)",
              file=sys.stderr)
        return 2
    from densenet_fast.ops.triton_tuning import cache_file

    device = torch.cuda.get_device_name() if mode.device == "cuda" else "cpu (dry run)"
    slug = "cpu-dry-run" if mode.device == "cpu" else \
        "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(args.out) / f"{slug}.json"
    logs = Path(args.out) / f"{slug}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in mode.timeouts
             if name in mode.stages and (not args.only or name in args.only)]
    plan = plan_limits(mode, names, mode.device)
    total = sum(row["limit_s"] for row in plan.values())
    print(format_plan(plan, cache_file()), flush=True)
    report = {"mode": mode_name, "device": device, "torch": torch.__version__,
              "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "goals": GOALS, "rel_l2_bounds": REL_L2_BOUNDS,
              "budget": {"total_s": total, "tuning_cache": str(cache_file()),
                         "compile_s": COMPILE_SECONDS, "trial_s": TRIAL_SECONDS,
                         "stages": plan},
              "stages": _earlier_stages(out, mode_name, device, names) if args.only else {}}
    for name in names:  # each within its limit, so all within the budget
        report["stages"][name] = _run_stage(name, mode_name, plan[name]["limit_s"],
                                            logs / f"{name}.log")
        print(f"stage {name}: {report['stages'][name].get('error', 'ok')} "
              f"({report['stages'][name].get('seconds', 0)} s)", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every stage
    print(format_report(report))
    print(f"results written to {out}")
    return 0 if all("error" not in s for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
