"""The machine the kernels run on, as reports and caches name it."""

from __future__ import annotations

import platform


def cpu_model() -> dict:
    """``{"vendor", "name"}`` of this machine's CPU, with ``"cpu family"`` and ``"model"``
    where ``/proc/cpuinfo`` gives them (Linux x86)."""
    info = {"vendor": "", "name": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not info["vendor"]:
                    info["vendor"] = value.strip()
                elif key == "model name" and not info["name"]:
                    info["name"] = value.strip()
                elif key in ("cpu family", "model") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    info["name"] = info["name"] or platform.processor() or platform.machine()
    return info


def describe_cpu(info: dict | None = None) -> str:
    """The CPU as reports name it: model name, vendor, family and model numbers."""
    info = info or cpu_model()
    numbers = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model") if k in info)
    return ", ".join(part for part in (info["name"], info["vendor"], numbers) if part)
