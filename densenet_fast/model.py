"""The memory-efficient DenseNet: torchvision's modules and names, fused block forward.

``features`` is an ``nn.Sequential`` whose forward runs each dense block, together with the
transition or final norm that follows it, as one autograd node over a shared buffer
(:mod:`densenet_fast.block`). Every module still works on its own with torchvision's
semantics (a block returns its concatenated features), so code that slices or hooks
``model.features`` keeps working.

``torch.jit.script`` compiles the modules' torchvision computation (the fused step is
``torch.jit.unused``): a scripted model computes, and needs the memory, as torchvision's.
Annotations here are objects, not strings, so that TorchScript also compiles the code
``torch.fx`` generates from these forwards.
"""

import functools
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn

from . import backends
from .architecture import CONFIGS, DenseBlock, DenseNetBase, Transition
from .block import BlockSpec, Tail
from .fusion import (
    STEM_NAMES,
    Blocker,
    block_blocker,
    block_channels,
    block_sync,
    fsdp_state,
    fsdp_tail_blocker,
    has_hooks,
    norm_blocker,
    norm_state,
    runtime_blocker,
    stem_blocker,
    transition_blocker,
    uses_batch_stats,
    warn_fallback,
)
from .graph import dense_block, stem
from .state_dict import load_torchvision_state_dict
from .stem import StemSpec
from .sync import sync_of
from .validation import check_input_tensor, check_spatial_plan, is_type

try:  # the builders' annotations, read by torchvision.models.get_model_weights
    from torchvision.models import (
        DenseNet121_Weights,
        DenseNet161_Weights,
        DenseNet169_Weights,
        DenseNet201_Weights,
    )
    from torchvision.models import WeightsEnum as _WeightsEnum
except ImportError:  # torchvision is optional: without it, weights are objects of one's own
    DenseNet121_Weights = DenseNet161_Weights = DenseNet169_Weights = DenseNet201_Weights = Any
    _WeightsEnum = None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on (BN parameters and statistics stay float32),
    else the parameters' dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _without_autocast(x: torch.Tensor):
    # The fused Functions compute in one dtype, cast to explicitly; autocast must not recast.
    return (torch.autocast(x.device.type, enabled=False)
            if torch.is_autocast_enabled(x.device.type) else nullcontext())


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def run_stem(conv: nn.Conv2d, norm: nn.Module, pool: nn.MaxPool2d, x: torch.Tensor,
             recompute_conv: bool = False) -> torch.Tensor:
    """Run a standard stem (``conv -> norm -> ReLU -> pool``) as one Function that keeps
    only the conv's output, or with ``recompute_conv`` nothing but its input: the caller has
    checked the modules (:func:`fusion.stem_blocker`)."""
    spec = StemSpec(
        conv_stride=conv.stride, conv_padding=conv.padding, conv_dilation=conv.dilation,
        conv_groups=conv.groups, pool_kernel=_pair(pool.kernel_size),
        pool_stride=_pair(pool.stride), pool_padding=_pair(pool.padding),
        pool_dilation=_pair(pool.dilation), pool_ceil_mode=pool.ceil_mode,
        norm=norm_state(norm), recompute_conv=recompute_conv)
    dtype = _compute_dtype(x, conv.weight)
    with _without_autocast(x):
        return stem(x.to(dtype), spec, conv.weight.to(dtype), norm.weight, norm.bias)


def run_block(block: DenseBlock, x: torch.Tensor, tail: nn.Module | None) -> torch.Tensor:
    """Run a standard ``block`` and, fused with it, ``tail`` (a transition, a final norm or
    None) from their parameters: the caller has checked them (:mod:`densenet_fast.fusion`)."""
    backends.active_backend(x.device.type)  # a forced, unavailable backend fails here
    layers = list(block._modules.values())
    norms, params = [], []
    for layer in layers:
        norms.append((norm_state(layer.norm1), norm_state(layer.norm2)))
        params += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                   layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    conv_params = {id(layer.conv1.weight) for layer in layers} | {
        id(layer.conv2.weight) for layer in layers}
    if tail is None:
        kind, tail_norm = Tail.NONE, None
    elif isinstance(tail, Transition):
        kind, tail_norm = Tail.TRANSITION, norm_state(tail.norm)
        params += [tail.norm.weight, tail.norm.bias, tail.conv.weight]
        conv_params.add(id(tail.conv.weight))
    else:
        kind, tail_norm = Tail.NORM, norm_state(tail)
        params += [tail.weight, tail.bias]
    spec = BlockSpec(
        growth_rate=layers[0].conv2.out_channels,
        layer_norms=tuple(norms),
        drop_rates=tuple(layer.drop_rate if layer.training else 0.0 for layer in layers),
        tail=kind,
        tail_norm=tail_norm,
        recompute_bottleneck=block.recompute_bottleneck,
        sync=block_sync(block),
    )
    dtype = _compute_dtype(x, layers[0].conv1.weight)
    with _without_autocast(x):
        # Casts are graph nodes, so gradients reach the float32 master weights under autocast.
        params = [p.to(dtype) if id(p) in conv_params else p for p in params]
        return dense_block(x.to(dtype), spec, params)


class FusionStep(NamedTuple):
    """One step of ``features``' forward: ``modules[0]`` called as a module, or (``fused``)
    ``modules`` run as one fused Function: a standard block (with the transition or norm
    after it, if any), or the standard stem (conv0, norm0, relu0, pool0). ``called``: the
    block is hooked by FSDP2 alone and is called as a module with the tail to fuse, so that
    FSDP's hooks wrap the fused step (:func:`fusion.fsdp_tail_blocker`)."""

    modules: tuple[nn.Module, ...]
    fused: bool
    called: bool = False

    @property
    def module(self) -> nn.Module:
        return self.modules[0]

    def run(self, x: torch.Tensor, recompute_stem: bool = False) -> torch.Tensor:
        if not self.fused:
            return self.module(x)
        if isinstance(self.module, DenseBlock):
            tail = self.modules[1] if len(self.modules) > 1 else None
            if self.called:
                return self.module(x, tail=tail)
            return run_block(self.module, x, tail)
        conv, norm, _, pool = self.modules
        return run_stem(conv, norm, pool, x, recompute_stem)


def _tail_blocker(block: nn.Module, tail: nn.Module | None) -> Blocker | None:
    """Why ``tail``, the module after a standard ``block``, cannot be fused into it."""
    if tail is None:
        return Blocker("the block is last")
    if has_hooks(block) and (blocker := fsdp_tail_blocker(block, tail)) is not None:
        return blocker
    if has_hooks(tail):
        return Blocker("it has hooks")
    if tail.training != block.training:
        return Blocker("it is not in the block's train/eval mode")
    channels = block_channels(block)
    tail_norm = getattr(tail, "norm", tail)
    if uses_batch_stats(tail_norm) and sync_of(tail_norm) != block_sync(block):
        return Blocker("it does not synchronise its statistics as the block does")
    if is_type(tail, _Transition):
        return transition_blocker(tail, channels)
    problem = norm_blocker(tail, channels)
    if problem is not None:
        return Blocker(f"it {problem}, and is not a transition either", nonstandard=True)
    if "forward" in tail.__dict__:
        return Blocker("it has its forward replaced on the instance", nonstandard=True)
    return None


class _DenseBlock(DenseBlock):
    """A dense block computed over one shared buffer; returns all its channels.

    A block whose module tree is not the standard one, or that is hooked inside, traced or
    transformed (:mod:`densenet_fast.fusion`), runs its modules as torchvision's does.
    ``recompute_bottleneck``: see :class:`DenseNet`. An empty batch and ``torch.jit.script``
    also run the modules.
    """

    recompute_bottleneck = False

    def forward(self, init_features: torch.Tensor, tail: Any = None) -> torch.Tensor:
        """All the block's channels; with ``tail`` (given by ``features`` only, to a block
        hooked by FSDP2 alone), the output of that transition or norm, fused in."""
        if torch.jit.is_scripting():
            return self.forward_modules(init_features)
        return self._forward_fused(init_features, tail)

    @torch.jit.unused
    def _forward_fused(self, init_features: torch.Tensor, tail: Any) -> torch.Tensor:
        blocker = runtime_blocker(init_features) or block_blocker(self)
        if blocker is not None:
            warn_fallback("a dense block", blocker)
            return self._forward_modules_then(init_features, tail)
        first = self.denselayer1
        check_input_tensor(init_features, expected_channels=first.conv1.in_channels,
                           reference=first.conv1.weight, where=type(self).__name__)
        if init_features.shape[0] == 0:
            # torchvision's computation: an empty output, num_batches_tracked counted in training
            return self._forward_modules_then(init_features, tail)
        check_spatial_plan([("block", self)], init_features, _DenseBlock, _Transition)
        return run_block(self, init_features, tail)

    @torch.jit.unused
    def _forward_modules_then(self, init_features: torch.Tensor, tail: Any) -> torch.Tensor:
        out = self.forward_modules(init_features)
        return out if tail is None else tail(out)


class _Transition(Transition):
    """Transition between blocks; fused into the preceding block inside ``features``."""


class _Features(nn.Sequential):
    """``model.features``: the stem, then each standard block fused with the transition or
    norm after it; everything else is called as a module, as ``nn.Sequential`` does.
    ``recompute_stem``: the fused stem keeps no conv0 output for backward (recomputes it).
    An empty batch (after the input checks) and ``torch.jit.script`` call every module."""

    recompute_stem = False

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(item, _Features):  # a slice keeps the setting
            item.recompute_stem = self.recompute_stem
        return item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            for module in self:
                x = module(x)
            return x
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if runtime_blocker(x) is not None:
            return self._forward_modules(x)
        conv0 = next(iter(self._modules.values())) if self._modules else None
        if isinstance(conv0, nn.Conv2d):
            check_input_tensor(x, expected_channels=conv0.in_channels, reference=conv0.weight,
                               where="DenseNet")
        self.check_spatial_size(x)
        if x.shape[0] == 0:
            # torchvision's computation: an empty output, num_batches_tracked counted in training
            return self._forward_modules(x)
        for step in self.fusion_plan():
            # A hooked block is called as a module, and is fused inside its own forward.
            x = step.run(x, self.recompute_stem)
        return x

    @torch.jit.unused
    def _forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """Every module called in turn, as ``nn.Sequential`` does."""
        for module in self._modules.values():
            x = module(x)
        return x

    def check_spatial_size(self, x: torch.Tensor) -> None:
        """Refuse, before anything runs, an input whose size some stride or pool cannot
        reduce, or that leaves a training BatchNorm one value per channel (``x`` may be on
        the meta device: only its shape is read)."""
        check_spatial_plan([(f"features.{name}", m) for name, m in self.named_children()], x,
                           _DenseBlock, _Transition, _values_over_ranks())

    def fusion_plan(self) -> list[FusionStep]:
        """The forward's steps, decided afresh on every call (the standard-tree check):
        each standard, unhooked block fused with the module after it where that one is a
        standard, unhooked transition or norm; every other module called as a module."""
        modules = list(self._modules.values())
        steps, i = [], 0
        if stem_blocker(self._modules) is None:
            steps.append(FusionStep(tuple(modules[:4]), fused=True))
            i = 4
        while i < len(modules):
            module = modules[i]
            if not _fusable_block(module):
                steps.append(FusionStep((module,), fused=False))
                i += 1
                continue
            tail = modules[i + 1] if i + 1 < len(modules) else None
            called = has_hooks(module)  # FSDP's alone (_fusable_block)
            if _tail_blocker(module, tail) is None:
                steps.append(FusionStep((module, tail), fused=True, called=called))
                i += 2
            else:
                steps.append(FusionStep((module,), fused=True, called=called))
                i += 1
        return steps

    def fusion_report(self) -> dict[str, str]:
        """How each dense block runs in the next forward, and why; see
        :meth:`DenseNet.fusion_report`."""
        runtime = runtime_blocker(None)
        named = list(self._modules.items())
        report = {}
        if tuple(self._modules)[:4] == STEM_NAMES:
            blocker = runtime or stem_blocker(self._modules)
            report["features.stem"] = "fused" if blocker is None else f"modules: {blocker.reason}"
        for i, (name, module) in enumerate(named):
            if not isinstance(module, DenseBlock):
                continue
            where = f"features.{name}"
            if not is_type(module, _DenseBlock) or "forward" in module.__dict__:
                report[where] = (f"modules: it is {type(module).__name__} with a forward of its "
                                 f"own, not densenet_fast's block")
                continue
            blocker = runtime or block_blocker(module)
            if blocker is not None:
                report[where] = f"modules: {blocker.reason}"
                continue
            tail_name, tail = named[i + 1] if i + 1 < len(named) else (None, None)
            tail_blocker = _tail_blocker(module, tail)
            if tail_blocker is None:
                report[where] = f"fused with features.{tail_name}"
            elif tail is None:
                report[where] = "fused"
            else:
                report[where] = (f"fused; features.{tail_name} runs as a module: "
                                 f"{tail_blocker.reason}")
        return report


def _values_over_ranks():
    """For the plan check: a synchronised BN's values per channel over every process. Only
    a plane of one pixel asks the processes (one collective, on every rank alike: the plane's
    size does not depend on the rank's batch); larger planes have at least two values."""
    totals = {}

    def values(bn: nn.Module, n: int, area: int) -> int | None:
        sync = sync_of(bn)
        if sync is None:
            return None
        if area > 1:
            return n * area
        if sync not in totals:
            totals[sync] = sync.total(n)
        return totals[sync]

    return values


def _fusable_block(module: nn.Module) -> bool:
    return is_type(module, _DenseBlock) and "forward" not in module.__dict__ \
        and (not has_hooks(module) or fsdp_state(module) is not None) \
        and block_blocker(module) is None


class DenseNet(DenseNetBase):
    r"""Memory-efficient DenseNet-BC, a drop-in replacement for torchvision's ``DenseNet``.

    Same constructor (plus ``in_channels``), module names, state_dict keys and numerics as
    ``torchvision.models.DenseNet``; activation memory is linear in depth. Each dense block
    writes into one preallocated buffer, computes each channel's batch statistics once and
    recomputes BN-ReLU in backward instead of storing it. ``memory_efficient`` is accepted for
    compatibility and has no effect: this model is always memory-efficient, with no
    checkpointing, so BatchNorm running statistics are updated exactly once per forward.

    Args:
        growth_rate: channels each layer adds (``k``).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (``bn_size * k`` channels before the 3x3 conv).
        drop_rate: dropout probability on each layer's new features (training only).
        num_classes: classifier outputs.
        memory_efficient: ignored (see above).
        in_channels: image channels (3 for RGB, 1 for MNIST).
        recompute_bottleneck: keep no per-layer bottleneck for backward, recompute it (one
            more BN-ReLU-Conv1x1 per layer in backward), and no conv0 output in the stem:
            less memory, somewhat more time, same results. Stored on each block
            (``recompute_bottleneck``) and on ``features`` (``recompute_stem``), so it can be
            set per block too.
    """

    block_cls = _DenseBlock
    transition_cls = _Transition
    features_cls = _Features

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory_efficient: bool = True,
                 in_channels: int = 3, recompute_bottleneck: bool = False) -> None:
        super().__init__(growth_rate, block_config, num_init_features, bn_size, drop_rate,
                         num_classes, memory_efficient, in_channels)
        self.features.recompute_stem = bool(recompute_bottleneck)
        for block in self.features.children():
            if isinstance(block, _DenseBlock):
                block.recompute_bottleneck = bool(recompute_bottleneck)

    def fusion_report(self) -> dict[str, str]:
        """How each dense block runs in the next forward, and why, keyed by its name.

        ``"fused with features.transition1"``: the block and the module after it run as one
        fused step. ``"fused; features.norm5 runs as a module: it has hooks"``: the block is
        fused and the module after it is called on its own. ``"modules: ..."``: the block
        runs its modules as torchvision's does, with the reason (a non-standard module,
        hooks inside the block, tracing, a ``torch.func`` transform, global module hooks).
        """
        return self.features.fusion_report()


_WEIGHTS = {"densenet121": DenseNet121_Weights, "densenet161": DenseNet161_Weights,
            "densenet169": DenseNet169_Weights, "densenet201": DenseNet201_Weights}


def _weights_enum(arch: str):
    enum = _WEIGHTS[arch]
    if enum is Any:
        raise ImportError(f"{arch}: torchvision's pretrained weights need torchvision installed "
                          f"(pass weights=None, or an object with .meta['categories'] and "
                          f".get_state_dict(progress, check_hash))")
    return enum


def _resolve_weights(arch: str, weights):
    """torchvision's ``<Enum>.verify``: a name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) or a value of
    this architecture's enum (another enum's is a TypeError). Any other object with
    ``meta["categories"]`` and ``get_state_dict(progress, check_hash)`` is used as it is."""
    if weights is None:
        return None
    if isinstance(weights, str) or (_WeightsEnum is not None
                                    and isinstance(weights, _WeightsEnum)):
        return _weights_enum(arch).verify(weights)
    return weights


def _positional_names(names: Sequence[str]) -> str:
    """torchvision's ``sequence_to_str(names, separate_last="and ")``."""
    if len(names) == 1:
        return f"'{names[0]}'"
    head = "'" + "', '".join(names[:-1]) + "'"
    return f"{head}{'' if len(names) == 2 else ','} and '{names[-1]}'"


def _new_style(weights) -> bool:
    """Whether ``weights`` needs no translation from the legacy interface: None, a name, or a
    weights object (torchvision: a WeightsEnum value)."""
    return weights is None or (isinstance(weights, str) and weights != "legacy") or (
        not isinstance(weights, str) and hasattr(weights, "get_state_dict"))


def _legacy_interface(builder):
    """torchvision's ``handle_legacy_interface(weights=("pretrained", <Enum>.IMAGENET1K_V1))``
    and ``kwonly_to_pos_or_kw``, with their warnings: ``weights`` and ``progress`` may be passed
    positionally, and ``pretrained=True`` / ``False`` means the default weights / None."""
    arch = builder.__name__

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> DenseNet:
        if args:
            positional = dict(zip(("weights", "progress", "kwargs"), args, strict=False))
            warnings.warn(
                f"Using {_positional_names(tuple(positional))} as positional parameter(s) is "
                f"deprecated since 0.13 and may be removed in the future. Please use keyword "
                f"parameter(s) instead.", stacklevel=2)
            kwargs.update(positional)
        sentinel = object()
        weights = kwargs.get("weights", sentinel)
        if ("weights" in kwargs or "pretrained" in kwargs) and not (
                weights is not sentinel and _new_style(weights)):
            pretrained_positional = weights is not sentinel
            if pretrained_positional:
                kwargs["pretrained"] = pretrained = kwargs.pop("weights")
            else:
                pretrained = kwargs["pretrained"]
            default = _weights_enum(arch).IMAGENET1K_V1 if pretrained else None
            if not pretrained_positional:
                warnings.warn("The parameter 'pretrained' is deprecated since 0.13 and may be "
                              "removed in the future, please use 'weights' instead.",
                              stacklevel=2)
            message = (f"Arguments other than a weight enum or `None` for 'weights' are "
                       f"deprecated since 0.13 and may be removed in the future. The current "
                       f"behavior is equivalent to passing `weights={default}`.")
            if pretrained:
                message += (f" You can also use `weights={type(default).__name__}.DEFAULT` to "
                            f"get the most up-to-date weights.")
            warnings.warn(message, stacklevel=2)
            del kwargs["pretrained"]
            kwargs["weights"] = default
        return builder(**kwargs)

    return wrapper


def _densenet(arch: str, weights, progress: bool, **kwargs: Any) -> DenseNet:
    growth_rate, block_config, num_init_features = CONFIGS[arch]
    weights = _resolve_weights(arch, weights)
    if weights is not None:
        categories = len(weights.meta["categories"])
        if kwargs.setdefault("num_classes", categories) != categories:
            raise ValueError(f"num_classes={kwargs['num_classes']} does not match the "
                             f"{categories} categories of {weights}")
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        load_torchvision_state_dict(
            model, weights.get_state_dict(progress=progress, check_hash=True))
    return model


# The builders have torchvision's signatures, annotations included, so that
# torchvision.models.get_model_weights(densenet_fast.densenet121) is DenseNet121_Weights.


@_legacy_interface
def densenet121(*, weights: Optional[DenseNet121_Weights] = None,  # noqa: UP045
                progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16), as ``torchvision.models.densenet121``.

    ``weights``: a torchvision ``DenseNet121_Weights`` value (or its name, e.g. ``"DEFAULT"``)
    whose state_dict is loaded, legacy key names included; other keyword arguments go to
    :class:`DenseNet`. The deprecated ``pretrained=True`` (the default weights) and positional
    arguments are accepted with torchvision's warnings.
    """
    return _densenet("densenet121", weights, progress, **kwargs)


@_legacy_interface
def densenet161(*, weights: Optional[DenseNet161_Weights] = None,  # noqa: UP045
                progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels); see :func:`densenet121`."""
    return _densenet("densenet161", weights, progress, **kwargs)


@_legacy_interface
def densenet169(*, weights: Optional[DenseNet169_Weights] = None,  # noqa: UP045
                progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); see :func:`densenet121`."""
    return _densenet("densenet169", weights, progress, **kwargs)


@_legacy_interface
def densenet201(*, weights: Optional[DenseNet201_Weights] = None,  # noqa: UP045
                progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); see :func:`densenet121`."""
    return _densenet("densenet201", weights, progress, **kwargs)
