"""The machine a benchmark ran on, and the roofline its rows are judged against.

A training step's time is mostly its convolutions, which are GEMMs; the best a DenseNet step
can do is its convolution FLOPs at the machine's GEMM rate. :func:`gemm_peak` measures that
rate for the dtype the model computes in (the fastest of torch's GEMM kernels),
:func:`convolution_flops` counts the FLOPs of one step (what ``torch.utils.flop_counter``
counts for torchvision's model: every implementation computes the same convolutions), and
each row's achieved rate is their quotient.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..machine import cpu_model, describe_cpu  # noqa: F401 (the reports' API)
from ..ops.measure import best_time
from .implementations import ModelConfig

# A GEMM large enough to reach the rate of the dense layers' big 1x1 convolutions.
_PEAK_SIZE = 1536
_PEAK_TRIALS = 5


def _gemm_kernels(n: int, dtype: torch.dtype, device: str) -> dict:
    """The same ``n``-cubed GEMM as each kernel family torch has for it: ``torch.mm`` (BLAS:
    MKL or OpenBLAS on CPU) and a 1x1 convolution over ``n`` pixels in NCHW and in
    channels-last (oneDNN on x86 CPUs, cuDNN on CUDA), which is how the dense layers' GEMMs
    run in torchvision's model and in the fused op."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    image = torch.randn(1, n, n // 32, 32, device=device).to(dtype)
    weight = b.reshape(n, n, 1, 1)
    planar = image.contiguous()
    pixel_major = image.contiguous(memory_format=torch.channels_last)
    return {"mm": lambda: torch.mm(a, b),
            "conv1x1": lambda: torch.nn.functional.conv2d(planar, weight),
            "conv1x1 channels_last": lambda: torch.nn.functional.conv2d(pixel_major, weight)}


def gemm_peak(dtype: torch.dtype, device: str = "cpu") -> dict:
    """The machine's GEMM rate for ``dtype`` math in GFLOP/s: the fastest kernel torch has for
    one large GEMM, as ``torch.mm`` and as 1x1 convolutions in both layouts (MKL's ``mm``
    reaches less than half of oneDNN's convolution rate on an AMD Zen 4, so ``mm`` alone
    would understate the machine), in ``dtype`` and, for bfloat16/float16 on the CPU, in
    float32 on such values (the same products, exactly, with float32 accumulation).
    ``{"gflops", "kernel"}``: the rate and which kernel reached it."""
    n = _PEAK_SIZE
    flops = 2 * n ** 3
    candidates = [dtype] + ([torch.float32] if dtype in (torch.bfloat16, torch.float16)
                            and device == "cpu" else [])
    best = {"gflops": 0.0, "kernel": ""}
    for kernel_dtype in candidates:
        for name, kernel in _gemm_kernels(n, kernel_dtype, device).items():

            def run(kernel=kernel):
                kernel()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            gflops = flops / best_time(run, _PEAK_TRIALS) / 1e9
            if gflops > best["gflops"]:
                best = {"gflops": gflops,
                        "kernel": f"{str(kernel_dtype).removeprefix('torch.')} {name}"}
    return best


def convolution_flops(config: ModelConfig, workload: str) -> int:
    """FLOPs of the convolutions (and the classifier's GEMM) of one ``workload`` step of
    torchvision's model of ``config``, as ``torch.utils.flop_counter`` counts them, on the
    meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import DenseNet as TorchvisionDenseNet

    kwargs = config.model_kwargs()
    kwargs.pop("in_channels")
    with torch.device("meta"):
        model: nn.Module = TorchvisionDenseNet(**kwargs)
        if config.in_channels != 3:
            model.features.conv0 = nn.Conv2d(config.in_channels, model.features.conv0.out_channels,
                                             7, 2, 3, bias=False)
        x = torch.randn(config.batch_size, config.in_channels, config.image_size,
                        config.image_size)
        y = torch.randint(0, config.num_classes, (config.batch_size,))
    model.train(workload == "train")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(workload == "train"):
        logits = model(x)
        if workload == "train":
            nn.functional.cross_entropy(logits, y).backward()
    return counter.get_total_flops()


def roofline_row(flops: int, seconds: float, peak_gflops: float) -> dict:
    """A row's achieved convolution rate and its share of the GEMM peak."""
    achieved = flops / seconds / 1e9
    return {"conv_gflops": achieved, "peak_share": achieved / peak_gflops if peak_gflops else None}
