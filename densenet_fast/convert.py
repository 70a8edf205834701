"""Bring existing torchvision DenseNets and checkpoints over to densenet_fast."""

from __future__ import annotations

import copy

import torch.nn as nn

from .model import DenseNet


def _config_of(model: nn.Module) -> dict:
    features = getattr(model, "features", None)
    blocks = [m for name, m in features.named_children() if name.startswith("denseblock")] \
        if isinstance(features, nn.Sequential) else []
    if not blocks:
        raise TypeError(
            f"convert() expects a torchvision DenseNet (features.denseblock1, ...), "
            f"got {type(model).__name__}")
    first_layer = next(iter(blocks[0].children()))
    growth_rate = first_layer.conv2.out_channels
    classifier = model.classifier
    return {
        "growth_rate": growth_rate,
        "block_config": tuple(len(list(b.children())) for b in blocks),
        "num_init_features": first_layer.norm1.num_features,
        "bn_size": first_layer.conv1.out_channels // growth_rate,
        "drop_rate": float(first_layer.drop_rate),
        "num_classes": classifier.out_features if isinstance(classifier, nn.Linear) else 1,
    }


def convert(model: nn.Module) -> DenseNet:
    """Return a :class:`densenet_fast.DenseNet` equivalent to a torchvision ``DenseNet``.

    The new model holds copies of the same parameters and buffers, on the same device and
    dtype, in the same train/eval mode, with each BatchNorm's momentum and eps and each
    parameter's ``requires_grad``. The stem (everything before ``denseblock1``) and a
    classifier that is not a plain ``nn.Linear`` are copied as modules, so common
    modifications (a 1-channel stem, a custom head) carry over. The source is not modified.
    """
    config = _config_of(model)
    fast = DenseNet(**config)
    source_features = dict(model.features.named_children())
    for name in list(fast.features._modules):
        if name.startswith("denseblock"):
            break
        if name not in source_features:
            raise TypeError(f"convert(): the source model has no features.{name}")
        fast.features._modules[name] = copy.deepcopy(source_features[name])
    if not isinstance(model.classifier, nn.Linear):
        fast.classifier = copy.deepcopy(model.classifier)
    reference = next(model.parameters())
    fast = fast.to(device=reference.device, dtype=reference.dtype)
    fast.load_state_dict(model.state_dict(), strict=True)
    fast_modules = dict(fast.named_modules())
    for name, source in model.named_modules():
        target = fast_modules.get(name)
        if isinstance(source, nn.BatchNorm2d) and isinstance(target, nn.BatchNorm2d):
            target.momentum, target.eps = source.momentum, source.eps
        if target is not None:
            target.training = source.training
    fast_params = dict(fast.named_parameters())
    for name, param in model.named_parameters():
        fast_params[name].requires_grad_(param.requires_grad)
    return fast
