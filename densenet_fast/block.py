"""The dense block as one autograd Function over a shared concatenation buffer.

Forward allocates one buffer ``[N, C0 + L*k, H, W]`` per block, copies the block input into
its first ``C0`` channels and lets layer ``l`` read the prefix ``buffer[:, :C_l]`` in place and
write its ``k`` new channels into the next slice. Each channel's batch mean and variance are
computed once, when the channel is written, and reused by every BN that reads it (the later
layers' ``norm1`` and the block's tail). Per layer, only the bottleneck (``4k`` channels, which
``norm2``'s backward needs) is kept; BN-ReLU of the prefix is recomputed in backward.

Backward allocates one gradient buffer, walks the layers in reverse and adds each layer's
input gradient into ``grad_buffer[:, :C_l]``; by the time layer ``l`` is reached, the slice of
its own output channels has received every later reader's contribution.

The tail fuses what reads the whole buffer next: a transition (BN-ReLU-Conv1x1-AvgPool) or
the final norm, so both reuse the block's statistics and nothing buffer-sized is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .ops import bn_relu_conv1x1, bn_relu_conv1x1_backward
from .ops.batchnorm import (
    StatsGradient,
    bn_apply,
    bn_backward,
    channel_stats,
    update_running_stats,
)
from .ops.schema import memory_format_of, stats_dtype_for

TAIL_NONE = "none"
TAIL_TRANSITION = "transition"
TAIL_NORM = "norm"

# norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
PARAMS_PER_LAYER = 6


@dataclass(frozen=True)
class NormState:
    """What a BN layer contributes besides its affine parameters, and how it normalises.

    ``batch_stats``: normalise with the batch's statistics (training mode, or a BN that tracks
    no running statistics); else with the running ones. ``update_running``: fold the batch's
    statistics into the running ones (training mode with running statistics).
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: float | None
    eps: float
    batch_stats: bool
    update_running: bool

    @classmethod
    def of(cls, bn: torch.nn.BatchNorm2d) -> NormState:
        tracking = bn.running_mean is not None
        return cls(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps,
                   batch_stats=bn.training or not tracking,
                   update_running=bn.training and tracking)


@dataclass(frozen=True)
class BlockSpec:
    """Static description of one block call: shapes, modes and the BN states it updates.

    ``params`` passed beside it are, per layer, ``norm1.weight, norm1.bias, conv1.weight,
    norm2.weight, norm2.bias, conv2.weight``, then the tail's: ``norm.weight, norm.bias,
    conv.weight`` for a transition, ``weight, bias`` for a final norm.
    ``drop_rates`` holds each layer's dropout probability, 0 where the layer is in eval mode.
    """

    growth_rate: int
    layer_norms: tuple[tuple[NormState, NormState], ...]
    drop_rates: tuple[float, ...]
    tail: str = TAIL_NONE
    tail_norm: NormState | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_norms)

    def prefix_norms(self):
        """Every BN that reads the buffer: each layer's ``norm1`` and the tail's norm."""
        norms = [norm1 for norm1, _ in self.layer_norms]
        if self.tail_norm is not None:
            norms.append(self.tail_norm)
        return norms

    def all_norms(self):
        return self.prefix_norms() + [norm2 for _, norm2 in self.layer_norms]


def _norm_stats(state: NormState, mean, var, channels: int, stats_dtype: torch.dtype):
    """``(mean, invstd)`` a BN reading ``channels`` channels normalises with: the slice of the
    block's batch statistics ``mean``/``var``, or the BN's running statistics."""
    if state.batch_stats:
        return mean[:channels], torch.rsqrt(var[:channels] + state.eps)
    return (state.running_mean.to(stats_dtype),
            torch.rsqrt(state.running_var.to(stats_dtype) + state.eps))


def _running_tensors_read(spec: BlockSpec):
    """Running statistics that an eval-mode BN of this block reads (again in backward)."""
    return [t for norm in spec.all_norms() if not norm.batch_stats
            for t in (norm.running_mean, norm.running_var)]


def _avg_pool2x2_backward(grad: torch.Tensor, input_shape) -> torch.Tensor:
    # avg_pool2d_backward reads only the input's shape; a zero-stride view stands in for it.
    shape_only = grad.new_empty(()).expand(input_shape)
    return torch.ops.aten.avg_pool2d_backward(grad, shape_only, [2, 2], [2, 2], [0, 0], False,
                                              True, None)


def _dropout_scale(mask: torch.Tensor, rate: float, dtype: torch.dtype) -> torch.Tensor:
    # Rebuilds F.dropout's noise tensor (mask / (1 - p) in the data's dtype) from a bool mask.
    return mask.to(dtype).div_(1 - rate)


class _Forward:
    """Runs the block forward; keeps what backward needs when asked to."""

    def __init__(self, x: torch.Tensor, spec: BlockSpec, params, keep: bool):
        n, c0, h, w = x.shape
        self.spec, self.params, self.keep = spec, params, keep
        self.c0, self.count = c0, n * h * w
        self.stats_dtype = stats_dtype_for(x.dtype)
        total = c0 + spec.num_layers * spec.growth_rate
        self.buffer = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device,
                                  memory_format=memory_format_of(x))
        self.buffer[:, :c0].copy_(x)
        # Batch statistics of every buffer channel, filled as channels are written.
        self.mean = self.var = None
        if any(norm.batch_stats for norm in spec.prefix_norms()):
            self.mean = torch.empty(total, dtype=self.stats_dtype, device=x.device)
            self.var = torch.empty_like(self.mean)
            self.mean[:c0], self.var[:c0] = channel_stats(x)
        self.bottlenecks, self.norm2_stats, self.masks = [], [], []
        self._norm2_batch = []  # (state, mean, var) for the running-stat update

    def run(self) -> torch.Tensor:
        for layer in range(self.spec.num_layers):
            self._layer(layer)
        out = self._tail()
        self._update_running_stats()
        return out

    def _layer(self, layer: int) -> None:
        spec, k = self.spec, self.spec.growth_rate
        channels = self.c0 + layer * k
        w1, b1, cw1, w2, b2, cw2 = self.params[PARAMS_PER_LAYER * layer:
                                               PARAMS_PER_LAYER * (layer + 1)]
        norm1, norm2 = spec.layer_norms[layer]
        mean1, invstd1 = _norm_stats(norm1, self.mean, self.var, channels, self.stats_dtype)
        bottleneck = bn_relu_conv1x1(self.buffer, mean1, invstd1, w1, b1, cw1)
        if norm2.batch_stats:
            mean2, var2 = channel_stats(bottleneck)
            invstd2 = torch.rsqrt(var2 + norm2.eps)
            if norm2.update_running:
                self._norm2_batch.append((norm2, mean2, var2))
        else:
            mean2, invstd2 = _norm_stats(norm2, None, None, 0, self.stats_dtype)
        act2 = bn_apply(bottleneck, mean2, invstd2, w2, b2, relu=True)
        new = F.conv2d(act2, cw2, padding=1)
        del act2
        mask = None
        rate = spec.drop_rates[layer]
        if rate > 0:
            # Same draws as F.dropout on CPU (bernoulli_ on an empty_like, then scale), so a
            # seeded run matches the unfused model mask for mask.
            noise = torch.empty_like(new).bernoulli_(1 - rate)
            noise.div_(1 - rate)
            new = new * noise
            mask = noise.ne(0)
            del noise
        self.buffer[:, channels:channels + k].copy_(new)
        if self.mean is not None:
            self.mean[channels:channels + k], self.var[channels:channels + k] = channel_stats(new)
        if self.keep:
            self.bottlenecks.append(bottleneck)
            self.norm2_stats.append((mean2, invstd2))
            self.masks.append(mask)

    def _tail(self) -> torch.Tensor:
        spec = self.spec
        if spec.tail == TAIL_NONE:
            return self.buffer
        total = self.buffer.shape[1]
        mean, invstd = _norm_stats(spec.tail_norm, self.mean, self.var, total, self.stats_dtype)
        tail_params = self.params[PARAMS_PER_LAYER * spec.num_layers:]
        if spec.tail == TAIL_TRANSITION:
            weight, bias, conv_weight = tail_params
            reduced = bn_relu_conv1x1(self.buffer, mean, invstd, weight, bias, conv_weight)
            return F.avg_pool2d(reduced, kernel_size=2, stride=2)
        weight, bias = tail_params
        return bn_apply(self.buffer, mean, invstd, weight, bias, relu=False)

    def _update_running_stats(self) -> None:
        # Done once, after every layer succeeded: a failure midway leaves them untouched.
        updates = []
        for layer, (norm1, _) in enumerate(self.spec.layer_norms):
            if norm1.update_running:
                channels = self.c0 + layer * self.spec.growth_rate
                updates.append((norm1, self.mean[:channels], self.var[:channels]))
        updates.extend(self._norm2_batch)
        tail_norm = self.spec.tail_norm
        if tail_norm is not None and tail_norm.update_running:
            updates.append((tail_norm, self.mean, self.var))
        for state, mean, var in updates:
            update_running_stats(state.running_mean, state.running_var,
                                 state.num_batches_tracked, state.momentum, mean, var,
                                 self.count)


class DenseBlockFunction(torch.autograd.Function):
    """``apply(x, spec, *params)``: one dense block (plus its tail) as a single graph node."""

    @staticmethod
    def forward(ctx, x, spec: BlockSpec, *params):
        fwd = _Forward(x, spec, params, keep=True)
        out = fwd.run()
        if out is fwd.buffer:
            # The buffer is saved for backward; the caller gets its own copy, which it may
            # modify in place (an in-place ReLU after a block, as after torchvision's cat).
            out = out.clone()
        masks = [m for m in fwd.masks if m is not None]
        flat_norm2 = [t for pair in fwd.norm2_stats for t in pair]
        stats = [fwd.mean, fwd.var] if fwd.mean is not None else []
        ctx.save_for_backward(fwd.buffer, *fwd.bottlenecks, *flat_norm2, *params, *masks, *stats)
        ctx.spec, ctx.c0, ctx.num_params = spec, x.shape[1], len(params)
        ctx.has_stats = fwd.mean is not None  # dynamo (torch 2.11) cannot trace bool(list)
        # Eval-mode BNs re-read running statistics in backward: refuse if they changed.
        ctx.running_versions = [t._version for t in _running_tensors_read(spec)]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        spec, k = ctx.spec, ctx.spec.growth_rate
        layers = spec.num_layers
        if ctx.running_versions != [t._version for t in _running_tensors_read(spec)]:
            raise RuntimeError(
                "densenet_fast: BatchNorm running statistics read by an eval-mode forward were "
                "modified in place before its backward")
        saved = iter(ctx.saved_tensors)
        buffer = next(saved)
        bottlenecks = [next(saved) for _ in range(layers)]
        norm2_stats = [(next(saved), next(saved)) for _ in range(layers)]
        params = [next(saved) for _ in range(ctx.num_params)]
        masks = [next(saved) if rate > 0 else None for rate in spec.drop_rates]
        mean, var = (next(saved), next(saved)) if ctx.has_stats else (None, None)
        stats_dtype = stats_dtype_for(buffer.dtype)
        grads = [None] * len(params)

        n, total, h, w = buffer.shape
        count = n * h * w
        # Prefix BNs add only their direct term to the gradient buffer; the term through the
        # batch statistics is summed per channel and added once, just before the layer that
        # wrote a channel reads its gradient (every reader of the channel is done by then).
        stats_term = StatsGradient(total, stats_dtype, buffer.device) if ctx.has_stats else None

        def add_stats_term(norm, mean, invstd, weight, dweight, dbias):
            if norm.batch_stats:
                stats_term.add(mean, invstd, weight, dweight, dbias, count)

        tail_at = PARAMS_PER_LAYER * layers
        if spec.tail == TAIL_NONE:
            grad_buffer = torch.empty_like(buffer).copy_(grad_out)
        else:
            tail_norm = spec.tail_norm
            tail_mean, tail_invstd = _norm_stats(tail_norm, mean, var, total, stats_dtype)
            if spec.tail == TAIL_TRANSITION:
                weight, bias, conv_weight = params[tail_at:]
                grad_reduced = _avg_pool2x2_backward(grad_out, (n, conv_weight.shape[0], h, w))
                grad_buffer = torch.zeros_like(buffer)
                grads[tail_at + 2], grads[tail_at], grads[tail_at + 1] = \
                    bn_relu_conv1x1_backward(grad_reduced, buffer, tail_mean, tail_invstd,
                                             weight, bias, conv_weight, False, grad_buffer)
                del grad_reduced
            else:
                weight, _ = params[tail_at:]
                grad_buffer, grads[tail_at], grads[tail_at + 1] = bn_backward(
                    grad_out, buffer, tail_mean, tail_invstd, weight, stats_grad=False)
            add_stats_term(tail_norm, tail_mean, tail_invstd, weight, grads[tail_at],
                              grads[tail_at + 1])

        for layer in reversed(range(layers)):
            channels = ctx.c0 + layer * k
            base = PARAMS_PER_LAYER * layer
            w1, b1, cw1, w2, b2, cw2 = params[base:base + PARAMS_PER_LAYER]
            norm1, norm2 = spec.layer_norms[layer]
            if stats_term is not None:
                stats_term.apply(grad_buffer, buffer, channels, channels + k)
            # A dense copy of the k-channel slice: convolution backward is markedly slower
            # on a strided gradient.
            grad_new = grad_buffer[:, channels:channels + k].contiguous(
                memory_format=memory_format_of(buffer))
            if masks[layer] is not None:
                grad_new = grad_new * _dropout_scale(masks[layer], spec.drop_rates[layer],
                                                     grad_new.dtype)
            bottleneck = bottlenecks[layer]
            mean2, invstd2 = norm2_stats[layer]
            act2 = bn_apply(bottleneck, mean2, invstd2, w2, b2, relu=True)
            grad_act2, grads[base + 5], _ = torch.ops.aten.convolution_backward(
                grad_new, act2, cw2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, True, False])
            del grad_new
            torch.ops.aten.threshold_backward.grad_input(grad_act2, act2, 0, grad_input=grad_act2)
            del act2
            grad_bottleneck, grads[base + 3], grads[base + 4] = bn_backward(
                grad_act2, bottleneck, mean2, invstd2, w2, stats_grad=norm2.batch_stats)
            del grad_act2
            mean1, invstd1 = _norm_stats(norm1, mean, var, channels, stats_dtype)
            grads[base + 2], grads[base], grads[base + 1] = bn_relu_conv1x1_backward(
                grad_bottleneck, buffer, mean1, invstd1, w1, b1, cw1, False, grad_buffer)
            del grad_bottleneck
            add_stats_term(norm1, mean1, invstd1, w1, grads[base], grads[base + 1])
        if stats_term is not None:
            stats_term.apply(grad_buffer, buffer, 0, ctx.c0)
        return (grad_buffer[:, :ctx.c0], None, *grads)


def dense_block(x: torch.Tensor, spec: BlockSpec, params) -> torch.Tensor:
    """Run one block (and its tail). Builds a graph node only when a gradient is needed;
    otherwise nothing is kept and each bottleneck is freed as soon as it is used."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in params))
    if needs_grad:
        return DenseBlockFunction.apply(x, spec, *params)
    return _Forward(x, spec, params, keep=False).run()
