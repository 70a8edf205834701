"""One comparison run: memory (subprocess per implementation) and interleaved timings,
reported as absolute figures and as ratios to the baseline measured in the same run, with
each row's convolution rate against the machine's GEMM peak (:mod:`.roofline`)."""

from __future__ import annotations

import torch

from ..backends import backend_info, cpu_gemm_engine
from .implementations import BASELINE, ModelConfig, available_implementations, describe
from .memory import MeasurementError, measure_peak_memory
from .progress import progress_bar
from .roofline import convolution_flops, cpu_model, gemm_peak, roofline_row
from .runner import WORKLOADS, Runner, RunSettings
from .timing import summarize, time_interleaved


def run_comparison(config: ModelConfig, settings: RunSettings | None = None, repeats: int = 5,
                   implementations: list[str] | None = None,
                   workloads: list[str] | None = None, show_progress: bool = True) -> dict:
    """Measure every implementation on ``config``; see :mod:`densenet_fast.benchmark.memory`
    for how memory is measured. Returns a JSON-serialisable dict."""
    settings = settings or RunSettings()
    names = implementations or available_implementations(settings.device)
    workloads = workloads or list(WORKLOADS)
    baseline = BASELINE if BASELINE in names else names[0]
    runners = {name: Runner(name, config, settings) for name in names}
    results = {"config": config.to_json(), "settings": settings.to_json(),
               "device": settings.device_name(), "torch": torch.__version__,
               "backend": backend_info()["active"], "baseline": baseline, "workloads": {}}
    if settings.device == "cpu":
        results["cpu"] = cpu_model()
    dtype = settings.compute_dtype()
    results["gemm_peak"] = {"dtype": str(dtype).removeprefix("torch."),
                            **gemm_peak(dtype, settings.device)}
    for workload in workloads:
        bar = progress_bar(len(names) + repeats + 1, show_progress, f"bench {workload}")
        if settings.device == "cpu":
            _choose_engines(runners, workload)
        memory = {}
        for name in names:
            try:
                memory[name] = measure_peak_memory(name, config, workload, settings)
            except MeasurementError as exc:
                memory[name] = {"error": str(exc)}
            if bar is not None:
                bar.update(1)
        steps = {name: (lambda r=runner, w=workload: r.step(w)) for name, runner in
                 runners.items() if "error" not in memory[name]}
        times = time_interleaved(steps, repeats, device=settings.device, progress=bar)
        if bar is not None:
            bar.close()
        flops = convolution_flops(config, workload)
        rows = {}
        for name in names:
            row = {"description": describe(name, settings.device), **memory[name]}
            if name in times:
                timing = summarize(times[name])
                row.update(timing, images_per_s=config.batch_size / timing["median_s"],
                           **roofline_row(flops, timing["median_s"],
                                          results["gemm_peak"]["gflops"]))
            rows[name] = row
        base = rows[baseline]
        for row in rows.values():
            # A step whose peak stays below the measurement's resolution (a page) has no ratio.
            if "peak_bytes" in row and base.get("peak_bytes"):
                row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
            if "median_s" in row and "median_s" in base:
                row["time_ratio"] = row["median_s"] / base["median_s"]
        method = next((m["method"] for m in memory.values() if "method" in m), "")
        results["workloads"][workload] = {"memory_method": method, "conv_flops": flops,
                                          "rows": rows}
    if settings.device == "cpu" and results["backend"].get("cpu") == "cpp":
        # The GEMM engines the timed steps ran (measured here, or read from the machine's
        # cache, which an earlier process may have filled under other conditions).
        results["cpu_gemm_engines"] = cpu_gemm_engine()
    return results


def _choose_engines(runners: dict[str, Runner], workload: str) -> None:
    """One untimed step of each implementation here that runs the fused kernels, before the
    memory subprocesses: the C++ kernels measure their GEMM engines in this process, whose
    allocator is a training process's, and the subprocesses run these choices
    (``memory.py``). A step that fails here is left to the subprocess to report."""
    for name, runner in runners.items():
        if "densenet_fast" in name and name != "densenet_fast-torch":
            try:
                runner.step(workload)
            except RuntimeError:
                continue


def format_table(results: dict) -> str:
    """Plain-text table of a :func:`run_comparison` result."""
    cfg, settings = results["config"], results["settings"]
    extras = [f"autocast {settings['autocast']}"] if settings.get("autocast") else []
    extras += ["channels_last"] if settings.get("channels_last") else []
    lines = [
        f"DenseNet k={cfg['growth_rate']} blocks={tuple(cfg['block_config'])}, "
        f"batch {cfg['batch_size']}, {cfg['in_channels']}x{cfg['image_size']}x"
        f"{cfg['image_size']}, {results['device']}, torch {results['torch']}"
        + "".join(", " + e for e in extras),
        f"ratios are to {results['baseline']} measured in the same run",
    ]
    peak = results.get("gemm_peak")
    if peak:
        lines.append(f"GEMM peak of this machine for {peak['dtype']} math: "
                     f"{peak['gflops']:.0f} GFLOP/s ({peak['kernel']}); conv GFLOP/s: the "
                     "step's convolution FLOPs over its median time")
    width = max([20, *(len(name) for data in results["workloads"].values()
                        for name in data["rows"])])
    for workload, data in results["workloads"].items():
        flops = data.get("conv_flops")
        lines += ["", f"[{workload}] memory: {data['memory_method']}"
                  + (f"; convolutions: {flops / 1e9:.1f} GFLOP per step" if flops else ""),
                  f"{'implementation':{width}s} {'peak MiB':>9s} {'x mem':>6s} {'median ms':>10s} "
                  f"{'min-max ms':>15s} {'x time':>7s} {'img/s':>8s} {'GFLOP/s':>8s} "
                  f"{'% peak':>6s}  backend/notes"]
        for name, row in data["rows"].items():
            if "error" in row:
                lines.append(f"{name:{width}s} {'-':>9s} {'-':>6s} {'-':>10s} {'-':>15s} {'-':>7s} "
                             f"{'-':>8s} {'-':>8s} {'-':>6s}  {row['error']}")
                continue
            spread = f"{row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f}"
            lines.append(
                f"{name:{width}s} {row['peak_bytes'] / 2**20:9.1f} "
                f"{row.get('memory_ratio', float('nan')):6.2f} "
                f"{row['median_s'] * 1e3:10.1f} {spread:>15s} {row.get('time_ratio', 0):7.2f} "
                f"{row['images_per_s']:8.1f} {row.get('conv_gflops', float('nan')):8.1f} "
                f"{100 * (row.get('peak_share') or float('nan')):6.1f}  {row['description']}")
    return "\n".join(lines)
