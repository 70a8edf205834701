"""Peak memory of one step, measured the same way for every implementation.

CPU: each implementation runs in a fresh subprocess whose allocator returns freed large
blocks to the system (glibc ``MALLOC_MMAP_THRESHOLD_``), so resident memory follows what is
live. After a warm-up step (weights, optimizer state, library caches in place) the process
resets its peak-RSS counter (``/proc/self/clear_refs``) and reports the peak resident memory
of one step above the resident memory just before it. CUDA: ``max_memory_allocated`` after
a reset, above the memory allocated before the step.

The subprocess reads a copy of the machine's CPU engine cache
(:mod:`densenet_fast.cpu_engine_cache`), so it runs the GEMM engines a process without that
allocator setting chose, and what it chooses itself is dropped with the copy. Under the
setting every allocation above 64 KiB faults its pages in, and the fused op's engine trials
allocate where tiles settled on an engine do not: float32 BLAS won most of them, and its
choices, written to the machine's cache, made every later training process run its
bfloat16 fused backward 2x slower (densenet121, batch 8, AMD EPYC of family 25). The trials
allocate less since (csrc/bn_relu_conv1x1.cpp, ``lowp_operand``), not nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import cpu_engine_cache
from .implementations import ModelConfig
from .runner import WORKLOADS, Runner, RunSettings

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


def measure_in_process(name: str, config: ModelConfig, workload: str,
                       settings: RunSettings) -> dict:
    """One warm-up and one measured step of ``workload``: the peak bytes of the step above
    the bytes in use before it (``peak_bytes``), and the job's peak (``total_peak_bytes``).
    On CUDA that is all that was allocated; on CPU, where resident memory also holds the
    interpreter and library code paged in on first use, it is the step's peak plus the
    bytes of the parameters, buffers and optimizer state, counted tensor by tensor.
    ``parameter_bytes``: the parameters' bytes, which the step's gradients take again. On
    CUDA the counts start from what the process held before the job was built, so a process
    can measure one job after another (a batch search does)."""
    on_cuda = settings.device.startswith("cuda")
    held = torch.cuda.memory_allocated() if on_cuda else 0
    runner = Runner(name, config, settings)
    runner.step(workload)
    runner.release_gradients()
    gc.collect()
    if on_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(workload)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak - before, "total_peak_bytes": peak - held,
                "parameter_bytes": _parameter_bytes(runner), "method": METHOD_CUDA}
    before = _status_kib("VmRSS")
    _reset_peak_rss()
    runner.step(workload)
    peak = _status_kib("VmHWM")
    step_bytes = (peak - before) * 1024
    return {"peak_bytes": step_bytes, "total_peak_bytes": step_bytes + _state_bytes(runner),
            "parameter_bytes": _parameter_bytes(runner), "method": METHOD_CPU}


def _parameter_bytes(runner: Runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def _state_bytes(runner: Runner) -> int:
    """Bytes of the model's parameters and buffers and of the optimizer's state."""
    tensors = list(runner.model.parameters()) + list(runner.model.buffers())
    for state in runner.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_peak_memory(name: str, config: ModelConfig, workload: str = "train",
                        settings: RunSettings | None = None, threads: int | None = None,
                        timeout: float | None = None) -> dict:
    """Measure in a fresh subprocess (see module docstring). Returns ``peak_bytes`` and
    ``total_peak_bytes``; raises ``MeasurementError`` if the step fails there (for example
    out of memory), with the subprocess's last words."""
    settings = settings or RunSettings()
    cmd = [sys.executable, "-m", "densenet_fast.benchmark.memory", "--impl", name,
           "--workload", workload, "--config", json.dumps(config.to_json()),
           "--settings", json.dumps(settings.to_json())]
    if threads:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="densenet_fast-memory-") as scratch:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES),
                   **{cpu_engine_cache.CACHE_ENV: _engine_cache_copy(Path(scratch))})
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise MeasurementError(f"{name} ({workload}) took longer than {timeout} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise MeasurementError(f"{name} ({workload}) failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _engine_cache_copy(scratch: Path) -> str:
    """A copy, in ``scratch``, of the CPU engine cache with this process's choices written
    to it first (see the module's docstring); its path (a file not there yet if the machine
    has none)."""
    cpu_engine_cache.write_choices_now()
    source = cpu_engine_cache.cache_file()
    copy = scratch / source.name
    if source.is_file():
        shutil.copyfile(source, copy)
    return str(copy)


class MeasurementError(RuntimeError):
    """A measurement subprocess did not finish its step."""


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--workload", choices=WORKLOADS, default="train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_json(json.loads(args.config))
    settings = RunSettings(**json.loads(args.settings))
    print(json.dumps(measure_in_process(args.impl, config, args.workload, settings)))


if __name__ == "__main__":
    _main()
