"""One comparison run: memory (subprocess per implementation) and interleaved timings,
reported as absolute figures and as ratios to the baseline measured in the same run."""

from __future__ import annotations

import platform

import torch

from ..backends import backend_info
from .implementations import (
    BASELINE,
    IMPLEMENTATIONS,
    ModelConfig,
    available_implementations,
    build,
    make_batch,
)
from .memory import measure_peak_memory
from .steps import WORKLOADS, inference_step, make_optimizer, train_step
from .timing import summarize, time_interleaved


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_comparison(config: ModelConfig, device: str = "cpu", repeats: int = 5,
                   implementations: list[str] | None = None,
                   workloads: list[str] | None = None, show_progress: bool = True) -> dict:
    """Measure every implementation on ``config``; see :mod:`densenet_fast.benchmark.memory`
    for how memory is measured. Returns a JSON-serialisable dict."""
    names = implementations or available_implementations()
    workloads = workloads or list(WORKLOADS)
    baseline = BASELINE if BASELINE in names else names[0]
    x, y = make_batch(config, device)
    models = {name: build(name, config).to(device) for name in names}
    results = {"config": config.to_json(), "device": _device_name(device),
               "torch": torch.__version__, "backend": backend_info()["active"],
               "baseline": baseline, "workloads": {}}
    for workload in workloads:
        bar = _progress(len(names) + repeats, show_progress, f"bench {workload}")
        memory = {}
        for name in names:
            memory[name] = measure_peak_memory(name, config, workload, device)
            if bar is not None:
                bar.update(1)
        if workload == "train":
            optimizers = {name: make_optimizer(m) for name, m in models.items()}
            steps = {name: (lambda m=m, o=optimizers[name]: train_step(m, o, x, y))
                     for name, m in models.items()}
        else:
            steps = {name: (lambda m=m: inference_step(m, x)) for name, m in models.items()}
        times = time_interleaved(steps, repeats, device=device, progress=bar)
        if bar is not None:
            bar.close()
        rows = {}
        for name in names:
            timing = summarize(times[name])
            rows[name] = {
                "description": IMPLEMENTATIONS[name][1],
                "peak_bytes": memory[name]["peak_bytes"],
                **timing,
                "images_per_s": config.batch_size / timing["median_s"],
            }
        base = rows[baseline]
        for row in rows.values():
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
            row["time_ratio"] = row["median_s"] / base["median_s"]
        results["workloads"][workload] = {"memory_method": memory[names[0]]["method"],
                                          "rows": rows}
    return results


def format_table(results: dict) -> str:
    """Plain-text table of a :func:`run_comparison` result."""
    cfg = results["config"]
    lines = [
        f"DenseNet k={cfg['growth_rate']} blocks={tuple(cfg['block_config'])}, "
        f"batch {cfg['batch_size']}, {cfg['in_channels']}x{cfg['image_size']}x"
        f"{cfg['image_size']}, {results['device']}, torch {results['torch']}",
        f"ratios are to {results['baseline']} measured in the same run",
    ]
    for workload, data in results["workloads"].items():
        lines += ["", f"[{workload}] memory: {data['memory_method']}",
                  f"{'implementation':20s} {'peak MiB':>9s} {'x mem':>6s} {'median ms':>10s} "
                  f"{'min-max ms':>15s} {'x time':>7s} {'img/s':>8s}"]
        for name, row in data["rows"].items():
            spread = f"{row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f}"
            lines.append(
                f"{name:20s} {row['peak_bytes'] / 2**20:9.1f} {row['memory_ratio']:6.2f} "
                f"{row['median_s'] * 1e3:10.1f} {spread:>15s} {row['time_ratio']:7.2f} "
                f"{row['images_per_s']:8.1f}")
    return "\n".join(lines)
