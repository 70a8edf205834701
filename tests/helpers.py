"""Shared helpers: twin models with identical weights, whole-model comparisons, test data."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tolerances import assert_close

from densenet_fast import block
from densenet_fast.spec import BatchNormSpec, BlockSpec, Tail


def twins(fast_cls, ref_cls, dtype=torch.float32, **config):
    """A (fast, reference) pair with identical parameters and buffers."""
    ref = ref_cls(**config).to(dtype)
    fast = fast_cls(**config).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def train_steps(model, inputs, labels, steps=2, lr=0.01, momentum=0.0, seed=None):
    """``steps`` SGD steps; returns the logits, input gradients and parameter gradients of
    every step. ``seed``: the random streams (dropout) are seeded with ``seed + step`` before
    each step, so that models compared step by step draw the same masks."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    outputs, input_grads, param_grads = [], [], []
    for step in range(steps):
        if seed is not None:
            torch.manual_seed(seed + step)
        x = inputs.detach().clone().requires_grad_()
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, labels).backward()
        outputs.append(logits.detach())
        input_grads.append(x.grad)
        param_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return outputs, input_grads, param_grads


def assert_models_match(fast, ref, dtype, what="", params=True):
    """Every buffer (running statistics, num_batches_tracked) and, with ``params``, every
    parameter agree."""
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters() if params else ():
        assert_close(p, ref_params[name], dtype, f"{what} parameter {name}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in fast.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, ref_buffers[name]), f"{what} {name}: {b} != {ref_buffers[name]}"
        else:
            assert_close(b, ref_buffers[name], dtype, f"{what} buffer {name}")


def assert_grads_match(fast_grads, ref_grads, dtype, what=""):
    assert fast_grads.keys() == ref_grads.keys()
    for name, g in fast_grads.items():
        assert_close(g, ref_grads[name], dtype, f"{what} grad {name}")


def saved_storages(model, run) -> dict[int, int]:
    """``{storage address: bytes}`` of what autograd saves while ``run()`` builds a graph,
    the model's parameters and ``run``'s input excluded (they exist anyway)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(2, 3, 32, 32)
    own.add(x.untyped_storage().data_ptr())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(x)
    out.sum().backward()
    return seen


class FusedOpCounter:
    """Counts the dense block's calls of the fused BN-ReLU-Conv1x1 forward (or, with
    ``name="bn_relu_conv1x1_backward"``, of its backward: one per layer and transition whose
    backward runs), whichever kernel serves them (the calls run inside the block's ops,
    which a dispatch mode sees as one). ``dtypes``: the buffer's dtype at each call."""

    def __init__(self, name: str = "bn_relu_conv1x1"):
        self.name = name

    def __enter__(self):
        self.calls, self.dtypes = 0, set()
        original = self._original = getattr(block, self.name)

        def counted(*args):
            self.calls += 1
            self.dtypes.add(args[0].dtype if args[0].dim() == 4 else args[1].dtype)
            return original(*args)

        setattr(block, self.name, counted)
        return self

    def __exit__(self, *exc_info):
        setattr(block, self.name, self._original)


def norm_state_case(c, training, dtype):
    """A BN's state with random running statistics, training or eval."""
    return BatchNormSpec(torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5,
                         torch.tensor(0), 0.1, 1e-5, batch_stats=training,
                         update_running_stats=training)


def block_case(c0=3, k=2, layers=3, bn_size=2, tail=Tail.NONE, training=True, drop=0.0,
               dtype=torch.float64):
    """``(BlockSpec, parameters)`` of a small random block, its BNs all in one mode."""
    norms, params = [], []
    width = bn_size * k
    for i in range(layers):
        c = c0 + i * k
        norms.append((norm_state_case(c, training, dtype), norm_state_case(width, training, dtype)))
        params += [torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype),
                   torch.randn(width, c, 1, 1, dtype=dtype) / c,
                   torch.rand(width, dtype=dtype) + 0.5, torch.randn(width, dtype=dtype),
                   torch.randn(k, width, 3, 3, dtype=dtype) / (3 * width)]
    total = c0 + layers * k
    tail_norm = None
    if tail != Tail.NONE:
        tail_norm = norm_state_case(total, training, dtype)
        params += [torch.rand(total, dtype=dtype) + 0.5, torch.randn(total, dtype=dtype)]
        if tail == Tail.TRANSITION:
            params.append(torch.randn(total // 2, total, 1, 1, dtype=dtype) / total)
    spec = BlockSpec(growth_rate=k, layer_norms=tuple(norms),
                     drop_rates=(drop if training else 0.0,) * layers, tail=tail,
                     tail_norm=tail_norm)
    return spec, [p.requires_grad_() for p in params]


@contextmanager
def float32_precision(precision: str):
    """torch's float32 precision of CUDA convolutions and matmuls, ``"ieee"`` or ``"tf32"``,
    for the ``with`` block: through the per-operator settings where torch has them (>= 2.9;
    mixing them with the legacy ``allow_tf32`` flags makes reading those raise), else through
    the legacy flags."""
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(conv, "conv", None), "fp32_precision"):
        conv = conv.conv
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = precision
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = conv.allow_tf32, matmul.allow_tf32
    conv.allow_tf32 = matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        conv.allow_tf32, matmul.allow_tf32 = saved


def laid_out_data(shape, dtype, layout: str, scale: float = 1.0, offset: float = 0.0):
    """Random normal data of ``shape`` (times ``scale``, plus ``offset``) in ``dtype``, laid
    out ``"contiguous"``, ``"channels_last"``, ``"strided"`` (every other column of a
    wider tensor: dense in neither format), or as a channel slice of a wider tensor in either
    format (``"slice-of-contiguous"``, ``"slice-of-channels_last"``: a block buffer's
    prefix)."""
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if layout.startswith("slice-of-"):
        n, c, h, w = shape
        fmt = torch.channels_last if layout.endswith("channels_last") else torch.contiguous_format
        wide = torch.zeros(n, c + 3, h, w, dtype=dtype).contiguous(memory_format=fmt)
        wide[:, 1:1 + c] = t
        return wide[:, 1:1 + c]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t
