"""The host's share of a training step, measured on any machine: densenet121's structure at tiny
widths, torchvision's model and densenet_fast's side by side.

    python benchmarks/host_proxy.py                    # densenet_fast on its C++ kernels
    python benchmarks/host_proxy.py --backend triton   # on its GPU path, launches skipped

A GPU step whose kernels are fast is bound by the host: the Python, dispatch and launches that
issue them (``profile_step.py`` tells on a GPU). Without one, this proxy keeps densenet121's
blocks (6, 12, 24 and 16 layers, three transitions) at growth rate 4, ``bn_size`` 1 and 8
initial features, batch 2 at 32x32 under bf16 autocast in channels-last, so that arithmetic
costs little and a step is mostly what it takes to issue it. Each implementation's steps are
timed in this process's CPU time (a busy host disturbs it less than the wall clock), one
thread, the implementations interleaved step by step, after a warm-up.

``--backend triton`` runs densenet_fast's Triton launchers through Triton's interpreter with
every launch skipped (``op_count.LaunchCounter``): the host work of the GPU path without the
cost of Triton's own launcher, which a GPU adds per launch. CPU tensors stand in for CUDA
ones, so ATen's operations run on the CPU (torchvision's arithmetic too, and the reference
kernels' ops that the Triton backend leaves to them): compare ratios between versions of the
code on one machine, not against a GPU's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLEMENTATIONS = ("torchvision", "densenet_fast")


def _launches(backend: str):
    """A context that skips (and counts) Triton's launches on the Triton backend; nothing on
    the C++ one."""
    import contextlib

    if backend != "triton":
        return contextlib.nullcontext(None)
    from op_count import LaunchCounter  # sets the Triton backend's variables on import

    return LaunchCounter()


def measure(args) -> tuple[dict, int | None]:
    """``{implementation: {"median_ms", "min_ms", "steps"}}`` of CPU time per training step,
    and densenet_fast's Triton launches per step, skipped (None on the C++ kernels)."""
    import torch

    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.runner import Runner, RunSettings

    torch.set_num_threads(1)
    config = ModelConfig(growth_rate=4, bn_size=1, num_init_features=8,
                         block_config=(6, 12, 24, 16), num_classes=10,
                         batch_size=args.batch, image_size=args.image)
    settings = RunSettings(device="cpu", autocast="bfloat16", channels_last=True)
    with _launches(args.backend) as launches:
        runners = {kind: Runner(kind, config, settings) for kind in IMPLEMENTATIONS}
        for runner in runners.values():
            for _ in range(args.warmup):
                runner.step("train")
        times = {kind: [] for kind in runners}
        if launches is not None:
            launches.counting = True
        for _ in range(args.steps):
            for kind, runner in runners.items():
                start = time.process_time()
                runner.step("train")
                times[kind].append(time.process_time() - start)
    rows = {kind: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                   "steps": len(t)} for kind, t in times.items()}
    per_step = None if launches is None else sum(launches.launches.values()) // args.steps
    return rows, per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cpp", "triton"), default="cpp")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.backend == "triton":
        # Before densenet_fast is imported: its backend is chosen then.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["DENSENET_FAST_BACKEND"] = "triton"
    import torch

    import densenet_fast
    from densenet_fast.machine import describe_cpu

    info = densenet_fast.backend_info()
    active = info["active"].get("cpu")
    if active != args.backend:
        print(f"densenet_fast runs on {active!r} here, not {args.backend!r}: "
              f"{info['backends'][args.backend]['reason']}", file=sys.stderr)
        return 2
    rows, launches = measure(args)
    base = rows["torchvision"]["median_ms"]
    print(f"host proxy: densenet121's blocks at growth rate 4, batch {args.batch} at "
          f"{args.image}x{args.image}, bf16 autocast, channels-last, one thread, "
          f"densenet_fast on {args.backend}"
          f"{' (launches skipped)' if args.backend == 'triton' else ''}; {describe_cpu()}, "
          f"torch {torch.__version__}; CPU time per training step, {args.steps} steps"
          f"{'' if launches is None else f', {launches} Triton launches a step, skipped'}")
    for kind, row in rows.items():
        print(f"  {kind:14s} median {row['median_ms']:8.2f} ms  min {row['min_ms']:8.2f} ms  "
              f"{row['median_ms'] / base:5.2f}x torchvision")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": vars(args), "cpu": describe_cpu(), "torch": torch.__version__,
             "densenet_fast_backend": active, "rows": rows,
             "triton_launches_per_step": launches}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
