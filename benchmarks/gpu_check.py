"""GPU check: Triton parity tests, then the op and densenet121 benchmarks, in one call.

Run on a machine with an NVIDIA GPU (about 3 minutes on an H100):

    python benchmarks/gpu_check.py [--out benchmarks/results] [--batch-size 64]

It writes ``gpu-<device>.json`` with the device name, torch and Triton versions, the parity
test summary and every measurement, each ratio taken against a baseline measured in the same
run. Goals it reports against (the Triton issue): the fused op at least 1.3x faster
than eager BatchNorm2d -> ReLU -> Conv2d(1x1) under bf16 autocast; one densenet121 training
step at least as fast as torchvision's memory_efficient=False with at most 0.5x the peak
memory of torchvision's memory_efficient=True.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_parity_tests(timeout: int) -> dict:
    env = dict(os.environ, DENSENET_FAST_BACKEND="triton")
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/with_triton"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    failures = re.findall(r"^FAILED .*$", proc.stdout, flags=re.M)
    return {"returncode": proc.returncode, "summary": summary, "failures": failures[:20],
            "seconds": round(time.perf_counter() - start, 1),
            "tail": proc.stdout[-3000:] if proc.returncode else ""}


def _cuda_time(fn, repeats: int, warmup: int = 3) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


OP_SHAPES = [("block1-last", 256, 224, 56), ("block2-last", 512, 480, 28),
             ("block3-mid", 1024, 640, 14), ("block3-last", 1024, 992, 14),
             ("block4-last", 1024, 992, 7), ("transition1", 256, 256, 56)]


def bench_op_shape(name: str, total: int, prefix: int, size: int, batch: int,
                   repeats: int) -> dict:
    """The fused op against eager BN-ReLU-Conv1x1 (bf16 autocast, channels_last) on one
    layer shape, forward + backward. ``in_block``: statistics given and their gradient left
    to the block, as the dense block calls it; ``standalone``: statistics computed and the
    full BN backward, a one-for-one replacement of the eager sequence."""
    import torch
    import torch.nn as nn

    from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward
    from densenet_fast.ops.batchnorm import channel_stats

    co, fmt = 128, torch.channels_last
    buffer = torch.randn(batch, total, size, size, device="cuda").to(torch.bfloat16)
    buffer = buffer.contiguous(memory_format=fmt)
    grad_out = torch.randn(batch, co, size, size, device="cuda").to(torch.bfloat16)
    grad_out = grad_out.contiguous(memory_format=fmt)
    gamma = torch.ones(prefix, device="cuda")
    beta = torch.zeros(prefix, device="cuda")
    weight = (torch.randn(co, prefix, 1, 1, device="cuda") / prefix ** 0.5).bfloat16()
    stats = channel_stats(buffer[:, :prefix])
    grad_buffer = torch.zeros_like(buffer)

    def fused(standalone: bool):
        mean, var = channel_stats(buffer[:, :prefix]) if standalone else stats
        invstd = torch.rsqrt(var + 1e-5)
        bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight)
        bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, gamma, beta, weight,
                                 standalone, grad_buffer)

    layer = nn.Sequential(nn.BatchNorm2d(prefix), nn.ReLU(inplace=True),
                          nn.Conv2d(prefix, co, 1, bias=False)).cuda().to(memory_format=fmt)
    x = buffer[:, :prefix].contiguous(memory_format=fmt).requires_grad_()

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        out.backward(grad_out)

    t_eager = statistics.median(_cuda_time(eager, repeats))
    t_block = statistics.median(_cuda_time(lambda: fused(False), repeats))
    t_alone = statistics.median(_cuda_time(lambda: fused(True), repeats))
    return {"shape": name, "batch": batch, "prefix": prefix, "size": size,
            "eager_ms": t_eager * 1e3, "fused_in_block_ms": t_block * 1e3,
            "fused_standalone_ms": t_alone * 1e3, "speedup_in_block": t_eager / t_block,
            "speedup_standalone": t_eager / t_alone}


def bench_model(batch: int, image: int, repeats: int, compile_baseline: bool) -> dict:
    """One densenet121 training step, bf16 autocast, channels_last, per implementation."""
    import torch

    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.memory import measure_in_process
    from densenet_fast.benchmark.runner import Runner, RunSettings
    from densenet_fast.benchmark.timing import summarize

    config = ModelConfig.named("densenet121", batch_size=batch, image_size=image)
    settings = RunSettings(device="cuda", autocast="bfloat16", channels_last=True)
    names = ["torchvision", "torchvision-memeff", "densenet_fast", "densenet_fast-torch",
             "naive"]
    if compile_baseline:
        names.append("torchvision-compiled")
    results = {}
    for name in names:
        try:
            memory = measure_in_process(name, config, "train", settings)  # the CLI's method
            runner = Runner(name, config, settings)
            timing = summarize(_cuda_time(lambda r=runner: r.step("train"), repeats, warmup=1))
            results[name] = {"peak_bytes": memory["peak_bytes"], **timing,
                             "images_per_s": batch / timing["median_s"]}
        except torch.cuda.OutOfMemoryError as exc:
            results[name] = {"error": f"out of memory: {exc}"[:300]}
        runner = None
        torch.cuda.empty_cache()
    base, memeff = results.get("torchvision", {}), results.get("torchvision-memeff", {})
    for row in results.values():
        if "median_s" in row and "median_s" in base:
            row["time_ratio_vs_torchvision"] = row["median_s"] / base["median_s"]
        if "peak_bytes" in row and "peak_bytes" in memeff:
            row["memory_ratio_vs_memeff"] = row["peak_bytes"] / memeff["peak_bytes"]
    return {"batch": batch, "image": image, "autocast": "bfloat16",
            "memory_format": "channels_last", "rows": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="also time torch.compile of torchvision's model (slow to compile)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    os.environ["DENSENET_FAST_BACKEND"] = "triton"
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    import densenet_fast

    device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "backend": densenet_fast.backend_info()["active"],
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_tests:
        report["parity_tests"] = run_parity_tests(timeout=240)
        print("parity:", report["parity_tests"]["summary"], flush=True)
    report["op"] = [bench_op_shape(*shape, args.batch_size, args.repeats)
                    for shape in OP_SHAPES]
    for row in report["op"]:
        print(f"op {row['shape']:12s} eager {row['eager_ms']:7.3f} ms  in-block "
              f"{row['speedup_in_block']:.2f}x  standalone {row['speedup_standalone']:.2f}x",
              flush=True)
    report["model"] = bench_model(args.batch_size, args.image_size, args.repeats,
                                  args.compile_baseline)
    for name, row in report["model"]["rows"].items():
        print(f"densenet121 {name:22s} {json.dumps(row)}", flush=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(args.out) / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {out}")
    return 0 if args.skip_tests or report["parity_tests"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
