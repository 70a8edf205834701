"""The two workloads every implementation is measured on."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, autocast: torch.dtype | None = None) -> None:
    """Forward, cross-entropy, backward and optimizer step, in training mode; the forward
    under ``torch.autocast`` to ``autocast`` when given."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x, autocast):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()


def inference_step(model: nn.Module, x: torch.Tensor,
                   autocast: torch.dtype | None = None) -> None:
    """One eval-mode forward without autograd."""
    model.eval()
    with torch.inference_mode(), _autocast(x, autocast):
        model(x)

