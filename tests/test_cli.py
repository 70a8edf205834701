"""The ``densenet-fast`` command end to end, and the memory measurement on a known answer."""

import json
import mmap
import os
import re
import subprocess
import sys

import pytest
import torch

from densenet_fast.benchmark import implementations
from densenet_fast.benchmark.implementations import Implementation, ModelConfig
from densenet_fast.benchmark.memory import measure_in_process
from densenet_fast.benchmark.roofline import describe_cpu
from densenet_fast.benchmark.runner import RunSettings

TINY = ["--growth-rate", "8", "--block-config", "3,3", "--batch-size", "8", "--image-size",
        "64", "--num-classes", "3", "--quiet"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "densenet_fast.cli", *args],
                          capture_output=True, text=True, check=False)


def test_info_lists_backends_and_versions():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "active on cpu: " in proc.stdout and "cpp" in proc.stdout
    # The CPU by model, as the benchmarks name it beside their figures.
    assert f"device: cpu ({describe_cpu()})" in proc.stdout
    # Where the measured GEMM engines are kept (the test process's own file, conftest.py).
    cache = os.environ["DENSENET_FAST_CPU_ENGINE_CACHE"]
    assert re.search(rf"cpu GEMM engines: measure, \d+ choices kept for this machine in "
                     rf"{re.escape(cache)}\n", proc.stdout), proc.stdout


def test_bench_compares_implementations_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("bench", *TINY, "--repeats", "2", "--impl", "naive", "--impl", "densenet_fast",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "densenet_fast" in proc.stdout and "ratios are to naive" in proc.stdout
    results = json.loads(out.read_text())
    assert results["baseline"] == "naive"
    # The roofline: the CPU named, the GEMM peak of the dtype in use, each row's rate.
    assert results["cpu"]["name"] and results["cpu"]["name"] in results["device"]
    assert "GEMM peak of this machine for float32 math" in proc.stdout
    peak = results["gemm_peak"]
    assert peak["dtype"] == "float32" and peak["gflops"] > 0
    for workload in ("train", "inference"):
        data = results["workloads"][workload]
        rows = data["rows"]
        assert set(rows) == {"naive", "densenet_fast"}
        assert rows["naive"]["time_ratio"] == 1.0
        for row in rows.values():
            assert row["repeats"] == 2 and row["median_s"] > 0 and row["images_per_s"] > 0
            assert row["conv_gflops"] == pytest.approx(data["conv_flops"] / row["median_s"] / 1e9)
            assert row["peak_share"] == pytest.approx(row["conv_gflops"] / peak["gflops"])
    # Backward: two GEMMs per forward GEMM, but none for the stem's input gradient.
    train, inference = (results["workloads"][w]["conv_flops"] for w in ("train", "inference"))
    assert 2 * inference < train < 3 * inference
    for row in results["workloads"]["train"]["rows"].values():
        assert row["peak_bytes"] > 0


def test_convolution_flops_of_densenet121_are_torchvisions_figure():
    """torchvision's model card gives densenet121 2.83 GFLOPS (multiply-adds) per 224x224
    image; the roofline counts 2 FLOPs per multiply-add."""
    pytest.importorskip("torchvision")
    from densenet_fast.benchmark.roofline import convolution_flops

    flops = convolution_flops(ModelConfig.named("densenet121", batch_size=1), "inference")
    assert flops == pytest.approx(2 * 2.83e9, rel=0.01)


def test_cpu_is_named_with_vendor_family_and_model():
    from densenet_fast.benchmark.roofline import cpu_model

    info = cpu_model()
    assert info["name"] and describe_cpu(info).startswith(info["name"])
    if info["vendor"]:  # Linux x86: /proc/cpuinfo
        assert info["vendor"] in describe_cpu(info)


def test_depth_sweep_writes_plot_and_points(tmp_path):
    plot = tmp_path / "depth.png"
    # 16x16 images (the smallest the three blocks take) and batch 2: the measurements, not
    # the models, are the point.
    proc = _cli("bench", "--sweep", "depth", "--depths", "10,16", "--batch-size", "2",
                "--image-size", "16", "--quiet", "--plot", str(plot), "--memory-budget", "2GiB",
                "--max-layers", "2",
                "--impl", "naive", "--impl", "densenet_fast-recompute")
    assert proc.returncode == 0, proc.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(plot.with_suffix(".json").read_text())
    names = {"naive", "densenet_fast-recompute"}
    assert set(result["points"]) == names
    for points in result["points"].values():
        assert [p["depth"] for p in points] == [10, 16]
        # (a tiny model's gradients can reuse memory the warm-up freed: no order between them)
        assert all(p["peak_bytes"] > 0 and p["parameter_bytes"] > 0 for p in points)
    # Tiny models fit 2 GiB up to the cap of 2 layers per block: depth 16, tried 1 then 2.
    assert set(result["deepest"]) == names
    for row in result["deepest"].values():
        assert row["max_depth"] == 16
        assert [t["depth"] for t in row["tries"]] == [10, 16]


def test_batch_sweep_bisects_to_the_budget(tmp_path):
    out = tmp_path / "batch.json"
    proc = _cli("bench", "--sweep", "batch", "--growth-rate", "4", "--block-config", "2",
                "--image-size", "32", "--num-classes", "3", "--memory-budget", "1GiB",
                "--max-batch", "4", "--impl", "densenet_fast", "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["rows"]["densenet_fast"]
    assert row["max_batch"] == 4  # a tiny model fits the cap within 1 GiB
    # Two probes (2 and 4) whose peaks guess past the cap: the cap, already known to fit.
    assert [t["batch"] for t in row["tries"]] == [2, 4]


@pytest.mark.parametrize("args, message", [
    (["--growth-rate", "4"], "--growth-rate and --block-config go together"),
    (["--image-size", "16"], "input spatial size 16x16 is too small"),
    (["--impl", "nope"], "--impl 'nope' is not available here"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--impl", "x"],
     "no CUDA device" if not torch.cuda.is_available() else "not available"),
    (["--sweep", "depth", "--depths", "41"], "depth must be 6n + 4"),
])
def test_bad_options_fail_clearly(args, message):
    proc = _cli("bench", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_memory_measurement_sees_a_known_allocation(monkeypatch):
    """A step that holds 64 MiB shows about that much peak memory (page accounting may
    leave a few pages of it counted before the step)."""
    size = 64 * 2**20

    class Holds64MiB:
        # Fresh pages from an anonymous mapping, touched so that they are resident: a tensor
        # from the allocator could reuse memory that earlier tests freed but the process
        # still holds, and then no resident memory would grow (seen once in a full run).
        def __enter__(self):
            self.mapping = mmap.mmap(-1, size)
            torch.frombuffer(self.mapping, dtype=torch.uint8).fill_(1)
        def __exit__(self, *exc):
            self.mapping.close()

    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "holds-64mib", Implementation(
        "naive model plus a 64 MiB tensor inside each step", implementations._naive,
        context=Holds64MiB))
    config = ModelConfig(growth_rate=4, block_config=(2,), num_init_features=8, num_classes=3,
                         batch_size=2, image_size=32)
    result = measure_in_process("holds-64mib", config, "train", RunSettings())
    assert 0.98 * size <= result["peak_bytes"] < size + 32 * 2**20
    assert result["total_peak_bytes"] >= result["peak_bytes"]
