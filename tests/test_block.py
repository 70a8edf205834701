"""The block Function on its own: float64 gradcheck of every input, tails and modes."""

import pytest
import torch
from tolerances import assert_close, assert_gradcheck

from densenet_fast.block import BlockSpec, DenseBlockFunction, NormState, Tail


def _norm_state(c, training, dtype):
    return NormState(torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5,
                     torch.tensor(0), 0.1, 1e-5, batch_stats=training, update_running=training)


def _block(c0=3, k=2, layers=3, bn_size=2, tail=Tail.NONE, training=True, drop=0.0,
           dtype=torch.float64):
    norms, params = [], []
    width = bn_size * k
    for i in range(layers):
        c = c0 + i * k
        norms.append((_norm_state(c, training, dtype), _norm_state(width, training, dtype)))
        params += [torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype),
                   torch.randn(width, c, 1, 1, dtype=dtype) / c,
                   torch.rand(width, dtype=dtype) + 0.5, torch.randn(width, dtype=dtype),
                   torch.randn(k, width, 3, 3, dtype=dtype) / (3 * width)]
    total = c0 + layers * k
    tail_norm = None
    if tail != Tail.NONE:
        tail_norm = _norm_state(total, training, dtype)
        params += [torch.rand(total, dtype=dtype) + 0.5, torch.randn(total, dtype=dtype)]
        if tail == Tail.TRANSITION:
            params.append(torch.randn(total // 2, total, 1, 1, dtype=dtype) / total)
    spec = BlockSpec(growth_rate=k, layer_norms=tuple(norms),
                     drop_rates=(drop if training else 0.0,) * layers, tail=tail,
                     tail_norm=tail_norm)
    return spec, [p.requires_grad_() for p in params]


@pytest.mark.parametrize("tail", [Tail.NONE, Tail.TRANSITION, Tail.NORM])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_every_input(tail, training):
    # Training updates running statistics on every call, but only eval mode reads them.
    spec, params = _block(tail=tail, training=training)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert_gradcheck(lambda x, *p: DenseBlockFunction.apply(x, spec, *p), (x, *params))


def test_gradcheck_with_dropout_under_fixed_masks():
    spec, params = _block(tail=Tail.TRANSITION, drop=0.3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def seeded(x, *p):
        # Same seed on every call: same dropout masks, so the function is deterministic.
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return DenseBlockFunction.apply(x, spec, *p)

    assert_gradcheck(seeded, (x, *params))


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
