"""Launch configs of the Triton kernels: one per shape class, measured once, kept on disk.

``triton.autotune`` keys on exact argument values and remembers in memory only: densenet121
has 61 distinct ``(P, C, CO)`` per batch size, so every process would tune each of its three
kernels 61 times (about 70 s on an H200) before its first step ran at speed. Here a shape is
reduced to its *class*: pixels, channels and output channels rounded up to powers of two,
with the dtype and the layout (13 classes per kernel for densenet121). Each class
is measured once, with a short timing of each config, and the winner is written to a JSON
file shared by later processes on the same device, Triton and kernel source.

The config a launch uses is returned to the launcher before the launch, never read back from
shared state afterwards: two threads (multi-threaded autograd, one worker per GPU) cannot see
each other's choice. Under ``torch.use_deterministic_algorithms(True)``, or with
``DENSENET_FAST_TRITON_TUNING=off`` (jobs too short to repay tuning, numerical checks), no
timing is taken: each kernel runs its pinned config, the same in every process and device.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from ..disk_cache import DiskCache, cache_dir

CACHE_ENV = "DENSENET_FAST_TRITON_CACHE"
TUNING_ENV = "DENSENET_FAST_TRITON_TUNING"
# Each config's trial runs until this much time has passed (after one untimed launch, which
# compiles it): enough to rank configs whose times differ by more than launch noise.
TRIAL_SECONDS = 0.002
MAX_TRIAL_REPEATS = 20

_stats_lock = threading.Lock()
_stats = {"tunings": 0, "trials": 0, "seconds": 0.0, "from_disk": 0}


def cache_file() -> Path:
    """Where tuned configs persist: ``$DENSENET_FAST_TRITON_CACHE``, else
    ``$XDG_CACHE_HOME/densenet_fast/triton-tuning.json`` (``~/.cache`` by default)."""
    path = os.environ.get(CACHE_ENV)
    return Path(path) if path else cache_dir() / "triton-tuning.json"


def tuning_enabled() -> bool:
    """``$DENSENET_FAST_TRITON_TUNING``: ``on`` (the default) times configs per shape class,
    ``off`` runs every kernel's pinned config."""
    value = os.environ.get(TUNING_ENV, "on")
    if value not in ("on", "off"):
        raise ValueError(f"{TUNING_ENV} must be 'on' or 'off', got {value!r}")
    return value == "on"


def tuning_stats() -> dict:
    """Counts since the process started (or ``reset_tuning_stats``): shape classes tuned,
    config trials timed, seconds spent tuning (compilation included), classes read from disk."""
    with _stats_lock:
        return dict(_stats)


def reset_tuning_stats() -> None:
    with _stats_lock:
        _stats.update(tunings=0, trials=0, seconds=0.0, from_disk=0)


def size_class(n: int) -> int:
    """The power of two at or above ``n``: sizes in one class share a tuned config."""
    return 1 << max(0, int(n) - 1).bit_length()


def _describe(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _disk_cache() -> DiskCache:
    return DiskCache(cache_file, "Triton tuning", CACHE_ENV)


DISK = _disk_cache()


def _time_trial(run: Callable[[], None], device: torch.device) -> float:
    """Seconds per call of ``run``: one untimed call (compilation, caches), then calls until
    ``TRIAL_SECONDS`` have passed, at most ``MAX_TRIAL_REPEATS``; the fastest call counts."""
    run()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    synchronize(device)
    best, spent, repeats = float("inf"), 0.0, 0
    while spent < TRIAL_SECONDS and repeats < MAX_TRIAL_REPEATS:
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - start
        best, spent, repeats = min(best, seconds), spent + seconds, repeats + 1
    return best


class Tuner:
    """Chooses one of ``configs`` for ``kernel`` per shape class.

    ``pinned`` is the config deterministic mode uses. ``timer(run, device)`` measures one
    config's trial (``_time_trial``; tests substitute their own)."""

    def __init__(self, kernel, configs: list[triton.Config], pinned: triton.Config,
                 timer: Callable[[Callable[[], None], torch.device], float] = _time_trial):
        self.kernel, self.configs, self.pinned, self.timer = kernel, list(configs), pinned, timer
        # What this process chose, by (shape class, device): looked up on every launch, so
        # kept apart from the disk cache's string keys, which only a first meeting builds.
        self._chosen: dict[tuple, triton.Config] = {}
        self._lock = threading.Lock()
        source = getattr(kernel, "cache_key", None) or repr(kernel)
        self._prefix = "|".join([kernel.__name__, hashlib.sha256(
            source.encode()).hexdigest()[:16], f"triton {triton.__version__}"])

    def _key(self, shape_class: tuple, device: torch.device) -> str:
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{device.type} (Triton interpreter)")
        return "|".join([self._prefix, name, repr(tuple(shape_class))])

    def choose(self, shape_class: tuple, device: torch.device,
               trial: Callable[[triton.Config], None]) -> triton.Config:
        """The config for ``shape_class`` on ``device``. The first time a class is met (in
        any process sharing the cache file), ``trial(config)`` runs each config and the
        fastest is kept; ``trial`` must leave the op's results untouched (the input-gradient
        kernel's trials add into a scratch buffer)."""
        if torch.are_deterministic_algorithms_enabled() or not tuning_enabled():
            return self.pinned
        if len(self.configs) == 1:
            return self.configs[0]
        met = (tuple(shape_class), device)
        chosen = self._chosen.get(met)
        if chosen is not None:
            return chosen
        with self._lock:  # one tuning per class, whichever thread meets it first
            chosen = self._chosen.get(met)
            if chosen is None:
                key = self._key(shape_class, device)
                chosen = self._from_disk(key) or self._tune(key, device, trial)
                self._chosen[met] = chosen
        return chosen

    def _from_disk(self, key: str) -> triton.Config | None:
        stored = DISK.get(key)
        for config in self.configs:
            if _describe(config) == stored:
                with _stats_lock:
                    _stats["from_disk"] += 1
                return config
        return None  # never tuned, or tuned over configs this version no longer has

    def _tune(self, key: str, device: torch.device,
              trial: Callable[[triton.Config], None]) -> triton.Config:
        start = time.perf_counter()
        seconds = [self.timer(lambda c=config: trial(c), device) for config in self.configs]
        best = self.configs[seconds.index(min(seconds))]
        DISK.put(key, _describe(best))
        with _stats_lock:
            _stats["tunings"] += 1
            _stats["trials"] += len(self.configs)
            _stats["seconds"] += time.perf_counter() - start
        return best

    def forget(self) -> None:
        """Drop the classes chosen in this process (tests; the disk cache stays)."""
        with self._lock:
            self._chosen.clear()
