"""The memory-efficient DenseNet: torchvision's modules and names, fused block forward.

``features`` is an ``nn.Sequential`` whose forward runs each dense block, together with the
transition or final norm that follows it, as one autograd node over a shared buffer
(:mod:`densenet_fast.block`). Every module still works on its own with torchvision's
semantics (a block returns its concatenated features), so code that slices or hooks
``model.features`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from . import backends
from .architecture import CONFIGS, DenseBlock, DenseNetBase, Transition
from .block import TAIL_NONE, TAIL_NORM, TAIL_TRANSITION, BlockSpec, NormState, dense_block
from .state_dict import load_torchvision_state_dict
from .validation import check_input_tensor, check_spatial_plan


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on (BN parameters and statistics stay float32),
    else the parameters' dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _is_standard_transition(t: nn.Module) -> bool:
    pool = getattr(t, "pool", None)
    conv = getattr(t, "conv", None)
    return (isinstance(t, Transition) and isinstance(getattr(t, "norm", None), nn.BatchNorm2d)
            and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.bias is None and conv.groups == 1
            and isinstance(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and not pool.ceil_mode)


def _check_norm(bn: nn.Module, name: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
        raise NotImplementedError(
            f"densenet_fast fuses affine nn.BatchNorm2d layers only; {name} is {bn!r}")


def run_block(block: DenseBlock, x: torch.Tensor, tail: nn.Module | None) -> torch.Tensor:
    """Run ``block`` and, fused with it, ``tail`` (a transition, a final BatchNorm2d or None)."""
    backends.active_backend(x.device.type)  # a forced, unavailable backend fails here
    layers = list(block.values())
    norms, params = [], []
    for i, layer in enumerate(layers):
        _check_norm(layer.norm1, f"denselayer{i + 1}.norm1")
        _check_norm(layer.norm2, f"denselayer{i + 1}.norm2")
        norms.append((NormState.of(layer.norm1), NormState.of(layer.norm2)))
        params += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                   layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    conv_params = {id(layer.conv1.weight) for layer in layers} | {
        id(layer.conv2.weight) for layer in layers}
    if tail is None:
        kind, tail_norm = TAIL_NONE, None
    elif isinstance(tail, nn.BatchNorm2d):
        _check_norm(tail, "the final norm")
        kind, tail_norm = TAIL_NORM, NormState.of(tail)
        params += [tail.weight, tail.bias]
    else:
        _check_norm(tail.norm, "transition.norm")
        kind, tail_norm = TAIL_TRANSITION, NormState.of(tail.norm)
        params += [tail.norm.weight, tail.norm.bias, tail.conv.weight]
        conv_params.add(id(tail.conv.weight))
    spec = BlockSpec(
        growth_rate=layers[0].conv2.out_channels,
        layer_norms=tuple(norms),
        drop_rates=tuple(layer.drop_rate if layer.training else 0.0 for layer in layers),
        tail=kind,
        tail_norm=tail_norm,
    )
    dtype = _compute_dtype(x, layers[0].conv1.weight)
    autocast_off = (torch.autocast(x.device.type, enabled=False)
                    if torch.is_autocast_enabled(x.device.type) else nullcontext())
    with autocast_off:
        # Casts are graph nodes, so gradients reach the float32 master weights under autocast.
        params = [p.to(dtype) if id(p) in conv_params else p for p in params]
        return dense_block(x.to(dtype), spec, params)


class _DenseBlock(DenseBlock):
    """A dense block computed over one shared buffer; returns all its channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.denselayer1
        check_input_tensor(x, expected_channels=first.norm1.num_features,
                           reference=first.conv1.weight, where=type(self).__name__)
        check_spatial_plan([("block", self)], x, _DenseBlock, _Transition)
        return run_block(self, x, None)


class _Transition(Transition):
    """Transition between blocks; fused into the preceding block inside ``features``."""


class _Features(nn.Sequential):
    """``model.features``: stem, then each block fused with the transition or norm after it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        named = list(self.named_children())
        if named and isinstance(named[0][1], nn.Conv2d):
            conv0 = named[0][1]
            check_input_tensor(x, expected_channels=conv0.in_channels, reference=conv0.weight,
                               where="DenseNet")
        check_spatial_plan([(f"features.{name}", m) for name, m in named], x, _DenseBlock,
                           _Transition)
        i = 0
        while i < len(named):
            module = named[i][1]
            follower = named[i + 1][1] if i + 1 < len(named) else None
            if isinstance(module, _DenseBlock):
                fusable = type(follower) is nn.BatchNorm2d or (
                    isinstance(follower, _Transition) and _is_standard_transition(follower))
                if fusable and follower.training == module.training:
                    x = run_block(module, x, follower)
                    i += 2
                    continue
                x = run_block(module, x, None)
            else:
                x = module(x)
            i += 1
        return x


class DenseNet(DenseNetBase):
    r"""Memory-efficient DenseNet-BC, a drop-in replacement for torchvision's ``DenseNet``.

    Same constructor (plus ``in_channels``), module names, state_dict keys and numerics as
    ``torchvision.models.DenseNet``; activation memory is linear in depth. Each dense block
    writes into one preallocated buffer, computes each channel's batch statistics once and
    recomputes BN-ReLU in backward instead of storing it. ``memory_efficient`` is accepted for
    compatibility and has no effect: this model is always memory-efficient, with no
    checkpointing, so BatchNorm running statistics are updated exactly once per forward.

    Args:
        growth_rate: channels each layer adds (``k``).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (``bn_size * k`` channels before the 3x3 conv).
        drop_rate: dropout probability on each layer's new features (training only).
        num_classes: classifier outputs.
        memory_efficient: ignored (see above).
        in_channels: image channels (3 for RGB, 1 for MNIST).
    """

    block_cls = _DenseBlock
    transition_cls = _Transition
    features_cls = _Features

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory_efficient: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__(growth_rate, block_config, num_init_features, bn_size, drop_rate,
                         num_classes, memory_efficient, in_channels)


def _resolve_weights(arch: str, weights):
    if isinstance(weights, str):
        from torchvision.models import get_weight  # only needed for names like "DEFAULT"

        enum = {"densenet121": "DenseNet121_Weights", "densenet161": "DenseNet161_Weights",
                "densenet169": "DenseNet169_Weights", "densenet201": "DenseNet201_Weights"}
        return get_weight(f"{enum[arch]}.{weights}")
    return weights


def _densenet(arch: str, weights, progress: bool, **kwargs: Any) -> DenseNet:
    growth_rate, block_config, num_init_features = CONFIGS[arch]
    weights = _resolve_weights(arch, weights)
    if weights is not None:
        categories = len(weights.meta["categories"])
        if kwargs.setdefault("num_classes", categories) != categories:
            raise ValueError(f"num_classes={kwargs['num_classes']} does not match the "
                             f"{categories} categories of {weights}")
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        load_torchvision_state_dict(
            model, weights.get_state_dict(progress=progress, check_hash=True))
    return model


def densenet121(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16), as ``torchvision.models.densenet121``.

    ``weights``: a torchvision ``DenseNet121_Weights`` value (or its name, e.g. ``"DEFAULT"``)
    whose state_dict is loaded, legacy key names included; other keyword arguments go to
    :class:`DenseNet`.
    """
    return _densenet("densenet121", weights, progress, **kwargs)


def densenet161(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels); see :func:`densenet121`."""
    return _densenet("densenet161", weights, progress, **kwargs)


def densenet169(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); see :func:`densenet121`."""
    return _densenet("densenet169", weights, progress, **kwargs)


def densenet201(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); see :func:`densenet121`."""
    return _densenet("densenet201", weights, progress, **kwargs)
