"""The block Function on its own: float64 gradcheck of every input, tails and modes."""

import pytest
import torch
from helpers import block_case as _block
from tolerances import assert_close, assert_gradcheck

from densenet_fast import block
from densenet_fast.graph import DenseBlockFunction
from densenet_fast.ops import reference_kernels
from densenet_fast.ops.formats import memory_format_of
from densenet_fast.spec import BatchNormSpec, Tail

# gradcheck's cost grows with the number of input and output elements: the smallest block that
# still has three layers (each reading all earlier outputs), batch statistics over two images,
# padded 3x3 convolutions and a transition pooling an odd side.


@pytest.mark.parametrize("tail", [Tail.NONE, Tail.TRANSITION, Tail.NORM])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_every_input(tail, training):
    # Training updates running statistics on every call, but only eval mode reads them.
    spec, params = _block(tail=tail, training=training, bn_size=1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert_gradcheck(lambda x, *p: DenseBlockFunction.apply(x, spec, *p), (x, *params))


def test_gradcheck_with_dropout_under_fixed_masks():
    spec, params = _block(tail=Tail.TRANSITION, drop=0.3, bn_size=1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)

    def seeded(x, *p):
        # Same seed on every call: same dropout masks, so the function is deterministic.
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return DenseBlockFunction.apply(x, spec, *p)

    assert_gradcheck(seeded, (x, *params))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_transition_backward_gets_its_gradient_in_the_buffers_layout(memory_format,
                                                                     monkeypatch):
    """The pooling's backward hands the fused backward a gradient laid out as the buffer (the
    layout its kernels read fastest: the Triton ones without a division per pixel)."""
    spec, params = _block(tail=Tail.TRANSITION)
    layouts = []
    original = block.bn_relu_conv1x1_backward

    def recorded(grad_out, buffer, *args):
        layouts.append((memory_format_of(grad_out), memory_format_of(buffer)))
        return original(grad_out, buffer, *args)

    monkeypatch.setattr(block, "bn_relu_conv1x1_backward", recorded)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(memory_format=memory_format)
    x.requires_grad_()
    DenseBlockFunction.apply(x, spec, *params).sum().backward()
    assert layouts and all(g == b == memory_format for g, b in layouts), layouts


def test_channels_last_and_contiguous_agree():
    spec, params = _block(tail=Tail.TRANSITION, training=False)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    dense = DenseBlockFunction.apply(x.requires_grad_(), spec, *params)
    grads = torch.autograd.grad(dense.sum(), [x, *params])
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    last = DenseBlockFunction.apply(x_cl, spec, *params)
    grads_cl = torch.autograd.grad(last.sum(), [x_cl, *params])
    assert last.dtype == dense.dtype == torch.float64
    assert_close(last, dense, torch.float64, "channels-last output")
    for i, (a, b) in enumerate(zip(grads_cl, grads, strict=True)):
        assert a.dtype == b.dtype == torch.float64, (i, a.dtype, b.dtype)
        assert_close(a, b, torch.float64, f"channels-last gradient {i}")



@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_batch_norm_backward_gets_defined_saved_statistics(training, memory_format,
                                                           monkeypatch):
    """CUDA's BN backward asserts that its saved mean and invstd are defined tensors (empty
    when the running statistics are to be used), where the CPU's also takes None: the first
    GPU run failed on the final norm's backward. Every call the block's backward makes, in
    both layouts and modes, passes tensors: through the reference kernel of ``bn_backward``,
    which serves CUDA (the CPU has a C++ kernel of its own)."""
    saved = []
    original = torch.ops.aten.native_batch_norm_backward

    def recorded(*args):
        saved.append(args[5:7])
        return original(*args)

    monkeypatch.setattr(torch.ops.aten, "native_batch_norm_backward", recorded)
    spec, params = _block(tail=Tail.NORM, training=training)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=memory_format)
    with reference_kernels():
        DenseBlockFunction.apply(x.requires_grad_(), spec, *params).sum().backward()
    assert saved, "the NORM tail's backward runs aten.native_batch_norm_backward"
    assert all(isinstance(t, torch.Tensor) for pair in saved for t in pair), saved


def _norm_spec(channels, eps, *, batch_stats, dtype=torch.float32):
    bn = torch.nn.BatchNorm2d(channels, eps=eps).to(dtype)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.1, 2)
    return BatchNormSpec.of(bn.train(batch_stats))


@pytest.mark.parametrize("buffers_dtype, stats_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float32),
    (torch.float64, torch.float64)])
def test_running_statistics_of_a_block_at_once_equal_each_bns_own(buffers_dtype, stats_dtype):
    # Two eps (two groups), BNs with batch statistics between, a missing tail norm: each
    # eval-mode BN gets rsqrt(running_var + eps) of its own, to the bit, as when computed alone.
    norms = [_norm_spec(5, 1e-5, batch_stats=False, dtype=buffers_dtype),
             _norm_spec(3, 1e-3, batch_stats=False, dtype=buffers_dtype),
             _norm_spec(4, 1e-5, batch_stats=True, dtype=buffers_dtype),
             _norm_spec(7, 1e-5, batch_stats=False, dtype=buffers_dtype), None]
    pairs = block.running_mean_invstds(norms, stats_dtype)
    assert pairs[2] is None and pairs[4] is None
    for norm, pair in zip(norms, pairs, strict=True):
        if pair is None:
            continue
        mean, invstd = pair
        assert mean.dtype == invstd.dtype == stats_dtype
        assert torch.equal(mean, norm.running_mean.to(stats_dtype))
        assert torch.equal(invstd, torch.rsqrt(norm.running_var.to(stats_dtype) + norm.eps))
    # A BN in the statistics' dtype hands over its own running mean, not a copy.
    if buffers_dtype == stats_dtype:
        assert pairs[0][0] is norms[0].running_mean
    # The single-BN form agrees.
    mean, invstd = block.running_mean_invstd(norms[1], stats_dtype)
    assert torch.equal(invstd, pairs[1][1]) and torch.equal(mean, pairs[1][0])
