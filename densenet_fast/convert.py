"""Bring existing torchvision DenseNets over to densenet_fast, sharing their modules."""

from __future__ import annotations

import torch.nn as nn

from .architecture import DenseBlock, DenseLayer, DenseNetBase, Transition
from .model import DenseNet, _DenseBlock, _Features, _Transition

# Everything a module keeps about its hooks; shared, so that hooks registered on the source
# model fire (and their handles remove them) on the converted one too.
_HOOK_ATTRIBUTES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _torchvision_classes() -> dict[str, type]:
    try:
        from torchvision.models import densenet
    except ImportError:
        return {}
    return {"model": densenet.DenseNet, "block": densenet._DenseBlock,
            "layer": densenet._DenseLayer, "transition": densenet._Transition}


def _standard(module: nn.Module, *classes: type | None) -> bool:
    """Of exactly one of ``classes``, with no forward replaced on the instance."""
    return type(module) in classes and "forward" not in module.__dict__


def _rehouse(source: nn.Module, cls: type[nn.Module], base: type[nn.Module]) -> nn.Module:
    """A ``cls`` holding ``source``'s children, attributes and hooks (the same objects)."""
    target = cls.__new__(cls)
    base.__init__(target)
    for name in _HOOK_ATTRIBUTES:
        if name in source.__dict__:
            setattr(target, name, source.__dict__[name])
    for name, value in source.__dict__.items():
        if not name.startswith("_") or name == "training":
            setattr(target, name, value)
    for name, child in source.named_children():
        target.add_module(name, child)
    return target


def _convert_block(block: nn.Module, tv: dict[str, type]) -> nn.Module:
    if not _standard(block, tv.get("block"), DenseBlock, _DenseBlock):
        return block  # a block with a forward of its own runs as it is
    fast = _rehouse(block, _DenseBlock, nn.ModuleDict)
    for name, layer in block.named_children():
        if _standard(layer, tv.get("layer"), DenseLayer):
            fast._modules[name] = _rehouse(layer, DenseLayer, nn.Module)
    return fast


def _config_check(model: nn.Module, tv: dict[str, type]) -> None:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not any(
            name.startswith("denseblock") for name, _ in features.named_children()):
        raise TypeError(
            f"convert() expects a torchvision DenseNet (features.denseblock1, ...), "
            f"got {type(model).__name__}")
    standard_forwards = (DenseNetBase.forward, getattr(tv.get("model"), "forward", None))
    if type(model).forward not in standard_forwards or "forward" in model.__dict__:
        raise TypeError(
            f"convert() cannot keep the forward of {type(model).__name__}: it replaces "
            f"DenseNet.forward. Convert a plain DenseNet, or assign "
            f"densenet_fast.convert(...).features to your model's features")
    if type(features) not in (nn.Sequential, _Features) or "forward" in features.__dict__:
        raise TypeError(
            f"convert() cannot keep the forward of features ({type(features).__name__}); "
            f"it expects an nn.Sequential")


def convert(model: nn.Module, *, recompute_bottleneck: bool = False) -> DenseNet:
    """Return a :class:`densenet_fast.DenseNet` that shares ``model``'s modules.

    ``model`` is a torchvision ``DenseNet`` (or one of this package's). As with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, the new model holds the same parameter and
    buffer tensors, so an optimizer built before ``convert`` keeps training it; every
    convolution, BatchNorm, stem module and classifier is the source's own object (its
    hooks, parametrizations, ``requires_grad`` flags, momentum, eps, device, dtype and mode
    come along). The containers (blocks, layers, transitions) are replaced by densenet_fast's
    and share the source's hook registries. A block, layer or transition of a custom class
    is kept as it is and runs through its own forward; a model whose ``DenseNet.forward``
    is replaced is refused, since converting it would change what it computes.
    ``recompute_bottleneck`` is set on every converted block and the stem
    (:meth:`DenseNet.set_recompute_bottleneck`).
    """
    tv = _torchvision_classes()
    _config_check(model, tv)
    fast = _rehouse(model, DenseNet, nn.Module)
    features = _rehouse(model.features, _Features, nn.Sequential)
    for name, child in model.features.named_children():
        if isinstance(child, nn.ModuleDict):
            features._modules[name] = _convert_block(child, tv)
        elif _standard(child, tv.get("transition"), Transition, _Transition):
            features._modules[name] = _rehouse(child, _Transition, nn.Sequential)
    fast._modules["features"] = features
    fast.set_recompute_bottleneck(recompute_bottleneck)
    return fast
