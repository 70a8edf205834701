"""Build script: the compiled CPU kernels of densenet_fast.

Package metadata lives in pyproject.toml. ``csrc/extension.cpp`` (every CPU kernel) is
compiled once per instruction set (``csrc/builds/``) into ``densenet_fast._C_<build>`` with
``torch.utils.cpp_extension`` (ninja when available), which needs torch at build time:
install with ``pip install --no-build-isolation``. Without torch, without a compiler, or if
the build fails, the package still installs; the reason is written to
``densenet_fast/_C_build_error.txt`` and ``densenet_fast.backend_info()`` reports it, while
the pure-PyTorch kernels serve.
"""

import glob
import os
import platform
import sys
import traceback

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_ERROR_FILE = os.path.join(HERE, "densenet_fast", "_C_build_error.txt")


def _record_build_error(reason: str) -> None:
    print(f"densenet_fast: the C++ extension is not built: {reason}", file=sys.stderr)
    with open(BUILD_ERROR_FILE, "w") as f:
        f.write(reason.strip() + "\n")


def _clear_build_error() -> None:
    if os.path.exists(BUILD_ERROR_FILE):
        os.remove(BUILD_ERROR_FILE)


def _extension_setup() -> dict:
    # Every kernel file and header: a change to any of them rebuilds each variant.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "*.h")))
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        _record_build_error(
            f"torch was not importable at build time ({exc}); install with "
            "'pip install --no-build-isolation' into an environment that has torch")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the kernels, but lets the install succeed without them."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, a compile error, a missing ninja...
                traceback.print_exc()
                _record_build_error(f"the build failed: {type(exc).__name__}: {exc}")
            else:
                _clear_build_error()

    return {"ext_modules": [
                CppExtension(f"densenet_fast._C_{build}", [os.path.join("csrc", "builds",
                                                                        f"{build}.cpp")],
                             extra_compile_args=["-O3", "-fopenmp", *flags],
                             extra_link_args=["-fopenmp"],
                             depends=sources)  # torch picks the C++ standard
                for build, flags in cpu_builds().items()],
            "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


def cpu_builds() -> dict[str, list[str]]:
    """The instruction sets the kernels are compiled for, with their flags. The package picks
    one at import from the running CPU (densenet_fast/backends.py), as ATen does for its own
    kernels, so an install built on one machine runs on another. DENSENET_FAST_NATIVE=1
    builds one variant for this machine's CPU only (-march=native)."""
    if os.environ.get("DENSENET_FAST_NATIVE") == "1":
        return {"native": ["-march=native"]}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {"default": []}
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    return {"default": [], "avx2": avx2,
            "avx512": [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]}


setup(**_extension_setup())
