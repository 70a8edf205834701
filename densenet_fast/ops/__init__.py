"""The fused BN-ReLU-Conv1x1 op: schema, reference kernels and BatchNorm helpers."""

from .. import backends
from . import torch_impl
from .schema import bn_relu_conv1x1, bn_relu_conv1x1_backward

torch_impl.register()
backends.activate()  # compiled kernels register against the schemas defined above

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_backward"]
