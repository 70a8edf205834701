"""Bring existing torchvision and timm DenseNets over to densenet_fast, sharing their
modules."""

from __future__ import annotations

import torch.nn as nn

from . import timm_parts
from .architecture import DenseBlock, DenseLayer, DenseNetBase, Transition
from .model import DenseNet, _DenseBlock, _Features, _Transition, set_recompute_bottleneck

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


def _container_classes(tv: dict[str, type]) -> dict[str, tuple[type | None, ...]]:
    """Per role, the block and transition classes whose forward densenet_fast's computes
    (torchvision's, timm's, this package's), and the layer classes it rehouses. timm's
    layers are kept as they are: timm's ``set_grad_checkpointing`` finds them by class."""
    return {"block": (tv.get("block"), timm_parts.densenet_class("block"), DenseBlock,
                      _DenseBlock),
            "layer": (tv.get("layer"), DenseLayer),
            "transition": (tv.get("transition"), timm_parts.densenet_class("transition"),
                           Transition, _Transition)}


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


def _share(model: nn.Module) -> nn.Module:
    """A new instance of ``model``'s class holding the same attributes, children, parameters,
    buffers and hooks (the same objects), in registries of its own: replacing a child of
    one leaves the other as it was."""
    twin = type(model).__new__(type(model))
    twin.__dict__.update(model.__dict__)
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        twin.__dict__[name] = type(model.__dict__[name])(model.__dict__[name])
    return twin


def _convert_block(block: nn.Module, classes: dict[str, tuple]) -> nn.Module:
    if not _standard(block, *classes["block"]):
        return block  # a block with a forward of its own runs as it is
    fast = _rehouse(block, _DenseBlock, nn.ModuleDict)
    for name, layer in block.named_children():
        if _standard(layer, *classes["layer"]):
            fast._modules[name] = _rehouse(layer, DenseLayer, nn.Module)
    return fast


def _convert_features(features: nn.Sequential, classes: dict[str, tuple]) -> _Features:
    """``features`` as densenet_fast's, its blocks and transitions rehoused (the same
    children), every other module kept."""
    if type(features) not in (nn.Sequential, _Features) or "forward" in features.__dict__:
        raise TypeError(
            f"convert() cannot keep the forward of features ({type(features).__name__}); "
            f"it expects an nn.Sequential")
    fast = _rehouse(features, _Features, nn.Sequential)
    for name, child in features.named_children():
        if isinstance(child, nn.ModuleDict):
            fast._modules[name] = _convert_block(child, classes)
        elif _standard(child, *classes["transition"]):
            fast._modules[name] = _rehouse(child, _Transition, nn.Sequential)
    return fast


def _config_check(model: nn.Module, tv: dict[str, type]) -> None:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not any(
            name.startswith("denseblock") for name, _ in features.named_children()):
        raise TypeError(
            f"convert() expects a torchvision or timm DenseNet (features.denseblock1, ...), "
            f"got {type(model).__name__}" + (
                "; for timm's features_only models, create them fused: import "
                "densenet_fast.timm, then timm.create_model('densenet121_fast', "
                "features_only=True)" if type(model).__name__.startswith("Feature") else ""))
    standard_forwards = (DenseNetBase.forward, getattr(tv.get("model"), "forward", None))
    if type(model).forward not in standard_forwards or "forward" in model.__dict__:
        raise TypeError(
            f"convert() cannot keep the forward of {type(model).__name__}: it replaces "
            f"DenseNet.forward. Convert a plain DenseNet, or assign "
            f"densenet_fast.convert(...).features to your model's features")


def convert(model: nn.Module, *, recompute_bottleneck: bool = False) -> nn.Module:
    """Return a :class:`densenet_fast.DenseNet` that shares ``model``'s modules; for a timm
    ``DenseNet``, a model of timm's class (see below).

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

    A timm ``DenseNet`` (``timm.create_model("densenet121")`` and the others timm registers,
    or a subclass) becomes a new model of its own class, with every attribute and method
    (``forward``, ``forward_features``, ``forward_head``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``pretrained_cfg``...) and state_dict key as they were; only
    ``features`` is densenet_fast's, which runs each block fused, with the stem, transitions
    and final norm where they are timm's standard ReLU ones. timm's dense layers are kept as
    they are; their ``grad_checkpointing`` makes the fused block recompute its bottlenecks.
    What the fused path does not compute (another activation, blur pooling, the deep stem)
    runs as modules, with the reason in ``model.features.fusion_report()``.
    """
    tv = _torchvision_classes()
    classes = _container_classes(tv)
    timm_model = timm_parts.densenet_class("model")
    if timm_model is not None and isinstance(model, timm_model):
        fast = _share(model)
        fast._modules["features"] = _convert_features(model.features, classes)
        set_recompute_bottleneck(fast.features, recompute_bottleneck)
        return fast
    _config_check(model, tv)
    fast = _rehouse(model, DenseNet, nn.Module)
    fast._modules["features"] = _convert_features(model.features, classes)
    fast.set_recompute_bottleneck(recompute_bottleneck)
    return fast
