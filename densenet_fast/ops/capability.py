"""The instruction set torch's CPU kernels run at, read once."""

from __future__ import annotations

import torch


def _read_cpu_capability() -> str:
    try:
        capability = torch.backends.cpu.get_cpu_capability().lower()
    except (AttributeError, RuntimeError):
        return "default"
    return capability if capability in ("avx512", "avx2") else "default"


# ``avx512``, ``avx2`` or ``default`` (torch before 2.6 calls the last "NO AVX"): torch's
# choice, which honours ATEN_CPU_CAPABILITY and is fixed when torch loads. A constant, read
# once: code dynamo traces reads it where it could not call torch's function.
CPU_CAPABILITY = _read_cpu_capability()
