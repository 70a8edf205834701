"""Beyond the first-order backward, side by side with torchvision's DenseNet in float64.

Gradient penalties by every route autograd offers (``create_graph=True``, then
``backward()``, ``backward(inputs=...)``, ``autograd.grad``), an R1 penalty on the input,
gradcheck and gradgradcheck, Jacobians and Hessians (vectorised: vmap over the backward),
forward-mode AD. The fused forward runs in each (counted): only the backward changes route.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import FusedOpCounter, twins
from tolerances import assert_close, assert_gradcheck
from torch.autograd.functional import hessian, jacobian
from torchvision.models import DenseNet as TorchvisionDenseNet

from densenet_fast import DenseNet

DTYPE = torch.float64
CONFIG = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
              num_classes=3)
TINY = dict(growth_rate=2, block_config=(2, 1), num_init_features=4, bn_size=2, num_classes=2)
# 6x6 inputs: after the stem (7x7 conv, stride 2, then 3x3 max-pool, stride 2) the same 2x2 and
# 1x1 feature maps as 8x8 inputs, with fewer input elements to differentiate by.
SMALL_SIDE = 6
FUSED_LAYERS = 5  # 4 layers and transition1, per forward


def _models(config=CONFIG, recompute=False, drop_rate=0.0):
    fast, ref = twins(DenseNet, TorchvisionDenseNet, DTYPE, **config, drop_rate=drop_rate)
    fast.set_recompute_bottleneck(recompute)
    with torch.no_grad():  # statistics that are not the initial ones
        ref(torch.randn(4, 3, 32, 32, dtype=DTYPE))
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, dtype=DTYPE, generator=generator), torch.tensor([0, 2, 1])


def _penalised(model, route, train, counter=None):
    """The parameter gradients of ``loss + penalty`` taken by ``route``, and the buffers;
    ``counter`` counts the fused op's calls in the forward."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x, y = _batch()
    x.requires_grad_()
    torch.manual_seed(0)  # dropout draws
    with counter or nullcontext():
        loss = F.cross_entropy(model(x), y)
    params = list(model.parameters())
    if route == "r1":  # a penalty on the input gradient, applied to the parameters only
        (dx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + dx.pow(2).sum()).backward(inputs=params)
        grads = [p.grad for p in params]
    else:  # a penalty on the parameter gradients (WGAN-GP style)
        first = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        total = loss + penalty
        if route == "backward":
            total.backward()
            grads = [p.grad for p in params]
        elif route == "backward(inputs=params)":
            total.backward(inputs=params)
            grads = [p.grad for p in params]
        elif route == "grad(total)":
            grads = torch.autograd.grad(total, params)
        else:  # "grad(penalty)"
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
    return grads, {name: b.clone() for name, b in model.named_buffers()}


ROUTES = ["backward", "backward(inputs=params)", "grad(total)", "grad(penalty)", "r1"]


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("route", ROUTES)
def test_gradient_penalty_routes_match_torchvision(route, train, recompute):
    fast, ref = _models(recompute=recompute)
    counter = FusedOpCounter()
    ours, our_buffers = _penalised(fast, route, train, counter)
    assert counter.calls == FUSED_LAYERS, "the forward did not run fused"
    theirs, their_buffers = _penalised(ref, route, train)
    names = [name for name, _ in fast.named_parameters()]
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert a is not None, f"{route}: no gradient for {name}"
        assert_close(a, b, DTYPE, f"{route} gradient of {name}")
    for name, b in their_buffers.items():
        assert_close(our_buffers[name], b, DTYPE, f"{route} buffer {name}")


def test_gradient_penalty_with_dropout_and_saved_tensor_hooks():
    # Dropout masks replayed in the recomputation; under save_on_cpu (outer saved-tensor
    # hooks) the block input is saved through them instead of aliased to the buffer.
    fast, ref = _models(drop_rate=0.3)
    with torch.autograd.graph.save_on_cpu():
        ours, _ = _penalised(fast, "backward", train=True)
    theirs, _ = _penalised(ref, "backward", train=True)
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b, DTYPE, "penalised gradient with dropout")


def test_block_input_is_saved_as_a_view_of_the_buffer():
    # The double-backward route needs the block input; it is kept without its own memory.
    fast, _ = _models()
    x = torch.randn(2, 8, 8, 8, dtype=DTYPE, requires_grad=True)
    from densenet_fast.model import run_block

    out = run_block(fast.features.denseblock1, x * 1, fast.features.transition1)
    buffer, *_, saved_input = out.grad_fn.saved_tensors
    assert saved_input.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(saved_input, x)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(train, recompute):
    fast, _ = _models(TINY, recompute=recompute)
    fast.train(train)
    x = torch.randn(2, 3, SMALL_SIDE, SMALL_SIDE, dtype=DTYPE, requires_grad=True)
    weight = fast.features.denseblock1.denselayer2.conv1.weight  # read through the buffer

    def logits(x, weight):
        return fast(x)

    assert_gradcheck(logits, (x, weight))
    assert torch.autograd.gradgradcheck(logits, (x, weight), eps=1e-6, atol=1e-6, rtol=1e-3,
                                        fast_mode=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_jacobian_and_hessian_match_torchvision(train):
    fast, ref = _models(TINY)
    fast.train(train), ref.train(train)
    x = torch.randn(2, 3, SMALL_SIDE, SMALL_SIDE, dtype=DTYPE)
    for vectorize in (False, True):
        with FusedOpCounter() as counter:
            ours = jacobian(fast, x, vectorize=vectorize)
        assert counter.calls > 0
        assert_close(ours, jacobian(ref, x, vectorize=vectorize), DTYPE,
                     f"jacobian, vectorize={vectorize}")
    assert_close(hessian(lambda t: fast(t).pow(2).sum(), x, vectorize=True),
                 hessian(lambda t: ref(t).pow(2).sum(), x, vectorize=True), DTYPE, "hessian")


def test_forward_mode_ad_matches_torchvision():
    fast, ref = _models(TINY)
    fast.eval(), ref.eval()
    x, tangent = torch.randn(1, 3, 8, 8, dtype=DTYPE), torch.randn(1, 3, 8, 8, dtype=DTYPE)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(fast(fwAD.make_dual(x, tangent))).tangent
        theirs = fwAD.unpack_dual(ref(fwAD.make_dual(x, tangent))).tangent
    assert_close(ours, theirs, DTYPE, "forward_ad tangent")
    ours = torch.func.jvp(fast, (x,), (tangent,))[1]
    assert_close(ours, torch.func.jvp(ref, (x,), (tangent,))[1], DTYPE, "torch.func.jvp")


def test_gradient_penalty_under_bfloat16_autocast():
    # The recomputed block computes in the dtypes the fused forward used (bfloat16 data,
    # float32 BatchNorm): its penalised gradients are as close to float32's as torchvision's.
    from tolerances import assert_as_accurate

    ref = TorchvisionDenseNet(**CONFIG)
    fast = DenseNet(**CONFIG)
    fast.load_state_dict(ref.state_dict())
    x, y = _batch()
    x = x.float()

    def penalised(model, autocast):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(xi).float(), y)
        (dx,) = torch.autograd.grad(loss, xi, create_graph=True)
        (loss + dx.pow(2).sum()).backward(inputs=list(model.parameters()))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = penalised(ref, autocast=False)
    assert_as_accurate(penalised(fast, True), penalised(ref, True), exact, torch.bfloat16,
                       "R1-penalised gradients under bfloat16 autocast")
