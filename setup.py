"""Build script: the compiled CPU kernels of densenet_fast.

Package metadata lives in pyproject.toml. ``csrc/*.cpp`` is compiled into ``densenet_fast._C``
with ``torch.utils.cpp_extension`` (ninja when available), which needs torch at build time:
install with ``pip install --no-build-isolation``. Without torch, without a compiler, or if
the build fails, the package still installs; the reason is written to
``densenet_fast/_C_build_error.txt`` and ``densenet_fast.backend_info()`` reports it, while
the pure-PyTorch kernels serve.
"""

import glob
import os
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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
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

    # The kernels are built on the machine that runs them, so they may use all of its vector
    # instructions; DENSENET_FAST_PORTABLE=1 builds for the baseline instruction set instead.
    native = [] if os.environ.get("DENSENET_FAST_PORTABLE") == "1" else ["-march=native"]
    ext = CppExtension(
        "densenet_fast._C",
        sources,
        extra_compile_args=["-O3", "-fopenmp", *native],  # torch picks the C++ standard
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_setup())
