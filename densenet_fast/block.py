"""The dense block's computation over one shared concatenation buffer.

Forward allocates one buffer ``[N, C0 + L*k, H, W]`` per block, copies the block input into
its first ``C0`` channels and lets layer ``l`` read the prefix ``buffer[:, :C_l]`` in place and
write its ``k`` new channels into the next slice. Each channel's batch mean and variance are
computed once, when the channel is written, and reused by every BN that reads it (the later
layers' ``norm1`` and the block's tail). Per layer, only the bottleneck (``4k`` channels, which
``norm2``'s backward needs) is kept; BN-ReLU of the prefix is recomputed in backward. With
``recompute_bottleneck`` the bottleneck is not kept either: backward recomputes it from the
buffer (one more BN-ReLU-Conv1x1 per layer), and per layer only statistics remain.

Backward allocates one gradient buffer, walks the layers in reverse and adds each layer's
input gradient into ``grad_buffer[:, :C_l]``; by the time layer ``l`` is reached, the slice of
its own output channels has received every later reader's contribution. The block input's
gradient is returned as a copy of its ``C0`` channels, so that the gradient buffer is freed
before the previous block's backward runs.

The tail fuses what reads the whole buffer next: a transition (BN-ReLU-Conv1x1-AvgPool) or
the final norm, so both reuse the block's statistics and nothing buffer-sized is stored twice.

:class:`BlockForward` and :class:`BlockBackward` are the computation, :class:`BlockSaved` what
crosses from one to the other; :mod:`densenet_fast.graph` runs them as one autograd node (and
as ops that ``torch.compile`` keeps opaque). What a call computes is its
:class:`spec.BlockSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import (
    add_stats_coefficients,
    add_stats_term,
    bn_backward,
    bn_relu,
    bn_relu_conv1x1,
    bn_relu_conv1x1_backward,
    bn_relu_inplace,
    channel_stats,
    lowp_conv,
)
from .ops.batchnorm import bn_apply, stats_scratch
from .ops.formats import cast, memory_format_of, stats_dtype_for
from .spec import (
    BatchNormSpec,
    BlockSpec,
    LayerParams,
    Tail,
    TailParams,
    flat_block_params,
    split_block_params,
)
from .sync import norm_backward, values_per_channel


def running_mean_invstd(state: BatchNormSpec, stats_dtype: torch.dtype):
    """``(mean, invstd)`` of a BN's running statistics."""
    return _running_mean_invstds([state], state.eps, stats_dtype)[0]


def running_mean_invstds(norms: list, stats_dtype: torch.dtype) -> list:
    """Per BN of ``norms`` (None entries allowed), ``(mean, invstd)`` of its running
    statistics in ``stats_dtype``, ``invstd = rsqrt(running_var + eps)``, where it normalises
    with them; None where it does not.

    Computed for all of them at once, per ``eps`` (:func:`_running_mean_invstds`). An
    eval-mode block of ``L`` layers reads ``2L + 1`` BNs' running statistics; one BN at a
    time, that was ``4L`` small operations (casts that change nothing included): a sixth of a
    batch-1 inference forward of a small DenseNet on a CPU, and as many launches on a GPU."""
    result = [None] * len(norms)
    by_eps: dict[float, list[int]] = {}
    for i, norm in enumerate(norms):
        if norm is not None and not norm.batch_stats:
            by_eps.setdefault(norm.eps, []).append(i)
    for eps, members in by_eps.items():
        pairs = _running_mean_invstds([norms[i] for i in members], eps, stats_dtype)
        for i, pair in zip(members, pairs, strict=True):
            result[i] = pair
    return result


def _running_mean_invstds(norms: list, eps: float, stats_dtype: torch.dtype) -> list:
    """``(mean, invstd)`` of each BN's running statistics, all with ``eps``: their variances
    concatenated, one ``add_`` and one ``rsqrt_`` (per element the arithmetic of each BN
    alone), each ``invstd`` a view of the result."""
    variances = [norm.running_var for norm in norms]
    invstd = torch.cat(variances).to(stats_dtype).add_(eps).rsqrt_()
    means = (norm.running_mean for norm in norms)
    return [(cast(mean, stats_dtype), part)
            for mean, part in zip(means, invstd.split([v.shape[0] for v in variances]),
                                  strict=True)]


class _RunningStats:
    """``(mean, invstd)`` of each BN of a block call that normalises with its running
    statistics (None for the others), computed once per call (:func:`running_mean_invstds`):
    ``norm1``, ``norm2`` per layer, ``tail``."""

    def __init__(self, spec: BlockSpec, stats_dtype: torch.dtype):
        norms = [norm for pair in spec.layer_norms for norm in pair] + [spec.tail_norm]
        pairs = running_mean_invstds(norms, stats_dtype)
        self.norm1, self.norm2, self.tail = pairs[0:-1:2], pairs[1:-1:2], pairs[-1]


def _prefix_stats(state: BatchNormSpec, mean, var, channels: int, running,
                  invstds: dict | None = None):
    """``(mean, invstd)`` a BN reading the first ``channels`` buffer channels normalises
    with: the block's batch statistics of those channels, or ``running``, its running
    statistics' (:class:`_RunningStats`). ``invstds`` (backward, where ``var`` is complete):
    ``rsqrt(var + eps)`` of every channel per ``eps``, computed once and sliced for each
    reader."""
    if not state.batch_stats:
        return running
    if invstds is None:
        return mean[:channels], torch.rsqrt(var[:channels] + state.eps)
    if state.eps not in invstds:
        invstds[state.eps] = torch.rsqrt(var + state.eps)
    return mean[:channels], invstds[state.eps][:channels]


def _avg_pool2x2_backward(grad: torch.Tensor, input_shape,
                          memory_format: torch.memory_format) -> torch.Tensor:
    """Gradient of ``avg_pool2d(x, 2)`` (floor mode) at ``x`` of ``input_shape``, laid out in
    ``memory_format``: each input pixel of a 2x2 window gets a quarter of the window's
    gradient (exact, as ``avg_pool2d_backward``'s division by 4), a last odd row or column
    none. Written here because ``avg_pool2d_backward`` lays its result out as NCHW unless
    given an input in channels-last, which the block does not keep, and the fused backward
    reads it fastest in the buffer's layout (the Triton kernels without a division per
    pixel)."""
    n, c, h, w = input_shape
    out = torch.empty(input_shape, dtype=grad.dtype, device=grad.device,
                      memory_format=memory_format).zero_()
    ho, wo = h // 2, w // 2
    windows = out[:, :, :2 * ho, :2 * wo].unflatten(3, (wo, 2)).unflatten(2, (ho, 2))
    windows.copy_((grad * 0.25)[:, :, :, None, :, None].expand_as(windows))
    return out


def dropout_scale(mask: torch.Tensor, rate: float, dtype: torch.dtype) -> torch.Tensor:
    # Rebuilds F.dropout's noise tensor (mask / (1 - p) in the data's dtype) from a bool mask;
    # at p = 1 F.dropout multiplies by a zero instead (mask / 0 would be NaN where it is 0).
    if rate >= 1:
        return torch.zeros((), dtype=dtype, device=mask.device)
    return mask.to(dtype).div_(1 - rate)


class StatsGradient:
    """The gradient through the buffer's batch statistics, summed per channel over every BN
    that read it: the coefficients ``kx``, ``k0`` of the affine map ``kx * x + k0`` each
    reader adds (the ``add_stats_coefficients`` op), applied once per channel by the
    ``add_stats_term`` op just before the layer that wrote the channel reads its gradient."""

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device):
        self.kx, self.k0 = torch.zeros((2, channels), dtype=dtype, device=device)

    def add(self, mean, invstd, weight, dweight, dbias, count: int) -> None:
        """Add one BN's term; it read the first ``len(mean)`` channels."""
        channels = mean.shape[0]
        add_stats_coefficients(self.kx[:channels], self.k0[:channels], mean, invstd, weight,
                               dweight, dbias, count)


class BlockForward:
    """Runs the block forward; keeps what backward needs when asked to. Convolution weights
    may come in another dtype than the input's (a forward without a graph gets autocast's
    float32 masters): each is cast as its layer runs, so that one layer's cast weights are
    alive at a time, not the block's."""

    def __init__(self, x: torch.Tensor, spec: BlockSpec, params, keep: bool):
        n, c0, h, w = x.shape
        self.spec, self.keep = spec, keep
        self.layer_params, self.tail_params = split_block_params(spec, params)
        self.c0, self.count = c0, n * h * w  # over every rank once statistics are merged
        self.stats_dtype = stats_dtype_for(x.dtype)
        self.running = _RunningStats(spec, self.stats_dtype)
        total = c0 + spec.num_layers * spec.growth_rate
        self.buffer = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device,
                                  memory_format=memory_format_of(x))
        self.buffer[:, :c0].copy_(x)
        self.stats_scratch = None  # for every _stats call of the block: see channel_stats
        if any(norm.batch_stats for norm in spec.norms()):
            widest = max([total] + [p.conv1_weight.shape[0] for p in self.layer_params])
            self.stats_scratch = stats_scratch(widest, x)
        # Batch statistics of every buffer channel, filled as channels are written.
        self.mean = self.var = None
        if spec.buffer_stats():
            self.mean = torch.empty(total, dtype=self.stats_dtype, device=x.device)
            self.var = torch.empty_like(self.mean)
            self._store_stats(0, c0, self._stats(x, "the block's input"))
        self.bottlenecks, self.masks = [], []  # per layer, None where not kept
        self.norm2_batch = []  # per layer, norm2's batch (mean, var), or None (running stats)

    def _stats(self, t: torch.Tensor, where: str):
        """Per-channel ``(mean, biased var)`` of ``t``: this batch's, or every rank's."""
        mean, var = channel_stats(t, self.stats_scratch)
        if self.spec.sync is None:
            return mean, var
        n, _, h, w = t.shape
        mean, var, self.count = self.spec.sync.merge(mean, var, n * h * w, where)
        return mean, var

    def _store_stats(self, start: int, stop: int, stats) -> None:
        """Keep ``(mean, var)`` as the statistics of buffer channels ``start:stop``: one
        ``_foreach`` copy (one launch on a GPU) instead of two."""
        torch._foreach_copy_([self.mean[start:stop], self.var[start:stop]], list(stats))

    def run(self) -> torch.Tensor:
        """The block's output; the running statistics are left to
        :meth:`running_stats_updates`."""
        for layer in range(self.spec.num_layers):
            self._layer(layer)
        return self._tail()

    def running_stats_updates(self) -> list:
        return running_stats_updates(self.spec, self.c0, self.mean, self.var, self.norm2_batch)

    def _layer(self, layer: int) -> None:
        spec, k = self.spec, self.spec.growth_rate
        channels = self.c0 + layer * k
        p = self.layer_params[layer]
        norm1, norm2 = spec.layer_norms[layer]
        mean1, invstd1 = _prefix_stats(norm1, self.mean, self.var, channels,
                                       self.running.norm1[layer])
        dtype = self.buffer.dtype
        bottleneck = bn_relu_conv1x1(self.buffer, mean1, invstd1, p.norm1_weight, p.norm1_bias,
                                     cast(p.conv1_weight, dtype))
        if norm2.batch_stats:
            mean2, var2 = self._stats(bottleneck, f"layer {layer + 1}'s norm2")
            self.norm2_batch.append((mean2, var2))
        else:
            self.norm2_batch.append(None)
        mean2, invstd2 = _norm2_stats(norm2, self.norm2_batch[-1], self.running.norm2[layer])
        kept = self.keep and spec.keeps_bottleneck(layer)
        if self.keep:
            self.bottlenecks.append(bottleneck if kept else None)
        act_dtype = lowp_conv.compute_dtype(bottleneck)
        if kept or act_dtype != bottleneck.dtype:
            act2 = bn_relu(bottleneck, mean2, invstd2, p.norm2_weight, p.norm2_bias, act_dtype)
        else:  # nothing reads the bottleneck again: normalise it where it lies
            bn_relu_inplace(bottleneck, mean2, invstd2, p.norm2_weight, p.norm2_bias)
            act2 = bottleneck
        del bottleneck  # kept above if backward needs it; else gone, or act2, by the convolution
        new = lowp_conv.conv2d(act2, cast(p.conv2_weight, dtype), padding=(1, 1))
        del act2
        mask = None
        rate = spec.drop_rates[layer]
        if rate >= 1:
            # F.dropout at p = 1: a product with a zero, no draws (NaN stays NaN).
            mask = torch.zeros_like(new, dtype=torch.bool)
            new = new * dropout_scale(mask, rate, new.dtype)
        elif rate > 0:
            # Same draws as F.dropout on CPU (bernoulli_ on an empty_like, then scale), so a
            # seeded run matches the unfused model mask for mask.
            layout = torch.contiguous_format if spec.masks_nchw else torch.preserve_format
            noise = torch.empty_like(new, memory_format=layout).bernoulli_(1 - rate)
            noise.div_(1 - rate)
            new = new * noise
            mask = noise.ne(0)
            del noise
        self.buffer[:, channels:channels + k].copy_(new)
        if self.mean is not None:
            self._store_stats(channels, channels + k,
                              self._stats(new, f"layer {layer + 1}'s new channels"))
        if self.keep:
            self.masks.append(mask if spec.keeps_mask(layer) else None)

    def _tail(self) -> torch.Tensor:
        spec, p = self.spec, self.tail_params
        if spec.tail is Tail.NONE:
            return self.buffer
        total = self.buffer.shape[1]
        mean, invstd = _prefix_stats(spec.tail_norm, self.mean, self.var, total,
                                     self.running.tail)
        if spec.tail is Tail.TRANSITION:
            reduced = bn_relu_conv1x1(self.buffer, mean, invstd, p.norm_weight, p.norm_bias,
                                      cast(p.conv_weight, self.buffer.dtype))
            return F.avg_pool2d(reduced, kernel_size=2, stride=2)
        return bn_apply(self.buffer, mean, invstd, p.norm_weight, p.norm_bias, relu=False)


def running_stats_updates(spec: BlockSpec, c0: int, mean, var, norm2_batch) -> list:
    """``(BatchNormSpec, batch mean, batch var)`` for every BN of the block that updates running
    statistics: each ``norm1`` and the tail's norm from the buffer's statistics (of the
    channels they read), each ``norm2`` from its own."""
    updates = []
    for layer, (norm1, norm2) in enumerate(spec.layer_norms):
        if norm1.update_running_stats:
            channels = c0 + layer * spec.growth_rate
            updates.append((norm1, mean[:channels], var[:channels]))
        if norm2.update_running_stats:
            updates.append((norm2, *norm2_batch[layer]))
    if spec.tail_norm is not None and spec.tail_norm.update_running_stats:
        updates.append((spec.tail_norm, mean, var))
    return updates


def _norm2_stats(norm2: BatchNormSpec, batch, running, invstd=None):
    """``(mean, invstd)`` ``norm2`` normalises with: from its batch ``(mean, var)`` (with
    ``invstd``, that variance's, already computed: see :func:`_norm2_invstds`), or
    ``running``, its running statistics' (:class:`_RunningStats`), when ``batch`` is None."""
    if batch is None:
        return running
    mean, var = batch
    return mean, torch.rsqrt(var + norm2.eps) if invstd is None else invstd


def _norm2_invstds(spec: BlockSpec, norm2_batch) -> list:
    """Per layer, ``rsqrt(var + eps)`` of norm2's batch variance, for the layers the backward
    runs (None elsewhere, and where norm2 reads its running statistics): every layer at once,
    two ``_foreach`` launches per eps on a GPU instead of two per layer."""
    invstds = [None] * len(norm2_batch)
    by_eps: dict[float, list[int]] = {}
    for layer in range(spec.backward_from, spec.num_layers):
        if norm2_batch[layer] is not None:
            by_eps.setdefault(spec.layer_norms[layer][1].eps, []).append(layer)
    for eps, layers in by_eps.items():
        values = torch._foreach_add([norm2_batch[layer][1] for layer in layers], eps)
        torch._foreach_rsqrt_(values)
        for layer, invstd in zip(layers, values, strict=True):
            invstds[layer] = invstd
    return invstds


@dataclass
class BlockSaved:
    """What forward keeps for backward besides the parameters, described once: ``tensors()``
    is the order in which it crosses to backward, ``load`` reads it back."""

    buffer: torch.Tensor
    bottlenecks: list  # per layer, the 1x1 conv's output (norm2's input), or None: recomputed
    # or not needed (see BlockSpec.keeps_bottleneck)
    norm2_batch: list  # per layer, norm2's batch (mean, var), or None (running statistics)
    masks: list  # per layer, the dropout mask, or None: no dropout, or not needed
    mean: torch.Tensor | None  # the buffer's batch statistics, when a prefix BN uses them
    var: torch.Tensor | None
    # Values per channel behind the statistics, merged over every rank: a CPU scalar, kept
    # only when synchronised (run time decides it); else None, and backward reads it off the
    # buffer's shape. No CPU tensor then crosses the ops, which CUDA graphs could not capture.
    merged_count: torch.Tensor | None

    @classmethod
    def of(cls, fwd: BlockForward, merged_count: torch.Tensor | None) -> BlockSaved:
        return cls(fwd.buffer, fwd.bottlenecks, fwd.norm2_batch, fwd.masks, fwd.mean, fwd.var,
                   merged_count)

    def tensors(self) -> list:
        stats = [self.mean, self.var] if self.mean is not None else []
        count = [self.merged_count] if self.merged_count is not None else []
        return [self.buffer, *(b for b in self.bottlenecks if b is not None),
                *(t for pair in self.norm2_batch if pair is not None for t in pair),
                *(m for m in self.masks if m is not None), *stats, *count]

    @classmethod
    def load(cls, tensors, spec: BlockSpec) -> BlockSaved:
        saved = iter(tensors)
        layers = range(spec.num_layers)
        buffer = next(saved)
        bottlenecks = [next(saved) if spec.keeps_bottleneck(layer) else None for layer in layers]
        norm2_batch = [(next(saved), next(saved)) if norm2.batch_stats else None
                       for _, norm2 in spec.layer_norms]
        masks = [next(saved) if spec.keeps_mask(layer) else None for layer in layers]
        mean, var = (next(saved), next(saved)) if spec.buffer_stats() else (None, None)
        merged_count = next(saved) if spec.sync is not None else None
        return cls(buffer, bottlenecks, norm2_batch, masks, mean, var, merged_count)


class BlockBackward:
    """Runs the block backward from what forward saved: the tail, then the layers in
    reverse, adding each input gradient into one gradient buffer."""

    def __init__(self, saved: BlockSaved, spec: BlockSpec, params):
        self.saved, self.spec = saved, spec
        self.layer_params, self.tail_params = split_block_params(spec, params)
        buffer = saved.buffer
        self.stats_dtype = stats_dtype_for(buffer.dtype)
        total = buffer.shape[1]
        self.c0 = total - spec.num_layers * spec.growth_rate
        self.count = values_per_channel(saved.merged_count, buffer)
        # Prefix BNs add only their direct term to the gradient buffer; the term through the
        # batch statistics is summed per channel and added once, just before the layer that
        # wrote a channel reads its gradient (every reader of the channel is done by then).
        self.stats_term = StatsGradient(total, self.stats_dtype, buffer.device) \
            if saved.mean is not None else None
        self.grad_buffer = None
        self.invstds = {}  # eps -> the buffer's invstd, see _prefix_stats
        self.norm2_invstds = _norm2_invstds(spec, saved.norm2_batch)
        self.running = _RunningStats(spec, self.stats_dtype)

    def run(self, grad_out: torch.Tensor, input_grad: bool = True):
        """``(grad_x, flat parameter gradients)``; ``grad_x`` is None without ``input_grad``,
        and so are the gradients of the layers below ``spec.backward_from``, which is not
        run (their parameters are frozen)."""
        tail_grads = self._tail(grad_out)
        skipped = LayerParams(*(None,) * len(LayerParams._fields))
        layer_grads = [skipped] * self.spec.num_layers
        for layer in reversed(range(self.spec.backward_from, self.spec.num_layers)):
            layer_grads[layer] = self._layer(layer)
        # A copy, not a view: a view would keep the whole gradient buffer alive through the
        # previous block's backward.
        grad_x = self._channel_grad(0, self.c0) if input_grad else None
        self.grad_buffer = None
        return grad_x, flat_block_params(layer_grads, tail_grads)

    def _channel_grad(self, start: int, stop: int) -> torch.Tensor:
        """The whole gradient of channels ``start:stop``, whose readers are all done: the
        gradient buffer's, plus the statistics' term summed for them (synchronised, its
        coefficients are first summed over the ranks: the global term is linear in them), as
        a dense tensor in the buffer's layout."""
        grad, buffer = self.grad_buffer[:, start:stop], self.saved.buffer
        term = self.stats_term
        if term is None:
            return grad.contiguous(memory_format=memory_format_of(buffer))
        if self.spec.sync is not None:
            term.kx[start:stop], term.k0[start:stop] = self.spec.sync.all_reduce(
                term.kx[start:stop], term.k0[start:stop])
        return add_stats_term(grad, buffer[:, start:stop], term.kx[start:stop],
                              term.k0[start:stop])

    def _add_stats_term(self, norm: BatchNormSpec, mean, invstd, weight, dweight, dbias) -> None:
        if norm.batch_stats:
            self.stats_term.add(mean, invstd, weight, dweight, dbias, self.count)

    def _tail(self, grad_out: torch.Tensor) -> TailParams | None:
        spec, buffer, p = self.spec, self.saved.buffer, self.tail_params
        if spec.tail is Tail.NONE:
            self.grad_buffer = torch.empty_like(buffer).copy_(grad_out)
            return None
        n, total, h, w = buffer.shape
        mean, invstd = _prefix_stats(spec.tail_norm, self.saved.mean, self.saved.var, total,
                                     self.running.tail, self.invstds)
        if spec.tail is Tail.TRANSITION:
            grad_reduced = _avg_pool2x2_backward(grad_out, (n, p.conv_weight.shape[0], h, w),
                                                 memory_format_of(buffer))
            self.grad_buffer = torch.zeros_like(buffer)
            dconv, dweight, dbias = bn_relu_conv1x1_backward(
                grad_reduced, buffer, mean, invstd, p.norm_weight, p.norm_bias, p.conv_weight,
                False, self.grad_buffer)
            grads = TailParams(dweight, dbias, dconv)
        else:
            self.grad_buffer, dweight, dbias = bn_backward(
                grad_out, buffer, mean, invstd, p.norm_weight, False)
            grads = TailParams(dweight, dbias)
        self._add_stats_term(spec.tail_norm, mean, invstd, p.norm_weight, dweight, dbias)
        return grads

    def _layer(self, layer: int) -> LayerParams:
        spec, saved, k = self.spec, self.saved, self.spec.growth_rate
        buffer, grad_buffer = saved.buffer, self.grad_buffer
        channels = self.c0 + layer * k
        p = self.layer_params[layer]
        norm1, norm2 = spec.layer_norms[layer]
        # Dense: convolution backward is markedly slower on a strided gradient.
        grad_new = self._channel_grad(channels, channels + k)
        if saved.masks[layer] is not None:
            grad_new = grad_new * dropout_scale(saved.masks[layer], spec.drop_rates[layer],
                                                 grad_new.dtype)
        mean1, invstd1 = _prefix_stats(norm1, saved.mean, saved.var, channels,
                                       self.running.norm1[layer], self.invstds)
        if spec.recompute_bottleneck:
            bottleneck = bn_relu_conv1x1(buffer, mean1, invstd1, p.norm1_weight, p.norm1_bias,
                                         p.conv1_weight)
        else:
            bottleneck = saved.bottlenecks[layer]
        mean2, invstd2 = _norm2_stats(norm2, saved.norm2_batch[layer], self.running.norm2[layer],
                                      self.norm2_invstds[layer])
        act2 = bn_relu(bottleneck, mean2, invstd2, p.norm2_weight, p.norm2_bias,
                       lowp_conv.compute_dtype(bottleneck))
        grad_act2, dconv2 = lowp_conv.conv2d_backward(
            grad_new, act2, p.conv2_weight, (1, 1), (1, 1), (1, 1), 1, (True, True))
        del grad_new
        torch.ops.aten.threshold_backward.grad_input(grad_act2, act2, 0, grad_input=grad_act2)
        del act2
        grad_act2 = grad_act2.to(bottleneck.dtype)  # from a float32 convolution's, rounded
        grad_bottleneck, dnorm2_weight, dnorm2_bias = norm_backward(
            grad_act2, bottleneck, mean2, invstd2, p.norm2_weight,
            batch_stats=norm2.batch_stats, sync=spec.sync, count=self.count)
        del grad_act2, bottleneck
        dconv1, dnorm1_weight, dnorm1_bias = bn_relu_conv1x1_backward(
            grad_bottleneck, buffer, mean1, invstd1, p.norm1_weight, p.norm1_bias,
            p.conv1_weight, False, grad_buffer)
        del grad_bottleneck
        self._add_stats_term(norm1, mean1, invstd1, p.norm1_weight, dnorm1_weight, dnorm1_bias)
        return LayerParams(dnorm1_weight, dnorm1_bias, dconv1, dnorm2_weight, dnorm2_bias,
                           dconv2)
