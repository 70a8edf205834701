"""The C++ kernels' measured GEMM engines, kept on disk: a later process runs its GEMMs with
the engines the first measured (cpu_engine_cache.py), so that timing noise cannot make two
runs of one script round differently."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import densenet_fast
from densenet_fast import cpu_engine_cache
from densenet_fast.backends import cpu_gemm_engine

needs_cpp = pytest.mark.skipif(densenet_fast.backend_info()["active"].get("cpu") != "cpp",
                               reason="C++ backend not active here")
choices = getattr(torch.ops.densenet_fast, "cpu_gemm_engine_choices", None)

# One fused forward, one thread, 1024 pixels x 256 channels -> 32: 2^23 multiply-adds, large
# enough to be measured, and a reduction long enough that ATen's BLAS and oneDNN round it
# differently; prints its output's bytes (hex) and the process's records.
PROCESS = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import densenet_fast
    from densenet_fast.backends import cpu_gemm_engine
    if sys.argv[1:] == ["mkldnn-off"]:
        torch.backends.mkldnn.enabled = False
    elif sys.argv[1:] == ["conv-bf16"]:
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    elif len(sys.argv) > 1:
        cpu_gemm_engine(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(1, 256, 32, 32, generator=g)
    c = 256
    out = torch.ops.densenet_fast.bn_relu_conv1x1(
        buffer, torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5,
        torch.rand(c, generator=g), torch.randn(c, generator=g) * 0.1,
        torch.randn(32, c, 1, 1, generator=g))
    print(json.dumps({"out": out.numpy().tobytes().hex(),
                      "records": torch.ops.densenet_fast.cpu_gemm_engine_choices([])}))
""")


def _python(script, cache, *args) -> str:
    """What ``script`` prints last, run in a new process with ``cache`` as its file."""
    env = {**os.environ, cpu_engine_cache.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _run(cache, *args):
    return json.loads(_python(PROCESS, cache, *args))


def _split(flat: list[int]) -> list[list[int]]:
    """``cpu_gemm_engine_choices``' flat list as records."""
    size = cpu_engine_cache.RECORD
    return [flat[i:i + size] for i in range(0, len(flat), size)]


@needs_cpp
def test_a_later_process_runs_the_engines_the_first_measured(tmp_path):
    cache = tmp_path / "engines.json"
    first = _run(cache)
    records = first["records"]
    assert records, "the first process measured no GEMM"
    stored = json.loads(cache.read_text())
    assert list(stored) == [cpu_engine_cache.machine_key(densenet_fast.backends.cpp_build()[0])]
    assert sorted(sum(stored.values(), [])) == sorted(_split(records))
    # The file's choice is what a later process runs, not a new measurement: with the
    # forward's engine changed in the file to one that is not measured fastest here...
    forward = [r for r in next(iter(stored.values())) if r[0] == 0]
    assert forward
    for record in forward:
        record[-1] = 1 if record[-1] == 0 else 0  # oneDNN where BLAS won, else BLAS
    cache.write_text(json.dumps(stored))
    engine = "onednn" if forward[0][-1] == 1 else "blas"
    later, forced = _run(cache), _run(tmp_path / "other.json", engine)
    # ... the later process computes, to the bit, what that engine forced computes (which
    # the other engine rounds differently: the test tells the two apart).
    assert later["out"] == forced["out"]
    other = "blas" if engine == "onednn" else "onednn"
    assert _run(tmp_path / "third.json", other)["out"] != forced["out"]
    flat = later["records"]
    assert sorted(_split(flat)) == sorted(sum(stored.values(), []))  # nothing new to write
    assert json.loads(cache.read_text()) == stored
    if engine == "onednn":  # a oneDNN choice is not run once torch.backends.mkldnn disables it
        assert _run(cache, "mkldnn-off")["out"] == _run(tmp_path / "blas.json", "blas")["out"]


@needs_cpp
def test_engine_records_are_read_where_no_choice_is_made_and_checked():
    unused = [0, 6, 1, 1, 97, 40, 3, 1]  # a thread count nothing here runs with
    mine = choices(unused)
    assert _split(mine).count(unused) == 1
    assert any("oneDNN on, 97 thread(s), 2^40 multiply-adds, reduction 2^3: onednn" in line
               for line in cpu_gemm_engine()["measured"])
    assert choices([0, 6, 1, 1, 97, 40, 3, 0]) == mine  # a choice made is not replaced
    with pytest.raises(ValueError, match="groups of 8"):
        choices([0, 6, 1])
    with pytest.raises(ValueError, match="groups of 8"):
        choices([0, 6, 1, 97, 40, 3, 1])  # a record written before oneDNN's setting was kept
    for record in ([0, 6, 1, 1, 97, 40, 3, 9],  # no such engine
                   [0, 6, 1, 2, 97, 40, 3, 0],  # oneDNN neither enabled nor disabled
                   [0, 6, 1, 0, 97, 40, 3, 1]):  # oneDNN measured fastest while disabled
        with pytest.raises(ValueError, match="not an engine record"):
            choices(record)



@needs_cpp
def test_choices_made_with_onednn_disabled_are_not_run_with_it_enabled(tmp_path):
    """oneDNN runs ATen's bfloat16 GEMMs too: without it every engine but float32 BLAS was
    slow, and a file written by such a process made later ones run their bfloat16 GEMMs 2x
    slower. A choice is kept with oneDNN's setting, and a process with the other setting
    measures its own."""
    cache = tmp_path / "engines.json"
    off = _split(_run(cache, "mkldnn-off")["records"])
    assert off and all(r[3] == 0 for r in off)

    def gemm(record):  # the record's key without oneDNN's setting
        return tuple(record[:3] + record[4:7])

    on = _split(_run(cache)["records"])
    assert sorted(map(gemm, (r for r in on if r[3] == 1))) == sorted(map(gemm, off))
    assert sorted(sum(json.loads(cache.read_text()).values(), [])) == sorted(on)
    assert _split(_run(cache, "mkldnn-off")["records"]) == sorted(on)  # both read back



@needs_cpp
def test_choices_made_under_a_librarys_isa_limit_are_kept_under_it(tmp_path, monkeypatch):
    """oneDNN limited to AVX2 runs ATen's bfloat16 GEMMs without AVX512_BF16: what wins then
    is not what wins without the limit, so the two are kept under different keys."""
    build = densenet_fast.backends.cpp_build()[0]
    plain = cpu_engine_cache.machine_key(build)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = cpu_engine_cache.machine_key(build)
    assert limited != plain and "ONEDNN_MAX_CPU_ISA=AVX2" in limited
    cache = tmp_path / "engines.json"
    _run(cache)
    assert list(json.loads(cache.read_text())) == [limited]


@needs_cpp
def test_no_float32_engine_is_measured_under_a_lowered_convolution_precision(tmp_path):
    # With torch.backends.mkldnn.conv.fp32_precision = "bf16" every float32 engine runs
    # through oneDNN in bfloat16: a choice measured so, kept under the key IEEE processes
    # read, could slow them. ATen's BLAS serves those GEMMs unmeasured, and nothing is kept.
    cache = tmp_path / "engines.json"
    assert _run(cache, "conv-bf16")["records"] == []
    assert not cache.exists() or not any(json.loads(cache.read_text()).values())
    assert _run(cache)["records"], "an IEEE process measures the same GEMM"


def test_records_of_other_processes_are_merged_not_replaced():
    on_disk = [[0, 6, 1, 1, 2, 20, 8, 1], "junk", [1, 2], [0, 6, 1, 2, 20, 8, 1]]
    ours = [[0, 6, 1, 1, 2, 20, 8, 0], [2, 6, 1, 1, 2, 20, 8, 2]]
    assert cpu_engine_cache._merge(on_disk, ours) == [[0, 6, 1, 1, 2, 20, 8, 1],
                                                      [2, 6, 1, 1, 2, 20, 8, 2]]
    assert cpu_engine_cache._merge(None, ours) == ours


@needs_cpp
@pytest.mark.parametrize("junk", [
    [{"a": 1}, [0, 6, 1, 1, "x", 20, 8, 1], [0, 99, 1, 1, 1, 20, 8, 1], [0, 6, 1], "text",
     [0, 6, 1, 1, 20, 8, 1]], 17],
    ids=["unreadable-records", "not-a-list"])
def test_records_this_version_cannot_read_are_measured_anew(tmp_path, junk):
    cache = tmp_path / "engines.json"
    key = cpu_engine_cache.machine_key(densenet_fast.backends.cpp_build()[0])
    cache.write_text(json.dumps({key: junk, "another machine": [[0, 6, 1, 1, 20, 8, 1]]}))
    assert _run(cache)["out"] == _run(tmp_path / "fresh.json")["out"]
    written = json.loads(cache.read_text())
    assert written["another machine"] == [[0, 6, 1, 1, 20, 8, 1]]
    assert all(len(r) == cpu_engine_cache.RECORD for r in written[key] if isinstance(r, list))


CONV_PRECISION = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    if sys.argv[1:] == ["conv-bf16"]:
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    from densenet_fast.ops import lowp_conv
    print(lowp_conv.runs_in_float32(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)))
""")


def test_the_convolutions_precision_is_measured_once_per_machine(tmp_path):
    """ops/lowp_conv.py's choice (float32 or bfloat16 3x3 convolutions of bfloat16 data) is
    the file's where a process measured it: here the file says the opposite of what this
    machine measures, and a later process follows the file."""
    cache = tmp_path / "choices.json"

    def run():
        return _python(CONV_PRECISION, cache) == "True"

    from densenet_fast.ops.lowp_conv import onednn_enabled

    case = f"bfloat16, 1 threads, oneDNN {onednn_enabled()}"
    measured = run()
    (key, cases), = json.loads(cache.read_text()).items()
    assert key.endswith("|float32 convolution is faster")
    assert cases == {case: measured}
    cache.write_text(json.dumps({key: {case: not measured}}))
    assert run() is not measured
    # Under float32 convolutions set to bfloat16 nothing is measured or kept.
    fresh = tmp_path / "fresh.json"
    assert _python(CONV_PRECISION, fresh, "conv-bf16") == "False"
    assert not fresh.exists() or not any(json.loads(fresh.read_text()).values())


# A bfloat16 channels-last step whose fused GEMMs are large enough to be measured (2048
# pixels by 64-96 channels -> 128, one thread).
BENCH_CONFIG = dict(growth_rate=32, block_config=(2,), num_init_features=64, num_classes=10,
                    batch_size=8, image_size=64)


@needs_cpp
def test_memory_subprocesses_read_this_processs_choices_and_keep_theirs_to_themselves(
        tmp_path, monkeypatch):
    """The benchmark measures memory in subprocesses under an allocator setting that biased
    their engine trials (benchmark/memory.py); written to the machine's file, their choices
    slowed later training processes. They read this process's choices, written for them
    first, and the file keeps nothing of theirs."""
    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.memory import MMAP_THRESHOLD_BYTES, measure_peak_memory
    from densenet_fast.benchmark.runner import RunSettings

    config = ModelConfig(**BENCH_CONFIG)
    settings = RunSettings(autocast="bfloat16", channels_last=True)
    args = ["--impl", "densenet_fast", "--config", json.dumps(config.to_json()),
            "--settings", json.dumps(settings.to_json()), "--threads", "1"]
    # Such a subprocess, on the machine's file, writes its choices there.
    alone = tmp_path / "alone.json"
    env = {**os.environ, cpu_engine_cache.CACHE_ENV: str(alone),
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    subprocess.run([sys.executable, "-m", "densenet_fast.benchmark.memory", *args], env=env,
                   check=True, capture_output=True, timeout=300)
    key = cpu_engine_cache.machine_key(densenet_fast.backends.cpp_build()[0])
    assert json.loads(alone.read_text())[key]

    cache = tmp_path / "engines.json"
    monkeypatch.setenv(cpu_engine_cache.CACHE_ENV, str(cache))
    ours = [0, 6, 1, 1, 89, 40, 3, 1]  # a choice this process made (a thread count of its own)
    mine = _split(choices(ours))
    measure_peak_memory("densenet_fast", config, settings=settings, threads=1)
    written = json.loads(cache.read_text())
    assert list(written) == [key] and ours in written[key]
    assert all(record in mine for record in written[key])


def test_a_comparison_steps_the_fused_rows_here_before_their_memory_subprocesses(monkeypatch):
    """So that the C++ kernels measure their engines in a process with a training process's
    allocator, and the memory subprocesses run those choices."""
    from densenet_fast.benchmark import report
    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.runner import Runner

    events = []
    step = Runner.step
    monkeypatch.setattr(Runner, "step",
                        lambda self, workload: (events.append(("step", self.name)),
                                                step(self, workload))[-1])
    monkeypatch.setattr(report, "measure_peak_memory",
                        lambda name, *args, **kwargs: events.append(("memory", name)) or
                        {"peak_bytes": 1, "total_peak_bytes": 1})
    config = ModelConfig(growth_rate=4, block_config=(2,), num_init_features=8,
                         num_classes=3, batch_size=2, image_size=32)
    results = report.run_comparison(config, repeats=1, workloads=["train"],
                                    show_progress=False,
                                    implementations=["torchvision", "densenet_fast",
                                                     "densenet_fast-recompute"])
    if results["backend"].get("cpu") == "cpp":  # the engines the timed steps ran are named
        assert results["cpu_gemm_engines"] == cpu_gemm_engine()
    for name in ("densenet_fast", "densenet_fast-recompute"):
        assert events.index(("step", name)) < events.index(("memory", name))
    # torchvision's rows run no fused kernel: their first step is the timing's warm-up.
    assert events.index(("memory", "torchvision")) < events.index(("step", "torchvision"))
