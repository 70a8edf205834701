"""Step times of several implementations, interleaved so drift hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     device: str = "cpu", progress=None) -> dict[str, list[float]]:
    """Seconds per call of each step: ``warmup`` untimed rounds, then ``repeats`` rounds in
    which every step runs once, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, spread (min, max) and quartiles of a list of timings."""
    ordered = sorted(seconds)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "q1_s": quartiles[0], "q3_s": quartiles[2], "repeats": len(ordered)}
