"""``features``' fused steps in channels-last for an NCHW caller (``ops.conv_layout``'s rule,
``plan.run_steps``): the caller, hooks and modules see its own layout, and the results are
torchvision's.

The rule applies to float32 and bfloat16 on AVX-512 CPUs only; these tests force it, in
float64 where results are compared with torchvision's, so they run the same on every CPU.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_match, assert_models_match, train_steps, twins
from tolerances import assert_close
from torchvision.models import DenseNet as TorchvisionDenseNet

from densenet_fast import DenseNet, backends, graph, plan
from densenet_fast.ops import conv_layout, reference_kernels

SMALL = dict(growth_rate=5, block_config=(3, 2), num_init_features=7, bn_size=3,
             num_classes=4)


def _forced_rule(x):
    """The rule as an AVX-512 CPU with oneDNN applies it, for every dtype."""
    return x.device.type == "cpu" and x.is_contiguous()


class _Spy:
    """What the fused kernels ran on: the stem's ``channels_last`` setting and each block's
    input and buffer layouts, read where the forward ops' kernels run (eager, or inside a
    compiled graph's opaque ops)."""

    def __init__(self, monkeypatch):
        self.stem, self.blocks = [], []
        stem_forward, block_forward = graph.stem_computation.forward, graph.BlockForward
        spy = self

        def recording_stem(x, spec, params):
            spy.stem.append(spec.channels_last)
            return stem_forward(x, spec, params)

        class RecordingBlock(block_forward):
            def __init__(self, x, spec, params, keep):
                super().__init__(x, spec, params, keep)
                spy.blocks.append(self.buffer.is_contiguous(memory_format=torch.channels_last)
                                  and not self.buffer.is_contiguous())

        monkeypatch.setattr(graph.stem_computation, "forward", recording_stem)
        monkeypatch.setattr(graph, "BlockForward", RecordingBlock)


def _image(shape=(3, 3, 40, 40), dtype=torch.float64, **kwargs):
    return torch.zeros(shape, dtype=dtype, **kwargs)


def test_rule_chooses_channels_last_where_it_was_measured_faster(monkeypatch):
    monkeypatch.setattr(conv_layout, "CPU_CAPABILITY", "avx512")
    assert conv_layout.fused_steps_channels_last(_image(dtype=torch.float32))
    assert conv_layout.fused_steps_channels_last(_image(dtype=torch.bfloat16))
    # Level (float16) or slower (float64) on the AMD EPYC where float32 and bfloat16 gain.
    assert not conv_layout.fused_steps_channels_last(_image(dtype=torch.float16))
    assert not conv_layout.fused_steps_channels_last(_image())
    # Under autocast, the dtype the steps compute in decides; float64 stays float64.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_layout.fused_steps_channels_last(_image(dtype=torch.float32))
        assert not conv_layout.fused_steps_channels_last(_image())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not conv_layout.fused_steps_channels_last(_image(dtype=torch.float32))
    # Already channels-last, or not dense: nothing to choose.
    channels_last = _image(dtype=torch.float32).to(memory_format=torch.channels_last)
    assert not conv_layout.fused_steps_channels_last(channels_last)
    view = _image((3, 3, 40, 80), dtype=torch.float32)[..., ::2]
    assert not conv_layout.fused_steps_channels_last(view)
    assert not conv_layout.fused_steps_channels_last(_image(dtype=torch.float32, device="meta"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not conv_layout.fused_steps_channels_last(_image(dtype=torch.float32))
    monkeypatch.undo()
    # An AVX2 CPU (AMD EPYC of family 23) ran the bfloat16 step slower in channels-last.
    monkeypatch.setattr(conv_layout, "CPU_CAPABILITY", "avx2")
    assert not conv_layout.fused_steps_channels_last(_image(dtype=torch.float32))


@pytest.mark.parametrize("kernels", ["cpp", "torch", "reference_kernels()"])
def test_only_the_compiled_cpu_kernels_run_channels_last(kernels, monkeypatch):
    """The pure-PyTorch kernels ran the step slower channels-last: with them (the ``torch``
    backend, or inside ``reference_kernels()``) the fused steps keep the caller's layout."""
    monkeypatch.setattr(conv_layout, "CPU_CAPABILITY", "avx512")
    monkeypatch.setattr(conv_layout.lowp_conv, "onednn_enabled", lambda: True)
    monkeypatch.setattr(backends, "active_backend",
                        lambda device: "torch" if kernels == "torch" else "cpp")
    spy = _Spy(monkeypatch)
    model = DenseNet(**SMALL)
    x = torch.randn(2, 3, 40, 40)
    with reference_kernels() if kernels == "reference_kernels()" else nullcontext():
        out = model(x)
    assert spy.stem == [kernels == "cpp"] and spy.blocks == [kernels == "cpp"] * 2
    assert out.shape == (2, 4)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_training_steps_match_torchvision(recompute, drop_rate, monkeypatch):
    """Two SGD steps with the fused steps channels-last: logits, the input's gradient, every
    parameter gradient and running statistic are torchvision's, dropout drops what
    torchvision's layers drop from the same seed, and the caller's tensors are NCHW."""
    monkeypatch.setattr(plan, "fused_steps_channels_last", _forced_rule)
    spy = _Spy(monkeypatch)
    config = dict(SMALL, drop_rate=drop_rate)
    fast, ref = twins(lambda **c: DenseNet(**c, recompute_bottleneck=recompute),
                      TorchvisionDenseNet, torch.float64, **config)
    x, y = torch.randn(2, 3, 40, 40, dtype=torch.float64), torch.tensor([0, 3])
    fast_out, fast_dx, fast_grads = train_steps(fast, x, y, seed=7)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y, seed=7)
    assert spy.stem == [True, True] and spy.blocks == [True] * 4
    for step in range(2):
        assert_close(fast_out[step], ref_out[step], torch.float64, f"logits, step {step + 1}")
        assert fast_dx[step].is_contiguous()
        assert_close(fast_dx[step], ref_dx[step], torch.float64,
                     f"input gradient, step {step + 1}")
        assert_grads_match(fast_grads[step], ref_grads[step], torch.float64,
                           f"step {step + 1}")
    assert_models_match(fast, ref, torch.float64, "after two steps")


@pytest.mark.parametrize("batch", [1, 3])
def test_features_give_the_callers_layout_back(batch, monkeypatch):
    """``model.features`` returns an NCHW input's features NCHW and a channels-last input's
    channels-last (that one runs as it is), in eval mode, equal to torchvision's."""
    monkeypatch.setattr(plan, "fused_steps_channels_last", _forced_rule)
    spy = _Spy(monkeypatch)
    fast, ref = twins(DenseNet, TorchvisionDenseNet, torch.float64, **SMALL)
    fast.eval(), ref.eval()
    x = torch.randn(batch, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        out, expected = fast.features(x), ref.features(x)
        assert out.is_contiguous()
        assert_close(out, expected, torch.float64, "features")
        assert spy.stem == [True] and spy.blocks == [True, True]
        out = fast.features(x.to(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, expected, torch.float64, "features of a channels-last input")


def test_hooks_and_modules_see_the_callers_layout(monkeypatch):
    """A hooked block (called as a module) and a hooked transition (run as a module) get the
    caller's NCHW tensors; the unhooked steps still run channels-last, and the results are
    torchvision's."""
    monkeypatch.setattr(plan, "fused_steps_channels_last", _forced_rule)
    spy = _Spy(monkeypatch)
    config = dict(SMALL, block_config=(2, 2, 2))
    fast, ref = twins(DenseNet, TorchvisionDenseNet, torch.float64, **config)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].is_contiguous()
        return hook

    for name in ("denseblock2", "transition1"):
        fast.features.get_submodule(name).register_forward_pre_hook(record(name))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    out = fast(x)
    expected = ref(x)
    assert seen == {"denseblock2": True, "transition1": True}
    # The stem and block 1 (its transition runs on its own), block 2 (called, in the
    # caller's layout), block 3 channels-last again.
    assert spy.stem == [True] and spy.blocks == [True, False, True]
    assert_close(out, expected, torch.float64, "logits")
    grad, expected_grad = torch.autograd.grad(out.square().sum(), x), \
        torch.autograd.grad(expected.square().sum(), x)
    assert grad[0].is_contiguous()
    assert_close(grad[0], expected_grad[0], torch.float64, "input gradient")


def test_compiled_steps_run_channels_last_as_ops(monkeypatch):
    """Under torch.compile, the real rule (on an AVX-512 CPU) runs the stem and blocks as
    their ops, channels-last, in a training step and in a forward without gradients, with
    eager's results; without gradients the blocks' ops keep nothing for backward."""
    monkeypatch.setattr(conv_layout, "CPU_CAPABILITY", "avx512")
    monkeypatch.setattr(conv_layout.lowp_conv, "onednn_enabled", lambda: True)
    spy = _Spy(monkeypatch)
    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    eager = DenseNet(**config)
    base = DenseNet(**config)
    base.load_state_dict(eager.state_dict())
    compiled = torch.compile(base, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    results = []
    for model in (compiled, eager):
        del spy.stem[:], spy.blocks[:]
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out, {n.removeprefix("_orig_mod."): p.grad
                              for n, p in model.named_parameters()}))
        # The compiled call ran the fake kernels while tracing, then the real ones.
        assert set(spy.stem) == {True} and set(spy.blocks) == {True}
    assert_close(results[0][0], results[1][0], torch.float32, "logits")
    assert_grads_match(results[0][1], results[1][1], torch.float32)
    assert_models_match(base, eager, torch.float32, "after a step", params=False)

    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    for train in (True, False):
        eager.train(train), base.train(train)
        torch._dynamo.reset()
        del spy.stem[:], spy.blocks[:], ops[:]
        compiled = torch.compile(base, backend=backend, fullgraph=True)
        with torch.no_grad():
            out = compiled(x)
            assert set(spy.stem) == {True} and set(spy.blocks) == {True}
            assert "densenet_fast.dense_block_forward" in ops
            assert "densenet_fast.stem_forward" in ops
            assert_close(out, eager(x), torch.float32, f"logits without gradients, {train=}")
        assert_models_match(base, eager, torch.float32, f"no gradients, {train=}", params=False)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("route", ["backward(inputs=params)", "r1"])
def test_gradient_penalties_match_torchvision(route, drop_rate, monkeypatch):
    """Beyond the first-order backward (a penalty on the parameters' gradients, and R1 on the
    input's), the blocks recompute what ran channels-last, dropout masks included."""
    from test_higher_order import _models, _penalised

    monkeypatch.setattr(plan, "fused_steps_channels_last", _forced_rule)
    spy = _Spy(monkeypatch)
    fast, ref = _models(drop_rate=drop_rate)
    ours, our_buffers = _penalised(fast, route, train=True)
    assert spy.stem == [True] and spy.blocks == [True, True]
    theirs, their_buffers = _penalised(ref, route, train=True)
    names = [name for name, _ in fast.named_parameters()]
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert_close(a, b, torch.float64, f"{route} gradient of {name}")
    for name, b in their_buffers.items():
        assert_close(our_buffers[name], b, torch.float64, f"{route} buffer {name}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_batch_statistics_as_accurate_in_both_layouts(layout):
    """The fused steps' channels-last data gets batch statistics as accurate as NCHW data's:
    ATen's channels-last CPU kernel accumulates float32 in float32 (about 1e-5 relative
    error in a variance on this tensor, which gradients that are small residuals amplify)."""
    from densenet_fast.ops.batchnorm import channel_stats

    torch.manual_seed(0)
    x = torch.randn(8, 32, 56, 56) * 0.7 + 2.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = channel_stats(x)
    exact = x.double()
    exact_mean, exact_var = exact.mean((0, 2, 3)), exact.var((0, 2, 3), unbiased=False)
    assert (mean.double() - exact_mean).abs().max() <= 1e-6
    assert ((var.double() - exact_var) / exact_var).abs().max() <= 1e-6
