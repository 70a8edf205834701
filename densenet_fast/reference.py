"""The naive DenseNet: the oracle of model-level parity and the baseline of every benchmark.

It is the seed article's algorithm (a ``torch.cat`` in every layer, unfused
``nn.BatchNorm2d`` / ``nn.ReLU`` / ``nn.Conv2d``, autograd storing every intermediate) with
torchvision's architecture, constructor and state_dict names, and no torchvision import.
Activation memory grows quadratically with depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from .architecture import DenseNetBase


class NaiveDenseNet(DenseNetBase):
    """DenseNet-BC computed naively. ``memory_efficient`` is accepted for signature
    compatibility with torchvision and ignored: this model always stores everything."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory_efficient: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__(growth_rate, block_config, num_init_features, bn_size, drop_rate,
                         num_classes, memory_efficient, in_channels)
