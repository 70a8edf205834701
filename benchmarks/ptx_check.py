"""Compile the Triton kernels for a GPU on a machine without one, and read their PTX.

Triton's CUDA backend compiles (to PTX and, with the ``ptxas`` Triton ships, to a cubin)
without a device. This script runs the real launchers of ``densenet_fast.ops.triton_impl``
forward and backward on CPU tensors with every kernel launch turned into a compile for the
given architecture, so a first GPU run's compile errors show here, and reports per kernel
the PTX facts the kernels depend on:

- ``nan_max``: ReLU as ``max.NaN`` (NaN kept, as torch's ReLU keeps it);
- ``wide_accesses`` / ``narrow_accesses``: global loads and global-to-shared copies of 16
  bytes (vectorised) and of fewer (one or two elements each): how the layout lets the
  compiler load;
- ``divisions``: integer division and remainder instructions.

    python benchmarks/ptx_check.py                  # sm_90 (H100/H200), every case
    python benchmarks/ptx_check.py --arch 80 --json out.json

The numbers describe code, not speed: timing needs the GPU (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, memory format, N, C_total, C, C_out, H, W): densenet121 layer shapes, channels-last
# (flat pixels) and NCHW with a plane of a multiple of 16 pixels (56x56) and of another size.
CASES = [("nhwc-56", "channels_last", 8, 256, 224, 128, 56, 56),
         ("nchw-56", "contiguous", 8, 256, 224, 128, 56, 56),
         ("nchw-14", "contiguous", 8, 1024, 992, 128, 14, 14)]
DTYPES = ("float32", "bfloat16", "float16")


class CompileOnlyDriver:
    """The part of a Triton GPU driver that compiling asks for: a device index, a stream
    and the target architecture."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def _facts(ptx: str) -> dict:
    copies = [int(size, 0) for size in re.findall(
        r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^\]]*\],\s*\[[^\]]*\],\s*"
        r"(0x[0-9a-f]+|\d+)", ptx)]
    loads = re.findall(r"ld\.global(?:\.\w+)*?\.(v[248]\.)?[busf]\d+", ptx)
    return {"nan_max": len(re.findall(r"\bmax\.NaN\.", ptx)),
            "wide_accesses": sum(c == 16 for c in copies) + loads.count("v4."),
            "narrow_accesses": sum(c < 16 for c in copies) + sum(v != "v4." for v in loads),
            "divisions": len(re.findall(r"\b(?:div|rem)\.[su]\d+", ptx))}


def compile_cases(arch: int, cases=CASES, dtypes=DTYPES) -> list[dict]:
    """Compile every kernel the launchers call, per case and dtype, for ``sm_<arch>``;
    return one row per kernel compile: the case, dtype, kernel, ``FLAT`` and PTX facts."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from densenet_fast.ops import triton_impl

    rows, current = [], {}
    compile_for_arch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = compile_for_arch(self, *args, grid=grid, warmup=True, **kwargs)
        rows.append({**current, "kernel": self.__name__, "flat": kwargs.get("FLAT"),
                     **_facts(kernel.asm["ptx"])})
        return kernel

    previous_driver = getattr(driver, "_active", None)  # None: not yet created (no GPU)
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = compile_only
    try:
        for name, layout, n, total, c, co, h, w in cases:
            memory_format = getattr(torch, f"{layout}_format" if layout == "contiguous"
                                    else layout)
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                current.update(case=name, dtype=dtype_name)
                _run_launchers(triton_impl, torch, dtype, memory_format, n, total, c, co, h, w)
    finally:
        JITFunction.run = compile_for_arch
        driver._active = previous_driver
    return rows


def _run_launchers(triton_impl, torch, dtype, memory_format, n, total, c, co, h, w):
    """Forward, then backward through the batch statistics (the four GEMM kernels and the BN
    gradients' sums in float64) and without them (the sums in the parameters' dtype), with
    the pinned config (no tuning: nothing runs to time); then the elementwise ops
    (``bn_relu`` to the statistics' dtype, ``add_stats_term`` on a channel slice of the
    buffer) and the statistics' coefficients (on slices, as the block passes them)."""
    buffer = torch.zeros(n, total, h, w, dtype=dtype).contiguous(memory_format=memory_format)
    grad_out = torch.zeros(n, co, h, w, dtype=dtype).contiguous(memory_format=memory_format)
    stats = [torch.ones(c) for _ in range(4)]  # mean, invstd, BN weight, BN bias
    weight = torch.zeros(co, c, 1, 1, dtype=dtype)
    with triton_impl.forced_config(triton_impl.GEMM_CONFIGS[1]):
        triton_impl.bn_relu_conv1x1(buffer, *stats, weight)
        for stats_grad in (True, False):
            triton_impl.bn_relu_conv1x1_backward(grad_out, buffer, *stats, weight, stats_grad,
                                                 torch.zeros_like(buffer))
    triton_impl.bn_relu(grad_out, *(t[:co] for t in stats), torch.float32)
    new_channels = buffer[:, c:]
    triton_impl.add_stats_term(new_channels, new_channels, torch.ones(total - c),
                               torch.ones(total - c))
    kx, k0 = torch.zeros(2, total)
    triton_impl.add_stats_coefficients(kx[:c], k0[:c], *stats[:3], *stats[2:], n * h * w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--case", action="append", choices=[c[0] for c in CASES])
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.case or c[0] in args.case]
    rows = compile_cases(args.arch, cases, tuple(args.dtype or DTYPES))
    print(f"sm_{args.arch}: {len(rows)} kernel compiles")
    print(f"{'case':10s} {'dtype':9s} {'kernel':20s} {'nan max':>8s} {'16B loads':>10s} "
          f"{'narrower':>9s} {'div/rem':>8s}")
    for r in rows:
        print(f"{r['case']:10s} {r['dtype']:9s} {r['kernel']:20s} {r['nan_max']:8d} "
              f"{r['wide_accesses']:10d} {r['narrow_accesses']:9d} {r['divisions']:8d}")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
