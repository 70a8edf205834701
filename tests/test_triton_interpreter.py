"""Runs tests/with_triton in a process of its own, with the Triton backend forced and, without a
GPU, Triton's interpreter running the kernels on CPU tensors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def test_triton_kernels_in_their_own_process():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = dict(os.environ, DENSENET_FAST_BACKEND="triton")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(TESTS / "with_triton")], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
