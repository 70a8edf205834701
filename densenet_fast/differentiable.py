"""The block and the stem written with differentiable ATen operations.

The fused backward (:mod:`densenet_fast.block`, :mod:`densenet_fast.stem`) is first-order: it
computes gradients with kernels autograd cannot see through. When autograd asks for more (a
backward with ``create_graph=True``, a gradient penalty, a Hessian, ``vmap`` over the
backward), the graph node recomputes its forward with the functions below, from the tensors it
saved, and differentiates that instead (:mod:`densenet_fast.graph`). They compute what
torchvision's modules compute, op for op where it matters to second derivatives (batch
statistics through ``F.batch_norm``, so their gradient terms are differentiated too), and
update no running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block import dropout_scale
from .ops import lowp_conv
from .spec import BatchNormSpec, BlockSpec, StemParams, StemSpec, Tail, split_block_params


def batch_norm(x: torch.Tensor, norm: BatchNormSpec, weight, bias, sync=None) -> torch.Tensor:
    """``x`` normalised as ``norm`` normalises (batch or running statistics), differentiably
    and without touching the running statistics; with ``sync`` (a
    :class:`sync.StatsSync`), batch statistics over every rank's batch."""
    if norm.batch_stats and sync is not None:
        return sync.batch_norm(x, norm.eps, weight, bias)
    if norm.batch_stats:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=norm.eps)
    return F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, training=False,
                        eps=norm.eps)


def block_forward(first: torch.Tensor, spec: BlockSpec, params, masks) -> torch.Tensor:
    """The block's (and tail's) output from its first ``C0 + spec.backward_from * k`` buffer
    channels ``first``: the block input when ``backward_from`` is 0, else the input and the
    frozen layers' outputs, taken as constants. ``masks``: per layer, the dropout mask forward
    drew, or None."""
    layers, tail = split_block_params(spec, params)
    sync = spec.sync
    features = [first]
    for layer in range(spec.backward_from, spec.num_layers):
        p, (norm1, norm2) = layers[layer], spec.layer_norms[layer]
        prefix = torch.cat(features, 1)
        bottleneck = F.conv2d(
            F.relu(batch_norm(prefix, norm1, p.norm1_weight, p.norm1_bias, sync)),
            p.conv1_weight)
        new = F.conv2d(F.relu(batch_norm(bottleneck, norm2, p.norm2_weight, p.norm2_bias, sync)),
                       p.conv2_weight, padding=1)
        if masks[layer] is not None:
            new = new * dropout_scale(masks[layer], spec.drop_rates[layer], new.dtype)
        features.append(new)
    out = torch.cat(features, 1)
    if spec.tail is Tail.NONE:
        return out
    out = batch_norm(out, spec.tail_norm, tail.norm_weight, tail.norm_bias, sync)
    if spec.tail is Tail.NORM:
        return out
    return F.avg_pool2d(F.conv2d(F.relu(out), tail.conv_weight), kernel_size=2, stride=2)


def stem_forward(x: torch.Tensor, spec: StemSpec, params: StemParams) -> torch.Tensor:
    """``max_pool(relu(bn(conv(x))))`` as conv0, norm0, relu0 and pool0 compute it."""
    conv_out = lowp_conv.conv2d(x, params.conv_weight, *spec.conv_args())
    out = batch_norm(conv_out, spec.norm, params.norm_weight, params.norm_bias, spec.sync)
    return F.max_pool2d(F.relu(out), *spec.pool_args())
