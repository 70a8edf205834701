"""Which implementation of the fused op serves which device, and why.

The pure-PyTorch kernels are always registered as the default for every device. Compiled
backends add device-specific kernels to the same op schemas when they are loaded, and the
dispatcher then prefers them: ``cpp`` (the C++/ATen extension) for CPU tensors, ``triton``
for CUDA tensors. ``DENSENET_FAST_BACKEND`` chooses, when the package is imported: ``auto``
(the best available per device), or a backend name, which must be available or the first
use raises instead of silently falling back. ``torch`` leaves the compiled kernels unloaded.
``triton`` with ``TRITON_INTERPRET=1`` also serves CPU tensors, through Triton's interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from .ops.capability import CPU_CAPABILITY

ENV_VAR = "DENSENET_FAST_BACKEND"
AUTO = "auto"

# name -> devices it serves, in order of preference for ``auto``.
_BACKEND_DEVICES = {
    "cpp": ("cpu",),
    "triton": ("cuda",),
    "torch": ("cpu", "cuda", "mps"),
}
# Builds of the C++ kernels (setup.py), best first; each serves CPUs with these ATen
# capabilities (torch.backends.cpu.get_cpu_capability, which honours ATEN_CPU_CAPABILITY).
# "native" (DENSENET_FAST_NATIVE=1 at build time) is this machine's own build.
_CPP_BUILDS = {"native": None, "avx512": ("avx512",), "avx2": ("avx512", "avx2"),
               "default": None}
CPU_BUILD_VAR = "DENSENET_FAST_CPU_BUILD"
_BUILD_ERROR_FILE = Path(__file__).with_name("_C_build_error.txt")

# name -> how its kernels were loaded; the reference kernels are every op's default.
_loaded: dict[str, str] = {}
_load_errors: dict[str, str] = {}
# DENSENET_FAST_BACKEND as read by activate(): kernels are registered once, at import, so a
# later change of the variable must not change what is reported.
_requested_at_import: str | None = None


def requested_backend() -> str:
    """The backend named by ``DENSENET_FAST_BACKEND`` when the package was imported
    (``auto`` when unset)."""
    raw = _requested_at_import if _requested_at_import is not None else \
        os.environ.get(ENV_VAR, AUTO)
    value = raw.strip().lower() or AUTO
    known = (AUTO, *_BACKEND_DEVICES)
    if value not in known:
        raise ValueError(f"{ENV_VAR}={value!r} is not a known backend; choose one of {known}")
    return value


def cpp_build() -> tuple[str | None, str]:
    """The build of the C++ kernels this process loads, and why: the one named by
    ``DENSENET_FAST_CPU_BUILD``, else ``native`` where it was built, else the best build
    that the running CPU's capability allows. ``(None, reason)`` when none is installed."""
    forced = os.environ.get(CPU_BUILD_VAR, "").strip().lower()
    if forced and forced not in _CPP_BUILDS:
        return None, f"{CPU_BUILD_VAR}={forced!r} is not one of {tuple(_CPP_BUILDS)}"
    capability = CPU_CAPABILITY
    for build, capabilities in _CPP_BUILDS.items():
        if forced and build != forced:
            continue
        if not forced and capabilities is not None and capability not in capabilities:
            continue
        if importlib.util.find_spec(f"densenet_fast._C_{build}") is not None:
            how = f"forced by {CPU_BUILD_VAR}" if forced else f"CPU capability {capability}"
            return build, f"{build} build ({how})"
    return None, (f"no {forced} build installed" if forced else
                  f"no build installed for CPU capability {capability}")


def _cpp_missing_reason() -> str | None:
    """Why the compiled extension cannot be loaded, or None if it can be tried."""
    build, reason = cpp_build()
    if build is not None:
        return None
    if reason.startswith(CPU_BUILD_VAR):
        return reason
    if _BUILD_ERROR_FILE.exists():
        return f"not built: {_BUILD_ERROR_FILE.read_text().strip()}"
    return (f"not built ({reason}): densenet_fast was installed without compiling csrc/ "
            "(reinstall with 'pip install --no-build-isolation .' where a C++ compiler exists)")


def _interpreted_triton() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors; only when asked for by name."""
    try:
        return os.environ.get("TRITON_INTERPRET") == "1" and requested_backend() == "triton"
    except ValueError:
        return False


def devices_of(name: str) -> tuple[str, ...]:
    """The device types backend ``name`` serves in this process."""
    if name == "triton" and _interpreted_triton():
        return ("cuda", "cpu")
    return _BACKEND_DEVICES[name]


def _load_cpp() -> str:
    missing = _cpp_missing_reason()
    if missing is not None:
        raise ImportError(missing)
    build, reason = cpp_build()
    module = f"densenet_fast._C_{build}"
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        raise ImportError(f"{module} failed to load: {exc}") from exc
    from .cpu_engine_cache import keep_across_processes

    keep_across_processes(build)
    return f"compiled ATen kernels (csrc/), {reason}, loaded for torch {torch.__version__}"


def _load_triton() -> str:
    if not torch.cuda.is_available() and not _interpreted_triton():
        raise ImportError("no CUDA device (TRITON_INTERPRET=1 with DENSENET_FAST_BACKEND=triton "
                          "runs the kernels on CPU tensors)")
    try:
        import triton

        from .ops import triton_impl
    except ImportError as exc:
        raise ImportError(f"Triton is not usable: {exc}") from exc
    triton_impl.register(["CUDA", "CPU"] if _interpreted_triton() else ["CUDA"])
    mode = "interpreter" if _interpreted_triton() else "GPU"
    return f"Triton {triton.__version__} kernels ({mode}), loaded"


def _load_torch() -> str:
    return f"pure PyTorch {torch.__version__}, always available"


# name -> (register its kernels and say how, why it cannot be loaded before trying)
_LOADERS = {"cpp": (_load_cpp, _cpp_missing_reason), "triton": (_load_triton, lambda: None),
            "torch": (_load_torch, lambda: None)}


def _load(name: str) -> None:
    """Register backend ``name``'s kernels with the dispatcher; remember why if it fails."""
    if name in _loaded or name in _load_errors:
        return
    try:
        _loaded[name] = _LOADERS[name][0]()
    except ImportError as exc:
        _load_errors[name] = str(exc)


def _status(name: str) -> tuple[bool, str]:
    """Whether a backend can run here, and a one-line reason."""
    if name in _loaded:
        return True, _loaded[name]
    if name in _load_errors:
        return False, _load_errors[name]
    missing = _LOADERS[name][1]()
    if missing is not None:
        return False, missing
    return True, f"not loaded ({ENV_VAR}={_requested_at_import!r})"


def activate() -> None:
    """Load the backends that ``DENSENET_FAST_BACKEND`` asks for (called on import).

    An unknown name is not raised here but at first use, so ``backend_info()`` can report it.
    """
    global _requested_at_import
    _requested_at_import = os.environ.get(ENV_VAR, AUTO)
    _load("torch")  # the reference kernels: every op's default (ops/__init__.py)
    try:
        requested = requested_backend()
    except ValueError:
        return
    for name in _BACKEND_DEVICES if requested == AUTO else (requested,):
        _load(name)


def active_backend(device_type: str) -> str:
    """The backend whose kernels run the fused op for tensors on ``device_type``.

    Raises ``RuntimeError`` if a forced backend cannot serve that device. ``meta`` tensors
    carry no data: the ops' shape functions (:mod:`densenet_fast.ops.library`) serve them
    whatever backend is asked for, which is what this returns (``torch`` under ``auto``).
    """
    requested = requested_backend()
    if device_type == "meta":
        return "torch" if requested == AUTO else requested
    candidates = list(_BACKEND_DEVICES) if requested == AUTO else [requested]
    reasons = []
    for name in candidates:
        available, reason = _status(name)
        serves = device_type in devices_of(name)
        if available and serves and name in _loaded:
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
    for name in _BACKEND_DEVICES:
        available, reason = _status(name)
        info["backends"][name] = {"available": available, "devices": list(devices_of(name)),
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


def cpu_gemm_engine(policy: str | None = None) -> dict:
    """The C++ kernels' GEMM engine: ``{"policy": ..., "measured": [...], "amx": bool}``.

    The fused op's GEMMs (the forward's ``W a``, the backward's ``W^T g`` and ``g a^T``) run
    through ATen's float32 BLAS, oneDNN (not the weight gradient's), or, for bfloat16/float16
    data (autocast's), a GEMM in that dtype ("lowp", float32 accumulation): ATen's (the weight
    gradient's tile results rounded to that dtype, as autocast's convolution rounds its
    weight gradient) or, for bfloat16 channels-last tiles on a CPU with AMX (``"amx"``),
    oneDNN's brgemm micro-kernel called per tile (the weight gradient summed in float32 and
    rounded once), whichever is fastest on this machine: by default (``"measure"``) the
    first GEMM of each kind (which GEMM, dtype, layout, threads, size) runs with each and the
    fastest is kept, for the process and, written to a file when it exits, for every later
    process on this CPU with this torch (:mod:`densenet_fast.cpu_engine_cache`: runs then
    round alike, where timing noise could pick another engine); a tile whose GEMMs are all
    settled on "lowp" builds its operands in the data's dtype, without float32 copies;
    ``"blas"``, ``"onednn"`` or ``"lowp"`` forces one engine where it applies (oneDNN where
    ``torch.backends.mkldnn`` enables it; else float32 BLAS). Under
    ``torch.use_deterministic_algorithms`` measuring keeps float32 BLAS. ``policy`` sets it;
    ``"measured"`` lists the choices made so far (read from the file included). Returns the
    settings as they were before the call. RuntimeError without the C++ kernels."""
    if "cpp" not in _loaded:
        raise RuntimeError(f"the C++ kernels are not loaded: {_status('cpp')[1]}")
    previous, *measured = torch.ops.densenet_fast.cpu_gemm_engine(policy or "")
    return {"policy": previous, "measured": measured,
            "amx": torch.ops.densenet_fast.cpu_amx_gemm()}
