"""Backend selection: which kernels serve, forcing, and failing loudly."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from tolerances import BUILD_TOLERANCES, assert_error_within

import densenet_fast

OP = "densenet_fast::bn_relu_conv1x1"


def _cpu_kernel_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def _compiler_present() -> bool:
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


@pytest.mark.skipif(os.environ.get("DENSENET_FAST_BACKEND", "auto") not in ("auto", "cpp"),
                    reason="this process was told to use another backend")
def test_compiled_backend_serves_cpu_wherever_it_can_be_built():
    """In CI, and anywhere with a compiler, the C++ kernels must be what the CPU tests run:
    a silent fallback to the pure-PyTorch kernels fails here."""
    info = densenet_fast.backend_info()
    if os.environ.get("CI") == "true" or _compiler_present():
        assert info["backends"]["cpp"]["available"], info["backends"]["cpp"]["reason"]
        assert info["active"]["cpu"] == "cpp", info
        assert _cpu_kernel_registered()
    else:
        assert info["active"]["cpu"] in ("cpp", "torch")
    assert info["active"]["cuda"] == "torch" and info["error"] is None


def _run(code: str, backend: str | None, block_extension: bool = False, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "DENSENET_FAST_BACKEND"}
    env.update(extra_env)
    if backend is not None:
        env["DENSENET_FAST_BACKEND"] = backend
    prelude = "import sys\n"
    if block_extension:  # as if the extension could not be loaded
        prelude += ("for build in ('native', 'avx512', 'avx2', 'default'):\n"
                    "    sys.modules[f'densenet_fast._C_{build}'] = None\n")
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True,
                          text=True, check=False)


REPORT = ("import torch, densenet_fast as d\n"
          "info = d.backend_info()\n"
          "print(info['active'].get('cpu'), info['error'])\n"
          "print(info['backends']['cpp']['reason'])\n"
          "print(torch._C._dispatch_has_kernel_for_dispatch_key("
          "'densenet_fast::bn_relu_conv1x1', 'CPU'))\n"
          "m = d.DenseNet(growth_rate=4, block_config=(2,), num_classes=2)\n"
          "m(torch.randn(2, 3, 16, 16)).sum().backward()\n")


def test_forcing_torch_leaves_the_compiled_kernels_unloaded():
    proc = _run(REPORT, "torch")
    assert proc.returncode == 0, proc.stderr
    active, _, kernel = proc.stdout.splitlines()[0], None, proc.stdout.splitlines()[2]
    assert active.startswith("torch None") and kernel == "False"


def test_auto_falls_back_and_says_why_when_the_extension_cannot_load():
    proc = _run(REPORT, None, block_extension=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("torch None")
    assert "not built" in lines[1] or "failed to load" in lines[1], lines[1]


def test_forcing_an_unloadable_cpp_backend_fails_loudly():
    proc = _run(REPORT, "cpp", block_extension=True)
    assert proc.returncode != 0
    assert "RuntimeError: DENSENET_FAST_BACKEND='cpp' cannot run on cpu: cpp: " in proc.stderr


def test_forcing_an_unknown_backend_fails_loudly():
    proc = _run(REPORT, "cuda-magic")
    assert proc.returncode != 0
    assert "not a known backend" in proc.stdout
    assert "DENSENET_FAST_BACKEND='cuda-magic' is not a known backend" in proc.stderr


BUILD_REPORT = ("import torch, densenet_fast as d\n"
                "from densenet_fast.ops import reference_kernels\n"
                "print(d.backend_info()['backends']['cpp']['reason'])\n"
                "x, w = torch.randn(2, 9, 5, 5), torch.randn(6, 7, 1, 1)\n"
                "args = (x, torch.randn(7) * 0.1, torch.rand(7) + 0.5, torch.rand(7), "
                "torch.randn(7), w)\n"
                "out = torch.ops.densenet_fast.bn_relu_conv1x1(*args)\n"
                "from densenet_fast.ops import torch_impl\n"
                "want = torch_impl.bn_relu_conv1x1(*args)\n"
                "print((out - want).abs().max().item(), want.abs().max().item())\n")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="one build per x86 instruction set")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_without_avx512_loads_a_build_it_can_run(capability):
    """ATEN_CPU_CAPABILITY lowers what torch reports of the CPU, as on an older CPU: the
    kernels built for that instruction set serve, and compute the reference's result."""
    proc = _run(BUILD_REPORT, None, ATEN_CPU_CAPABILITY=capability)
    assert proc.returncode == 0, proc.stderr
    reason, errors = proc.stdout.splitlines()
    assert f"{capability} build (CPU capability {capability})" in reason, reason
    error, scale = map(float, errors.split())
    assert_error_within(error, scale, torch.float32, f"{capability} build", BUILD_TOLERANCES)


def test_forcing_a_missing_cpu_build_says_so():
    proc = _run(REPORT, "cpp", DENSENET_FAST_CPU_BUILD="sse9")
    assert proc.returncode != 0
    assert "DENSENET_FAST_CPU_BUILD='sse9' is not one of" in proc.stderr
