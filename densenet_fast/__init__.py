"""densenet_fast: a memory-efficient, drop-in DenseNet for PyTorch.

Replace ``torchvision.models.densenet121(...)`` with ``densenet_fast.densenet121(...)`` (or an
existing model with ``densenet_fast.convert(model)``): same state_dict, same outputs,
gradients and BatchNorm statistics, with activation memory linear in depth.
"""

from . import backends, ops  # noqa: F401  (ops: the fused op and its reference kernels)
from .backends import backend_info
from .convert import convert
from .fusion import unfused
from .model import (
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    fusion_report,
)
from .reference import NaiveDenseNet
from .state_dict import load_torchvision_state_dict, upgrade_legacy_state_dict

backends.activate()  # the compiled kernels register against the op's schemas

__version__ = "0.1.0"

__all__ = [
    "DenseNet",
    "NaiveDenseNet",
    "backend_info",
    "convert",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "fusion_report",
    "load_torchvision_state_dict",
    "unfused",
    "upgrade_legacy_state_dict",
]
