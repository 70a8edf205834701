"""Side-by-side memory and speed measurements of DenseNet implementations.

Shared by the ``densenet-fast bench`` command and the pytest-benchmark suite in
``benchmarks/``, so both measure the same way.
"""
