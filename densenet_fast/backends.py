"""Which implementation of the fused op serves which device, and why.

The pure-PyTorch kernels are always registered as the default for every device. Compiled
backends add device-specific kernels to the same op schemas. ``DENSENET_FAST_BACKEND``
chooses: ``auto`` (the best available per device) or a backend name, which must be
available or the first use raises instead of silently falling back.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "DENSENET_FAST_BACKEND"
AUTO = "auto"

# name -> devices it serves; probed in order of preference for ``auto``.
_BACKEND_DEVICES = {
    "torch": ("cpu", "cuda", "mps"),
}


def _probe(name: str) -> tuple[bool, str]:
    """Whether a backend can run here, and a one-line reason."""
    if name == "torch":
        return True, f"pure PyTorch {torch.__version__}, always available"
    raise AssertionError(name)


def requested_backend() -> str:
    """The backend named by ``DENSENET_FAST_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO
    known = (AUTO, *_BACKEND_DEVICES)
    if value not in known:
        raise ValueError(f"{ENV_VAR}={value!r} is not a known backend; choose one of {known}")
    return value


def backend_info() -> dict:
    """Report the available backends, the requested one, and the one serving each device.

    Never raises: a bad ``DENSENET_FAST_BACKEND`` or an unavailable forced backend is
    reported under ``"error"``.
    """
    backends = {}
    for name, devices in _BACKEND_DEVICES.items():
        available, reason = _probe(name)
        backends[name] = {"available": available, "devices": list(devices), "reason": reason}
    info = {"backends": backends, "requested": None, "active": {}, "error": None}
    try:
        info["requested"] = requested_backend()
        info["active"] = {device: active_backend(device)
                          for device in ("cpu", "cuda", "mps")}
    except (ValueError, RuntimeError) as exc:
        info["error"] = str(exc)
    return info


def active_backend(device_type: str) -> str:
    """The backend whose kernels run the fused op for tensors on ``device_type``.

    Raises ``RuntimeError`` if a forced backend cannot serve that device.
    """
    requested = requested_backend()
    candidates = list(_BACKEND_DEVICES) if requested == AUTO else [requested]
    reasons = []
    for name in candidates:
        available, reason = _probe(name)
        if available and device_type in _BACKEND_DEVICES[name]:
            return name
        reasons.append(f"{name}: {reason if not available else 'does not serve ' + device_type}")
    raise RuntimeError(
        f"{ENV_VAR}={requested!r} cannot run on {device_type}: " + "; ".join(reasons)
    )
