"""The Triton kernels' config choice (ops/triton_tuning.py): shape classes, one tuning per
class, the cache file shared by processes, deterministic mode; and the TF32 setting the
kernels follow. No kernel runs here: the tuner is given stand-in kernels and timers."""

import json
import os
import subprocess
import sys
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")
from densenet_fast.ops import triton_impl, triton_tuning  # noqa: E402

CPU = torch.device("cpu")
CONFIGS = triton_impl.GEMM_CONFIGS
CLASS = ("float32", 0, 1024, 256, 128)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(triton_tuning.CACHE_ENV, str(path))
    triton_tuning.DISK.forget()
    yield path
    triton_tuning.DISK.forget()


def _kernel(source="v1"):
    return SimpleNamespace(__name__="kernel", cache_key=source)


class Timer:
    """Times each config as given in ``seconds`` (by config index) and counts the trials."""

    def __init__(self, seconds=(3.0, 1.0, 2.0)):
        self.seconds, self.calls = seconds, []

    def __call__(self, run, device):
        config = run()
        self.calls.append(config)
        return self.seconds[CONFIGS.index(config)]


def _tuner(timer, source="v1"):
    return triton_tuning.Tuner(_kernel(source), CONFIGS, pinned=CONFIGS[0], timer=timer)


def _trial(config):
    return config  # what the stand-in timer reads back


def test_sizes_fall_into_power_of_two_classes():
    assert [triton_tuning.size_class(n) for n in (1, 2, 3, 64, 65, 992, 1024, 25088)] == \
        [1, 2, 4, 64, 128, 1024, 1024, 32768]


def test_densenet121_needs_a_handful_of_classes_not_one_per_layer():
    """Per batch size and dtype: 61 distinct (P, C, CO) of densenet121's fused 1x1
    convolutions at batch 8, 224x224, against the classes they fall into."""
    shapes = set()
    channels, side = 64, 56
    for block, layers in enumerate((6, 12, 24, 16)):
        for i in range(layers):
            shapes.add((8 * side * side, channels + 32 * i, 128))
        channels += 32 * layers
        if block < 3:
            shapes.add((8 * side * side, channels, channels // 2))
            channels, side = channels // 2, side // 2
    classes = {tuple(map(triton_tuning.size_class, s)) for s in shapes}
    assert len(shapes) == 61 and len(classes) <= 14, (len(shapes), len(classes))


def test_a_class_is_timed_once_and_the_fastest_config_kept(cache):
    timer = Timer()
    tuner = _tuner(timer)
    assert tuner.choose(CLASS, CPU, _trial) is CONFIGS[1]
    assert tuner.choose(CLASS, CPU, _trial) is CONFIGS[1]
    assert timer.calls == CONFIGS  # each config timed once, on the first call only
    assert tuner.choose(("float32", 0, 2048, 256, 128), CPU, _trial) is CONFIGS[1]
    assert len(timer.calls) == 2 * len(CONFIGS)  # another class: timed again


def test_the_choice_is_kept_on_disk_for_later_processes(cache):
    _tuner(Timer()).choose(CLASS, CPU, _trial)
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["BLOCK_M"] == 128
    code = f"""
import sys
sys.path.insert(0, {str(triton_impl.__file__).rsplit('/densenet_fast/', 1)[0]!r})
from types import SimpleNamespace
import torch
from densenet_fast.ops import triton_impl, triton_tuning
def never(run, device):
    raise SystemExit("timed again")
tuner = triton_tuning.Tuner(SimpleNamespace(__name__="kernel", cache_key="v1"),
                            triton_impl.GEMM_CONFIGS, triton_impl.GEMM_CONFIGS[0], timer=never)
config = tuner.choose({CLASS!r}, torch.device("cpu"), lambda c: c)
print(triton_impl.GEMM_CONFIGS.index(config), triton_tuning.tuning_stats()["from_disk"])
"""
    env = {**os.environ, triton_tuning.CACHE_ENV: str(cache)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "1"]


def test_changed_kernel_source_or_configs_are_tuned_afresh(cache):
    _tuner(Timer()).choose(CLASS, CPU, _trial)
    timer = Timer(seconds=(1.0, 3.0, 2.0))
    assert _tuner(timer, source="v2").choose(CLASS, CPU, _trial) is CONFIGS[0]
    assert len(timer.calls) == len(CONFIGS)
    # An entry naming a config this version no longer has is not trusted.
    entries = json.loads(cache.read_text())
    for value in entries.values():
        value["BLOCK_M"] = 999
    cache.write_text(json.dumps(entries))
    triton_tuning.DISK.forget()
    timer = Timer()
    assert _tuner(timer).choose(CLASS, CPU, _trial) is CONFIGS[1] and timer.calls


def test_processes_writing_at_once_keep_each_others_entries(cache):
    """Each write merges with the file as it is now, under a lock: two tuners (as two
    processes would) add two entries."""
    first, second = _tuner(Timer()), _tuner(Timer(), source="other kernel")
    first.choose(CLASS, CPU, _trial)
    triton_tuning.DISK.forget()  # the second process read the file before the first wrote
    stale = triton_tuning._disk_cache()
    stale._entries, stale._path = {}, cache
    second_key = second._key(CLASS, CPU)
    stale.put(second_key, {"BLOCK_M": 1})
    assert len(json.loads(cache.read_text())) == 2


def test_an_unwritable_cache_warns_once_and_tuning_still_works(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(triton_tuning.CACHE_ENV, str(blocker / "tuning.json"))  # not a dir
    triton_tuning.DISK.forget()
    fresh = triton_tuning._disk_cache()
    monkeypatch.setattr(triton_tuning, "DISK", fresh)
    with pytest.warns(UserWarning, match="cannot write the Triton tuning cache"):
        assert _tuner(Timer()).choose(CLASS, CPU, _trial) is CONFIGS[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tuner(Timer()).choose(("float32", 0, 1, 1, 1), CPU, _trial)


def test_threads_meeting_a_new_class_tune_it_once(cache):
    timer = Timer()
    tuner = _tuner(timer)
    start = threading.Barrier(4)
    chosen = []

    def choose():
        start.wait()
        chosen.append(tuner.choose(CLASS, CPU, _trial))

    threads = [threading.Thread(target=choose) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert chosen == [CONFIGS[1]] * 4 and len(timer.calls) == len(CONFIGS)


def test_deterministic_mode_uses_the_pinned_config_without_timing(cache):
    def never(run, device):
        raise AssertionError("timed")

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _tuner(never).choose(CLASS, CPU, _trial) is CONFIGS[0]
    finally:
        torch.use_deterministic_algorithms(previous)


def test_tuning_off_runs_the_pinned_config_and_a_bad_value_is_named(cache, monkeypatch):
    def never(run, device):
        raise AssertionError("timed")

    monkeypatch.setenv(triton_tuning.TUNING_ENV, "off")
    assert _tuner(never).choose(CLASS, CPU, _trial) is CONFIGS[0]
    monkeypatch.setenv(triton_tuning.TUNING_ENV, "fast")
    with pytest.raises(ValueError, match="DENSENET_FAST_TRITON_TUNING must be 'on' or 'off'"):
        _tuner(never).choose(CLASS, CPU, _trial)


def test_a_trial_is_timed_after_an_untimed_first_call():
    calls = []
    seconds = triton_tuning._time_trial(lambda: calls.append(1), CPU)
    assert seconds >= 0 and 2 <= len(calls) <= triton_tuning.MAX_TRIAL_REPEATS + 1


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="torch before 2.9 has only the legacy TF32 flags")
def test_tf32_follows_the_per_operator_setting_without_reading_the_legacy_flag(monkeypatch):
    """torch >= 2.9: the conv setting decides, inheriting cuDNN's and then the global one
    while "none"; the legacy ``cudnn.allow_tf32``, which raises once conv and RNN settings
    differ, is not read."""
    conv, cudnn, generic = torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends
    rnn = torch.backends.cudnn.rnn
    saved = conv.fp32_precision, rnn.fp32_precision, cudnn.fp32_precision, \
        generic.fp32_precision
    monkeypatch.setattr(triton_impl, "INTERPRETED", False)
    try:
        conv.fp32_precision, rnn.fp32_precision = "ieee", "tf32"
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # noqa: B018 (the hazard: reading it raises)
        assert not triton_impl.conv_uses_tf32()
        assert triton_impl._precision(torch.float32) == "ieee"
        conv.fp32_precision = "tf32"
        assert triton_impl._precision(torch.float32) == "tf32"
        assert triton_impl._precision(torch.bfloat16) == "ieee"
        conv.fp32_precision, cudnn.fp32_precision = "none", "tf32"
        assert triton_impl.conv_uses_tf32()
        cudnn.fp32_precision, generic.fp32_precision = "none", "ieee"
        assert not triton_impl.conv_uses_tf32()
        generic.fp32_precision = "none"
        assert not triton_impl.conv_uses_tf32()
    finally:
        generic.fp32_precision = saved[3]
        cudnn.fp32_precision = saved[2]
        conv.fp32_precision, rnn.fp32_precision = saved[:2]
