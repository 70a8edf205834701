"""DenseNet-BC structure shared by the naive reference and the fused model.

Module names, constructor and initialisation follow torchvision's ``models/densenet.py`` so
state_dicts are interchangeable; only the forward passes differ between implementations.

The forwards here are TorchScript-compatible, as torchvision's are, and their annotations are
real objects, not strings (no ``from __future__ import annotations``): ``torch.jit.script``
compiles them, also in the code ``torch.fx`` generates from them (for example
``create_feature_extractor``).
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's configurations: (growth_rate, block_config, num_init_features)
CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}


class DenseLayer(nn.Module):
    """``BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k)``; returns the ``k`` new channels.

    Called on its own it takes a tensor or a list of tensors (concatenated along channels),
    as torchvision's layer does.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        # torchvision's sequence of calls, op for op: hooks, tracers and FLOP counters see
        # the same tensors and node names (the cat copies even a lone tensor, as there).
        prev_features = [inputs] if isinstance(inputs, torch.Tensor) else inputs
        concated_features = torch.cat(prev_features, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers named ``denselayer1``...; returns all channels concatenated.

    This base forward is torchvision's (the seed's algorithm): every layer concatenates all
    earlier features, so memory grows quadratically with depth.
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate,
                memory_efficient))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        return self.forward_modules(init_features)

    def forward_modules(self, init_features: torch.Tensor) -> torch.Tensor:
        """Torchvision's block forward: each layer called as a module on all the features
        before it (also what a subclass runs when it cannot compute the block otherwise)."""
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """``BN-ReLU-Conv1x1-AvgPool(2)`` between blocks, named as torchvision's."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                              bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _check_config(growth_rate, block_config, num_init_features, bn_size, drop_rate,
                  num_classes, in_channels) -> tuple[int, ...]:
    """The configurations torchvision's DenseNet builds and runs, refused here where its
    would fail only at the first forward (a zero-width convolution, a dropout rate above 1).
    Like torchvision's: no classes (an ``(N, 0)`` output), blocks of no layers or none at
    all, and a drop rate of 0 or less (no dropout) or 1 (zeros) are accepted."""
    for name, value in (("growth_rate", growth_rate), ("num_init_features", num_init_features),
                        ("bn_size", bn_size), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if not isinstance(block_config, Sequence) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in block_config):
        raise ValueError(
            f"block_config must be a sequence of non-negative integers, got {block_config!r}")
    if not float(drop_rate) <= 1.0:
        raise ValueError(f"drop_rate must be at most 1 (a dropout probability), got {drop_rate!r}")
    return tuple(block_config)


class DenseNetBase(nn.Module):
    """DenseNet-BC with torchvision's constructor, module names and initialisation.

    Subclasses choose the block, transition and feature-container classes, i.e. how the
    forward pass is computed; parameters and state_dict keys are the same for all of them.
    """

    block_cls: type[DenseBlock] = DenseBlock
    transition_cls: type[Transition] = Transition
    features_cls: type[nn.Sequential] = nn.Sequential

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory_efficient: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        block_config = _check_config(growth_rate, block_config, num_init_features, bn_size,
                                     drop_rate, num_classes, in_channels)
        self.features = self.features_cls(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2,
                                padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = self.block_cls(num_layers, num_features, bn_size, growth_rate, drop_rate,
                                   memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}",
                                         self.transition_cls(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)
