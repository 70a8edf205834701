"""torch.compile traces the whole model, fused blocks included, with no graph break, and
matches eager: outputs, every gradient and the BatchNorm running statistics."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import FusedOpCounter, assert_grads_match, assert_models_match
from tolerances import assert_close

import densenet_fast
from densenet_fast import DenseNet
from densenet_fast.ops import conv_layout


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach()


# aot_eager checks what dynamo and AOT autograd trace, in seconds; inductor, the default
# backend, also generates code (about a minute on 2 cores) and is what users run.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager_without_graph_breaks(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3,
                  drop_rate=0.0)
    eager, compiled_base = DenseNet(**config), DenseNet(**config)
    compiled_base.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_base, backend=backend, fullgraph=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for step in range(2):
        # The compiled graph calls the opaque block ops, which run the fused op per layer and
        # per transition at run time (5 calls). Were the blocks traced instead, the counter's
        # patch would make the second step recompile, which is an error here. So would a
        # guard on the loaded modules (a sys.modules lookup of a library that is not loaded
        # is guarded by the number of modules): one more module is loaded before step 2.
        if step:
            sys.modules["_densenet_fast_test_one_more_module"] = types.ModuleType("marker")
        with FusedOpCounter() as ops, torch._dynamo.config.patch(error_on_recompile=step > 0):
            logits = _step(compiled, x, y)
        # (The first step also runs them on fake tensors while tracing, several times.)
        assert ops.calls == 2 + 2 + 1 if step else ops.calls > 2 + 2 + 1, ops.calls
        assert_close(logits, _step(eager, x, y), torch.float32, "logits")
        assert_grads_match({n: p.grad for n, p in compiled_base.named_parameters()},
                           {n: p.grad for n, p in eager.named_parameters()}, torch.float32)
    assert_models_match(compiled_base, eager, torch.float32, "after two compiled steps",
                        params=False)
    del sys.modules["_densenet_fast_test_one_more_module"]


def test_compiled_eval_mode_step_matches_eager():
    """With gradients in eval mode (BatchNorm on running statistics, as when fine-tuning with
    frozen statistics) the compiled step traces too, and matches eager."""
    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    eager, compiled_base = DenseNet(**config).eval(), DenseNet(**config).eval()
    compiled_base.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_base, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    assert_close(_step(compiled, x, y), _step(eager, x, y), torch.float32, "logits")
    assert_grads_match({n: p.grad for n, p in compiled_base.named_parameters()},
                       {n: p.grad for n, p in eager.named_parameters()}, torch.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiled_forward_without_gradients_traces_aten_ops(train, monkeypatch):
    """Without gradients dynamo traces the blocks' and the stem's kernels as their reference
    ATen ops, which inductor fuses (it had them as opaque densenet_fast ops on torch 2.14 and
    as ATen ops on torch 2.11, whose dynamo answers is_exporting() True); the one op left is
    the running statistics' update, whose mutations it declares. The outputs and the running
    statistics equal eager's. So on CPUs where ``features`` keeps the caller's layout (one
    without AVX-512 here; on AVX-512 CPUs the fused steps run as their ops,
    ``test_working_layout.py``)."""
    monkeypatch.setattr(conv_layout, "CPU_CAPABILITY", "avx2")
    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    eager, compiled_base = DenseNet(**config).train(train), DenseNet(**config).train(train)
    compiled_base.load_state_dict(eager.state_dict())
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes
                       if node.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(compiled_base, backend=backend, fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, "logits")
    ours = {target for target in targets if "densenet_fast" in target}
    assert targets and ours <= {"densenet_fast.update_running_stats"}, ours
    assert_models_match(compiled_base, eager, torch.float32, "after a compiled forward",
                        params=False)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiled_forward_without_gradients_under_autocast(dtype, memory_format):
    """A compiled inference forward under CPU autocast, the usual way to deploy with
    torch.compile, traces whole (``fullgraph=True``) and matches eager, in eval and training
    mode (running statistics). It failed to trace: the CPU's measured choice of convolution
    precision and the stem's oneDNN layout rule called what dynamo cannot trace
    (``torch.backends.mkldnn.is_available``); traced, inductor chooses those itself."""
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    x = torch.randn(4, 3, 32, 32).to(memory_format=memory_format)
    for train in (False, True):
        torch._dynamo.reset()
        eager = DenseNet(**config).train(train).to(memory_format=memory_format)
        compiled_base = DenseNet(**config).train(train).to(memory_format=memory_format)
        compiled_base.load_state_dict(eager.state_dict())
        compiled = torch.compile(compiled_base, backend="aot_eager", fullgraph=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out, expected = compiled(x), eager(x)
        assert out.dtype == expected.dtype == dtype
        assert_close(out.float(), expected.float(), dtype, f"logits, train={train}")
        for name, buffer in eager.named_buffers():
            assert_close(dict(compiled_base.named_buffers())[name].float(), buffer.float(),
                         dtype, f"{name}, train={train}")


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_compiled_dropout_draws_torchvisions_masks(rate):
    """Dropout inside the compiled blocks draws what torchvision's layers draw from the same
    seed (the opaque block op runs its draws at run time, once per step, not while tracing):
    logits and every gradient match torchvision's step by step; at rate 1, zeros and no
    draws."""
    from torchvision.models import DenseNet as TorchvisionDenseNet

    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3,
                  drop_rate=rate)
    base, ref = DenseNet(**config), TorchvisionDenseNet(**config)
    ref.load_state_dict(base.state_dict())
    compiled = torch.compile(base, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for step in range(2):
        results = []
        for model in (compiled, ref):
            torch.manual_seed(100 + step)
            results.append(_step(model, x, y))
        assert_close(results[0], results[1], torch.float32, f"logits, step {step + 1}")
        assert_grads_match({n: p.grad for n, p in base.named_parameters()},
                           {n: p.grad for n, p in ref.named_parameters()}, torch.float32)


def test_compiled_model_with_a_swapped_module_compiles_whole(monkeypatch):
    """A block whose module tree is not torchvision's standard one (a GELU in a layer) runs
    its modules; under ``torch.compile(fullgraph=True)`` they compile as torchvision's do and
    match eager, where the fallback's warning, which dynamo cannot trace, broke the graph.
    Eager still warns."""
    from densenet_fast import fusion

    monkeypatch.setattr(fusion, "_warned", set())  # no reason warned yet in this process
    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    eager, compiled_base = DenseNet(**config), DenseNet(**config)
    compiled_base.load_state_dict(eager.state_dict())
    for model in (eager, compiled_base):
        model.features.denseblock1.denselayer2.relu1 = torch.nn.GELU()
    compiled = torch.compile(compiled_base, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    logits = _step(compiled, x, y)
    with pytest.warns(UserWarning, match="relu1 is GELU"):
        assert_close(logits, _step(eager, x, y), torch.float32, "logits")
    assert_grads_match({n: p.grad for n, p in compiled_base.named_parameters()},
                       {n: p.grad for n, p in eager.named_parameters()}, torch.float32)
    assert compiled_base.fusion_report()["features.denseblock1"].startswith("modules: ")


@pytest.mark.parametrize("how", ["module.compile", "replaced"])
def test_blocks_compiled_on_their_own(how):
    """Regional compilation, which PyTorch recommends to cut compile time: each block
    compiled in place (``block.compile()``) or replaced by ``torch.compile(block)``. The
    blocks run fused inside their compiled calls and the step matches the eager model;
    ``fusion_report`` names a replaced block (it left such blocks out: the wrapper is no
    block, and the block inside decides)."""
    torch._dynamo.reset()
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    eager, compiled = DenseNet(**config), DenseNet(**config)
    compiled.load_state_dict(eager.state_dict())
    for name in ("denseblock1", "denseblock2"):
        block = getattr(compiled.features, name)
        if how == "module.compile":
            block.compile(backend="aot_eager")
        else:
            setattr(compiled.features, name, torch.compile(block, backend="aot_eager"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    _step(compiled, x, y)  # compiles
    with FusedOpCounter() as ops:
        logits = _step(compiled, x, y)
    assert ops.calls == 2 + 2 + (1 if how == "module.compile" else 0), ops.calls
    _step(eager, x, y)  # the same two steps: the running statistics move alike
    reference = _step(eager, x, y)
    assert_close(logits, reference, torch.float32, "logits")
    assert_grads_match({n.replace("._orig_mod", ""): p.grad
                        for n, p in compiled.named_parameters()},
                       {n: p.grad for n, p in eager.named_parameters()}, torch.float32)
    report = compiled.fusion_report()
    if how == "replaced":
        assert report["features.denseblock1"] == "compiled on its own (torch.compile): fused"
    else:
        assert report["features.denseblock1"] == "fused with features.transition1"


@pytest.mark.parametrize("name", ["features.denseblock1.denselayer2.conv1.weight",
                                  "features.denseblock1.denselayer1.norm2.weight",
                                  "features.denseblock1.denselayer2.norm1.bias"])
def test_compiled_backward_refuses_a_parameter_changed_since_forward(name):
    """The compiled model, as the eager one (tests/test_errors.py), raises autograd's error
    where a parameter changed in place between forward and backward, where torchvision's
    compiled model does; the BN bias, which torchvision's backward does not read, too."""
    import torchvision

    raised = {}
    for lib in (torchvision.models, densenet_fast):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = lib.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8,
                             bn_size=2, num_classes=5)
        out = torch.compile(model, backend="aot_eager")(torch.randn(2, 3, 32, 32)).sum()
        with torch.no_grad():
            model.get_parameter(name).mul_(2)
        try:
            out.backward()
            raised[lib.__name__] = False
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            raised[lib.__name__] = True
    assert raised["densenet_fast"] == (raised["torchvision.models"] or name.endswith(".bias"))
