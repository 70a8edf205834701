"""Sweeps: peak memory against depth (with a plot), and the largest batch within a budget."""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import torch

from .implementations import ModelConfig, describe
from .memory import MeasurementError, measure_in_process, measure_peak_memory
from .progress import progress_bar
from .runner import RunSettings

DEPTH_IMPLEMENTATIONS = ("naive", "torchvision-memeff", "densenet_fast",
                         "densenet_fast-recompute")
DEFAULT_DEPTHS = (40, 100, 160, 250)
DEPTH_IMAGE_SIZE = 32


def depth_config(depth: int, growth_rate: int = 12, batch_size: int = 32,
                 image_size: int = DEPTH_IMAGE_SIZE) -> ModelConfig:
    """DenseNet-BC with three blocks of ``(depth - 4) / 6`` layers (each layer is two
    convolutions), torchvision's stem (4x downsampling), CIFAR-sized input by default and 10
    classes."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (40, 100, 160, 250, "
                         f"...), got {depth}")
    layers = (depth - 4) // 6
    return ModelConfig(growth_rate=growth_rate, block_config=(layers,) * 3,
                       num_init_features=2 * growth_rate, num_classes=10,
                       batch_size=batch_size, image_size=image_size)


def sweep_depth(depths=DEFAULT_DEPTHS, implementations=DEPTH_IMPLEMENTATIONS,
                settings: RunSettings | None = None, batch_size: int = 32,
                show_progress: bool = True, image_size: int = DEPTH_IMAGE_SIZE) -> dict:
    """Peak memory of one training step per implementation and depth."""
    settings = settings or RunSettings()
    bar = progress_bar(len(depths) * len(implementations), show_progress, "depth sweep")
    points = {name: [] for name in implementations}
    for depth in depths:
        config = depth_config(depth, batch_size=batch_size, image_size=image_size)
        for name in implementations:
            point = {"depth": depth, "peak_bytes": None, "parameter_bytes": None}
            try:
                measured = measure_peak_memory(name, config, "train", settings)
            except MeasurementError as exc:
                print(f"depth {depth}, {name}: {exc}")
            else:
                point.update(peak_bytes=measured["peak_bytes"],
                             parameter_bytes=measured["parameter_bytes"])
            points[name].append(point)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"sweep": "depth", "device": settings.device_name(),
            "settings": settings.to_json(), "batch_size": batch_size, "growth_rate": 12,
            "image_size": image_size, "descriptions": {n: describe(n, settings.device)
                                               for n in implementations},
            "points": points}


def depth_ratios(result: dict) -> dict:
    """Peak memory at the deepest point, per implementation, over densenet_fast's."""
    deepest = {name: pts[-1]["peak_bytes"] for name, pts in result["points"].items()}
    fast = deepest.get("densenet_fast")
    return {name: (peak / fast if peak and fast else None) for name, peak in deepest.items()}


def plot_depth(result: dict, path: str | Path) -> Path:
    """Write a PNG of memory against depth: the step's peak less the gradients (activations
    and workspace: linear in depth when the block is), and parameters with their gradients
    (quadratic in depth for every implementation: the 1x1 convolutions read every earlier
    channel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (activations, weights) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, pts in result["points"].items():
        shown = [p for p in pts if p["peak_bytes"] is not None]
        depths = [p["depth"] for p in shown]
        activations.plot(depths, [(p["peak_bytes"] - p["parameter_bytes"]) / 2**20
                                  for p in shown], marker="o", label=result["descriptions"][name])
    fast = [p for p in next(iter(result["points"].values())) if p["parameter_bytes"]]
    weights.plot([p["depth"] for p in fast], [2 * p["parameter_bytes"] / 2**20 for p in fast],
                 marker="o", color="black", label="parameters + gradients (every implementation)")
    activations.set_ylabel("step peak less gradients (MiB)")
    activations.set_title("activations and workspace", fontsize=10)
    weights.set_ylabel("MiB")
    weights.set_title("parameters and their gradients", fontsize=10)
    for ax in (activations, weights):
        ax.set_xlabel("depth (DenseNet-BC, growth rate 12, 3 blocks)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    size = result["image_size"]
    fig.suptitle(f"one training step, batch {result['batch_size']}, {size}x{size} input, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def device_memory(device: str) -> int:
    """What the device has: total GPU memory, or the memory available to new processes."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _largest(fits, cap: int, guess: int | None = None) -> int:
    """The largest ``n`` in ``[1, cap]`` with ``fits(n)`` (0 if none); ``fits`` must be
    monotone. Without a ``guess``: doubling from 1, then bisection. With one (where the
    answer is expected): steps away from it that double (the first 1/128 of it) until the
    answer is bracketed, then bisection: a good guess costs a handful of tries instead of
    twice log2(cap)."""
    if guess is None:
        if not fits(1):
            return 0
        low = 1
        while low < cap and fits(min(2 * low, cap)):
            low = min(2 * low, cap)
        high = min(2 * low, cap + 1)  # smallest size known (or assumed) not to fit
    else:
        guess = min(max(guess, 1), cap)
        step = max(1, guess // 128)
        if fits(guess):
            low = guess
            while low < cap and fits(min(low + step, cap)):
                low, step = min(low + step, cap), 2 * step
            high = min(low + step, cap + 1)
        else:
            high = guess
            while True:
                candidate = max(high - step, 1)
                if fits(candidate):
                    low = candidate
                    break
                if candidate == 1:
                    return 0
                high, step = candidate, 2 * step
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _measure_here(name: str, config: ModelConfig, settings: RunSettings) -> dict:
    """:func:`measure_in_process` in this process, for CUDA, whose allocator counts what a
    step allocates exactly wherever it runs (a fresh process per try costs seconds of
    imports and initialisation each: the first GPU run's batch search did not finish in
    two minutes). Out of memory ends the try, not the search."""
    try:
        return measure_in_process(name, config, "train", settings)
    except torch.OutOfMemoryError as exc:
        error = f"{name} (train) ran out of memory: {str(exc).splitlines()[0]}"
    finally:
        # After the handler: the out-of-memory error, and the frames of the job whose
        # tensors it holds, are gone before the next try measures what the process holds.
        gc.collect()
        torch.cuda.empty_cache()
    raise MeasurementError(error)


def _fits_budget(name: str, config: ModelConfig, budget_bytes: int, settings: RunSettings,
                 tries: list, label: dict, on_try=None) -> bool:
    """Whether ``config``'s training job peaks within the budget; the try is recorded and
    passed to ``on_try``. On CUDA the step runs in this process, elsewhere in a fresh one
    (see :mod:`.memory`)."""
    try:
        measured = _measure_here(name, config, settings) \
            if settings.device.startswith("cuda") else \
            measure_peak_memory(name, config, "train", settings)
    except MeasurementError as exc:
        tries.append({**label, "error": str(exc)})
        peak = None
    else:
        peak = measured["total_peak_bytes"]
        tries.append({**label, "total_peak_bytes": peak})
    if on_try is not None:
        on_try(name, tries[-1])
    return peak is not None and peak <= budget_bytes


def _affine_guess(peaks: dict[int, int], budget_bytes: int, cap: int) -> int:
    """The batch at which a job's peak, affine in the batch (weights and state, plus
    activations per image), reaches the budget, from two measured batches."""
    (b1, p1), (b2, p2) = sorted(peaks.items())
    per_image = (p2 - p1) / (b2 - b1)
    if per_image <= 0:
        return cap
    return int(b2 + (budget_bytes - p2) / per_image)


def largest_batch(name: str, config: ModelConfig, budget_bytes: int, settings: RunSettings,
                  max_batch: int = 1024, on_try=None) -> dict:
    """The largest batch whose training job (weights, optimizer state, activations; not the
    interpreter and libraries) peaks within ``budget_bytes``; out of memory ends only that
    try. Two small batches first (up to 8 and twice that), whose peaks, affine in the batch,
    guess where the budget is reached; the search starts there (:func:`_largest`)."""
    tries: list = []
    known: dict[int, bool] = {}

    def fits(batch: int) -> bool:
        if batch not in known:
            known[batch] = _fits_budget(name, dataclasses.replace(config, batch_size=batch),
                                        budget_bytes, settings, tries, {"batch": batch},
                                        on_try)
        return known[batch]

    guess = None
    first = max(1, min(8, max_batch // 2))
    if 2 * first <= max_batch and fits(first) and fits(2 * first):
        peaks = {t["batch"]: t["total_peak_bytes"] for t in tries}
        guess = _affine_guess(peaks, budget_bytes, max_batch)
    return {"max_batch": _largest(fits, max_batch, guess), "tries": tries}


def deepest_in_budget(name: str, budget_bytes: int, settings: RunSettings,
                      batch_size: int = 32, max_layers: int = 512, on_try=None,
                      image_size: int = DEPTH_IMAGE_SIZE) -> dict:
    """The deepest DenseNet-BC (k=12, three blocks of ``n`` layers, depth ``6n + 4``) whose
    training job peaks within ``budget_bytes``, by doubling then bisection (:func:`_largest`)."""
    tries = []
    layers = _largest(lambda n: _fits_budget(
        name, depth_config(6 * n + 4, batch_size=batch_size, image_size=image_size),
        budget_bytes, settings, tries,
        {"depth": 6 * n + 4}, on_try), max_layers)
    return {"max_depth": 6 * layers + 4 if layers else 0, "tries": tries}


def sweep_batch(config: ModelConfig, implementations, budget_bytes: int,
                settings: RunSettings | None = None, max_batch: int = 1024,
                show_progress: bool = True, on_row=None, on_attempt=None) -> dict:
    """:func:`largest_batch` for each implementation. ``on_row(result)`` is called with the
    result so far after each implementation (a long sweep can save its rows as it goes),
    ``on_attempt(name, attempt)`` after each batch tried."""
    settings = settings or RunSettings()
    bar = progress_bar(None, show_progress, "batch sweep")

    def on_try(name: str, attempt: dict) -> None:
        if bar is not None:
            bar.update(1)
        if on_attempt is not None:
            on_attempt(name, attempt)
    result = {"sweep": "batch", "device": settings.device_name(),
              "settings": settings.to_json(), "config": config.to_json(),
              "budget_bytes": budget_bytes, "max_batch": max_batch,
              "descriptions": {n: describe(n, settings.device) for n in implementations},
              "rows": {}}
    for name in implementations:
        result["rows"][name] = largest_batch(name, config, budget_bytes, settings, max_batch,
                                             on_try)
        if on_row is not None:
            on_row(result)
    if bar is not None:
        bar.close()
    return result
