"""Shared helpers: twin models with identical weights and whole-model comparisons."""

import torch
import torch.nn.functional as F
from tolerances import assert_close
from torch.utils._python_dispatch import TorchDispatchMode


def twins(fast_cls, ref_cls, dtype=torch.float32, **config):
    """A (fast, reference) pair with identical parameters and buffers."""
    ref = ref_cls(**config).to(dtype)
    fast = fast_cls(**config).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def train_steps(model, inputs, labels, steps=2, lr=0.01):
    """``steps`` SGD steps; returns the logits, input gradients and parameter gradients of
    every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    outputs, input_grads, param_grads = [], [], []
    for _ in range(steps):
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


class FusedOpCounter(TorchDispatchMode):
    """Counts calls of the fused BN-ReLU-Conv1x1 forward op."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.densenet_fast.bn_relu_conv1x1.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))
