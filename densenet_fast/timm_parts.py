"""timm's DenseNet parts, recognised without importing timm.

The fused path checks module types on every forward; a timm model exists only once timm has
been imported, so its classes are looked up in ``sys.modules`` (None while timm is not
loaded) rather than imported, which would cost every densenet_fast user timm's import time.
"""

from __future__ import annotations

import sys

_NORM_ACT = "timm.layers.norm_act"
_DENSENET = "timm.models.densenet"


def _lookup(module_name: str, name: str) -> type | None:
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def batchnorm_act_class() -> type | None:
    """``timm.layers.BatchNormAct2d``: ``nn.BatchNorm2d``, then ``drop``, then ``act``."""
    return _lookup(_NORM_ACT, "BatchNormAct2d")


def sync_batchnorm_act_class() -> type | None:
    """``timm.layers.SyncBatchNormAct``: ``nn.SyncBatchNorm``, then ``drop``, then ``act``."""
    return _lookup(_NORM_ACT, "SyncBatchNormAct")


def frozen_batchnorm_act_class() -> type | None:
    """``timm.layers.FrozenBatchNormAct2d``: running statistics only, then ``drop`` and ``act``."""
    return _lookup(_NORM_ACT, "FrozenBatchNormAct2d")


def densenet_class(role: str) -> type | None:
    """timm's DenseNet class for ``role``: ``"model"``, ``"block"``, ``"layer"`` or
    ``"transition"``."""
    names = {"model": "DenseNet", "block": "DenseBlock", "layer": "DenseLayer",
             "transition": "DenseTransition"}
    return _lookup(_DENSENET, names[role])
