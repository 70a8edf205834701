"""Which implementation of the fused op serves which device, and why.

The pure-PyTorch kernels are always registered as the default for every device. Compiled
backends add device-specific kernels to the same op schemas when they are loaded, and the
dispatcher then prefers them. ``DENSENET_FAST_BACKEND`` chooses, when the package is
imported: ``auto`` (the best available per device), or a backend name, which must be
available or the first use raises instead of silently falling back. ``torch`` leaves the
compiled kernels unloaded, so the pure-PyTorch kernels serve everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

ENV_VAR = "DENSENET_FAST_BACKEND"
AUTO = "auto"

# name -> devices it serves, in order of preference for ``auto``.
_BACKEND_DEVICES = {
    "cpp": ("cpu",),
    "torch": ("cpu", "cuda", "mps"),
}
_CPP_MODULE = "densenet_fast._C"
_BUILD_ERROR_FILE = Path(__file__).with_name("_C_build_error.txt")

_loaded: set[str] = set()
_load_errors: dict[str, str] = {}


def requested_backend() -> str:
    """The backend named by ``DENSENET_FAST_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO
    known = (AUTO, *_BACKEND_DEVICES)
    if value not in known:
        raise ValueError(f"{ENV_VAR}={value!r} is not a known backend; choose one of {known}")
    return value


def _cpp_missing_reason() -> str | None:
    """Why the compiled extension cannot be loaded, or None if it can be tried."""
    if importlib.util.find_spec(_CPP_MODULE) is not None:
        return None
    if _BUILD_ERROR_FILE.exists():
        return f"not built: {_BUILD_ERROR_FILE.read_text().strip()}"
    return ("not built: densenet_fast was installed without compiling csrc/ "
            "(reinstall with 'pip install --no-build-isolation .' where a C++ compiler exists)")


def _load(name: str) -> None:
    """Register backend ``name``'s kernels with the dispatcher; remember why if it fails."""
    if name != "cpp" or name in _loaded or name in _load_errors:
        return
    missing = _cpp_missing_reason()
    if missing is not None:
        _load_errors[name] = missing
        return
    try:
        importlib.import_module(_CPP_MODULE)
    except (ImportError, OSError) as exc:
        _load_errors[name] = f"densenet_fast._C failed to load: {exc}"
    else:
        _loaded.add(name)


def _status(name: str) -> tuple[bool, str]:
    """Whether a backend can run here, and a one-line reason."""
    if name == "torch":
        return True, f"pure PyTorch {torch.__version__}, always available"
    if name in _loaded:
        return True, f"compiled ATen kernels (csrc/), loaded for torch {torch.__version__}"
    if name in _load_errors:
        return False, _load_errors[name]
    missing = _cpp_missing_reason()
    if missing is not None:
        return False, missing
    return True, f"compiled, not loaded ({ENV_VAR}={os.environ.get(ENV_VAR, AUTO)!r})"


def activate() -> None:
    """Load the backends that ``DENSENET_FAST_BACKEND`` asks for (called on import).

    An unknown name is not raised here but at first use, so ``backend_info()`` can report it.
    """
    try:
        requested = requested_backend()
    except ValueError:
        return
    for name in _BACKEND_DEVICES if requested == AUTO else (requested,):
        _load(name)


def active_backend(device_type: str) -> str:
    """The backend whose kernels run the fused op for tensors on ``device_type``.

    Raises ``RuntimeError`` if a forced backend cannot serve that device.
    """
    requested = requested_backend()
    candidates = list(_BACKEND_DEVICES) if requested == AUTO else [requested]
    reasons = []
    for name in candidates:
        available, reason = _status(name)
        serves = device_type in _BACKEND_DEVICES[name]
        if available and serves and (name == "torch" or name in _loaded):
            return name
        reasons.append(f"{name}: {reason if not available else 'does not serve ' + device_type}")
    raise RuntimeError(
        f"{ENV_VAR}={requested!r} cannot run on {device_type}: " + "; ".join(reasons))


def backend_info() -> dict:
    """Report each backend (available or why not), the requested one, and which one serves
    each device (``active``) or why none can (``unavailable``).

    Never raises: an unknown ``DENSENET_FAST_BACKEND`` is reported under ``"error"``.
    """
    info = {"backends": {}, "requested": None, "active": {}, "unavailable": {}, "error": None}
    for name, devices in _BACKEND_DEVICES.items():
        available, reason = _status(name)
        info["backends"][name] = {"available": available, "devices": list(devices),
                                  "reason": reason}
    try:
        info["requested"] = requested_backend()
    except ValueError as exc:
        info["error"] = str(exc)
        return info
    for device in ("cpu", "cuda", "mps"):
        try:
            info["active"][device] = active_backend(device)
        except RuntimeError as exc:
            info["unavailable"][device] = str(exc)
    return info
