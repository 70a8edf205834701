"""When a dense block may run fused: the standard module tree, with nothing watching it.

The fused block computes, from the modules' parameters and buffers, what torchvision's
modules would compute, without calling them. That is exact only for the standard tree, so
before every forward each block is checked with plain attribute reads (no allocation):

- every module has its standard type and settings (``nn.BatchNorm2d`` with ``affine=True``
  and both its weight and bias, or an equivalent the fused path computes exactly:
  ``nn.SyncBatchNorm`` where it does not synchronise, torchvision's ``FrozenBatchNorm2d``;
  ``nn.ReLU``; bias-free ``nn.Conv2d`` 1x1 and 3x3 with torchvision's stride, padding,
  dilation and groups; the 2x2 ``nn.AvgPool2d``),
  with channel counts that chain as in a DenseNet, and no ``forward`` replaced on an instance;
  a subclass that only wraps a standard type (FSDP2's ``FSDP<cls>``) counts as that type
  (:func:`validation.is_type`);
- no module has forward, pre-forward or backward hooks (old-style ``prune``, ``weight_norm``
  and ``spectral_norm`` are pre-forward hooks), and no global module hook is registered;
  hooks on the block itself leave it fused (it is called as a module), and when they are
  FSDP2's alone (``fully_shard`` on the block) the transition or norm after it is fused into
  that call too (:func:`fsdp_tail_blocker`);
- nothing is parametrized (``torch.nn.utils.parametrize`` changes a module's type);
- nothing traces the model (``torch.jit.trace``, the legacy ONNX exporter, ``torch.fx``,
  ``torch.export`` and the ONNX exporter built on it), no ``torch.func`` transform is active
  and no forward-mode AD dual level is open;
  :func:`unfused` is not in force.

A block that fails the check runs its modules, exactly as torchvision's block does; the
other blocks stay fused.
"""

from __future__ import annotations

import functools
import sys
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module_globals

from . import timm_parts
from .architecture import DenseLayer
from .spec import BatchNormSpec
from .sync import sync_of
from .validation import is_named_type, is_type, member, pads_over_half_kernel

# A transition's children: torchvision's, and timm's (whose norm applies the ReLU itself).
_TRANSITION_CHILDREN = ("norm", "relu", "conv", "pool")
_NORM_ACT_TRANSITION_CHILDREN = ("norm", "conv", "pool")

# Depth of nested unfused() contexts.
_unfused_depth = 0
_warned: set[str] = set()


class Blocker(NamedTuple):
    """Why a block (or its fused tail) runs through its modules.

    ``nonstandard``: the module tree itself differs from the standard one (a swapped type or
    setting, a parametrization); such a fallback is warned about once. Hooks, tracing and
    transforms are the user's own doing and are only reported.
    """

    reason: str
    nonstandard: bool = False


@contextmanager
def unfused():
    """Run every dense block through its modules inside this context: torchvision's
    computation and memory, for a side-by-side check or for a module-level tool that needs
    the modules to run."""
    global _unfused_depth
    _unfused_depth += 1
    try:
        yield
    finally:
        _unfused_depth -= 1


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, pre-forward or backward hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _fsdp_state_class() -> type | None:
    """FSDP2's per-module state class, looked up only if FSDP2 is loaded."""
    state = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_state")
    return getattr(state, "FSDPState", None) if state is not None else None


def fsdp_state(module: nn.Module):
    """The FSDP2 state whose hooks are ``module``'s only ones (None: other hooks, or none):
    the forward pre-hook that unshards the module's parameters (and registers the
    post-backward hook on its inputs) and the forward hook that reshards them (and registers
    the pre-backward hook on its outputs), which ``fully_shard`` puts on a module it shards
    on its own. Subclassed states and grouped ``fully_shard([...])`` hooks do not count."""
    state_cls = _fsdp_state_class()
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if state_cls is None or len(pre) != 1 or len(post) != 1 \
            or module._backward_hooks or module._backward_pre_hooks:
        return None
    (pre_hook,), (post_hook,) = pre.values(), post.values()
    state = getattr(pre_hook, "__self__", None)
    if (type(state) is not state_cls or getattr(post_hook, "__self__", None) is not state
            or getattr(pre_hook, "__func__", None) is not state_cls._pre_forward
            or getattr(post_hook, "__func__", None) is not state_cls._post_forward):
        return None
    return state


def fsdp_tail_blocker(block: nn.Module, tail: nn.Module) -> Blocker | None:
    """Why ``tail`` cannot run fused inside the call of ``block``, a block hooked by FSDP2
    alone (its hooks then wrap the block and the tail together, and see the tail's output).
    That computes what the modules do where FSDP's post-forward leaves the block's output as
    it is, and the tail's parameters have the dtype FSDP unshards the block's in."""
    state = fsdp_state(block)
    if state is None:
        return Blocker("the block has hooks, so it is called as a module")
    policy = getattr(state, "_mp_policy", None)
    if policy is None or policy.output_dtype is not None:
        return Blocker("FSDP casts the block's output (MixedPrecisionPolicy.output_dtype)")
    first = next(iter(block._modules.values()))
    dtype = policy.param_dtype or first.conv1.weight.dtype
    if any(p.dtype != dtype for p in tail.parameters()):
        return Blocker(f"its parameters are not in {dtype}, the dtype FSDP gives the block's")
    return None


def _global_hooks() -> bool:
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


# torch.fx.symbolic_trace only; the older name also answers for torch.export on newer torch.
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                               torch.fx._symbolic_trace.is_fx_tracing)


def exporting() -> bool:
    """Whether ``torch.export`` traces, strict (under dynamo) or not. The flag is read, not
    ``torch.compiler.is_exporting()``: dynamo folds that call to True under ``torch.compile``
    on torch 2.11, where the flag itself reads False."""
    return getattr(torch.compiler, "_is_exporting_flag", False) or (
        torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling())


def under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _forward_ad_active() -> bool:
    # A dual level is open (torch.autograd.forward_ad): inputs or parameters may carry
    # tangents, which the fused Functions do not propagate.
    return torch.autograd.forward_ad._current_level >= 0


def runtime_blocker(x) -> Blocker | None:
    """What, in the current call, keeps every block on its modules (None: nothing)."""
    if _unfused_depth:
        return Blocker("densenet_fast.unfused() is in force")
    if _global_hooks():
        return Blocker("global module hooks are registered "
                       "(torch.nn.modules.module.register_module_forward_hook and the like)")
    if exporting():
        # An exported program is a deployment artifact: runtimes (onnxruntime, AOTInductor)
        # optimise torchvision's concatenations and batch_norm nodes, and plan memory
        # themselves. The fused block traced as ATen ops gave onnxruntime 1.36x torchvision's
        # inference time (its buffer writes become ScatterND copies).
        return Blocker("traced by torch.export (or the ONNX exporter built on it)")
    if torch.compiler.is_compiling():
        return None  # dynamo traces the fused block itself (see graph.py)
    if torch.jit.is_tracing():
        return Blocker("traced by torch.jit.trace (or the TorchScript-based ONNX exporter)")
    if isinstance(x, torch.fx.Proxy) or _fx_symbolic_tracing():
        return Blocker("traced by torch.fx")
    if under_func_transform():
        return Blocker("under a torch.func transform")
    if _forward_ad_active():
        return Blocker("forward-mode AD (torch.autograd.forward_ad) is active")
    return None


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (recognised by name: torchvision need not be
    imported, see :mod:`densenet_fast.timm_parts`)."""
    return is_named_type(module, "torchvision.ops.misc.FrozenBatchNorm2d")


def is_norm_act(module: nn.Module | None) -> bool:
    """Whether ``module`` is one of timm's BatchNorm-with-activation modules
    (``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``): the BatchNorm, then
    its ``drop`` child, then its ``act`` child."""
    return any(is_named_type(module, name) for name in timm_parts.NORM_ACT)


def _describe(module: nn.Module | None) -> str:
    if module is None:
        return "missing"
    name = type(module).__name__
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"parametrized ({name}, torch.nn.utils.parametrize)"
    return f"{name} ({module!r})" if isinstance(module, (nn.Conv2d, nn.AvgPool2d)) else name


def norm_problem(bn: nn.Module | None, channels: int, *, act: bool = False) -> str | None:
    """Why ``bn`` is not a BatchNorm the fused path computes exactly over ``channels``.
    ``act``: ``bn`` is to be one of timm's norm-act modules (:func:`is_norm_act`), whose
    BatchNorm part this checks; the caller checks its ``drop`` and ``act``. (Plain BatchNorms,
    the common case on every forward, are answered by their exact type first.)"""
    wanted = "timm's BatchNormAct2d" if act else "nn.BatchNorm2d"
    if is_type(bn, nn.BatchNorm2d) or is_type(bn, nn.SyncBatchNorm):
        if act:
            return f"is {_describe(bn)}, not {wanted}"
    elif is_norm_act(bn):
        if not act:
            return f"is {_describe(bn)}, not {wanted} (it applies an activation itself)"
    elif act or not is_frozen_batchnorm(bn):
        return f"is {_describe(bn)}, not {wanted}"
    if _is_frozen(bn):
        width = bn.weight.shape[0]
    else:
        if not bn.affine:
            return "has affine=False"
        problem = _affine_problem(bn) or _running_stats_problem(bn) or _eps_problem(bn)
        if problem is not None:
            return problem
        width = bn.num_features
    if width != channels:
        return f"normalises {width} channels where {channels} arrive"
    return None


def _affine_problem(bn: nn.Module) -> str | None:
    """Why an ``affine=True`` BN's scale and shift are not both there (set to None by hand
    after construction; its forward then leaves that one out), or None. The fused calls take
    both as tensors."""
    params = bn._parameters  # the common case, read without member(): see _running_stats_problem
    if params.get("weight") is not None and params.get("bias") is not None:
        return None
    missing = [name for name in ("weight", "bias") if member(bn, name, None) is None]
    if missing:
        verb = "are" if len(missing) > 1 else "is"
        return f"has affine=True but its {' and '.join(missing)} {verb} None"
    return None


def _eps_problem(bn: nn.Module) -> str | None:
    """Why ``bn``'s ``eps`` is one this torch's ``F.batch_norm`` refuses (torch 2.14 raises
    for eps <= 0 with batch statistics, eps < 0 otherwise; older versions compute with it), or
    None: the modules then run, and raise that error where torchvision's would, after the
    modules before it have run."""
    eps = bn.eps
    if eps > 0:
        return None
    batch_stats = uses_batch_stats(bn)
    if _batch_norm_refuses(float(eps), batch_stats):
        return f"has eps={eps}, which BatchNorm refuses" + (" in training" if batch_stats else "")
    return None


@functools.cache
def _batch_norm_refuses(eps: float, batch_stats: bool) -> bool:
    """Whether this torch's ``F.batch_norm`` raises for ``eps``, tried on a two-value input."""
    x = torch.ones(2, 1)
    try:
        F.batch_norm(x, None if batch_stats else torch.zeros(1),
                     None if batch_stats else torch.ones(1), training=batch_stats, eps=eps)
    except ValueError:
        return True
    return False


def _running_stats_problem(bn: nn.Module) -> str | None:
    """Why ``bn``'s running-statistics buffers are in a state its own forward handles but
    the fused BNs do not model (set by hand after construction), or None. Read from
    ``_buffers`` directly: this runs for every BN on every forward, and ``Module.__getattr__``
    would triple its cost."""
    buffers = bn._buffers
    has_mean = buffers.get("running_mean") is not None
    if has_mean != (buffers.get("running_var") is not None):
        return "has only one of running_mean and running_var"
    if bn.training and bn.track_running_stats:
        # nn.BatchNorm2d then counts the batch in num_batches_tracked even without running
        # statistics to update, and without a counter folds with momentum 0 where momentum
        # is None.
        if not has_mean:
            return "has track_running_stats=True but no running_mean and running_var"
        if buffers.get("num_batches_tracked") is None:
            return "has track_running_stats=True but no num_batches_tracked"
    return None


def _is_frozen(bn: nn.Module) -> bool:
    """Of the modules :func:`norm_problem` accepts, the frozen ones (torchvision's
    ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``: running statistics and affine
    parameters as buffers): the only ones that are not ``nn.BatchNorm2d`` or
    ``nn.SyncBatchNorm``."""
    return not isinstance(bn, nn.BatchNorm2d | nn.SyncBatchNorm)


def norm_state(bn: nn.Module) -> BatchNormSpec:
    """The fused block's view of a BatchNorm that :func:`norm_problem` accepted."""
    if _is_frozen(bn):
        return BatchNormSpec(bn.running_mean, bn.running_var, None, None, bn.eps,
                             batch_stats=False)
    return BatchNormSpec.of(bn)


def _standard_conv(conv: nn.Module | None, kernel: int, in_channels: int) -> bool:
    return (is_type(conv, nn.Conv2d) and conv.kernel_size == (kernel, kernel)
            and conv.stride == (1, 1) and conv.padding == (kernel // 2, kernel // 2)
            and conv.dilation == (1, 1) and conv.groups == 1
            and member(conv, "bias") is None
            and conv.padding_mode == "zeros" and conv.in_channels == in_channels)


def _conv_problem(conv: nn.Module | None, kernel: int, in_channels: int) -> str | None:
    if _standard_conv(conv, kernel, in_channels):
        return None
    if is_type(conv, nn.Conv2d) and _standard_conv(conv, kernel, conv.in_channels):
        return f"reads {conv.in_channels} channels where {in_channels} arrive"
    return (f"is {_describe(conv)}, not a bias-free {kernel}x{kernel} nn.Conv2d with "
            f"stride 1, padding {kernel // 2}, dilation 1 and groups 1")


def _relu_problem(relu: nn.Module | None) -> str | None:
    return None if is_type(relu, nn.ReLU) else f"is {_describe(relu)}, not nn.ReLU"


def _identity_problem(module: nn.Module | None) -> str | None:
    return None if is_type(module, nn.Identity) else f"is {_describe(module)}, not nn.Identity"


def _child_blocker(prefix: str, name: str, child: nn.Module | None,
                   problem: str | None) -> Blocker | None:
    """Why child ``prefix + name`` keeps the fusion off, given the ``problem`` of its type
    or settings (None: standard); built only when something is wrong, as every forward
    checks every child."""
    if problem is not None:
        return Blocker(f"{prefix}{name} {problem}", nonstandard=True)
    if "forward" in child.__dict__:
        return Blocker(f"{prefix}{name} has its forward replaced on the instance",
                       nonstandard=True)
    if has_hooks(child):
        return Blocker(f"{prefix}{name} has hooks")
    return None


def bn_relu_blocker(prefix: str, norm_name: str, norm: nn.Module | None, relu_name: str,
                    relu: nn.Module | None, channels: int, *, norm_act: bool) -> Blocker | None:
    """Why child ``norm_name`` and the ReLU after it are not BN-ReLU over ``channels``.
    Torchvision's layout (``norm_act`` False): a BatchNorm, then the ``relu_name`` child
    ``relu``. timm's: one norm-act module (:func:`is_norm_act`) whose ``drop`` is
    ``nn.Identity`` and whose ``act`` is ``nn.ReLU`` (``relu`` is not used)."""
    if not norm_act:
        return (_child_blocker(prefix, norm_name, norm, norm_problem(norm, channels))
                or _child_blocker(prefix, relu_name, relu, _relu_problem(relu)))
    blocker = _child_blocker(prefix, norm_name, norm, norm_problem(norm, channels, act=True))
    if blocker is not None:
        return blocker
    inner = f"{prefix}{norm_name}."
    drop, act = norm._modules.get("drop"), norm._modules.get("act")
    return (_child_blocker(inner, "drop", drop, _identity_problem(drop))
            or _child_blocker(inner, "act", act, _relu_problem(act)))


def is_timm_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is timm's ``DenseLayer`` (norm-act modules, no ReLU children)."""
    return is_named_type(layer, timm_parts.DENSE_LAYER)


def layer_blocker(name: str, layer: nn.Module, channels: int, growth: int) -> Blocker | None:
    """Why ``layer`` (``name`` in its block) is not a standard dense layer reading
    ``channels`` channels and adding ``growth``; None when it is. Standard: densenet_fast's
    (torchvision's) ``DenseLayer`` with its BatchNorms and ReLUs, or timm's ``DenseLayer``
    with ReLU norm-act modules (its ``grad_checkpointing`` changes memory, not results)."""
    timm_layer = is_timm_layer(layer)
    if not (timm_layer or is_type(layer, DenseLayer)) or "forward" in layer.__dict__:
        return Blocker(f"{name} is {type(layer).__name__} with a forward of its own, "
                       f"not densenet_fast's (torchvision's) or timm's dense layer",
                       nonstandard=True)
    if has_hooks(layer):
        return Blocker(f"{name} has hooks")
    children = layer._modules
    norm1, relu1, conv1 = children.get("norm1"), children.get("relu1"), children.get("conv1")
    norm2, relu2, conv2 = children.get("norm2"), children.get("relu2"), children.get("conv2")
    prefix = f"{name}."
    bottleneck = conv1.out_channels if is_type(conv1, nn.Conv2d) else None
    return (bn_relu_blocker(prefix, "norm1", norm1, "relu1", relu1, channels,
                            norm_act=timm_layer)
            or _child_blocker(prefix, "conv1", conv1, _conv_problem(conv1, 1, channels))
            or bn_relu_blocker(prefix, "norm2", norm2, "relu2", relu2, bottleneck,
                               norm_act=timm_layer)
            or _child_blocker(prefix, "conv2", conv2, _conv_problem(conv2, 3, bottleneck))
            or (None if conv2.out_channels == growth else Blocker(
                f"{name} adds {conv2.out_channels} channels where the block's first layer "
                f"adds {growth}", nonstandard=True)))


def uses_batch_stats(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d | nn.SyncBatchNorm) and (
        bn.training or member(bn, "running_mean") is None)


def block_sync(block: nn.Module):
    """The :class:`sync.StatsSync` a standard block's batch statistics are merged over (None:
    per process). Every BN of a fused block that uses batch statistics must agree on it, as
    a channel's statistics are computed once for all its readers."""
    for layer in block._modules.values():
        for bn in norms_of_layer(layer):
            if uses_batch_stats(bn):
                return sync_of(bn)
    return None


def norms_of_layer(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A checked dense layer's ``norm1`` and ``norm2``."""
    children = layer._modules
    return children["norm1"], children["norm2"]


def _sync_blocker(block: nn.Module) -> Blocker | None:
    syncs = {sync_of(bn) for layer in block._modules.values()
             for bn in norms_of_layer(layer) if uses_batch_stats(bn)}
    if len(syncs) > 1:
        return Blocker("its training BatchNorms do not all synchronise over the same process "
                       "group (some SyncBatchNorm, some not, or different groups)",
                       nonstandard=True)
    return None


def block_blocker(block: nn.Module) -> Blocker | None:
    """Why the layers of ``block`` cannot run fused (None: they can). ``block`` itself is
    assumed to be densenet_fast's block; its own hooks are the caller's concern."""
    layers = block._modules
    if not layers:  # block_config with a 0: torchvision's block returns a copy of its input
        return Blocker("it has no layers to fuse")
    first = next(iter(layers.values()))
    channels = getattr(getattr(first, "conv1", None), "in_channels", None)
    growth = getattr(getattr(first, "conv2", None), "out_channels", None)
    for name, layer in layers.items():
        blocker = layer_blocker(name, layer, channels, growth)
        if blocker is not None:
            return blocker
        channels += growth
    return _sync_blocker(block)


def block_channels(block: nn.Module) -> int:
    """Channels a standard block returns."""
    last = next(reversed(block._modules.values()))
    return last.conv1.in_channels + last.conv2.out_channels


def transition_blocker(transition: nn.Module, channels: int) -> Blocker | None:
    """Why a standard transition type cannot be fused after a block of ``channels``: its
    children are torchvision's (``norm``, ``relu``, ``conv``, ``pool``) or timm's (``norm``, a
    norm-act module, then ``conv``, ``pool``)."""
    children = transition._modules
    names = tuple(children)
    if "forward" in transition.__dict__ or names not in (
            _TRANSITION_CHILDREN, _NORM_ACT_TRANSITION_CHILDREN):
        return Blocker(f"has children {names} or a forward of its own, not torchvision's "
                       f"{_TRANSITION_CHILDREN} or timm's {_NORM_ACT_TRANSITION_CHILDREN}",
                       nonstandard=True)
    pool = children["pool"]
    pool_problem = None
    if not (is_type(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and not pool.ceil_mode and pool.divisor_override is None):
        pool_problem = f"is {_describe(pool)}, not nn.AvgPool2d(kernel_size=2, stride=2)"
    return (bn_relu_blocker("", "norm", children["norm"], "relu", children.get("relu"),
                            channels, norm_act="relu" not in children)
            or _child_blocker("", "conv", children["conv"],
                              _conv_problem(children["conv"], 1, channels))
            or _child_blocker("", "pool", pool, pool_problem))


# The stems the fused stem computes: torchvision's, and timm's (whose norm0 applies the ReLU).
STEM_NAMES = ("conv0", "norm0", "relu0", "pool0")
NORM_ACT_STEM_NAMES = ("conv0", "norm0", "pool0")


def stem_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the stem that ``features`` (whose module names are ``names``) starts with:
    torchvision's or timm's four or three modules, else every module before the first
    ``denseblock`` when ``features`` starts with ``conv0`` (a stem of another kind, such as
    timm's deep stem, which runs as modules), else none."""
    for layout in (STEM_NAMES, NORM_ACT_STEM_NAMES):
        if names[:len(layout)] == layout:
            return layout
    if names[:1] != ("conv0",):
        return ()
    blocks = [i for i, name in enumerate(names) if name.startswith("denseblock")]
    return names[:blocks[0] if blocks else len(names)]


def stem_blocker(modules: dict[str, nn.Module]) -> Blocker | None:
    """Why the stem (:func:`stem_names`) of ``features`` (``modules``, by name) cannot run
    fused: a bias-free ``nn.Conv2d`` (any stride, padding, dilation, groups), a BatchNorm of
    its channels and ``nn.ReLU`` (or a ReLU norm-act module), and an ``nn.MaxPool2d``, none
    hooked."""
    names = stem_names(tuple(modules))
    if names not in (STEM_NAMES, NORM_ACT_STEM_NAMES):
        return Blocker(f"the stem has modules {names}; the fused stem is torchvision's "
                       f"{STEM_NAMES} or timm's {NORM_ACT_STEM_NAMES}")
    conv, norm, pool = modules["conv0"], modules["norm0"], modules["pool0"]
    conv_problem = None
    if not (is_type(conv, nn.Conv2d) and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)):
        conv_problem = f"is {_describe(conv)}, not a bias-free nn.Conv2d with numeric padding"
    pool_problem = None
    if not (is_type(pool, nn.MaxPool2d) and not pool.return_indices):
        pool_problem = f"is {_describe(pool)}, not nn.MaxPool2d"
    elif pads_over_half_kernel(pool.kernel_size, pool.padding):
        pool_problem = f"has padding {pool.padding} over half its kernel size {pool.kernel_size}"
    channels = conv.out_channels if is_type(conv, nn.Conv2d) else None
    return (_child_blocker("", "conv0", conv, conv_problem)
            or bn_relu_blocker("", "norm0", norm, "relu0", modules.get("relu0"), channels,
                               norm_act=names == NORM_ACT_STEM_NAMES)
            or _child_blocker("", "pool0", pool, pool_problem))


def warn_fallback(where: str, blocker: Blocker) -> None:
    """Warn, once per reason, that a block runs through its modules because the module tree
    is not the standard one. Not while torch.compile traces: dynamo cannot trace
    ``warnings.warn``, and the graph break would fail ``fullgraph=True`` on a model whose
    modules compile as torchvision's do (``fusion_report()`` still says why)."""
    if torch.compiler.is_compiling():
        return
    message = (f"densenet_fast: {where} runs through its modules (torchvision's computation "
               f"and memory), because {blocker.reason}; model.fusion_report() lists how every "
               f"block runs")
    if blocker.nonstandard and message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
