"""Training recipes of ``densenet-fast train``: the seed article's, and the default one.

The seed trains with a constant Adam learning rate on the raw digits and evaluates with the
running statistics as they are; on the 4,000 embedded digits that ends between 93% and 95%,
swinging from epoch to epoch. The default recipe adds what a 4,000-image training set
needs: small random affine distortions of each digit, a one-cycle learning rate (warm up,
then cosine decay to zero, so the last epoch is a settled one) with decoupled weight decay,
and running statistics recomputed over the training set before each evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    """How to train: ``schedule`` is ``"constant"`` or ``"one-cycle"``; ``augment``: random
    affine distortions; ``refresh_statistics``: recompute BN running statistics over the
    training set before evaluating."""

    image_size: int
    epochs: int
    lr: float
    schedule: str
    weight_decay: float
    augment: bool
    refresh_statistics: bool


RECIPES = {
    # The seed article's exact recipe: 64x64, 5 epochs, Adam 1e-3.
    "seed": Recipe(image_size=64, epochs=5, lr=1e-3, schedule="constant", weight_decay=0.0,
                   augment=False, refresh_statistics=False),
    "default": Recipe(image_size=32, epochs=4, lr=3e-3, schedule="one-cycle",
                      weight_decay=1e-4, augment=True, refresh_statistics=True),
}

WARMUP_FRACTION = 0.15


def learning_rate(recipe: Recipe, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``total_steps``: constant, or a
    linear warm-up over the first 15% followed by a cosine decay to zero. A function of the
    step alone, so a resumed run continues the schedule without saving its state."""
    if recipe.schedule == "constant":
        return recipe.lr
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(recipe: Recipe, parameters) -> torch.optim.Optimizer:
    """Adam, as the seed; AdamW when the recipe decays weights."""
    if recipe.weight_decay:
        return torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(parameters, lr=recipe.lr)


def distort(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated by up to 10 degrees, scaled by 0.9 to 1.1 and shifted by up to 8%
    of its size, drawn from ``generator``; the border (background) fills the new pixels."""
    n = x.shape[0]
    draw = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = draw[:, 0] * math.radians(10)
    scale = 1 + 0.1 * draw[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.08 * draw[:, 2]], 1),
                         torch.stack([sin, cos, 0.08 * draw[:, 3]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False).contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous() else torch.contiguous_format)


@torch.no_grad()
def refresh_running_statistics(model: nn.Module, x: torch.Tensor, batch_size: int,
                               autocast=None) -> None:
    """Replace every BN's running statistics by the average over ``x`` (one pass in
    training mode, ``momentum=None``), as SWA's ``update_bn`` does: the statistics of the
    final weights instead of an average over the weights the epoch went through."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
                model(x[start:start + batch_size])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
