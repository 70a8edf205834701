"""Peak memory of one step, measured the same way for every implementation.

CPU: each implementation runs in a fresh subprocess whose allocator returns freed large
blocks to the system (glibc ``MALLOC_MMAP_THRESHOLD_``), so resident memory follows what is
live. After a warm-up step (weights, optimizer state, library caches in place) the process
resets its peak-RSS counter (``/proc/self/clear_refs``) and reports the peak resident memory
of one step above the resident memory just before it. CUDA: ``max_memory_allocated`` after
a reset, above the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from .implementations import ModelConfig, build, make_batch
from .steps import inference_step, make_optimizer, train_step

MMAP_THRESHOLD_BYTES = 64 * 1024
METHOD_CPU = ("peak RSS of one step above RSS before it, fresh subprocess per implementation, "
              f"glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD_BYTES}")
METHOD_CUDA = "torch.cuda.max_memory_allocated during one step above allocated before it"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_in_process(name: str, config: ModelConfig, workload: str, device: str) -> dict:
    """Run one warm-up and one measured step of ``workload``; return peak bytes above start."""
    model = build(name, config).to(device)
    x, y = make_batch(config, device)
    optimizer = make_optimizer(model)

    def step():
        if workload == "train":
            train_step(model, optimizer, x, y)
        else:
            inference_step(model, x)

    step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak - before, "method": METHOD_CUDA}
    before = _status_kib("VmRSS")
    _reset_peak_rss()
    step()
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024, "method": METHOD_CPU}


def measure_peak_memory(name: str, config: ModelConfig, workload: str = "train",
                        device: str = "cpu", threads: int | None = None) -> dict:
    """Measure in a fresh subprocess (see module docstring); returns ``peak_bytes``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    cmd = [sys.executable, "-m", "densenet_fast.benchmark.memory", "--impl", name,
           "--workload", workload, "--device", device, "--config", json.dumps(config.to_json())]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} ({workload}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--workload", choices=("train", "inference"), default="train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_json(json.loads(args.config))
    print(json.dumps(measure_in_process(args.impl, config, args.workload, args.device)))


if __name__ == "__main__":
    _main()
