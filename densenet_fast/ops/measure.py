"""Timing for choices made by measurement (which kernel runs), and for the roofline."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], trials: int) -> float:
    """The fastest of ``trials`` timed calls of ``fn``, in seconds, after one untimed call
    (first calls build kernels and caches: oneDNN's primitives, allocations)."""
    fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
