"""Build script.

Package metadata lives in pyproject.toml. This file is where the compiled CPU extension
(``csrc/``, ``torch.utils.cpp_extension`` with ninja) is declared once it lands; until then
the package is pure Python and the pure-PyTorch backend serves every device.
"""

from setuptools import setup

setup()
