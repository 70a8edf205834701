"""The fused op alone against eager ``BatchNorm2d -> ReLU -> Conv2d(1x1)`` on the prefix
shapes of a DenseNet's layers, forward + backward.

``fused-standalone`` replaces the eager sequence one for one: it computes the batch
statistics of the prefix and runs the full training-mode BN backward (``stats_grad``).
``fused-in-block`` is the op as the dense block calls it: statistics were computed once when
the channels were written, and the gradient through them is added once per channel by the
block, not by each layer.
"""

import pytest
import torch
import torch.nn as nn

from densenet_fast.ops import bn_relu_conv1x1, bn_relu_conv1x1_backward, channel_stats


def _layer_shapes(config):
    """(name, N, C_total, C_prefix, H) for the first, middle and last layer of each block."""
    shapes, channels, size = [], config.num_init_features, config.image_size // 4
    for b, layers in enumerate(config.block_config):
        total = channels + layers * config.growth_rate
        for layer in sorted({0, layers // 2, layers - 1}):
            prefix = channels + layer * config.growth_rate
            shapes.append((f"block{b + 1}-layer{layer + 1}", total, prefix, size))
        channels, size = total // 2, size // 2
    return shapes


def pytest_generate_tests(metafunc):
    if "layer_shape" in metafunc.fixturenames:
        from densenet_fast.benchmark.implementations import ModelConfig

        opt = metafunc.config.getoption
        config = ModelConfig.named(opt("--model"), image_size=opt("--image-size"))
        shapes = _layer_shapes(config)
        metafunc.parametrize("layer_shape", shapes, ids=[s[0] for s in shapes])


@pytest.mark.parametrize("impl", ["fused-standalone", "fused-in-block", "eager"])
def test_bn_relu_conv1x1_fwd_bwd(benchmark, impl, layer_shape, model_config, rounds):
    name, total, prefix, size = layer_shape
    n, out_channels = model_config.batch_size, model_config.bn_size * model_config.growth_rate
    benchmark.group = f"bn-relu-conv1x1 {name} (C={prefix}, {size}x{size}, N={n})"
    buffer = torch.randn(n, total, size, size)
    grad_out = torch.randn(n, out_channels, size, size)
    if impl == "eager":
        layer = nn.Sequential(nn.BatchNorm2d(prefix), nn.ReLU(inplace=True),
                              nn.Conv2d(prefix, out_channels, 1, bias=False))
        x = buffer[:, :prefix].contiguous().requires_grad_()

        def step():
            layer(x).backward(grad_out)
    else:
        gamma, beta = torch.ones(prefix), torch.zeros(prefix)
        weight = torch.randn(out_channels, prefix, 1, 1) / prefix
        grad_buffer = torch.zeros_like(buffer)
        standalone = impl == "fused-standalone"
        stats = channel_stats(buffer[:, :prefix])

        def step():
            mean, var = channel_stats(buffer[:, :prefix]) if standalone else stats
            invstd = torch.rsqrt(var + 1e-5)
            bn_relu_conv1x1(buffer, mean, invstd, gamma, beta, weight)
            bn_relu_conv1x1_backward(grad_out, buffer, mean, invstd, gamma, beta, weight,
                                     standalone, grad_buffer)

    benchmark.pedantic(step, rounds=rounds * 3, warmup_rounds=1)
