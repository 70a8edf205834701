"""Speed of each build of the C++ kernels, side by side: ``python benchmarks/cpu_builds.py``.

setup.py compiles the kernels once per instruction set (default x86-64, AVX2, AVX-512; or
one ``-march=native`` build with ``DENSENET_FAST_NATIVE=1``) and the package picks one at
import. This times the fused op's forward and backward on densenet121's layer shapes
(batch 8, 224x224) with every installed build, one subprocess per build
(``DENSENET_FAST_CPU_BUILD``), alternating builds over several rounds, and reports each
build's median against the best one. ``--json`` saves the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

BUILDS = ("native", "avx512", "avx2", "default")
# (C_total, C_prefix, H) of densenet121's first and last layers of blocks 1 and 3.
SHAPES = [(256, 64, 56), (256, 224, 56), (1024, 256, 14), (1024, 992, 14)]
BATCH = 8


def installed_builds() -> list[str]:
    return [b for b in BUILDS if importlib.util.find_spec(f"densenet_fast._C_{b}") is not None]


def _measure(repeats: int) -> dict:
    """In the subprocess: median seconds of forward + backward summed over the shapes."""
    import densenet_fast  # noqa: F401  (loads the forced build)
    from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward

    torch.manual_seed(0)
    cases = []
    for total, prefix, size in SHAPES:
        buffer = torch.randn(BATCH, total, size, size)
        stats = (torch.randn(prefix) * 0.1, torch.rand(prefix) + 0.5, torch.rand(prefix),
                 torch.randn(prefix))
        weight = torch.randn(128, prefix, 1, 1) / prefix ** 0.5
        cases.append((buffer, stats, weight, torch.randn(BATCH, 128, size, size),
                      torch.zeros_like(buffer)))

    def step():
        for buffer, stats, weight, grad_out, grad_buffer in cases:
            bn_relu_conv1x1(buffer, *stats, weight)
            bn_relu_conv1x1_backward(grad_out, buffer, *stats, weight, False, grad_buffer)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times)}


def compare(rounds: int, repeats: int) -> dict:
    builds = installed_builds()
    seconds: dict[str, list[float]] = {b: [] for b in builds}
    for _ in range(rounds):
        for build in builds:
            env = dict(os.environ, DENSENET_FAST_CPU_BUILD=build, DENSENET_FAST_BACKEND="cpp")
            proc = subprocess.run([sys.executable, __file__, "--child", str(repeats)], env=env,
                                  capture_output=True, text=True, check=True)
            seconds[build].append(json.loads(proc.stdout.splitlines()[-1])["median_s"])
    medians = {b: statistics.median(s) for b, s in seconds.items()}
    best = min(medians.values())
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "shapes": SHAPES, "batch": BATCH, "rounds": rounds,
            "builds": {b: {"median_s": m, "ratio_to_best": m / best,
                           "rounds_s": seconds[b]} for b, m in medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child)))
        return
    result = compare(args.rounds, args.repeats)
    print(f"fused op forward + backward, densenet121 layer shapes, batch {BATCH}, "
          f"{result['machine']}, CPU capability {result['capability']}")
    for build, row in result["builds"].items():
        print(f"{build:8s} {row['median_s'] * 1e3:8.1f} ms  x{row['ratio_to_best']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
