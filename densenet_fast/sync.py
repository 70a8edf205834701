"""Batch statistics synchronised across processes, with one small collective per channel group.

``nn.SyncBatchNorm`` synchronises per BN module: two collectives over all ``C`` channels a
module reads, in forward and in backward, so a dense block moves ``O(L^2 k)`` values. Here a
channel's statistics are merged once, when the channel is written, and the gradient through
them once, when its summed coefficients are applied:

- forward: each rank's per-channel ``(count, mean, M2)`` are gathered and merged with Chan's
  pairwise formula, weighting uneven batches by their counts (:meth:`StatsSync.merge`);
- backward: the statistics' gradient term is linear in every reader's ``sum(g)`` and
  ``sum(g * xhat)``, so summing the coefficients over ranks (:meth:`StatsSync.all_reduce`)
  gives the global term exactly. Parameter gradients stay local sums, for DDP to average, as
  with ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import timm_parts
from .ops import bn_backward
from .validation import is_named_type, is_type

_recorders: list[list] = []


@contextmanager
def record_collectives() -> Iterator[list]:
    """Inside this context, every collective a fused block or stem issues is appended to the
    yielded list as ``(kind, elements, bytes)``: what the traffic figures and tests count."""
    record: list = []
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def _note(kind: str, t: torch.Tensor) -> None:
    for record in _recorders:
        record.append((kind, t.numel(), t.numel() * t.element_size()))


def one_value_error(count: int, where: str) -> ValueError:
    return ValueError(
        f"Expected more than 1 value per channel when training, got {count} over all "
        f"processes at {where}: use a larger batch or image, or call .eval()")


@dataclass(frozen=True)
class StatsSync:
    """The process group a block's (or the stem's) synchronised BNs share.

    ``group`` is a ``ProcessGroup``, or None for the default group, as in
    ``nn.SyncBatchNorm(process_group=...)``.
    """

    group: object = None

    def group_name(self) -> str:
        """The group's registered name: how a ``torch.library`` op receives it."""
        return (self.group if self.group is not None else dist.group.WORLD).group_name

    @classmethod
    def named(cls, name: str) -> StatsSync | None:
        """The inverse of :meth:`group_name`; ``""`` stands for no synchronisation."""
        if not name:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return cls(_resolve_process_group(name))

    def merge(self, mean: torch.Tensor, var: torch.Tensor, count: int, where: str = ""):
        """Global ``(mean, biased var, count)`` from every rank's per-channel statistics of
        ``count`` values each: one ``all_gather`` of ``2C + 1`` values per rank.

        Chan et al.'s merge: ``mean = sum n_r mean_r / n``,
        ``M2 = sum (M2_r + n_r (mean_r - mean)^2)``, ``var = M2 / n``; no ``E[x^2] - E[x]^2``
        cancellation.
        """
        channels = mean.shape[0]
        local = torch.cat([mean.new_full((1,), float(count)), mean, var * count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        _note("all_gather", local)
        dist.all_gather(parts, local, group=self.group)
        gathered = torch.stack(parts)
        counts, means, m2s = gathered.split([1, channels, channels], dim=1)
        total = counts.sum()
        global_count = int(total.item())
        if global_count <= 1:
            raise one_value_error(global_count, where)
        global_mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
        return global_mean, m2 / total, global_count

    def all_reduce(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Sum each tensor over the ranks, in one collective: ``tensors`` concatenated."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        _note("all_reduce", flat)
        dist.all_reduce(flat, group=self.group)
        return list(flat.split([t.numel() for t in tensors]))

    def total(self, count: int) -> int:
        """``count`` summed over the ranks (the one collective of a rare pre-check)."""
        t = torch.tensor([float(count)], dtype=torch.float64)
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        _note("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def batch_norm(self, x: torch.Tensor, eps: float, weight, bias) -> torch.Tensor:
        """``x`` normalised with the batch statistics of every rank's batch, differentiably
        to any order: the sums go through ``torch.distributed.nn``'s ``all_reduce``, whose
        backward all-reduces the gradients (so the gradient of a gradient crosses the ranks
        as the gradient does). Two passes, the mean and then the squared deviations from
        it, keep the variance free of ``E[x^2] - E[x]^2`` cancellation. For the route that
        builds a graph of the gradients; every rank calls it in the same order."""
        from torch.distributed.nn.functional import all_reduce

        n, _, h, w = x.shape
        shape = (1, -1, 1, 1)
        data = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([n * h * w], device=x.device)  # int64: exact at any size
        dist.all_reduce(count, group=self.group)
        group = self.group if self.group is not None else dist.group.WORLD
        mean = all_reduce(data.sum((0, 2, 3)), group=group) / count
        centred = data - mean.view(shape)
        var = all_reduce((centred * centred).sum((0, 2, 3)), group=group) / count
        out = centred * torch.rsqrt(var + eps).view(shape) * weight.view(shape) \
            + bias.view(shape)
        return out.to(x.dtype)

    def bn_backward(self, grad, x, mean, invstd, weight, count: int):
        """The ``bn_backward`` op with statistics over every rank's ``count``
        values: ``sum(g)`` and ``sum(g * xhat)`` are summed over the ranks (one collective)
        for ``dx``; ``dweight`` and ``dbias`` are returned local."""
        dx, dweight, dbias = bn_backward(grad, x, mean, invstd, weight, False)
        stats_dtype = invstd.dtype
        total_dbias, total_dweight = self.all_reduce(dbias.to(stats_dtype),
                                                     dweight.to(stats_dtype))
        # dx += -weight * invstd / n * (sum g + xhat * sum g xhat), per channel kx * x + k0
        scale = weight.to(stats_dtype) * invstd / count
        kx = -scale * invstd * total_dweight
        k0 = scale * (mean * invstd * total_dweight - total_dbias)
        shape = (1, -1, 1, 1)
        dx = dx + torch.addcmul(k0.view(shape), x, kx.view(shape))
        return dx.to(grad.dtype), dweight, dbias


def sync_of(bn: torch.nn.Module) -> StatsSync | None:
    """The synchronisation ``bn`` asks for in this forward: a training ``nn.SyncBatchNorm``
    (or timm's ``SyncBatchNormAct``) with an initialised process group of more than one rank
    (else None: it behaves as ``BatchNorm2d``, as PyTorch's does)."""
    # Asked of every BN on every forward: the usual answer first, from the exact type.
    if not bn.training or type(bn) is torch.nn.BatchNorm2d:
        return None
    if not (is_type(bn, torch.nn.SyncBatchNorm)
            or is_named_type(bn, timm_parts.SYNC_BATCHNORM_ACT)):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group
    if dist.get_world_size(group) <= 1:
        return None
    return StatsSync(group)


def values_per_channel(merged_count: torch.Tensor | None, data: torch.Tensor) -> int:
    """Values per channel behind batch statistics of ``data``: ``merged_count`` (the CPU
    scalar a synchronised forward op returned, every rank's) where given, else ``data``'s
    own N * H * W."""
    if merged_count is not None:
        return int(merged_count)
    n, _, h, w = data.shape
    return n * h * w


def norm_backward(grad, x, mean, invstd, weight, *, batch_stats: bool,
                  sync: StatsSync | None, count: int):
    """A BN's ``(dx, dweight, dbias)``: :meth:`StatsSync.bn_backward` for a BN normalising
    with statistics merged over ``sync``'s ranks, else the ``bn_backward`` op
    (through its own batch statistics when ``batch_stats``)."""
    if batch_stats and sync is not None:
        return sync.bn_backward(grad, x, mean, invstd, weight, count)
    return bn_backward(grad, x, mean, invstd, weight, batch_stats)
