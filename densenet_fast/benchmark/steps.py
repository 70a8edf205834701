"""The two workloads every implementation is measured on."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """Forward, cross-entropy, backward and optimizer step, in training mode."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def inference_step(model: nn.Module, x: torch.Tensor) -> None:
    """One eval-mode forward without autograd."""
    model.eval()
    with torch.inference_mode():
        model(x)


WORKLOADS = ("train", "inference")
