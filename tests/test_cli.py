"""The ``densenet-fast`` command: info and a tiny side-by-side bench."""

import json
import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "densenet_fast.cli", *args],
                          capture_output=True, text=True, check=False)


def test_info_lists_backends_and_versions():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "active on cpu: " in proc.stdout and "cpp" in proc.stdout


def test_bench_compares_implementations_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("bench", "--growth-rate", "4", "--block-config", "2,2", "--batch-size", "4",
                "--image-size", "32", "--num-classes", "3", "--repeats", "2", "--quiet",
                "--impl", "naive", "--impl", "densenet_fast", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "densenet_fast" in proc.stdout and "ratios are to naive" in proc.stdout
    results = json.loads(out.read_text())
    assert results["baseline"] == "naive"
    for workload in ("train", "inference"):
        rows = results["workloads"][workload]["rows"]
        assert set(rows) == {"naive", "densenet_fast"}
        assert rows["naive"]["memory_ratio"] == 1.0 and rows["naive"]["time_ratio"] == 1.0
        for row in rows.values():
            assert row["repeats"] == 2 and row["median_s"] > 0 and row["images_per_s"] > 0
            assert row["peak_bytes"] >= 0
        assert rows["densenet_fast"]["peak_bytes"] > 0 or workload == "inference"


def test_bench_rejects_half_a_custom_model():
    proc = _cli("bench", "--growth-rate", "4")
    assert proc.returncode != 0 and "--growth-rate and --block-config go together" in proc.stderr
