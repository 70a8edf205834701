"""What one fused call computes: the block's and the stem's specs, described once.

A spec is the only carrier of a fused call's settings. The model builds it from the modules
(:mod:`densenet_fast.fusion`), the computation reads its named fields
(:mod:`densenet_fast.block`, :mod:`densenet_fast.stem`), and where it crosses a
``torch.library`` op's boundary (:mod:`densenet_fast.graph`) it is encoded into op arguments
and decoded back here, from the same field declarations that write the op's schema:

- a field declared with :func:`setting` crosses as one op argument of its schema type
  (``int``, ``float[]``, ``str``...), encoded and decoded by the functions given there;
- each :class:`BatchNormSpec` setting crosses as a list over the spec's BNs, in ``norms()``
  order (``float[] norm_eps``...), and the running statistics of the BNs that normalise with
  them as one tensor list;
- everything else (running statistics to update, momentum) stays on the caller's side: the
  ops mutate nothing, they return the batch statistics and the caller folds them in.

So a new per-BatchNorm option is one field of :class:`BatchNormSpec` (with
:func:`setting`) and the code that reads it.

The parameters beside a spec are named tuples (:class:`LayerParams`, :class:`TailParams`,
:class:`StemParams`), flattened in one order by :func:`flat_block_params`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum
from typing import NamedTuple

import torch

from .ops.formats import cast
from .sync import StatsSync
from .validation import member, output_size


def setting(schema_type: str, *, default=MISSING, encode=None, decode=None):
    """A spec field that crosses op boundaries as one argument of ``schema_type``;
    ``encode``/``decode`` map the field's value to the argument and back (default: as is)."""
    return field(default=default, metadata={"op": (schema_type, encode, decode)})


def _pair(schema_type: str = "int[2]", default=MISSING):
    return setting(schema_type, default=default, encode=list, decode=tuple)


def _sync_setting():
    # The process group's name; "" when not synchronised.
    return setting("str", default=None,
                   encode=lambda sync: sync.group_name() if sync is not None else "",
                   decode=StatsSync.named)


@dataclass(frozen=True)
class BatchNormSpec:
    """One BatchNorm as a fused call sees it: how it normalises and what it updates.

    ``batch_stats``: normalise with the batch's statistics (training mode, or a BN that tracks
    no running statistics); else with ``running_mean``/``running_var``.
    ``update_running_stats``: fold the batch's statistics into the running ones (training
    mode with running statistics), with ``momentum`` and ``num_batches_tracked`` as
    ``nn.BatchNorm2d`` does.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: float | None
    eps: float = setting("float")
    batch_stats: bool = setting("bool", default=True)
    update_running_stats: bool = False

    @classmethod
    def of(cls, bn: torch.nn.Module) -> BatchNormSpec:
        """An ``nn.BatchNorm2d``'s (or ``nn.SyncBatchNorm``'s) spec, decided as its forward
        decides: batch statistics in training mode or without running statistics; the
        running statistics updated in training mode only while ``track_running_stats`` is
        set. A BN whose flag is cleared after construction keeps its buffers: in training it
        normalises with the batch and leaves them alone, in eval it normalises with them."""
        running_mean = member(bn, "running_mean")  # member: every forward reads every BN
        has_running = running_mean is not None
        return cls(running_mean, member(bn, "running_var"), member(bn, "num_batches_tracked"),
                   bn.momentum, bn.eps,
                   batch_stats=bn.training or not has_running,
                   update_running_stats=bn.training and bn.track_running_stats and has_running)

    def running(self) -> list:
        """The tensors an op reads for this BN: its running statistics, when it uses them."""
        return [] if self.batch_stats else [self.running_mean, self.running_var]

    def __eq__(self, other) -> bool:
        """The same BN state: the same buffer objects (a spec refers to a module's buffers,
        never to copies of them) and equal settings. The ``__eq__`` dataclass would generate
        compares the tensors with ``==``, elementwise, whose truth value is ambiguous: on
        Python 3.13, which compares field by field, even for the same buffers (earlier
        versions compare tuples, which first test identity). The generated ``__hash__``
        (frozen) hashes tensors by identity, which agrees with this."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            tensors = isinstance(mine, torch.Tensor) or isinstance(theirs, torch.Tensor)
            if (mine is not theirs) if tensors else (mine != theirs):
                return False
        return True


class Tail(Enum):
    """What the block computes after its layers, from the whole buffer."""

    NONE = "none"  # the buffer itself: all channels concatenated
    TRANSITION = "transition"  # BN-ReLU-Conv1x1-AvgPool2x2
    NORM = "norm"  # the final BN (norm5)


@dataclass(frozen=True)
class BlockSpec:
    """One block call: its layers' BNs, dropout, tail and memory setting.

    ``drop_rates``: each layer's dropout probability, 0 where the layer is in eval mode.
    ``recompute_bottleneck``: backward recomputes each layer's bottleneck instead of keeping it.
    ``backward_from``: the first layer whose backward runs. Nothing below it needs a gradient
    (the block input and those layers' parameters are frozen), so forward keeps nothing for
    those layers and backward stops above them; ``num_layers``: only the tail's backward runs.
    ``sync``: the process group every batch statistic of the block is merged over (then
    every BN that uses batch statistics synchronises over it; see :mod:`densenet_fast.sync`).
    ``masks_nchw``: dropout draws its masks in NCHW order though the block runs channels-last
    (``features``' fused steps for an NCHW caller, :func:`plan.run_steps`): the order
    torchvision's layers draw them in for that caller, so a seeded run drops what it drops.
    """

    layer_norms: tuple[tuple[BatchNormSpec, BatchNormSpec], ...]  # (norm1, norm2) per layer
    growth_rate: int = setting("int")
    drop_rates: tuple[float, ...] = _pair("float[]")
    tail: Tail = setting("str", default=Tail.NONE, encode=lambda t: t.value, decode=Tail)
    tail_norm: BatchNormSpec | None = None
    recompute_bottleneck: bool = setting("bool", default=False)
    sync: StatsSync | None = _sync_setting()
    backward_from: int = setting("int", default=0)
    masks_nchw: bool = setting("bool", default=False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_norms)

    def keeps_bottleneck(self, layer: int) -> bool:
        """Whether forward keeps ``layer``'s bottleneck for backward."""
        return not self.recompute_bottleneck and layer >= self.backward_from

    def keeps_mask(self, layer: int) -> bool:
        """Whether forward keeps ``layer``'s dropout mask for backward."""
        return self.drop_rates[layer] > 0 and layer >= self.backward_from

    def prefix_norms(self) -> list[BatchNormSpec]:
        """Every BN that reads the buffer: each layer's ``norm1`` and the tail's norm."""
        norms = [norm1 for norm1, _ in self.layer_norms]
        if self.tail_norm is not None:
            norms.append(self.tail_norm)
        return norms

    def buffer_stats(self) -> bool:
        """Whether the buffer's batch statistics are computed: a BN reading it uses them."""
        return any(norm.batch_stats for norm in self.prefix_norms())

    def norms(self) -> list[BatchNormSpec]:
        """Every BN of the call: the prefix BNs, then each layer's ``norm2``."""
        return self.prefix_norms() + [norm2 for _, norm2 in self.layer_norms]

    def with_norms(self, norms: list[BatchNormSpec]) -> BlockSpec:
        """This spec with ``norms`` (in :meth:`norms` order) in place of its BNs; reads only
        ``drop_rates`` and ``tail`` for the structure."""
        layers = len(self.drop_rates)
        prefix, norm2s = norms[:len(norms) - layers], norms[len(norms) - layers:]
        return replace(self, layer_norms=tuple(zip(prefix[:layers], norm2s, strict=True)),
                       tail_norm=prefix[layers] if self.tail is not Tail.NONE else None)


@dataclass(frozen=True)
class StemSpec:
    """One stem call: conv0's and pool0's settings, norm0 and the memory setting.

    ``recompute_bottleneck``: keep no conv0 output (the convolution output norm0 reads, as a
    layer's bottleneck is for its norm2) for backward, recompute it. ``channels_last``: conv0
    reads a channels-last copy of the input and the output stays channels-last (the layout of
    ``features``' fused steps, :func:`ops.conv_layout.fused_steps_channels_last`), where it would
    come back in the input's. ``sync``: the process group norm0's batch statistics are merged
    over.
    """

    norm: BatchNormSpec
    conv_stride: tuple[int, int] = _pair()
    conv_padding: tuple[int, int] = _pair()
    conv_dilation: tuple[int, int] = _pair()
    conv_groups: int = setting("int")
    pool_kernel: tuple[int, int] = _pair()
    pool_stride: tuple[int, int] = _pair()
    pool_padding: tuple[int, int] = _pair()
    pool_dilation: tuple[int, int] = _pair()
    pool_ceil_mode: bool = setting("bool")
    recompute_bottleneck: bool = setting("bool", default=False)
    channels_last: bool = setting("bool", default=False)
    sync: StatsSync | None = _sync_setting()

    def norms(self) -> list[BatchNormSpec]:
        return [self.norm]

    def with_norms(self, norms: list[BatchNormSpec]) -> StemSpec:
        (norm,) = norms
        return replace(self, norm=norm)

    def pool_args(self) -> tuple:
        """``max_pool2d``'s arguments after the input."""
        return (self.pool_kernel, self.pool_stride, self.pool_padding, self.pool_dilation,
                self.pool_ceil_mode)

    def conv_args(self) -> tuple:
        """``conv2d``'s arguments after the input and weight (no bias)."""
        return self.conv_stride, self.conv_padding, self.conv_dilation, self.conv_groups

    def conv_output_plane(self, size, kernel) -> tuple[int, int]:
        """conv0's output ``(height, width)`` for an input plane of ``size`` and a kernel of
        ``kernel`` (each ``(height, width)``)."""
        return tuple(output_size(size[i], kernel[i], self.conv_stride[i], self.conv_padding[i],
                                 self.conv_dilation[i]) for i in range(2))


Spec = BlockSpec | StemSpec


class _Setting(NamedTuple):
    name: str
    schema_type: str
    encode: object  # callable, or None: as is
    decode: object


def _settings(cls: type) -> tuple[_Setting, ...]:
    return tuple(_Setting(f.name, *f.metadata["op"]) for f in fields(cls) if "op" in f.metadata)


# Read once: torch.compile traces op_arguments(), and dynamo cannot call dataclasses.fields.
_SETTINGS = {cls: _settings(cls) for cls in (BatchNormSpec, BlockSpec, StemSpec)}


def op_schema(spec_cls: type) -> str:
    """The op arguments that carry a ``spec_cls`` (after its tensors and the running-statistics
    list), as schema text."""
    own = [f"{s.schema_type} {s.name}" for s in _SETTINGS[spec_cls]]
    per_norm = [f"{s.schema_type}[] norm_{s.name}" for s in _SETTINGS[BatchNormSpec]]
    return ", ".join(own + per_norm)


def op_arguments(spec: Spec) -> tuple[list, list]:
    """``(running, settings)``: the running statistics the spec's BNs normalise with, and the
    settings, in :func:`op_schema`'s order."""
    own = []
    for s in _SETTINGS[type(spec)]:
        value = getattr(spec, s.name)
        own.append(s.encode(value) if s.encode is not None else value)
    norms = spec.norms()
    per_norm = [[getattr(norm, s.name) for norm in norms] for s in _SETTINGS[BatchNormSpec]]
    running = [t for norm in norms for t in norm.running()]
    return running, own + per_norm


def from_op_arguments(spec_cls: type, running, settings, synchronised: bool = True):
    """The spec :func:`op_arguments` encoded: what an op computes with. Its BNs update no
    running statistics (the caller folds them in). ``synchronised=False``: for shapes only
    (a fake implementation, a FLOP formula), no process group is looked up."""
    own_settings = _SETTINGS[spec_cls]
    own, per_norm = settings[:len(own_settings)], settings[len(own_settings):]
    values = {}
    for s, value in zip(own_settings, own, strict=True):
        if s.name == "sync" and not synchronised:
            value = None
        elif s.decode is not None:
            value = s.decode(value)
        values[s.name] = value
    read = iter(running)
    norms = []
    for norm_values in zip(*per_norm, strict=True):
        norm = dict(zip((s.name for s in _SETTINGS[BatchNormSpec]), norm_values, strict=True))
        stats = (None, None) if norm["batch_stats"] else (next(read), next(read))
        norms.append(BatchNormSpec(*stats, None, None, **norm))
    structure = spec_cls(**_placeholder_norms(spec_cls), **values)
    return structure.with_norms(norms)


def is_synchronised(spec_cls: type, settings) -> bool:
    """Whether the op arguments ``settings`` of a ``spec_cls`` name a process group to merge
    batch statistics over, read without looking the group up (as a fake implementation
    must: its spec, decoded with ``synchronised=False``, has no ``sync``)."""
    return any(s.name == "sync" and value != ""
               for s, value in zip(_SETTINGS[spec_cls], settings, strict=False))


def _placeholder_norms(spec_cls: type) -> dict:
    # The BN fields before with_norms() fills them in.
    return {"layer_norms": ()} if spec_cls is BlockSpec else {"norm": None}


class LayerParams(NamedTuple):
    """One dense layer's parameters."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    conv1_weight: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    conv2_weight: torch.Tensor


class TailParams(NamedTuple):
    """The tail's parameters: its BN's, then the transition's 1x1 conv (absent for a norm)."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    conv_weight: torch.Tensor | None = None


class StemParams(NamedTuple):
    """conv0's weight and norm0's affine parameters."""

    conv_weight: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor


def flat_block_params(layers, tail: TailParams | None) -> list:
    """A block's parameters (or their gradients) as the flat list its graph node and ops take:
    each layer's :class:`LayerParams`, then the tail's :class:`TailParams` (a norm has no
    conv weight). ``autograd.Function.apply`` and ``Tensor[]`` op arguments take tensors one
    by one; :func:`split_block_params` reads them back."""
    flat = [t for layer in layers for t in layer]
    if tail is not None:
        flat += [t for t in tail if t is not None]
    return flat


def split_block_params(spec: BlockSpec, flat) -> tuple[list[LayerParams], TailParams | None]:
    """The flat list of :func:`flat_block_params` as named groups."""
    size = len(LayerParams._fields)
    layers = [LayerParams(*flat[size * i:size * (i + 1)]) for i in range(spec.num_layers)]
    rest = flat[size * spec.num_layers:]
    return layers, (TailParams(*rest) if spec.tail is not Tail.NONE else None)


def cast_conv_weights(spec: BlockSpec, flat, dtype: torch.dtype) -> list:
    """The flat list of :func:`flat_block_params` with every convolution weight cast to
    ``dtype``, the convolutions' compute dtype (autocast's); BN parameters stay as they are."""
    layers, tail = split_block_params(spec, flat)
    layers = [p._replace(conv1_weight=cast(p.conv1_weight, dtype),
                         conv2_weight=cast(p.conv2_weight, dtype)) for p in layers]
    if tail is not None and tail.conv_weight is not None:
        tail = tail._replace(conv_weight=cast(tail.conv_weight, dtype))
    return flat_block_params(layers, tail)
