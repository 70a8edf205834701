"""State-dict compatibility with torchvision checkpoints, old and new."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

# Old torchvision checkpoints name layer modules "norm.1", "conv.2", ...: '.'s are no longer
# allowed in module names, so these keys map to "norm1", "conv2", ... (Such checkpoints
# predate num_batches_tracked; BatchNorm then starts it at 0.)
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def upgrade_legacy_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Return a copy of ``state_dict`` with legacy torchvision keys (``denselayer1.norm.1.weight``)
    renamed to current ones (``denselayer1.norm1.weight``); other keys are kept as they are."""
    upgraded = {}
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        upgraded[match.group(1) + match.group(2) if match else key] = value
    return upgraded


def load_torchvision_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                                strict: bool = True):
    """``model.load_state_dict`` that also accepts legacy torchvision key names."""
    return model.load_state_dict(upgrade_legacy_state_dict(state_dict), strict=strict)
