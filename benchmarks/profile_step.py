"""Where one training step's time goes, torchvision's DenseNet against densenet_fast's.

    python benchmarks/profile_step.py --device cuda --autocast bfloat16 --channels-last
    python benchmarks/profile_step.py --device cpu --model tiny --batch 2 --image 32

Per implementation, in one process: the step's wall time (synchronised), the time the host
takes to issue it (no synchronisation: on a GPU, a step whose issue time is close to its wall
time is bound by the host, not the kernels), the profiler's count of device kernels and their
summed time, and the operators with the most host and device time of their own. A GPU step
that is slower than torchvision's while its kernels take less time is paying for launches
and Python, not for arithmetic; ``--cuda-graph`` then times the step captured whole in a CUDA
graph and replayed, which issues every launch at once. ``--compile-mode reduce-overhead``
profiles both models under ``torch.compile`` in that mode, which is how a user asks for CUDA
graphs, and reports how many graphs inductor declined to capture (``cudagraph skips``; run
with ``TORCH_LOGS=cudagraphs`` for the reasons): a skip means the mode gives nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# The smallest model that runs every code path (the CPU smoke test's): two blocks of two
# layers, a transition between them.
TINY = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)


def _runner(kind: str, args):
    """The benchmark package's runner of implementation ``kind``: the model, its batch and
    optimizer, and the training step every benchmark measures."""
    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.runner import Runner, RunSettings

    shape = dict(batch_size=args.batch, image_size=args.image)
    config = ModelConfig(**TINY, **shape) if args.model == "tiny" else \
        ModelConfig.named(args.model, num_classes=1000, **shape)
    settings = RunSettings(device=args.device, autocast=args.autocast,
                           channels_last=args.channels_last)
    return Runner(kind, config, settings)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile(kind: str, args) -> dict:
    """One implementation's figures (see the module's docstring)."""
    import torch
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = _runner(kind, args)
    if args.compile_mode:
        runner.model = torch.compile(runner.model, mode=args.compile_mode)
    skips_before = counters["inductor"]["cudagraph_skips"]

    def step():
        if args.compile_mode:
            # CUDA graph trees reuse their output memory: say where each step begins.
            torch.compiler.cudagraph_mark_step_begin()
        runner.step("train")

    for _ in range(args.warmup):  # Triton's tuning and compiles happen here
        step()
    _sync(args.device)
    walls, issues = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        issues.append(time.perf_counter() - start)
        _sync(args.device)
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        step()
        _sync(args.device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    averages = prof.key_averages()
    return {
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before
        if args.compile_mode else None,
        "graphed": _graphed_ms(runner, args) if args.cuda_graph else None,
        "wall_ms": 1e3 * statistics.median(walls),
        "issue_ms": 1e3 * statistics.median(issues),
        "device_kernels": len(kernels),
        "device_kernel_ms": sum(e.device_time_total for e in kernels) / 1e3,
        "host_ops": sum(a.count for a in averages),
        "by_host": averages.table(sort_by="self_cpu_time_total", row_limit=args.rows),
        "by_device": averages.table(sort_by="self_device_time_total", row_limit=args.rows)
        if len(activities) > 1 else "",
    }


def _graphed_ms(runner, args) -> str:
    """The step captured whole in a CUDA graph (forward, backward and the optimizer's update,
    as torch's documentation captures a network), then replayed: what is left of its time
    once the host issues one graph instead of every launch. The capture's error instead,
    where something in the step cannot be captured."""
    import torch
    import torch.nn.functional as F

    model, optimizer, x, y = runner.model, runner.optimizer, runner.x, runner.y
    dtype = runner.settings.autocast_dtype()

    def forward_backward_update():
        # The runner's training step without its zero_grad (the gradients are allocated in
        # the graph) and without autocast's weight cache, which a graph must not keep.
        with runner.context(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None,
                                              cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            for _ in range(args.warmup):
                runner.step("train")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            forward_backward_update()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - the report says what stopped the capture
        return f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return f"{1e3 * statistics.median(times):.2f} ms"


def add_step_arguments(parser: argparse.ArgumentParser, batch: int, image: int) -> None:
    """The options of the step :func:`_runner` builds: model, batch, image side, autocast
    dtype, channels-last (with the given defaults for batch and side)."""
    parser.add_argument("--model", default="densenet121",
                        choices=["tiny", "densenet121", "densenet161", "densenet169",
                                 "densenet201"])
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--image", type=int, default=image)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"])
    parser.add_argument("--channels-last", action="store_true")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch=32, image=224)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the step captured in a CUDA graph and replayed")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead",
                                                   "max-autotune-no-cudagraphs"],
                        help="profile both models under torch.compile in this mode")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    import torch

    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA device (--device cuda)")

    lines = [f"{args.model} batch {args.batch} {args.image}x{args.image} on "
             f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
             f"autocast {args.autocast}, channels_last {args.channels_last}, "
             f"torch {torch.__version__}"
             + (f", torch.compile mode {args.compile_mode}" if args.compile_mode else "")]
    tables = []
    for kind in ("torchvision", "densenet_fast"):
        r = profile(kind, args)
        lines.append(f"{kind:14s} wall {r['wall_ms']:8.2f} ms  issue {r['issue_ms']:8.2f} ms  "
                     f"device kernels {r['device_kernels']:5d} taking {r['device_kernel_ms']:8.2f}"
                     f" ms  host ops {r['host_ops']}"
                     + (f"  CUDA graph replay {r['graphed']}" if r["graphed"] else "")
                     + (f"  cudagraph skips {r['cudagraph_skips']}"
                        if r["cudagraph_skips"] is not None else ""))
        tables += [f"--- {kind}: by own host time", r["by_host"]]
        if r["by_device"]:
            tables += [f"--- {kind}: by own device time", r["by_device"]]
    report = "\n".join(lines + tables)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
