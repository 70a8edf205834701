"""timm's DenseNet parts, recognised without importing timm.

The fused path checks module types on every forward, also while ``torch.compile`` traces it.
timm (or torchvision) need not be imported, and importing it would cost every densenet_fast
user its import time; looking its module up in ``sys.modules`` would make dynamo guard on
the number of loaded modules (a missing key is guarded by the dict's length), which the
first compilation itself changes, so every step would recompile. A module's class is
instead recognised by name among its own type's bases (:func:`validation.is_named_type`):
such a module exists only where its library is loaded.
"""

from __future__ import annotations

import sys

# timm's BatchNorm-with-activation modules: the BatchNorm, then their `drop` and `act` children
BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"
SYNC_BATCHNORM_ACT = "timm.layers.norm_act.SyncBatchNormAct"
FROZEN_BATCHNORM_ACT = "timm.layers.norm_act.FrozenBatchNormAct2d"
NORM_ACT = (BATCHNORM_ACT, SYNC_BATCHNORM_ACT, FROZEN_BATCHNORM_ACT)

DENSE_LAYER = "timm.models.densenet.DenseLayer"

_DENSENET = "timm.models.densenet"
_ROLES = {"model": "DenseNet", "block": "DenseBlock", "layer": "DenseLayer",
          "transition": "DenseTransition"}


def densenet_class(role: str) -> type | None:
    """timm's DenseNet class for ``role`` (``"model"``, ``"block"``, ``"layer"``,
    ``"transition"``), or None while timm's DenseNet module is not loaded. For
    :func:`densenet_fast.convert`, which is not traced."""
    module = sys.modules.get(_DENSENET)
    return getattr(module, _ROLES[role], None) if module is not None else None
