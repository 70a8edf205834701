"""The fusion plan of ``features``: one walk over its modules, the steps and why each runs
as it does, and what a fused step runs.

:func:`plan_features` is the only place that decides how ``features`` runs: its forward
runs the plan's steps, ``fusion_report()`` prints their reasons, and the spatial check
(:func:`validation.check_spatial_plan`) walks the plan's modules with the roles it gave
them. The checks of single modules it applies live in :mod:`densenet_fast.fusion`; the
check of the module after a block (:func:`tail_blocker`) lives here, with the plan.

A fused step builds its spec (:mod:`densenet_fast.spec`) from the modules' parameters,
buffers and settings (:func:`run_stem`, :func:`run_block`) and runs it as one graph node
(:mod:`densenet_fast.graph`).
"""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn as nn

from . import backends
from .architecture import DenseBlock, Transition
from .fusion import (
    Blocker,
    block_blocker,
    block_channels,
    block_sync,
    fsdp_tail_blocker,
    has_hooks,
    is_norm_act,
    norm_problem,
    norm_state,
    norms_of_layer,
    stem_blocker,
    stem_names,
    transition_blocker,
    uses_batch_stats,
)
from .graph import dense_block, stem
from .ops import reference_kernels_in_force
from .ops.conv_layout import fused_steps_channels_last
from .ops.formats import autocast_dtype_of, autocast_enabled, memory_format_of
from .spec import (
    BlockSpec,
    LayerParams,
    StemParams,
    StemSpec,
    Tail,
    TailParams,
    flat_block_params,
)
from .sync import sync_of
from .validation import as_pair, is_type, member


class StepKind(Enum):
    STEM = "stem"  # conv0, norm0, relu0, pool0 (timm: conv0, norm0, pool0), or another stem
    BLOCK = "block"  # a dense block, with the transition or norm after it when fused
    MODULE = "module"  # anything else, called as a module


class Step(NamedTuple):
    """One step of ``features``' forward.

    ``fused``: the stem or block runs as one fused graph node (else its modules run, as
    torchvision's do). ``called``: a fused block with hooks of its own is called as a module,
    so that they fire, and fuses inside its own forward (with the tail in ``modules`` when
    the hooks are FSDP2's alone, see :func:`fusion.fsdp_tail_blocker`). ``report``: how the
    step runs and why, as :meth:`DenseNet.fusion_report` gives it ("" for plain modules).
    ``roles``: per module, ``"block"``, ``"transition"`` or None, for the spatial check.
    """

    kind: StepKind
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    roles: tuple[str | None, ...]
    fused: bool = False
    called: bool = False
    report: str = ""

    @property
    def module(self) -> nn.Module:
        return self.modules[0]

    def named_roles(self):
        """``(name, module, role)`` of each module of the step."""
        return zip(self.names, self.modules, self.roles, strict=True)

    def run(self, x: torch.Tensor, recompute_bottleneck: bool = False,
            channels_last_steps: bool = False) -> torch.Tensor:
        """The step's output; ``recompute_bottleneck`` is ``features``' setting (the stem's).
        ``channels_last_steps``: the step is one of the fused steps ``features`` runs
        channels-last for an NCHW caller (:func:`run_steps`; see :func:`run_block`)."""
        if self.fused and self.kind is StepKind.STEM:
            conv, norm, pool = self.modules[0], self.modules[1], self.modules[-1]
            return run_stem(conv, norm, pool, x, recompute_bottleneck, channels_last_steps)
        if self.fused and self.kind is StepKind.BLOCK:
            tail = self.modules[1] if len(self.modules) > 1 else None
            if self.called:
                return self.module(x, tail=tail)
            return run_block(self.module, x, tail, channels_last_steps)
        for module in self.modules:
            x = module(x)
        return x


def plan_features(features: nn.Sequential, block_cls: type, transition_cls: type,
                  runtime: Blocker | None = None, *, report: bool = False) -> list[Step]:
    """``features``' steps, in order, decided from the modules as they are now: the standard
    stem fused; each densenet_fast block (``block_cls``) that passes the checks fused, with
    the transition (``transition_cls``) or norm after it where that one passes
    :func:`tail_blocker`; everything else called as a module. ``runtime``: what keeps every
    block on its modules in this call (:func:`fusion.runtime_blocker`), for the report.
    ``report``: describe blocks compiled on their own too (:func:`_compiled_block_report`,
    which checks the block again: its own compiled call checks it in a forward)."""
    named = list(features._modules.items())
    steps, i = [], 0
    stem_length = len(stem_names(tuple(features._modules)))
    if stem_length:
        blocker = runtime or stem_blocker(features._modules)
        names, modules = zip(*named[:stem_length], strict=True)
        steps.append(Step(StepKind.STEM, names, modules, (None,) * stem_length,
                          fused=blocker is None,
                          report="fused" if blocker is None else f"modules: {blocker.reason}"))
        i = stem_length
    while i < len(named):
        name, module = named[i]
        if not isinstance(module, DenseBlock):
            role = "transition" if is_type(module, transition_cls) else None
            described = _compiled_block_report(module, block_cls, runtime) if report else ""
            steps.append(Step(StepKind.MODULE, (name,), (module,), (role,), report=described))
            i += 1
            continue
        blocker = _own_block_blocker(module, block_cls) or runtime or block_blocker(module)
        if blocker is not None:
            steps.append(Step(StepKind.BLOCK, (name,), (module,), ("block",),
                              report=f"modules: {blocker.reason}"))
            i += 1
            continue
        tail_name, tail = named[i + 1] if i + 1 < len(named) else (None, None)
        refused = tail_blocker(module, tail, transition_cls)
        called = has_hooks(module)
        if refused is None:
            role = "transition" if is_type(tail, transition_cls) else None
            steps.append(Step(StepKind.BLOCK, (name, tail_name), (module, tail),
                              ("block", role), fused=True, called=called,
                              report=f"fused with features.{tail_name}"))
            i += 2
            continue
        report = "fused" if tail is None else \
            f"fused; features.{tail_name} runs as a module: {refused.reason}"
        steps.append(Step(StepKind.BLOCK, (name,), (module,), ("block",), fused=True,
                          called=called, report=report))
        i += 1
    return steps


def run_steps(steps: list[Step], x: torch.Tensor,
              recompute_bottleneck: bool = False) -> torch.Tensor:
    """``features``' output: each step run in turn on ``x``. Where :func:`_channels_last_steps`
    chooses channels-last for ``x``, fused steps that run one after another (the stem and
    blocks, not a block called as a module for its hooks) run in it: a fused stem reads
    ``x`` as it is and gives its output channels-last (keeping no copy of ``x`` for
    backward), a block gets a channels-last copy of its input; modules, hooks and the caller
    get ``x``'s own layout back. Under ``torch.compile`` those steps run as their ops (these
    kernels), with or without gradients."""
    channels_last = _channels_last_steps(x)
    caller, in_working = memory_format_of(x), False
    for step in steps:
        inside = channels_last and step.fused and not step.called
        if inside and not in_working and step.kind is StepKind.BLOCK:
            x = x.contiguous(memory_format=torch.channels_last)
        elif in_working and not inside:
            x = x.contiguous(memory_format=caller)
        x = step.run(x, recompute_bottleneck, channels_last_steps=inside)
        in_working = inside
    return x.contiguous(memory_format=caller) if in_working else x


def _channels_last_steps(x: torch.Tensor) -> bool:
    """Whether ``features``' fused steps run channels-last for ``x``: where
    :func:`conv_layout.fused_steps_channels_last` says so and the C++ kernels serve the
    device.
    With the pure-PyTorch kernels (``DENSENET_FAST_BACKEND=torch``, or
    :func:`ops.reference_kernels`) densenet121's batch-8 training step ran slower so on the
    AMD EPYC of family 25 (Zen 4): 1.08x (float32) and 1.07x (bf16 autocast) its NCHW time."""
    return (fused_steps_channels_last(x) and not reference_kernels_in_force()
            and backends.active_backend(x.device.type) == "cpp")


def _compiled_block_report(module: nn.Module, block_cls: type, runtime: Blocker | None) -> str:
    """How a block compiled on its own runs (``features.denseblock1 =
    torch.compile(block)``, whose wrapper holds the block as ``_orig_mod``): its own forward
    decides inside the compiled call, as for any block called as a module; "" for other
    modules."""
    block = module._modules.get("_orig_mod")
    if not isinstance(block, DenseBlock):
        return ""
    blocker = _own_block_blocker(block, block_cls) or runtime or block_blocker(block)
    where = "compiled on its own (torch.compile)"
    return f"{where}: fused" if blocker is None else f"{where}: modules: {blocker.reason}"


def _own_block_blocker(block: nn.Module, block_cls: type) -> Blocker | None:
    """Why a dense block is not densenet_fast's, whose forward fuses."""
    if is_type(block, block_cls) and "forward" not in block.__dict__:
        return None
    return Blocker(f"it is {type(block).__name__} with a forward of its own, not "
                   f"densenet_fast's block")


def tail_blocker(block: nn.Module, tail: nn.Module | None,
                 transition_cls: type) -> Blocker | None:
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
    if is_type(tail, transition_cls):
        return transition_blocker(tail, channels)
    problem = norm_problem(tail, channels, act=is_norm_act(tail))
    if problem is not None:
        return Blocker(f"it {problem}, and is not a transition either", nonstandard=True)
    if "forward" in tail.__dict__:
        return Blocker("it has its forward replaced on the instance", nonstandard=True)
    return None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The convolutions' dtype: the weights' as autocast casts them (BN parameters and
    statistics stay float32); the input was checked to agree
    (:func:`validation.check_input_tensor`)."""
    return autocast_dtype_of(weight)


def _without_autocast(x: torch.Tensor):
    # The fused Functions compute in one dtype, cast to explicitly; autocast must not recast.
    return (torch.autocast(x.device.type, enabled=False)
            if autocast_enabled(x.device.type) else nullcontext())


def run_stem(conv: nn.Conv2d, norm: nn.Module, pool: nn.MaxPool2d, x: torch.Tensor,
             recompute_bottleneck: bool = False,
             channels_last_steps: bool = False) -> torch.Tensor:
    """Run a standard stem (``conv -> norm -> ReLU -> pool``) as one graph node that keeps
    only the conv's output, or with ``recompute_bottleneck`` nothing but its input: the
    caller has checked the modules (:func:`fusion.stem_blocker`). ``channels_last_steps``
    (see :func:`run_block`): the output is channels-last, whatever ``x``'s layout, and
    under ``torch.compile`` the stem runs as its op with or without gradients."""
    spec = StemSpec(
        norm=norm_state(norm), conv_stride=conv.stride, conv_padding=conv.padding,
        conv_dilation=conv.dilation, conv_groups=conv.groups,
        pool_kernel=as_pair(pool.kernel_size), pool_stride=as_pair(pool.stride),
        pool_padding=as_pair(pool.padding), pool_dilation=as_pair(pool.dilation),
        pool_ceil_mode=pool.ceil_mode, recompute_bottleneck=recompute_bottleneck,
        channels_last=channels_last_steps, sync=sync_of(norm))
    dtype = _compute_dtype(conv.weight)
    with _without_autocast(x):
        return stem(x.to(dtype), spec, StemParams(conv.weight.to(dtype), norm.weight, norm.bias),
                    as_op=channels_last_steps)


def _layer_params(layer: nn.Module) -> LayerParams:
    """A checked dense layer's parameters."""
    children = layer._modules
    norm1, norm2 = norms_of_layer(layer)
    return LayerParams(member(norm1, "weight"), member(norm1, "bias"),
                       member(children["conv1"], "weight"),
                       member(norm2, "weight"), member(norm2, "bias"),
                       member(children["conv2"], "weight"))


def run_block(block: DenseBlock, x: torch.Tensor, tail: nn.Module | None,
              channels_last_steps: bool = False) -> torch.Tensor:
    """Run a standard ``block`` and, fused with it, ``tail`` (a transition, a final norm or
    None) as one graph node: the caller has checked them (:func:`plan_features`). A final
    norm that is one of timm's norm-act modules has its BatchNorm fused and its ``drop`` and
    ``act`` called after, as its forward calls them. The block recomputes its bottlenecks
    where ``block.recompute_bottleneck`` or a timm layer's ``grad_checkpointing`` asks to
    (timm's ``set_grad_checkpointing``): the same results, the memory setting closest to
    timm's checkpointing of each layer's concatenation, BN-ReLU and 1x1 convolution.
    ``channels_last_steps``: the block is one of the fused steps ``features`` runs
    channels-last for an NCHW caller (:func:`run_steps`), where this CPU's kernels were
    measured fastest: dropout draws its masks in NCHW order (``BlockSpec.masks_nchw``), and
    under ``torch.compile`` the block runs as its op, those kernels, with or without
    gradients (elsewhere a compiled forward without gradients traces the kernels' ATen ops
    for inductor)."""
    backends.active_backend(x.device.type)  # a forced, unavailable backend fails here
    modules = list(block._modules.values())
    dtype = _compute_dtype(modules[0].conv1.weight)
    with _without_autocast(x):
        # The weights as the modules hold them (autocast's float32 masters): dense_block casts
        # them to the input's dtype, where it keeps them for backward, or layer by layer.
        layers = [_layer_params(m) for m in modules]
        if tail is None:
            kind, tail_norm, tail_params = Tail.NONE, None, None
        elif isinstance(tail, Transition):
            kind, tail_norm = Tail.TRANSITION, norm_state(tail.norm)
            tail_params = TailParams(tail.norm.weight, tail.norm.bias, tail.conv.weight)
        else:
            kind, tail_norm = Tail.NORM, norm_state(tail)
            tail_params = TailParams(tail.weight, tail.bias)
        spec = BlockSpec(
            layer_norms=tuple(tuple(map(norm_state, norms_of_layer(m))) for m in modules),
            growth_rate=modules[0].conv2.out_channels,
            drop_rates=tuple(m.drop_rate if m.training else 0.0 for m in modules),
            tail=kind,
            tail_norm=tail_norm,
            recompute_bottleneck=block.recompute_bottleneck or any(
                # timm's DenseLayer sets it on the instance (set_grad_checkpointing too);
                # getattr of a member a module lacks raises inside Module.__getattr__.
                m.__dict__.get("grad_checkpointing", False) for m in modules),
            sync=block_sync(block),
            masks_nchw=channels_last_steps,
        )
        out = dense_block(x.to(dtype), spec, flat_block_params(layers, tail_params),
                          as_op=channels_last_steps)
    if kind is Tail.NORM and is_norm_act(tail):
        out = tail.act(tail.drop(out))
    return out
