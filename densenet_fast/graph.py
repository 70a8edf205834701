"""The dense block and the stem as autograd graph nodes, each over a pair of torch.library ops.

A node is an autograd Function whose forward calls a forward op and whose backward calls a
backward op; the ops run :mod:`densenet_fast.block`'s and :mod:`densenet_fast.stem`'s
computation. In eager mode this is one Function per block. Under ``torch.compile`` the ops
are opaque: AOTAutograd saves for backward exactly the tensors the forward op returns for it
(what eager keeps), and inductor never sees the block's buffers or the gradient buffer, so it
can neither keep intermediates the block frees nor choose their layout. Inside the ops the
kernel ops run on the dispatcher's choice of kernels.

A spec crosses an op's boundary as the op arguments :func:`spec.op_arguments` derives from
it, and is decoded by :func:`spec.from_op_arguments`. The forward op mutates nothing: it
returns the batch statistics, and a third op folds them into the running statistics.

A training step passes: ``DenseNet.forward`` -> ``features`` (the fusion plan,
:mod:`densenet_fast.plan`) -> :func:`dense_block` / :func:`stem` here -> the graph node ->
the forward op -> :class:`block.BlockForward` -> the kernel ops (:mod:`densenet_fast.ops`);
backward: the node -> the backward op -> :class:`block.BlockBackward` -> the kernel ops.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from math import prod

import torch

from . import differentiable
from . import stem as stem_computation
from .block import BlockBackward, BlockForward, BlockSaved, running_stats_updates
from .fusion import under_func_transform
from .ops import batchnorm, library
from .ops.formats import autocast_enabled, memory_format_of
from .spec import (
    BlockSpec,
    LayerParams,
    StemParams,
    StemSpec,
    cast_conv_weights,
    from_op_arguments,
    is_synchronised,
    op_arguments,
    op_schema,
    split_block_params,
)
from .stem import StemSaved


def _merged_count(count: int, synchronised: bool, fake: bool) -> torch.Tensor | None:
    """What a forward op returns of its values per channel: with synchronised statistics a
    CPU scalar (the ranks' batches decide it at run time), else nothing (each reader derives
    it from a shape). A CPU tensor among a graph's outputs keeps inductor's CUDA graphs from
    capturing it, so the usual, unsynchronised call has none."""
    if not synchronised:
        return None
    return torch.empty((), dtype=torch.int64) if fake else torch.tensor(count)


def _strided_like(grads, params) -> list:
    """Each gradient with its parameter's strides, as the fake implementations promise
    (a convolution's weight gradient comes out channels-last from channels-last data); an
    empty tensor for a gradient not computed."""
    return [p.new_empty(0) if g is None else
            g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            for g, p in zip(grads, params, strict=True)]


def _no_grads(args) -> tuple:
    """The gradients of arguments that get none: a list of Nones for a tensor list (as
    torch.library expects), None for anything else."""
    return tuple([None] * len(a) if isinstance(a, list) and all(
        isinstance(t, torch.Tensor) for t in a) else None for a in args)


# ---- running statistics ----------------------------------------------------------------

def _update_running_stats_kernel(running_mean, running_var, num_batches_tracked, mean, var,
                                 momentum, count, merged_count):
    if merged_count is not None:
        count = int(merged_count)
    batchnorm.update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                   mean, var, count)


library.define(
    "update_running_stats",
    "(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, "
    "Tensor[] mean, Tensor[] var, float?[] momentum, SymInt count, Tensor? merged_count) -> ()",
    kernel=_update_running_stats_kernel, fake=lambda *args: None)


def update_running_stats(updates, count, merged_count=None) -> None:
    """Fold ``(BatchNormSpec, batch mean, batch var)`` updates into the running statistics
    (:func:`ops.batchnorm.update_running_stats`), ``count`` values per channel behind the
    batch statistics, or ``merged_count`` (the CPU scalar a synchronised forward op returned)
    when not None. By the op ``densenet_fast::update_running_stats``, whose mutations are
    declared (``torch.compile`` keeps the forward ops opaque) and whose CPU kernel is C++."""
    if not updates:
        return
    norms = [norm for norm, _, _ in updates]
    lists = ([n.running_mean for n in norms], [n.running_var for n in norms],
             [n.num_batches_tracked for n in norms], [mean for _, mean, _ in updates],
             [var for _, _, var in updates], [n.momentum for n in norms])
    with torch.no_grad():
        torch.ops.densenet_fast.update_running_stats(*lists, count, merged_count)


# ---- the block's ops -------------------------------------------------------------------

_BLOCK_SETTINGS = op_schema(BlockSpec)


def _block_forward_kernel(x, params, running, *settings, fake: bool = False):
    """``[out, *saved]``: the block's (and tail's) output, then ``BlockSaved.tensors()``."""
    spec = from_op_arguments(BlockSpec, running, settings, synchronised=not fake)
    fwd = BlockForward(x, spec, params, keep=True)
    out = fwd.run()
    if out is fwd.buffer:
        # The buffer is saved for backward; the caller gets its own copy, which it may
        # modify in place (an in-place ReLU after a block, as after torchvision's cat).
        out = out.clone()
    merged = _merged_count(fwd.count, is_synchronised(BlockSpec, settings), fake)
    return [out, *BlockSaved.of(fwd, merged).tensors()]


def _block_backward_kernel(grad_out, saved, params, running, *rest):
    """``[grad_x, *parameter gradients]`` from what the forward op saved; ``grad_x`` is
    empty unless ``input_grad``, and so are the gradients of the layers below
    ``backward_from`` (frozen: their backward does not run)."""
    *settings, input_grad = rest
    spec = from_op_arguments(BlockSpec, running, settings)
    grad_x, grads = BlockBackward(BlockSaved.load(saved, spec), spec, params).run(
        grad_out, input_grad)
    grad_x = grad_x if grad_x is not None else grad_out.new_empty(0)
    return [grad_x, *_strided_like(grads, params)]


def _block_backward_fake(grad_out, saved, params, running, *rest):
    *settings, input_grad = rest
    spec = from_op_arguments(BlockSpec, running, settings, synchronised=False)
    buffer = saved[0]
    n, total, h, w = buffer.shape
    c0 = total - spec.num_layers * spec.growth_rate
    grad_x = buffer.new_empty((n, c0, h, w)).contiguous(memory_format=memory_format_of(buffer)) \
        if input_grad else grad_out.new_empty(0)
    skipped = len(LayerParams._fields) * spec.backward_from
    return [grad_x, *(p.new_empty(0) if i < skipped else torch.empty_like(p)
                      for i, p in enumerate(params))]


# FLOPs, counted as FlopCounterMode counts torchvision's modules: 2 per multiply-add of each
# convolution, its backward twice that (input and weight gradients), BN and ReLU not counted;
# recomputed convolutions count again. The formulas receive shapes for tensors.

def _conv_flops(out_pixels: int, weight_shape) -> int:
    return 2 * out_pixels * prod(weight_shape)


def _block_conv_flops(spec: BlockSpec, x_shape, params, from_layer: int = 0,
                      recomputed: bool = False) -> int:
    """The block's convolutions of layers ``from_layer`` on and of the tail; ``recomputed``:
    each layer's 1x1 convolution only (what ``recompute_bottleneck`` runs again)."""
    n, _, h, w = x_shape
    layers, tail = split_block_params(spec, params)
    weights = [layer.conv1_weight for layer in layers[from_layer:]]
    if not recomputed:
        weights += [layer.conv2_weight for layer in layers[from_layer:]]
        if tail is not None and tail.conv_weight is not None:
            weights.append(tail.conv_weight)
    return sum(_conv_flops(n * h * w, weight) for weight in weights)


def _block_forward_flops(x, params, running, *settings, out_shape=None, **kwargs) -> int:
    spec = from_op_arguments(BlockSpec, running, settings, synchronised=False)
    return _block_conv_flops(spec, x, params)


def _block_backward_flops(grad_out, saved, params, running, *rest, out_shape=None,
                          **kwargs) -> int:
    *settings, _ = rest
    spec = from_op_arguments(BlockSpec, running, settings, synchronised=False)
    n, total, h, w = saved[0]
    x_shape = (n, total - spec.num_layers * spec.growth_rate, h, w)
    flops = 2 * _block_conv_flops(spec, x_shape, params, spec.backward_from)
    if spec.recompute_bottleneck:
        flops += _block_conv_flops(spec, x_shape, params, spec.backward_from, recomputed=True)
    return flops


def _block_setup_context(ctx, inputs, output):
    x, params, running, *settings = inputs
    ctx.save_for_backward(*output[1:], *params, *running)
    ctx.settings, ctx.num_saved, ctx.num_params = settings, len(output) - 1, len(params)
    ctx.no_grads = _no_grads((running, *settings))
    ctx.input_grad, ctx.params_grad = x.requires_grad, [p.requires_grad for p in params]


def _block_op_backward(ctx, grads):
    """The forward op's gradient under ``torch.compile`` (see :func:`dense_block`)."""
    tensors, saved_end = ctx.saved_tensors, ctx.num_saved
    params_end = saved_end + ctx.num_params
    grad_x, *grad_params = dense_block_backward(
        grads[0], list(tensors[:saved_end]), list(tensors[saved_end:params_end]),
        list(tensors[params_end:]), *ctx.settings, ctx.input_grad)
    # Frozen layers below backward_from get empty tensors from the op: no gradient.
    grad_params = [g if need else None for g, need in zip(grad_params, ctx.params_grad,
                                                          strict=True)]
    return (grad_x if ctx.input_grad else None), grad_params, *ctx.no_grads


dense_block_backward = library.define(
    "dense_block_backward",
    f"(Tensor grad_out, Tensor[] saved, Tensor[] params, Tensor[] running, {_BLOCK_SETTINGS}, "
    "bool input_grad) -> Tensor[]",
    kernel=_block_backward_kernel, fake=_block_backward_fake, flops=_block_backward_flops)

dense_block_forward = library.define(
    "dense_block_forward",
    f"(Tensor x, Tensor[] params, Tensor[] running, {_BLOCK_SETTINGS}) -> Tensor[]",
    kernel=_block_forward_kernel,
    fake=lambda *args: _block_forward_kernel(*args, fake=True),
    flops=_block_forward_flops, autograd=(_block_op_backward, _block_setup_context))


# ---- the stem's ops --------------------------------------------------------------------

_STEM_SETTINGS = op_schema(StemSpec)


def _stem_forward_kernel(x, params, running, *settings, fake: bool = False):
    """``[out, *saved]``: the stem's output, then ``StemSaved.tensors()``."""
    spec = from_op_arguments(StemSpec, running, settings, synchronised=not fake)
    out, saved, count = stem_computation.forward(x, spec, StemParams(*params))
    merged = _merged_count(count, is_synchronised(StemSpec, settings), fake)
    return [out, *replace(saved.for_backward(spec), merged_count=merged).tensors()]


def _stem_backward_kernel(grad_out, x, saved, params, running, *rest):
    """``[grad_x, dconv, dnorm_weight, dnorm_bias]``; ``grad_x`` is empty unless
    ``input_grad``."""
    *settings, input_grad = rest
    spec = from_op_arguments(StemSpec, running, settings)
    grad_x, *grads = stem_computation.backward(grad_out, x, spec, StemParams(*params),
                                               StemSaved.load(saved, spec), input_grad)
    grad_x = grad_x if grad_x is not None else x.new_empty(0)
    return [grad_x, *_strided_like(grads, params)]


def _stem_backward_fake(grad_out, x, saved, params, running, *rest):
    grad_x = torch.empty_like(x) if rest[-1] else x.new_empty(0)
    return [grad_x, *(torch.empty_like(p) for p in params)]


def _stem_conv_flops(spec: StemSpec, x_shape, conv_weight) -> int:
    n, _, *size = x_shape
    h, w = spec.conv_output_plane(size, conv_weight[2:])
    return _conv_flops(n * h * w, conv_weight)  # weight: C_in / groups wide


def _stem_forward_flops(x, params, running, *settings, out_shape=None, **kwargs) -> int:
    spec = from_op_arguments(StemSpec, running, settings, synchronised=False)
    return _stem_conv_flops(spec, x, params[0])


def _stem_backward_flops(grad_out, x, saved, params, running, *rest, out_shape=None,
                         **kwargs) -> int:
    *settings, input_grad = rest
    spec = from_op_arguments(StemSpec, running, settings, synchronised=False)
    passes = 1 + int(input_grad) + int(spec.recompute_bottleneck)
    return passes * _stem_conv_flops(spec, x, params[0])


def _stem_setup_context(ctx, inputs, output):
    x, params, running, *settings = inputs
    ctx.save_for_backward(x, *params, *output[1:], *running)
    ctx.settings, ctx.num_saved = settings, len(output) - 1
    ctx.no_grads = _no_grads((running, *settings))


def _stem_op_backward(ctx, grads):
    """The forward op's gradient under ``torch.compile`` (see :func:`stem`)."""
    x, *rest = ctx.saved_tensors
    size = len(StemParams._fields)
    params, saved, running = rest[:size], rest[size:size + ctx.num_saved], \
        rest[size + ctx.num_saved:]
    input_grad = ctx.needs_input_grad[0]
    grad_x, *grad_params = stem_backward(grads[0], x, list(saved), list(params), list(running),
                                         *ctx.settings, input_grad)
    return (grad_x if input_grad else None), grad_params, *ctx.no_grads


stem_backward = library.define(
    "stem_backward",
    f"(Tensor grad_out, Tensor x, Tensor[] saved, Tensor[] params, Tensor[] running, "
    f"{_STEM_SETTINGS}, bool input_grad) -> Tensor[]",
    kernel=_stem_backward_kernel, fake=_stem_backward_fake, flops=_stem_backward_flops)

stem_forward = library.define(
    "stem_forward",
    f"(Tensor x, Tensor[] params, Tensor[] running, {_STEM_SETTINGS}) -> Tensor[]",
    kernel=_stem_forward_kernel, fake=lambda *args: _stem_forward_kernel(*args, fake=True),
    flops=_stem_forward_flops, autograd=(_stem_op_backward, _stem_setup_context))


# ---- graph nodes -----------------------------------------------------------------------

def _needs_graph_node(x, params) -> bool:
    """Whether a gradient is needed (``torch.export`` never gets here: the model runs its
    modules while it traces, :func:`fusion.runtime_blocker`)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _restore_backward_grads(ctx, grads):
    """A backward's gradients with None where the Function's input needs none."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def _differentiate(ctx, forward, x, params, grad_out, synchronised: bool):
    """A backward's gradients for ``apply(x, spec, *params)``: those of ``forward()`` at ``x``
    and ``params`` (None where the Function's input needs none) with ``grad_out`` as the
    output's gradient, through differentiable operations: a graph of their own when grad mode
    is on (``create_graph=True``), batched under ``vmap``. ``synchronised``: the spec's batch
    statistics are merged over ranks."""
    if synchronised and _batched(grad_out):
        # The recomputation's collectives cannot run on batched tensors.
        raise RuntimeError(
            "densenet_fast: vmap over the backward (torch.func, or jacobian with "
            "vectorize=True) through synchronised BatchNorm is not supported: its "
            "collectives cannot run on batched tensors; take the Jacobian without vectorize")
    create_graph = torch.is_grad_enabled()
    inputs = (x, *params)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    device_type = x.device.type
    # Autocast is thread-local, and a CPU backward runs in the caller's thread: the recomputed
    # forward computes in the dtypes forward saw, as the fused forward did.
    autocast_off = (torch.autocast(device_type, enabled=False)
                    if autocast_enabled(device_type) else nullcontext())
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
    return torch.is_grad_enabled() or _batched(grad_out)


def _batched(grad_out: torch.Tensor) -> bool:
    return under_func_transform() or "Batched" in str(torch._C._dispatch_keys(grad_out))


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
    """``(out, saved, (running, settings))``: the forward op's results, with the running
    statistics folded in (never recorded for autograd), and the spec as the op took it."""
    running, settings = op_arguments(spec)
    out, *saved = dense_block_forward(x, list(params), running, *settings)
    kept = BlockSaved.load(saved, spec)
    n, c0, h, w = x.shape
    update_running_stats(running_stats_updates(spec, c0, kept.mean, kept.var, kept.norm2_batch),
                         n * h * w, kept.merged_count)
    return out, saved, (running, settings)


def _keep_for_backward(ctx, params, running, settings) -> None:
    """Keep what a Function's backward needs besides its saved tensors. The spec, as the ops
    take it, ``(running, settings)``, rather than as spec objects: a block's spec is three
    Python objects per layer (its BNs' specs and their pair), which, alive from forward to
    backward beside the saved tensors' Python objects, pushed most densenet121 steps over the
    garbage collector's threshold (1,373 young collections in 1,500 steps, 228 so;
    docs/benchmarks.md).

    Also the versions of what backward reads that the caller can change in place: the
    parameters (``params``, as the Function received them) and the running statistics its
    eval-mode BNs normalise with. Autograd refuses a backward after such a change in
    torchvision's model, but checks no version of a tensor saved through saved-tensor hooks,
    which the block's tensors are (:class:`_InputInBuffer`), and ``running`` is not saved:
    :func:`_check_unchanged` refuses it here."""
    ctx.running, ctx.settings = running, settings
    # Two flat lists: a pair per tensor would be as many more objects for the collector.
    ctx.read = [*params, *running]
    ctx.read_versions = [t._version for t in ctx.read]


def _check_unchanged(ctx, params) -> None:
    """Raise, as autograd does, if a tensor :func:`_keep_for_backward` noted changed in place
    since the forward while backward reads its memory; ``params``: the parameters as
    backward unpacked them (a saved-tensor hook of the caller's, such as ``save_on_cpu``,
    gives copies, which hold what forward saw, and autograd checks nothing there either)."""
    for tensor, version, now in zip(ctx.read, ctx.read_versions, [*params, *ctx.running],
                                    strict=True):
        if tensor is not None and tensor._version != version and \
                now.data_ptr() == tensor.data_ptr():
            raise RuntimeError(
                "densenet_fast: one of the variables needed for gradient computation has been "
                "modified by an inplace operation: a parameter or BatchNorm running statistic "
                f"of a fused block or stem, [{tensor.dtype} {list(tensor.shape)}], is at "
                f"version {tensor._version}; expected version {version} instead. It changed "
                "between the forward that read it and this backward (an optimizer step before "
                "the backward, say), where torchvision's model raises the same error")
    # Past the check, no reference of ctx's own to a tensor the caller does not keep (a
    # non-leaf: autocast's casts of the weights): the saved tensors hold it until autograd
    # frees them after this backward, while ctx lives as long as the whole graph. Held here,
    # densenet121's bf16 weight casts stayed alive to the end of the backward, raising the
    # recompute setting's bf16 training peak from 79 to 92 MiB (batch 8, 224x224). A second
    # backward through a retained graph checks the leaves (parameters, statistics) again.
    ctx.read = [tensor if tensor is not None and tensor.is_leaf else None
                for tensor in ctx.read]


class DenseBlockFunction(torch.autograd.Function):
    """``apply(x, spec, *params)``: one dense block (plus its tail) as a single graph node.

    Backward runs the fused kernels; when autograd asks for more than a first-order gradient
    (:func:`_needs_differentiable_backward`), it recomputes the block with differentiable
    operations from what it saved and differentiates that (:mod:`densenet_fast.differentiable`).
    """

    @staticmethod
    def forward(ctx, x, spec: BlockSpec, *params):
        out, saved, (running, settings) = _run_block_forward_op(x, spec, params)
        # The input, for the differentiable route (saved as a view of the buffer: see
        # _InputInBuffer).
        ctx.save_for_backward(*saved, *params, x)
        ctx.num_saved, ctx.num_params = len(saved), len(params)
        _keep_for_backward(ctx, params, running, settings)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        saved = list(tensors[:ctx.num_saved])
        params = list(tensors[ctx.num_saved:ctx.num_saved + ctx.num_params])
        _check_unchanged(ctx, params)
        if _needs_differentiable_backward(grad_out):
            return _differentiable_block_backward(ctx, grad_out, saved, params, tensors)
        grad_x, *grads = dense_block_backward(grad_out, saved, params, ctx.running,
                                              *ctx.settings, ctx.needs_input_grad[0])
        return _restore_backward_grads(ctx, (grad_x, None, *grads))


def _differentiable_block_backward(ctx, grad_out, saved, params, tensors):
    spec, x = from_op_arguments(BlockSpec, ctx.running, ctx.settings), tensors[-1]
    kept = BlockSaved.load(saved, spec)
    if spec.backward_from:  # the input and the frozen layers' outputs are constants
        first = kept.buffer[:, :x.shape[1] + spec.backward_from * spec.growth_rate]
    else:
        first = x
    return _differentiate(
        ctx, lambda: differentiable.block_forward(first, spec, params, kept.masks), x, params,
        grad_out, spec.sync is not None)


def _backward_from(spec: BlockSpec, x: torch.Tensor, params) -> int:
    """The first layer whose backward must run: 0 if the input needs a gradient, else the
    first layer with a parameter that needs one (``num_layers``: none)."""
    if x.requires_grad:
        return 0
    layers, _ = split_block_params(spec, params)
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer):
            return index
    return spec.num_layers


def dense_block(x: torch.Tensor, spec: BlockSpec, params, as_op: bool = False) -> torch.Tensor:
    """Run one block (and its tail). Builds a graph node only when a gradient is needed, and
    keeps for it only what the gradients asked for need; otherwise nothing is kept and each
    bottleneck is freed as soon as it is used. The convolutions compute in ``x``'s dtype:
    their weights (``params``, as :func:`flat_block_params` lists them) are cast to it, all
    before the node that keeps them, else each as its layer runs.

    Under ``torch.compile`` the node is the forward op itself, with the backward op
    registered as its gradient (``register_autograd``) instead of an autograd Function around
    it: dynamo records a Function as the ``autograd_function_apply`` higher-order op, which
    AOTAutograd's cache refuses, so each new process would trace and partition the whole
    model again; a graph of library ops is cached. Both save for backward the same tensors,
    what the forward op returns for it (compiled graphs support no double backward, so what
    the Function does beyond that is not needed there). ``as_op``: under ``torch.compile``
    a forward without gradients calls the forward op too (which then keeps nothing for
    backward) instead of tracing the kernels' ATen ops."""
    if _needs_graph_node(x, params):
        spec = replace(spec, backward_from=_backward_from(spec, x, params))
        # Casts before the node are graph nodes themselves: gradients reach the weights.
        params = cast_conv_weights(spec, params, x.dtype)
        if torch.compiler.is_compiling():
            return _run_block_forward_op(x, spec, params)[0]
        with _InputInBuffer(x).hooks() or nullcontext():
            return DenseBlockFunction.apply(x, spec, *params)
    if as_op and torch.compiler.is_compiling():
        spec = replace(spec, backward_from=spec.num_layers)
        return _run_block_forward_op(x, spec, cast_conv_weights(spec, params, x.dtype))[0]
    fwd = BlockForward(x, spec, params, keep=False)  # casts each layer's weights as it runs
    out = fwd.run()
    update_running_stats(fwd.running_stats_updates(), fwd.count)
    return out


def _run_stem_forward_op(x, spec: StemSpec, params: StemParams):
    """``(out, saved, (running, settings))``: the stem's forward op, with norm0's running
    statistics folded in (never recorded for autograd), and the spec as the op took it."""
    running, settings = op_arguments(spec)
    out, *saved = stem_forward(x, list(params), running, *settings)
    kept = StemSaved.load(saved, spec)
    h, w = spec.conv_output_plane(x.shape[2:], params.conv_weight.shape[2:])
    update_running_stats(kept.running_stats_updates(spec), x.shape[0] * h * w,
                         kept.merged_count)
    return out, saved, (running, settings)


class StemFunction(torch.autograd.Function):
    """``apply(x, spec, conv_weight, norm_weight, norm_bias)``:
    ``max_pool(relu(bn(conv(x))))``, keeping ``conv(x)`` and the statistics for backward;
    beyond a first-order backward, differentiates the recomputed stem (as the block does)."""

    @staticmethod
    def forward(ctx, x, spec: StemSpec, *params):
        out, saved, (running, settings) = _run_stem_forward_op(x, spec, StemParams(*params))
        ctx.save_for_backward(x, *params, *saved)
        _keep_for_backward(ctx, params, running, settings)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *rest = ctx.saved_tensors
        size = len(StemParams._fields)
        params, saved = StemParams(*rest[:size]), rest[size:]
        _check_unchanged(ctx, params)
        if _needs_differentiable_backward(grad_out):
            spec = from_op_arguments(StemSpec, ctx.running, ctx.settings)
            return _differentiate(
                ctx, lambda: differentiable.stem_forward(x, spec, params), x, params,
                grad_out, spec.sync is not None)
        grad_x, *grads = stem_backward(grad_out, x, list(saved), list(params), ctx.running,
                                       *ctx.settings, ctx.needs_input_grad[0])
        return _restore_backward_grads(ctx, (grad_x, None, *grads))


def stem(x: torch.Tensor, spec: StemSpec, params: StemParams, as_op: bool = False) -> torch.Tensor:
    """Run the stem; builds a graph node only when a gradient is needed (under
    ``torch.compile``, the forward op with its registered gradient, as :func:`dense_block`
    explains; with ``as_op``, the forward op without gradients too)."""
    if _needs_graph_node(x, params):
        if torch.compiler.is_compiling():
            return _run_stem_forward_op(x, spec, params)[0]
        return StemFunction.apply(x, spec, *params)
    if as_op and torch.compiler.is_compiling():
        return _run_stem_forward_op(x, spec, params)[0]
    out, saved, count = stem_computation.forward(x, spec, params)
    update_running_stats(saved.running_stats_updates(spec), count)
    return out
