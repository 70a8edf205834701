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
from typing import Any, Optional

import torch
import torch.nn as nn

from .architecture import CONFIGS, DenseBlock, DenseNetBase, Transition
from .fusion import Blocker, block_blocker, runtime_blocker, warn_fallback
from .plan import (  # noqa: F401 (run_stem: API)
    Step,
    StepKind,
    plan_features,
    run_block,
    run_stem,
    run_steps,
)
from .state_dict import load_torchvision_state_dict
from .sync import sync_of
from .validation import check_input_tensor, check_spatial_plan, stored_tensor

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


class _DenseBlock(DenseBlock):
    """A dense block computed over one shared buffer; returns all its channels.

    A block whose module tree is not the standard one, or that is hooked inside, traced or
    transformed (:mod:`densenet_fast.fusion`), runs its modules as torchvision's does.
    ``recompute_bottleneck``: backward recomputes each layer's bottleneck instead of keeping
    it (see :class:`DenseNet`). An empty batch and ``torch.jit.script`` also run the modules.
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float, memory_efficient: bool = False,
                 recompute_bottleneck: bool = False) -> None:
        super().__init__(num_layers, num_input_features, bn_size, growth_rate, drop_rate,
                         memory_efficient)
        self.recompute_bottleneck = bool(recompute_bottleneck)

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
                           reference=stored_tensor(first.conv1), where=type(self).__name__)
        if init_features.shape[0] == 0:
            # torchvision's computation: an empty output, num_batches_tracked counted in training
            return self._forward_modules_then(init_features, tail)
        check_spatial_plan([("block", self, "block")], init_features)
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
    ``recompute_bottleneck``: the fused stem keeps no conv0 output (the convolution output
    its BN reads, as a layer's bottleneck is) for backward, and recomputes it. An empty batch
    (after the input checks) and ``torch.jit.script`` call every module."""

    def __init__(self, *args: Any, recompute_bottleneck: bool = False) -> None:
        super().__init__(*args)
        self.recompute_bottleneck = bool(recompute_bottleneck)

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(item, _Features):  # nn.Sequential builds a slice from its modules alone
            item.recompute_bottleneck = self.recompute_bottleneck
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
            check_input_tensor(x, expected_channels=conv0.in_channels,
                               reference=stored_tensor(conv0), where="DenseNet")
        steps = self.fusion_plan()
        check_spatial_plan(_named_roles(steps), x, _values_over_ranks())
        if x.shape[0] == 0:
            # torchvision's computation: an empty output, num_batches_tracked counted in training
            return self._forward_modules(x)
        return run_steps(steps, x, self.recompute_bottleneck)

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
        check_spatial_plan(_named_roles(self.fusion_plan()), x, _values_over_ranks())

    def fusion_plan(self, runtime: Blocker | None = None, *,
                    report: bool = False) -> list[Step]:
        """The forward's steps (:func:`plan.plan_features`), decided afresh on every call
        from the modules as they are; ``runtime``: what keeps every block on its modules in
        this call, and ``report``: also describe blocks compiled on their own, for the
        report."""
        return plan_features(self, _DenseBlock, _Transition, runtime, report=report)

    def fusion_report(self) -> dict[str, str]:
        """How the stem and each dense block run in the next forward, and why; see
        :meth:`DenseNet.fusion_report`."""
        steps = self.fusion_plan(runtime_blocker(None), report=True)
        return {("features.stem" if step.kind is StepKind.STEM else f"features.{step.names[0]}"):
                step.report for step in steps if step.report}


def fusion_report(model: nn.Module) -> dict[str, str]:
    """:meth:`DenseNet.fusion_report` for any model that holds densenet_fast's ``features``
    (a converted timm DenseNet, a model of one's own around a DenseNet): the report of each
    such ``features``, keyed by the names of its stem and blocks in ``model``. A model with
    none (not converted) is refused rather than reported empty."""
    held = [(name, m) for name, m in model.named_modules() if isinstance(m, _Features)]
    if not held:
        raise TypeError(f"{type(model).__name__} holds no densenet_fast features to report "
                        f"on; densenet_fast.convert(model) converts a torchvision or timm "
                        f"DenseNet")
    return {(name + key[len("features"):] if name else key): value
            for name, features in held for key, value in features.fusion_report().items()}


def set_recompute_bottleneck(features: nn.Module, enable: bool = True) -> None:
    """Set ``recompute_bottleneck`` on ``features`` (when it is densenet_fast's) and on each
    of densenet_fast's blocks in it (see :class:`DenseNet`)."""
    enable = bool(enable)
    for module in (features, *features.children()):
        if isinstance(module, (_DenseBlock, _Features)):
            module.recompute_bottleneck = enable


def _named_roles(steps):
    return ((f"features.{name}", module, role) for step in steps
            for name, module, role in step.named_roles())


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
            less memory, somewhat more time, same results. Stored as ``recompute_bottleneck``
            on each block and on ``features`` (the stem), so it can be set per block too;
            :meth:`set_recompute_bottleneck` sets it everywhere.
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
        self.set_recompute_bottleneck(recompute_bottleneck)

    def set_recompute_bottleneck(self, enable: bool = True) -> None:
        """Set ``recompute_bottleneck`` (see the class docstring) on every densenet_fast block
        of ``features`` and on ``features`` itself (the stem), as timm's
        ``set_grad_checkpointing`` sets its setting everywhere; a block can also be set on its
        own (``model.features.denseblock1.recompute_bottleneck = True``)."""
        set_recompute_bottleneck(self.features, enable)

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
