"""The CPU kernels' measured choices, kept on disk for the next process on this machine.

The fused op times each GEMM engine (ATen's BLAS, oneDNN, a GEMM in bfloat16/float16) on the
first large GEMM of each kind and keeps the fastest (``backends.cpu_gemm_engine``). The
engines round differently, and where two are close the winner depends on what else the
machine is doing (a DataLoader's workers): two runs of one training script with one seed then
drifted apart, where torchvision's runs give the same bits. So the choices a process makes
are written, when it exits, to a JSON file under a key naming this CPU, the kernels' build,
torch's version and the environment's limits on the engines' libraries (each record also
names whether oneDNN was enabled), and every later process reads them when the kernels load:
each runs its GEMMs as the first did. The precision of autocast's bfloat16/float16 convolutions
(``ops/lowp_conv.py``), measured too, is kept the same way (:func:`kept_choice`).
``$DENSENET_FAST_CPU_ENGINE_CACHE`` names the file (by default
``$XDG_CACHE_HOME/densenet_fast/cpu-gemm-engines.json``); deleting it measures afresh.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .disk_cache import DiskCache, cache_dir
from .machine import describe_cpu

CACHE_ENV = "DENSENET_FAST_CPU_ENGINE_CACHE"
# An engine record: the choice's key (which GEMM, dtype, layout, whether oneDNN was enabled,
# threads, log2 of its multiply-adds and of its reduction length), then the engine
# (csrc/bn_relu_conv1x1.cpp). Records of seven integers, written before the key named
# oneDNN's setting, are not read: measured with oneDNN disabled, they could slow every
# bfloat16 GEMM of a later process 2x.
RECORD = 8


def cache_file() -> Path:
    path = os.environ.get(CACHE_ENV)
    return Path(path) if path else cache_dir() / "cpu-gemm-engines.json"


DISK = DiskCache(cache_file, "CPU kernels' measured choices", CACHE_ENV)


# Settings the libraries behind the engines read from the environment: the instructions
# oneDNN, MKL and ATen's kernels may use, and oneDNN's float32 math (bfloat16 under
# ONEDNN_DEFAULT_FPMATH_MODE=BF16). They change which engine is fastest and what it computes,
# so a choice made under one is kept under it alone.
LIBRARY_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
                    "DNNL_DEFAULT_FPMATH_MODE", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def _key(*what: str) -> str:
    """The file's key for ``what`` measured on this CPU with this torch (whose BLAS, oneDNN
    and convolutions the choices are between) and the libraries' settings in force."""
    settings = [f"{name}={os.environ[name]}" for name in LIBRARY_SETTINGS
                if os.environ.get(name)]
    return "|".join([describe_cpu(), f"torch {torch.__version__}", *settings, *what])


def kept_choice(subject: str, case: str, measure: Callable[[], bool]) -> bool:
    """``measure()`` for ``case`` of ``subject`` on this CPU with this torch: read from the
    file where a process measured it before, else measured and written (a value another
    process wrote meanwhile wins, so every later process reads one)."""
    key = _key(subject)
    stored = DISK.get(key)
    if isinstance(stored, dict) and isinstance(stored.get(case), bool):
        return stored[case]
    value = bool(measure())
    DISK.put(key, {case: value}, merge=lambda on_disk, ours: {
        **ours, **(on_disk if isinstance(on_disk, dict) else {})})
    return value


def machine_key(build: str) -> str:
    """The file's key for the GEMM engines of the kernels' ``build``."""
    return _key(f"build {build}")


def _records(flat: list[int]) -> set[tuple[int, ...]]:
    return {tuple(flat[i:i + RECORD]) for i in range(0, len(flat), RECORD)}


def _merge(on_disk, ours: list[list[int]]) -> list[list[int]]:
    """The file's records, and ours for keys it lacks: a choice on disk is never replaced,
    so processes that measured at once converge on one."""
    on_disk = on_disk if isinstance(on_disk, list) else []
    kept = [list(r) for r in on_disk if isinstance(r, list) and len(r) == RECORD
            and all(isinstance(v, int) for v in r)]
    keys = {tuple(r[:-1]) for r in kept}
    return kept + [r for r in ours if tuple(r[:-1]) not in keys]


class EngineCache:
    """Loads this machine's records into the kernels, and writes the process's at exit."""

    def __init__(self, build: str):
        self.key = machine_key(build)
        self._loaded: set[tuple[int, ...]] = set()

    def load(self) -> None:
        """Give the kernels the file's records; one this version cannot read (an edited
        file) is skipped, and the GEMMs it would have settled are measured anew."""
        stored = DISK.get(self.key)
        for record in stored if isinstance(stored, list) else []:
            try:
                torch.ops.densenet_fast.cpu_gemm_engine_choices([int(v) for v in record])
            except (TypeError, ValueError, RuntimeError):
                continue
        self._loaded = _records(torch.ops.densenet_fast.cpu_gemm_engine_choices([]))

    def save(self) -> None:
        """Write the choices made since :meth:`load` (none: nothing is written)."""
        chosen = _records(torch.ops.densenet_fast.cpu_gemm_engine_choices([]))
        new = sorted(chosen - self._loaded)
        if new:
            DISK.put(self.key, [list(r) for r in new], merge=_merge)
            self._loaded |= set(new)


_process_cache: EngineCache | None = None  # the loaded kernels', once loaded


def keep_across_processes(build: str) -> EngineCache:
    """Read this machine's choices into the freshly loaded kernels, and write the process's
    own when it exits."""
    global _process_cache
    cache = EngineCache(build)
    cache.load()
    atexit.register(cache.save)
    _process_cache = cache
    return cache


def write_choices_now() -> None:
    """Write the choices this process has made so far, as it would at exit, for a process
    it starts to read (nothing without the C++ kernels)."""
    if _process_cache is not None:
        _process_cache.save()
