"""The dense block and the stem as autograd graph nodes, each over a pair of torch.library ops.

A node is an autograd Function whose forward calls a forward op and whose backward calls a
backward op; the ops run :mod:`densenet_fast.block`'s and :mod:`densenet_fast.stem`'s
computation. In eager mode this is one Function per block, as before. Under
``torch.compile`` the ops are opaque: AOTAutograd saves for backward exactly the tensors the
forward op returns for it (what eager keeps), and inductor never sees the block's buffers or
the gradient buffer, so it can neither keep intermediates the block frees nor choose their
layout. Inside the ops the per-layer fused op runs on the active backend's kernels.

A spec crosses an op's boundary as plain numbers and lists (:func:`block_op_args`), the
running statistics an eval-mode BN reads as a tensor list. The forward op mutates nothing:
it returns the batch statistics, and a third op folds them into the running statistics.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from math import prod
from typing import NamedTuple

import torch
from torch.utils.flop_counter import register_flop_formula

from . import differentiable
from .block import (
    Backward,
    BlockSpec,
    Forward,
    LayerParams,
    NormState,
    Saved,
    Tail,
    running_stats,
    running_tensors_read,
    running_updates,
)
from .fusion import under_func_transform
from .ops.batchnorm import update_running_stats
from .ops.formats import memory_format_of, stats_dtype_for
from .stem import StemSpec
from .stem import backward as stem_backward_computation
from .stem import forward as stem_forward_computation
from .sync import StatsSync

_LIB = "densenet_fast"

# The block's settings as op arguments; the same list follows the tensors of both block ops.
_BLOCK_SETTINGS = ("int growth_rate, str tail, bool recompute_bottleneck, float[] drop_rates, "
                   "float[] eps, bool[] batch_stats, str sync_group, int backward_from")


class BlockOpArgs(NamedTuple):
    """A :class:`BlockSpec` as op arguments. Per BN, in ``BlockSpec.all_norms()`` order:
    ``eps`` and whether it normalises with batch statistics; ``running`` holds the running
    mean and variance of each BN that does not. ``sync_group``: the process group's name,
    ``""`` when not synchronised. Whether and how BNs update running statistics stays out:
    the forward op does not update them. ``backward_from``: see :class:`BlockSpec`."""

    growth_rate: int
    tail: str
    recompute_bottleneck: bool
    drop_rates: list
    eps: list
    batch_stats: list
    sync_group: str
    backward_from: int

    def spec(self, running, synchronised: bool = True) -> BlockSpec:
        """The spec the ops compute with (``synchronised=False``: shapes only, no group)."""
        read = iter(running)
        norms = [NormState(*((next(read), next(read)) if not batch else (None, None)), None,
                           None, eps, batch_stats=batch, update_running=False)
                 for eps, batch in zip(self.eps, self.batch_stats, strict=True)]
        layers, tail = len(self.drop_rates), Tail(self.tail)
        prefix, norm2s = norms[:len(norms) - layers], norms[len(norms) - layers:]
        return BlockSpec(
            growth_rate=self.growth_rate,
            layer_norms=tuple(zip(prefix[:layers], norm2s, strict=True)),
            drop_rates=tuple(self.drop_rates),
            tail=tail,
            tail_norm=prefix[layers] if tail is not Tail.NONE else None,
            recompute_bottleneck=self.recompute_bottleneck,
            sync=StatsSync.named(self.sync_group) if synchronised else None,
            backward_from=self.backward_from,
        )


def block_op_args(spec: BlockSpec) -> tuple[BlockOpArgs, list]:
    """``(settings, running)``: what the block ops take besides the input and parameters."""
    norms = spec.all_norms()
    running = [t for norm in norms if not norm.batch_stats
               for t in (norm.running_mean, norm.running_var)]
    args = BlockOpArgs(spec.growth_rate, spec.tail.value, spec.recompute_bottleneck,
                       list(spec.drop_rates), [norm.eps for norm in norms],
                       [norm.batch_stats for norm in norms],
                       spec.sync.group_name() if spec.sync is not None else "",
                       spec.backward_from)
    return args, running


def _block_forward_outputs(x, params, running, args: BlockOpArgs, fake: bool):
    fwd = Forward(x, args.spec(running, synchronised=not fake), params, keep=True)
    out = fwd.run()
    if out is fwd.buffer:
        # The buffer is saved for backward; the caller gets its own copy, which it may
        # modify in place (an in-place ReLU after a block, as after torchvision's cat).
        out = out.clone()
    # The count as a CPU scalar: synchronised statistics know it only at run time.
    count = torch.empty((), dtype=torch.int64) if fake else torch.tensor(fwd.count)
    return [out, *Saved.of(fwd, count).tensors()]


@torch.library.custom_op(f"{_LIB}::dense_block_forward", mutates_args=(), schema=(
    f"(Tensor x, Tensor[] params, Tensor[] running, {_BLOCK_SETTINGS}) -> Tensor[]"))
def dense_block_forward(x, params, running, *settings):
    """``[out, *saved]``: the block's (and tail's) output, then ``Saved.tensors()``."""
    return _block_forward_outputs(x, params, running, BlockOpArgs(*settings), fake=False)


@dense_block_forward.register_fake
def _(x, params, running, *settings):
    return _block_forward_outputs(x, params, running, BlockOpArgs(*settings), fake=True)


@torch.library.custom_op(f"{_LIB}::dense_block_backward", mutates_args=(), schema=(
    f"(Tensor grad_out, Tensor[] saved, Tensor[] params, Tensor[] running, {_BLOCK_SETTINGS}, "
    "bool input_grad) -> Tensor[]"))
def dense_block_backward(grad_out, saved, params, running, *rest):
    """``[grad_x, *parameter gradients]`` from what :func:`dense_block_forward` saved;
    ``grad_x`` is empty unless ``input_grad``, and so are the gradients of the layers below
    ``backward_from`` (frozen: their backward does not run)."""
    *settings, input_grad = rest
    spec = BlockOpArgs(*settings).spec(running)
    grad_x, grads = Backward(Saved.load(saved, spec), spec, params).run(grad_out, input_grad)
    grad_x = grad_x if grad_x is not None else grad_out.new_empty(0)
    return [grad_x, *_strided_like(grads, params)]


def _strided_like(grads, params) -> list:
    """Each gradient with its parameter's strides, as the fake implementations promise
    (a convolution's weight gradient comes out channels-last from channels-last data); an
    empty tensor for a gradient not computed."""
    return [p.new_empty(0) if g is None else
            g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            for g, p in zip(grads, params, strict=True)]


@dense_block_backward.register_fake
def _(grad_out, saved, params, running, *rest):
    *settings, input_grad = rest
    args = BlockOpArgs(*settings)
    buffer = saved[0]
    n, total, h, w = buffer.shape
    c0 = total - len(args.drop_rates) * args.growth_rate
    grad_x = buffer.new_empty((n, c0, h, w)).contiguous(memory_format=memory_format_of(buffer)) \
        if input_grad else grad_out.new_empty(0)
    skipped = len(LayerParams._fields) * args.backward_from
    return [grad_x, *(p.new_empty(0) if i < skipped else torch.empty_like(p)
                      for i, p in enumerate(params))]


@torch.library.custom_op(f"{_LIB}::update_running_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"),
                         schema=("(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, "
                                 "Tensor(c!)[] num_batches_tracked, Tensor[] mean, Tensor[] var, "
                                 "float?[] momentum, Tensor count) -> ()"))
def update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, var,
                            momentum, count):
    """:func:`ops.batchnorm.update_running_stats` for several BNs at once, ``count`` (values
    per channel) a CPU scalar tensor: the forward ops return it, as synchronised statistics
    know it only at run time."""
    _fold_running(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                  int(count))


@update_running_stats_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    return None


def _fold_running(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                  count: int) -> None:
    for state in zip(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                     strict=True):
        update_running_stats(*state, count)


def update_running(updates, count) -> None:
    """Fold ``(NormState, batch mean, batch var)`` updates in; ``count``: an int, or the CPU
    scalar tensor a forward op returned (then through the op, whose mutations are declared)."""
    if not updates:
        return
    states = [state for state, _, _ in updates]
    lists = ([s.running_mean for s in states], [s.running_var for s in states],
             [s.num_batches_tracked for s in states], [mean for _, mean, _ in updates],
             [var for _, _, var in updates], [s.momentum for s in states])
    if isinstance(count, torch.Tensor):
        update_running_stats_op(*lists, count)
    else:
        _fold_running(*lists, count)


def _needs_graph_node(x, params) -> bool:
    """Whether a gradient is needed. torch.export traces the forward alone: there the ATen
    ops are traced instead of the ops of this module, so that the exported program (and an
    ONNX file made from it) needs no densenet_fast to run. (Export's default, non-strict
    mode; under dynamo, torch 2.11 answers ``is_exporting()`` True for torch.compile too.)"""
    exporting = torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
    return (torch.is_grad_enabled() and not exporting
            and (x.requires_grad or any(p.requires_grad for p in params)))


def _restore_backward_grads(ctx, grads):
    """A backward's gradients with None where the Function's input needs none."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def _differentiate(ctx, forward, x, params, grad_out):
    """A backward's gradients for ``apply(x, spec, *params)``: those of ``forward()`` at ``x``
    and ``params`` (None where the Function's input needs none) with ``grad_out`` as the
    output's gradient, through differentiable operations: a graph of their own when grad mode
    is on (``create_graph=True``), batched under ``vmap``."""
    create_graph = torch.is_grad_enabled()
    inputs = (x, *params)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    device_type = x.device.type
    # Autocast is thread-local, and a CPU backward runs in the caller's thread: the recomputed
    # forward computes in the dtypes forward saw, as the fused forward did.
    autocast_off = (torch.autocast(device_type, enabled=False)
                    if torch.is_autocast_enabled(device_type) else nullcontext())
    with torch.enable_grad(), autocast_off:
        out = forward()
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True))
    grads = [next(grads) if need else None for need in needs]
    return (grads[0], None, *grads[1:])


def _needs_differentiable_backward(grad_out: torch.Tensor) -> bool:
    """Whether autograd asks more of a backward than the fused kernels give: a graph of the
    gradients (``create_graph=True``: grad mode is on inside the backward), or batched
    gradients (``torch.func.vmap`` over the backward, or the older vmap that
    ``torch.autograd.functional.jacobian(vectorize=True)`` runs, whose batched tensors carry
    the ``Batched`` dispatch key, which Python's DispatchKey enum does not name)."""
    return (torch.is_grad_enabled() or under_func_transform()
            or "Batched" in str(torch._C._dispatch_keys(grad_out)))


class _InputInBuffer:
    """Saved-tensor hooks that keep the block input for backward as a view of the buffer's
    first channels, which hold a copy of it. The route for higher-order gradients needs the
    input's autograd identity (to differentiate through the graph that produced it); autograd
    restores that identity on a tensor saved through hooks, so this keeps the identity
    without keeping the input's memory. The buffer is the first tensor the block saves."""

    def __init__(self, x: torch.Tensor):
        self.x, self.channels, self.buffer = x, x.shape[1], None

    def pack(self, t):
        if self.buffer is None:
            self.buffer = t
        elif t is self.x:
            self.x = None
            return self
        return t

    def unpack(self, packed):
        if packed is self:
            return self.buffer[:, :self.channels]
        return packed

    def hooks(self):
        """The context that saves the block's tensors through these hooks, or None where the
        input must be saved as it is: other saved-tensor hooks are in force (``save_on_cpu``,
        checkpointing), or hooks are disabled."""
        autograd = torch._C._autograd
        if autograd._top_saved_tensors_default_hooks(False) is not None \
                or not autograd._saved_tensors_hooks_is_enabled():
            return None
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _run_block_forward_op(x, spec: BlockSpec, params):
    """``(out, saved, op settings)``: the forward op's results, with the running statistics
    folded in (never recorded for autograd)."""
    args, running = block_op_args(spec)
    out, *saved = dense_block_forward(x, list(params), running, *args)
    kept = Saved.load(saved, spec)
    with torch.no_grad():
        update_running(running_updates(spec, x.shape[1], kept.mean, kept.var,
                                       kept.norm2_batch), kept.count)
    return out, saved, args


class DenseBlockFunction(torch.autograd.Function):
    """``apply(x, spec, *params)``: one dense block (plus its tail) as a single graph node.

    Backward runs the fused kernels; when autograd asks for more than a first-order gradient
    (:func:`_needs_differentiable_backward`), it recomputes the block with differentiable
    operations from what it saved and differentiates that (:mod:`densenet_fast.differentiable`).
    """

    @staticmethod
    def forward(ctx, x, spec: BlockSpec, *params):
        out, saved, args = _run_block_forward_op(x, spec, params)
        # The input, for the differentiable route (saved as a view of the buffer: see
        # _InputInBuffer).
        ctx.save_for_backward(*saved, *params, x)
        ctx.spec, ctx.args, ctx.num_saved, ctx.num_params = spec, args, len(saved), len(params)
        # Eval-mode BNs re-read running statistics in backward: refuse if they changed.
        ctx.running_versions = [t._version for t in running_tensors_read(spec)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.running_versions != [t._version for t in running_tensors_read(ctx.spec)]:
            raise RuntimeError(
                "densenet_fast: BatchNorm running statistics read by an eval-mode forward were "
                "modified in place before its backward")
        tensors = ctx.saved_tensors
        saved = list(tensors[:ctx.num_saved])
        params = list(tensors[ctx.num_saved:ctx.num_saved + ctx.num_params])
        if _needs_differentiable_backward(grad_out):
            return _differentiable_block_backward(ctx, grad_out, saved, params, tensors)
        _, running = block_op_args(ctx.spec)
        grad_x, *grads = dense_block_backward(grad_out, saved, params, running, *ctx.args,
                                              ctx.needs_input_grad[0])
        return _restore_backward_grads(ctx, (grad_x, None, *grads))


def _differentiable_block_backward(ctx, grad_out, saved, params, tensors):
    spec, x = ctx.spec, tensors[-1]
    kept = Saved.load(saved, spec)
    if spec.backward_from:  # the input and the frozen layers' outputs are constants
        first = kept.buffer[:, :x.shape[1] + spec.backward_from * spec.growth_rate]
    else:
        first = x
    return _differentiate(
        ctx, lambda: differentiable.block_forward(first, spec, params, kept.masks), x, params,
        grad_out)


def _backward_from(spec: BlockSpec, x: torch.Tensor, params) -> int:
    """The first layer whose backward must run: 0 if the input needs a gradient, else the
    first layer with a parameter that needs one (``num_layers``: none)."""
    if x.requires_grad:
        return 0
    size = len(LayerParams._fields)
    for layer in range(spec.num_layers):
        if any(p.requires_grad for p in params[size * layer:size * (layer + 1)]):
            return layer
    return spec.num_layers


def dense_block(x: torch.Tensor, spec: BlockSpec, params) -> torch.Tensor:
    """Run one block (and its tail). Builds a graph node only when a gradient is needed, and
    keeps for it only what the gradients asked for need; otherwise nothing is kept and each
    bottleneck is freed as soon as it is used."""
    if _needs_graph_node(x, params):
        spec = replace(spec, backward_from=_backward_from(spec, x, params))
        if torch.compiler.is_compiling():
            return _compiled_dense_block(x, spec, params)
        with _InputInBuffer(x).hooks() or nullcontext():
            return DenseBlockFunction.apply(x, spec, *params)
    fwd = Forward(x, spec, params, keep=False)
    out = fwd.run()
    update_running(fwd.running_updates(), fwd.count)
    return out


_STEM_SETTINGS = ("int[] conv, int[] pool, bool pool_ceil_mode, float eps, bool batch_stats, "
                  "bool recompute_conv, str sync_group")


class StemOpArgs(NamedTuple):
    """A :class:`StemSpec` as op arguments: ``conv`` is conv0's stride, padding, dilation
    (two each) and groups; ``pool`` is pool0's kernel, stride, padding and dilation (two
    each); ``running`` holds norm0's running mean and variance when it normalises with them."""

    conv: list
    pool: list
    pool_ceil_mode: bool
    eps: float
    batch_stats: bool
    recompute_conv: bool
    sync_group: str

    def spec(self, running, synchronised: bool = True) -> StemSpec:
        c, p = self.conv, self.pool
        norm = NormState(*(running if not self.batch_stats else (None, None)), None, None,
                         self.eps, batch_stats=self.batch_stats, update_running=False,
                         sync=StatsSync.named(self.sync_group) if synchronised else None)
        return StemSpec(tuple(c[0:2]), tuple(c[2:4]), tuple(c[4:6]), c[6], tuple(p[0:2]),
                        tuple(p[2:4]), tuple(p[4:6]), tuple(p[6:8]), self.pool_ceil_mode, norm,
                        self.recompute_conv)


def stem_op_args(spec: StemSpec) -> tuple[StemOpArgs, list]:
    """``(settings, running)``: what the stem ops take besides the tensors they compute on."""
    norm = spec.norm
    running = [] if norm.batch_stats else [norm.running_mean, norm.running_var]
    args = StemOpArgs(
        [*spec.conv_stride, *spec.conv_padding, *spec.conv_dilation, spec.conv_groups],
        [*spec.pool_kernel, *spec.pool_stride, *spec.pool_padding, *spec.pool_dilation],
        spec.pool_ceil_mode, norm.eps, norm.batch_stats, spec.recompute_conv,
        norm.sync.group_name() if norm.sync is not None else "")
    return args, running


def _stem_forward_outputs(x, conv_weight, norm_weight, norm_bias, running, args: StemOpArgs,
                          fake: bool):
    result = stem_forward_computation(x, args.spec(running, synchronised=not fake),
                                      conv_weight, norm_weight, norm_bias)
    count = torch.empty((), dtype=torch.int64) if fake else torch.tensor(result.count)
    kept = [] if args.recompute_conv else [result.conv_out]
    if not args.batch_stats:  # the running statistics: backward reads them again
        return [result.out, *kept, count]
    return [result.out, *kept, result.mean, result.invstd, count, result.var]


@torch.library.custom_op(f"{_LIB}::stem_forward", mutates_args=(), schema=(
    "(Tensor x, Tensor conv_weight, Tensor norm_weight, Tensor norm_bias, Tensor[] running, "
    f"{_STEM_SETTINGS}) -> Tensor[]"))
def stem_forward(x, conv_weight, norm_weight, norm_bias, running, *settings):
    """``[out, *saved]``, ``saved`` being conv0's output (unless recomputed), with batch
    statistics norm0's mean and invstd, and the count; then, with batch statistics, the batch
    variance (for the running statistics)."""
    return _stem_forward_outputs(x, conv_weight, norm_weight, norm_bias, running,
                                 StemOpArgs(*settings), fake=False)


@stem_forward.register_fake
def _(x, conv_weight, norm_weight, norm_bias, running, *settings):
    return _stem_forward_outputs(x, conv_weight, norm_weight, norm_bias, running,
                                 StemOpArgs(*settings), fake=True)


@torch.library.custom_op(f"{_LIB}::stem_backward", mutates_args=(), schema=(
    "(Tensor grad_out, Tensor x, Tensor conv_weight, Tensor norm_weight, Tensor norm_bias, "
    f"Tensor[] saved, Tensor[] running, {_STEM_SETTINGS}, bool input_grad) -> Tensor[]"))
def stem_backward(grad_out, x, conv_weight, norm_weight, norm_bias, saved, running, *rest):
    """``[grad_x, dconv, dnorm_weight, dnorm_bias]``; ``grad_x`` is empty unless
    ``input_grad``."""
    *settings, input_grad = rest
    spec = StemOpArgs(*settings).spec(running)
    *kept, count = saved
    if spec.norm.batch_stats:
        *kept, mean, invstd = kept
    else:
        mean, invstd = running_stats(spec.norm, stats_dtype_for(x.dtype))
    grad_x, *grads = stem_backward_computation(
        grad_out, x, spec, conv_weight, norm_weight, norm_bias, kept[0] if kept else None,
        mean, invstd, int(count), input_grad)
    grad_x = grad_x if grad_x is not None else x.new_empty(0)
    return [grad_x, *_strided_like(grads, (conv_weight, norm_weight, norm_bias))]


@stem_backward.register_fake
def _(grad_out, x, conv_weight, norm_weight, norm_bias, saved, running, *rest):
    grad_x = torch.empty_like(x) if rest[-1] else x.new_empty(0)
    return [grad_x, torch.empty_like(conv_weight), torch.empty_like(norm_weight),
            torch.empty_like(norm_bias)]


def _run_stem_forward_op(x, spec: StemSpec, conv_weight, norm_weight, norm_bias):
    """``(out, saved, op settings)``: the stem's forward op, with norm0's running statistics
    folded in (never recorded for autograd); ``saved`` is what backward takes."""
    args, running = stem_op_args(spec)
    out, *rest = stem_forward(x, conv_weight, norm_weight, norm_bias, running, *args)
    saved = rest[:-1] if spec.norm.batch_stats else rest
    if spec.norm.update_running:  # saved ends with mean, invstd, count; rest with the var
        with torch.no_grad():
            update_running([(spec.norm, saved[-3], rest[-1])], saved[-1])
    return out, saved, args


class StemFunction(torch.autograd.Function):
    """``apply(x, spec, conv_weight, norm_weight, norm_bias)``:
    ``max_pool(relu(bn(conv(x))))``, keeping ``conv(x)`` and the statistics for backward;
    beyond a first-order backward, differentiates the recomputed stem (as the block does)."""

    @staticmethod
    def forward(ctx, x, spec: StemSpec, conv_weight, norm_weight, norm_bias):
        out, saved, args = _run_stem_forward_op(x, spec, conv_weight, norm_weight, norm_bias)
        ctx.save_for_backward(x, conv_weight, norm_weight, norm_bias, *saved)
        ctx.spec, ctx.args = spec, args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, conv_weight, norm_weight, norm_bias, *saved = ctx.saved_tensors
        params = (conv_weight, norm_weight, norm_bias)
        if _needs_differentiable_backward(grad_out):
            return _differentiate(
                ctx, lambda: differentiable.stem_forward(x, ctx.spec, *params), x, params,
                grad_out)
        _, running = stem_op_args(ctx.spec)
        grad_x, *grads = stem_backward(grad_out, x, *params, saved, running, *ctx.args,
                                       ctx.needs_input_grad[0])
        return _restore_backward_grads(ctx, (grad_x, None, *grads))


def stem(x: torch.Tensor, spec: StemSpec, conv_weight, norm_weight, norm_bias) -> torch.Tensor:
    """Run the stem; builds a graph node only when a gradient is needed."""
    params = (conv_weight, norm_weight, norm_bias)
    if _needs_graph_node(x, params):
        if torch.compiler.is_compiling():
            return _compiled_stem(x, spec, *params)
        return StemFunction.apply(x, spec, *params)
    result = stem_forward_computation(x, spec, *params)
    if spec.norm.update_running:
        update_running([(spec.norm, result.mean, result.var)], result.count)
    return result.out


# Under torch.compile a graph node is the forward op itself, with the backward op registered as
# its gradient (torch.library's register_autograd) instead of an autograd Function around it.
# Dynamo records an autograd Function as the autograd_function_apply higher-order op, which
# AOTAutograd's cache refuses (unless a process-wide private flag opts every Function in), so
# each new process would trace and partition the whole model again; a graph of library ops is
# cached. AOTAutograd traces the same forward and backward ops either way, and saves for
# backward the same tensors: what the forward op returns for it. (Compiled graphs do not
# support double backward, so what the Functions do beyond this for eager mode is not needed.)

def _compiled_dense_block(x, spec: BlockSpec, params) -> torch.Tensor:
    """:meth:`DenseBlockFunction.forward` for dynamo to trace."""
    return _run_block_forward_op(x, spec, params)[0]


def _no_grads(args) -> tuple:
    """The gradients of arguments that get none: a list of Nones for a tensor list (as
    torch.library expects), None for anything else."""
    return tuple([None] * len(a) if isinstance(a, list) and all(
        isinstance(t, torch.Tensor) for t in a) else None for a in args)


def _setup_block_backward(ctx, inputs, output):
    x, params, running, *settings = inputs
    ctx.save_for_backward(*output[1:], *params, *running)
    ctx.settings, ctx.num_saved, ctx.num_params = settings, len(output) - 1, len(params)
    ctx.no_grads = _no_grads((running, *settings))
    ctx.input_grad, ctx.params_grad = x.requires_grad, [p.requires_grad for p in params]


def _block_backward(ctx, grads):
    tensors, saved_end = ctx.saved_tensors, ctx.num_saved
    params_end = saved_end + ctx.num_params
    grad_x, *grad_params = dense_block_backward(
        grads[0], list(tensors[:saved_end]), list(tensors[saved_end:params_end]),
        list(tensors[params_end:]), *ctx.settings, ctx.input_grad)
    # Frozen layers below backward_from get empty tensors from the op: no gradient.
    grad_params = [g if need else None for g, need in zip(grad_params, ctx.params_grad,
                                                          strict=True)]
    return (grad_x if ctx.input_grad else None), grad_params, *ctx.no_grads


dense_block_forward.register_autograd(_block_backward, setup_context=_setup_block_backward)


def _compiled_stem(x, spec: StemSpec, conv_weight, norm_weight, norm_bias) -> torch.Tensor:
    """:meth:`StemFunction.forward` for dynamo to trace."""
    return _run_stem_forward_op(x, spec, conv_weight, norm_weight, norm_bias)[0]


def _setup_stem_backward(ctx, inputs, output):
    *tensors, running = inputs[:5]
    args = StemOpArgs(*inputs[5:])
    saved = output[1:-1] if args.batch_stats else output[1:]
    ctx.save_for_backward(*tensors, *saved, *running)
    ctx.args, ctx.num_saved, ctx.no_grads = args, len(saved), _no_grads((running, *args))


def _stem_backward(ctx, grads):
    x, conv_weight, norm_weight, norm_bias, *rest = ctx.saved_tensors
    saved, running = rest[:ctx.num_saved], rest[ctx.num_saved:]
    input_grad = ctx.needs_input_grad[0]
    grad_x, *grad_params = stem_backward(grads[0], x, conv_weight, norm_weight, norm_bias,
                                         saved, running, *ctx.args, input_grad)
    return (grad_x if input_grad else None), *grad_params, *ctx.no_grads


stem_forward.register_autograd(_stem_backward, setup_context=_setup_stem_backward)

# FLOPs, counted as FlopCounterMode counts torchvision's modules: 2 per multiply-add of each
# convolution, its backward twice that (input and weight gradients), BN and ReLU not counted;
# recomputed convolutions count again.

def _conv_flops(out_pixels: int, weight_shape) -> int:
    return 2 * out_pixels * prod(weight_shape)


def _block_conv_flops(x_shape, params, tail, drop_rates, from_layer: int = 0,
                      recomputed: bool = False) -> int:
    """The block's convolutions of layers ``from_layer`` on and of the tail; ``recomputed``:
    each layer's 1x1 convolution only (what ``recompute_bottleneck`` runs again)."""
    n, _, h, w = x_shape
    size = len(LayerParams._fields)
    fields = (LayerParams._fields.index("conv1_weight"),) if recomputed else (
        LayerParams._fields.index("conv1_weight"), LayerParams._fields.index("conv2_weight"))
    convs = [params[size * i + j] for i in range(from_layer, len(drop_rates)) for j in fields]
    if tail == Tail.TRANSITION.value and not recomputed:
        convs.append(params[-1])
    return sum(_conv_flops(n * h * w, weight) for weight in convs)


@register_flop_formula(torch.ops.densenet_fast.dense_block_forward)
def _(x, params, running, growth_rate, tail, recompute_bottleneck, drop_rates, *rest,
      out_shape=None, **kwargs) -> int:
    return _block_conv_flops(x, params, tail, drop_rates)


@register_flop_formula(torch.ops.densenet_fast.dense_block_backward)
def _(grad_out, saved, params, running, growth_rate, tail, recompute_bottleneck, drop_rates,
      eps, batch_stats, sync_group, backward_from, input_grad, out_shape=None, **kwargs) -> int:
    n, total, h, w = saved[0]
    x_shape = (n, total - len(drop_rates) * growth_rate, h, w)
    flops = 2 * _block_conv_flops(x_shape, params, tail, drop_rates, backward_from)
    if recompute_bottleneck:
        flops += _block_conv_flops(x_shape, params, tail, drop_rates, backward_from,
                                   recomputed=True)
    return flops


def _stem_conv_flops(x_shape, conv_weight, conv) -> int:
    n, _, *size = x_shape
    stride, padding, dilation = conv[0:2], conv[2:4], conv[4:6]
    kernel = conv_weight[2:]
    out = [(size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i in range(2)]
    return _conv_flops(n * out[0] * out[1], conv_weight)  # weight: C_in / groups wide


@register_flop_formula(torch.ops.densenet_fast.stem_forward)
def _(x, conv_weight, norm_weight, norm_bias, running, conv, *rest, out_shape=None,
      **kwargs) -> int:
    return _stem_conv_flops(x, conv_weight, conv)


@register_flop_formula(torch.ops.densenet_fast.stem_backward)
def _(grad_out, x, conv_weight, norm_weight, norm_bias, saved, running, conv, pool,
      pool_ceil_mode, eps, batch_stats, recompute_conv, sync_group, input_grad,
      out_shape=None, **kwargs) -> int:
    passes = 1 + int(input_grad) + int(recompute_conv)
    return passes * _stem_conv_flops(x, conv_weight, conv)
