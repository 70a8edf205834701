"""Frozen parts cost nothing: side by side with torchvision's DenseNet in float64.

A block whose parameters are frozen and whose input needs no gradient builds no graph node;
a frozen block followed by a trainable transition keeps only what the transition's gradients
need and runs only the transition's backward; within a block, the frozen layers below the
first trainable one run no backward. Values, which backward kernels ran (counted), and what
the graph keeps are checked.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import FusedOpCounter, twins
from tolerances import assert_close
from torchvision.models import DenseNet as TorchvisionDenseNet

from densenet_fast import DenseNet

DTYPE = torch.float64
CONFIG = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
              num_classes=3)

# What is frozen: every module of ``features`` up to and including the name, or also the
# first layer of denseblock2; and the fused backward calls of the step (the layers and
# transitions whose backward runs: 2 + 1 + 2 when nothing is frozen).
CASES = {
    "nothing": (None, 5),
    "up to denseblock1": ("denseblock1", 3),  # transition1's backward, then denseblock2's
    "up to denseblock2.denselayer1": ("denseblock2.denselayer1", 1),
    "features": ("norm5", 0),
}


def _freeze(model, upto):
    if upto is None:
        return
    if upto == "denseblock2.denselayer1":
        _freeze(model, "transition1")
        model.features.denseblock2.denselayer1.requires_grad_(False)
        return
    for name, module in model.features.named_children():
        module.requires_grad_(False)
        if name == upto:
            return


def _step(model, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE, generator=generator)
    out = model(x)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    return (out.detach(), {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_frozen_parts_match_torchvision_and_skip_their_backward(case, train):
    upto, backward_calls = CASES[case]
    fast, ref = twins(DenseNet, TorchvisionDenseNet, DTYPE, **CONFIG)
    _freeze(fast, upto), _freeze(ref, upto)
    with FusedOpCounter("bn_relu_conv1x1_backward") as counter:
        out, grads, buffers = _step(fast, train)
    assert counter.calls == backward_calls
    ref_out, ref_grads, ref_buffers = _step(ref, train)
    assert_close(out, ref_out, DTYPE, "logits")
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(grads[name], grad, DTYPE, f"gradient of {name}")
    for name, buffer in ref_buffers.items():
        assert_close(buffers[name], buffer, DTYPE, f"buffer {name}")


def _block_nodes(out):
    """The dense-block graph nodes behind ``out``."""
    found, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "DenseBlockFunctionBackward":
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_a_frozen_block_keeps_nothing_for_backward():
    model = DenseNet(**CONFIG).to(DTYPE)
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE)
    model.features.requires_grad_(False)
    assert _block_nodes(model(x)) == []  # only the classifier trains: no block node at all

    model.features.requires_grad_(True)
    _freeze(model, "denseblock1")  # denseblock1 frozen, transition1 fused with it trainable
    out = model(x)  # kept: the graph lives as long as its output
    nodes = _block_nodes(out)
    first = next(node for node in nodes if node.saved_tensors[0].shape[2] == 32 // 4)
    buffer = first.saved_tensors[0]
    # What is kept besides the parameters: the buffer (the block input as a view of it) and
    # per-channel statistics; no bottleneck, which would be a storage of its own.
    large = {t.untyped_storage().data_ptr() for t in first.saved_tensors if t.numel() > 64}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert large - params == {buffer.untyped_storage().data_ptr()}
