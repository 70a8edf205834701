"""Fine-tuning with frozen parts: one training step of densenet_fast and torchvision side by
side, nothing frozen, ``features`` up to ``denseblock2`` frozen, and all of ``features``
frozen (only the classifier trains).

Times: every (implementation, setting) step interleaved in one process, median of
``--repeats`` after a warm-up. Memory: peak RSS growth of one step in a fresh subprocess per
row (the method of ``densenet_fast.benchmark.memory``). Ratios are against torchvision with
the same parts frozen, measured in the same run.

    python benchmarks/frozen.py --batch-size 8 --image-size 224 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch
import torchvision

import densenet_fast
from densenet_fast.benchmark.memory import MMAP_THRESHOLD_BYTES, _reset_peak_rss, _status_kib
from densenet_fast.benchmark.roofline import describe_cpu
from densenet_fast.benchmark.steps import make_optimizer, train_step
from densenet_fast.benchmark.timing import summarize, time_interleaved

IMPLEMENTATIONS = {"torchvision": torchvision.models.densenet121,
                   "densenet_fast": densenet_fast.densenet121}
SETTINGS = {"nothing frozen": None, "frozen up to denseblock2": "denseblock2",
            "features frozen": "norm5"}


def freeze(model: torch.nn.Module, upto: str | None) -> None:
    """``requires_grad_(False)`` on ``features``' modules up to and including ``upto``."""
    if upto is None:
        return
    for name, module in model.features.named_children():
        module.requires_grad_(False)
        if name == upto:
            return


def _step_fn(impl: str, setting: str, batch: int, size: int):
    torch.manual_seed(0)
    model = IMPLEMENTATIONS[impl](num_classes=10)
    freeze(model, SETTINGS[setting])
    optimizer = make_optimizer(model)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return lambda: train_step(model, optimizer, x, y)


def _memory_row(impl: str, setting: str, batch: int, size: int) -> int:
    """Peak bytes of one step above the bytes before it (run in a fresh process)."""
    step = _step_fn(impl, setting, batch, size)
    step()
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak_rss()
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _measure_memory(impl: str, setting: str, args) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    cmd = [sys.executable, __file__, "--memory-row", impl, setting,
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--memory-row", nargs=2, metavar=("IMPL", "SETTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_row:
        print(_memory_row(*args.memory_row, args.batch_size, args.image_size))
        return
    rows = [(impl, setting) for setting in SETTINGS for impl in IMPLEMENTATIONS]
    steps = {f"{impl} | {setting}": _step_fn(impl, setting, args.batch_size, args.image_size)
             for impl, setting in rows}
    times = time_interleaved(steps, args.repeats)
    del steps
    gc.collect()
    memory = {f"{impl} | {setting}": _measure_memory(impl, setting, args)
              for impl, setting in rows}
    report = {"cpu": describe_cpu(), "torch": torch.__version__, "threads": args.threads,
              "batch_size": args.batch_size, "image_size": args.image_size, "rows": []}
    print(f"densenet121 train step, batch {args.batch_size}, {args.image_size}x"
          f"{args.image_size}, float32, {args.threads} threads, {report['cpu']}")
    print(f"{'row':48} {'median s':>9} {'x time':>7} {'MiB':>8} {'x mem':>6}")
    for impl, setting in rows:
        key, base = f"{impl} | {setting}", f"torchvision | {setting}"
        median = summarize(times[key])["median_s"]
        ratio = median / summarize(times[base])["median_s"]
        mem_ratio = memory[key] / memory[base]
        report["rows"].append({"impl": impl, "setting": setting, **summarize(times[key]),
                               "time_ratio": ratio, "peak_bytes": memory[key],
                               "memory_ratio": mem_ratio})
        print(f"{key:48} {median:9.3f} {ratio:7.2f} {memory[key] / 2**20:8.1f} "
              f"{mem_ratio:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
