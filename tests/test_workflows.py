"""What users do to a torchvision DenseNet, done side by side to densenet_fast's.

Hooks, Grad-CAM, module swaps, parametrizations, frozen and synchronised BatchNorm, tracing
and export, parameter and FLOP counters, torch.func. Each gives torchvision's results (a
block that is not the standard tree runs its modules), and a dispatch-mode count of the
fused op shows that the other blocks stay fused. Everything runs in float64, where a ReLU
mask flip cannot hide a real difference.
"""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune
from helpers import FusedOpCounter, twins
from tolerances import assert_close
from torchvision.models import DenseNet as TorchvisionDenseNet

import densenet_fast
from densenet_fast import DenseNet

CONFIG = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
              num_classes=5)
DTYPE = torch.float64
FUSED_OPS = {"block1": 3, "block2": 3}  # two layers + transition, three layers (+ norm5)


@pytest.fixture
def models():
    """(densenet_fast, torchvision) with identical weights and non-trivial statistics."""
    fast, ref = twins(DenseNet, TorchvisionDenseNet, DTYPE, **CONFIG)
    with torch.no_grad():
        ref(torch.randn(4, 3, 32, 32, dtype=DTYPE))
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 32, 32, dtype=DTYPE, generator=generator),
            torch.tensor([1, 3]))


def _step(model, train=True):
    """A forward and backward: logits, input gradient, every parameter's gradient (None
    kept), and the buffers after the step."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x, y = _batch()
    x.requires_grad_()
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def _counted_step(model, train=True):
    with FusedOpCounter() as counter:
        result = _step(model, train)
    return result, counter.calls


def assert_same_step(fast_result, ref_result, what=""):
    (out, dx, grads, buffers), (ref_out, ref_dx, ref_grads, ref_buffers) = \
        fast_result, ref_result
    assert_close(out, ref_out, DTYPE, f"{what} logits")
    assert_close(dx, ref_dx, DTYPE, f"{what} input gradient")
    assert grads.keys() == ref_grads.keys(), f"{what}: parameter names differ"
    for name, grad in grads.items():
        if ref_grads[name] is None:
            assert grad is None, f"{what}: {name}.grad is set where torchvision's is None"
        else:
            assert grad is not None, f"{what}: {name}.grad is None where torchvision's is not"
            assert_close(grad, ref_grads[name], DTYPE, f"{what} grad {name}")
    assert buffers.keys() == ref_buffers.keys(), f"{what}: buffer names differ"
    for name, buffer in buffers.items():
        assert_close(buffer, ref_buffers[name], DTYPE, f"{what} buffer {name}")


def test_standard_model_runs_the_fused_op_in_every_block(models):
    fast, ref = models
    result, calls = _counted_step(fast)
    assert calls == sum(FUSED_OPS.values())
    assert_same_step(result, _step(ref), "standard model")
    assert fast.fusion_report() == {
        "features.stem": "fused",
        "features.denseblock1": "fused with features.transition1",
        "features.denseblock2": "fused with features.norm5",
    }


# --- hooks -----------------------------------------------------------------------------

HOOK_TARGETS = {
    # module hooked: fused op calls per forward that remain
    "features.denseblock1": sum(FUSED_OPS.values()) - 1,  # fused alone; the transition
    "features.denseblock2": sum(FUSED_OPS.values()),  # runs as a module of its own
    "features.denseblock2.denselayer1": FUSED_OPS["block1"],
    "features.denseblock1.denselayer2.conv1": FUSED_OPS["block2"],
    "features.denseblock2.denselayer3.norm2": FUSED_OPS["block1"],
    "features.transition1": sum(FUSED_OPS.values()) - 1,  # now a module of its own
    "features.norm5": sum(FUSED_OPS.values()),
    # The stem then runs as modules; the blocks stay fused.
    "features.conv0": sum(FUSED_OPS.values()),
    "features.norm0": sum(FUSED_OPS.values()),
    "features.relu0": sum(FUSED_OPS.values()),
    "features.pool0": sum(FUSED_OPS.values()),
}


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    return []


def _record_hooks(model, target):
    """Every kind of hook on ``target``; returns the record they fill."""
    module = model.get_submodule(target)
    record = {"pre": [], "forward": [], "tensor": [], "backward": []}

    def forward_hook(mod, inputs, output):
        record["forward"].append(_flatten(output))
        output.register_hook(lambda grad: record["tensor"].append(_flatten(grad)))

    module.register_forward_pre_hook(lambda mod, inputs: record["pre"].append(_flatten(inputs)))
    module.register_forward_hook(forward_hook)
    module.register_full_backward_hook(
        lambda mod, grad_in, grad_out: record["backward"].append(_flatten(grad_in + grad_out)))
    return record


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", list(HOOK_TARGETS))
def test_hooks_fire_once_with_torchvisions_tensors(models, target, train):
    fast, ref = models
    fast_record, ref_record = _record_hooks(fast, target), _record_hooks(ref, target)
    try:
        ref_result = _step(ref, train)
    except RuntimeError as exc:
        # A full backward hook's output view fed to an in-place ReLU: torchvision refuses
        # it, and so must we, with the same error.
        assert "is a view and is being modified inplace" in str(exc)
        with pytest.raises(RuntimeError) as ours:
            _step(fast, train)
        assert str(ours.value) == str(exc)
        return
    result, calls = _counted_step(fast, train)
    assert_same_step(result, ref_result, f"hooked {target}")
    assert calls == HOOK_TARGETS[target]
    if target.endswith("0"):
        assert fast.fusion_report()["features.stem"] == f"modules: {target[9:]} has hooks"
    for kind, ref_fired in ref_record.items():
        fired = fast_record[kind]
        assert len(fired) == len(ref_fired) == 1, f"{kind} hook on {target}: {len(fired)} calls"
        assert len(fired[0]) == len(ref_fired[0]), f"{kind} hook on {target}: tensor count"
        for i, (tensor, ref_tensor) in enumerate(zip(fired[0], ref_fired[0], strict=True)):
            assert_close(tensor, ref_tensor, DTYPE, f"{kind} hook on {target}, tensor {i}")


def test_full_backward_hooks_where_torchvision_allows_them(models):
    """A module whose output feeds an in-place ReLU refuses full backward hooks in both
    models (above); with the ReLU modules made out-of-place they fire with equal tensors."""
    fast, ref = models
    targets = ["features.denseblock2.denselayer3.norm2", "features.transition1.norm"]
    records = []
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        records.append([_record_hooks(model, target) for target in targets])
    fast_result = _step(fast)
    ref_result = _step(ref)
    assert_same_step(fast_result, ref_result, "full backward hooks, out-of-place ReLU")
    for target, ours, theirs in zip(targets, *records, strict=True):
        assert len(ours["backward"]) == len(theirs["backward"]) == 1, target
        for tensor, ref_tensor in zip(ours["backward"][0], theirs["backward"][0], strict=True):
            assert_close(tensor, ref_tensor, DTYPE, f"backward hook on {target}")


def test_global_module_hooks_run_every_block_through_its_modules(models):
    fast, ref = models
    seen = {id(m): 0 for m in fast.modules()}

    def count(module, inputs, output):
        seen[id(module)] = seen.get(id(module), 0) + 1

    handle = nn.modules.module.register_module_forward_hook(count)
    try:
        result, calls = _counted_step(fast)
        assert "global module hooks" in fast.fusion_report()["features.denseblock1"]
    finally:
        handle.remove()
    assert calls == 0
    assert all(seen[id(m)] == 1 for m in fast.modules()), "every module is called once"
    assert_same_step(result, _step(ref), "global hook")


def _gradcam(model, target, x, class_index):
    """Grad-CAM by hand: weights are the spatially averaged gradients of the class score."""
    captured = {}

    def keep(module, inputs, output):
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    handle = model.get_submodule(target).register_forward_hook(keep)
    try:
        model.zero_grad()
        model(x)[:, class_index].sum().backward()
    finally:
        handle.remove()
    weights = captured["gradient"].mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * captured["activation"]).sum(1)).detach()


@pytest.mark.parametrize("target", ["features.denseblock2", "features.norm5"])
def test_gradcam_by_hand(models, target):
    fast, ref = models
    x, _ = _batch()
    for model in models:
        model.eval()
    heatmap = _gradcam(fast, target, x, 2)
    assert heatmap.abs().max() > 0
    assert_close(heatmap, _gradcam(ref, target, x, 2), DTYPE, f"Grad-CAM on {target}")


def test_gradcam_package_on_the_last_feature_layer(models):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, _ = _batch()
    heatmaps = []
    for model in models:
        model.eval()
        with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
            heatmaps.append(torch.from_numpy(
                cam(input_tensor=x, targets=[ClassifierOutputTarget(2)] * 2)))
    assert heatmaps[0].abs().max() > 0
    assert_close(heatmaps[0], heatmaps[1], torch.float32, "grad-cam heatmaps")


# --- module swaps and parametrizations -------------------------------------------------

class _ScaledLayer(nn.Module):
    """A user's own dense layer: the standard computation, scaled by two."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, inputs):
        return 2 * self.inner(inputs)


def _conv_like(conv, **changes):
    settings = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                    kernel_size=conv.kernel_size, padding=conv.padding, bias=False)
    settings.update(changes)
    return nn.Conv2d(**settings)


def _frozen(bn):
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.weight.dtype)
    frozen.load_state_dict(bn.state_dict(), strict=False)
    return frozen


def _replace_batchnorms(module, make):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            _replace_batchnorms(child, make)


def _set(path):
    """A modification that replaces the module at ``path`` with ``make(old module)``."""
    parent_path, _, name = path.rpartition(".")

    def modify(make):
        def apply(model):
            parent = model.get_submodule(parent_path)
            setattr(parent, name, make(getattr(parent, name)))
        return apply
    return modify


LAYER = "features.denseblock2.denselayer2"
SWAPS = {
    # name: (modification applied identically to both models, non-standard block or None)
    "relu2-leaky": (_set(f"{LAYER}.relu2")(lambda m: nn.LeakyReLU(0.2)), "denseblock2"),
    "relu1-gelu": (_set(f"{LAYER}.relu1")(lambda m: nn.GELU()), "denseblock2"),
    "conv1-bias": (_set(f"{LAYER}.conv1")(lambda m: _conv_like(m, bias=True)), "denseblock2"),
    "conv2-dilated": (_set(f"{LAYER}.conv2")(lambda m: _conv_like(m, dilation=2, padding=2)),
                      "denseblock2"),
    "conv2-grouped": (_set(f"{LAYER}.conv2")(lambda m: _conv_like(m, groups=2)), "denseblock2"),
    "norm1-not-affine": (_set(f"{LAYER}.norm1")(
        lambda m: nn.BatchNorm2d(m.num_features, affine=False)), "denseblock2"),
    "norm2-groupnorm": (_set(f"{LAYER}.norm2")(lambda m: nn.GroupNorm(2, m.num_features)),
                        "denseblock2"),
    "layer-own-class": (_set(LAYER)(_ScaledLayer), "denseblock2"),
    "transition-maxpool": (_set("features.transition1.pool")(lambda m: nn.MaxPool2d(2)), None),
    "transition-extra-module": (
        lambda model: model.features.transition1.add_module("drop", nn.Dropout(0.0)), None),
    "norm5-identity": (_set("features.norm5")(lambda m: nn.Identity()), None),
}


def _replace_forward(model):
    layer = model.get_submodule(LAYER)
    original = layer.forward
    layer.forward = lambda inputs: original(inputs) * 0.5


SWAPS["layer-forward-replaced"] = (_replace_forward, "denseblock2")


def _modified(models, modify):
    """Both models changed alike (new modules drawn from the same seed), in DTYPE."""
    for model in models:
        torch.manual_seed(7)
        modify(model)
        model.to(DTYPE)
    return models


@pytest.mark.parametrize("name", list(SWAPS))
def test_module_swaps_apply(models, name):
    modify, fallback_block = SWAPS[name]
    fast, ref = _modified(models, modify)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, calls = _counted_step(fast)
    assert_same_step(result, _step(ref), f"swap {name}")
    report = fast.fusion_report()
    if fallback_block is None:  # the blocks stay fused; the changed tail runs on its own
        assert calls == sum(FUSED_OPS.values()) - (name.startswith("transition"))
        assert all(status.startswith("fused") for status in report.values()), report
    else:
        assert calls == FUSED_OPS["block1"]
        assert report[f"features.{fallback_block}"].startswith("modules: ")
        assert report["features.denseblock1"] == "fused with features.transition1"
        assert any("runs through its modules" in str(w.message) for w in caught)


def test_fallback_warns_once_per_reason(models):
    fast, _ = models
    SWAPS["relu1-gelu"][0](fast)
    x, _ = _batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(x)
        fast(x)
    assert sum("runs through its modules" in str(w.message) for w in caught) <= 1


def _new_style(apply):
    def modify(model):
        apply(model.get_submodule(f"{LAYER}.conv1"))
    return modify


PARAMETRIZATIONS = {
    "weight_norm": _new_style(lambda m: nn.utils.parametrizations.weight_norm(m)),
    "spectral_norm": _new_style(lambda m: nn.utils.parametrizations.spectral_norm(m)),
    "orthogonal": _new_style(lambda m: nn.utils.parametrizations.orthogonal(m)),
    "old-weight_norm": _new_style(lambda m: nn.utils.weight_norm(m)),
    "old-spectral_norm": _new_style(lambda m: nn.utils.spectral_norm(m)),
    "old-prune": _new_style(lambda m: nn.utils.prune.l1_unstructured(m, "weight", 0.3)),
}


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_parametrizations_old_and_new_style_train(models, name):
    fast, ref = models
    for model in (fast, ref):
        torch.manual_seed(3)
        PARAMETRIZATIONS[name](model)
        model.to(DTYPE)
    for step in range(2):  # old-style hooks used to break on the second step
        result, calls = _counted_step(fast)
        assert_same_step(result, _step(ref), f"{name}, step {step + 1}")
        assert calls == FUSED_OPS["block1"]
        for model in (fast, ref):
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.01 * p.grad)


class _CountedIdentity(nn.Module):
    """A parametrization that returns its tensor and counts its evaluations: spectral_norm
    runs a power iteration (updating its vectors) on every one in training mode, so an
    evaluation torchvision does not make changes what the model computes."""

    def __init__(self, counts, key):
        super().__init__()
        self.counts, self.key = counts, key

    def forward(self, tensor):
        self.counts[self.key] += 1
        return tensor


def _count_evaluations(model, target):
    """Parametrize every parameter of ``target`` (a module name, or every module for "")."""
    from collections import Counter
    counts = Counter()
    for name, module in list(model.named_modules()):
        if target and name != target:
            continue
        for pname in [n for n, _ in module.named_parameters(recurse=False)]:
            nn.utils.parametrize.register_parametrization(
                module, pname, _CountedIdentity(counts, f"{name}.{pname}"))
    return counts


PARAMETRIZED_TARGETS = ["", "features.conv0", "features.norm0",
                        f"{LAYER}.norm1", f"{LAYER}.conv1", f"{LAYER}.norm2", f"{LAYER}.conv2",
                        "features.transition1.norm", "features.transition1.conv",
                        "features.norm5", "classifier"]


@pytest.mark.filterwarnings("ignore:.*runs through its modules")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", PARAMETRIZED_TARGETS, ids=lambda t: t or "every-module")
def test_parametrizations_are_evaluated_as_often_as_by_torchvision(models, target, train):
    """Every parameter of one module (or of all) parametrized: a forward and backward, a
    no-grad forward and a fusion report evaluate each parametrization as many times as
    torchvision's forwards do (the report none)."""
    counts = [_count_evaluations(model, target) for model in models]
    fast, ref = models
    assert_same_step(_step(fast, train), _step(ref, train), f"{target or 'all'} parametrized")
    assert counts[0] == counts[1] and counts[1], (counts[0] - counts[1], counts[1] - counts[0])
    with torch.no_grad():
        fast(_batch()[0]), ref(_batch()[0])
    fast.fusion_report()
    assert counts[0] == counts[1], (counts[0] - counts[1], counts[1] - counts[0])


def test_spectral_norm_on_every_convolution_trains_as_torchvision(models):
    """Spectral norm's power iteration runs once per forward and module, as in torchvision:
    three SGD steps give the same outputs and vectors."""
    for model in models:
        torch.manual_seed(3)
        for module in list(model.modules()):
            if isinstance(module, nn.Conv2d):
                nn.utils.parametrizations.spectral_norm(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            results = [_step(model) for model in models]
            assert_same_step(*results, f"spectral norm, step {step + 1}")
            for model in models:
                with torch.no_grad():
                    for p in model.parameters():
                        p.sub_(0.1 * p.grad)


def test_frozen_batchnorm_runs_fused(models):
    fast, ref = models
    for model in models:
        _replace_batchnorms(model.features, _frozen)
    result, calls = _counted_step(fast)
    assert calls == sum(FUSED_OPS.values())
    assert_same_step(result, _step(ref), "FrozenBatchNorm2d")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_in_one_process_runs_fused(models, train):
    fast, ref = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in models)
    assert isinstance(fast.features.denseblock1.denselayer1.norm1, nn.SyncBatchNorm)
    result, calls = _counted_step(fast, train)
    assert calls == sum(FUSED_OPS.values())
    assert_same_step(result, _step(ref, train), "SyncBatchNorm")


STEM_CHANGES = {
    # change: (modification, whether the stem stays fused)
    "conv0-other-settings": (_set("features.conv0")(lambda m: _conv_like(
        m, kernel_size=5, stride=1, padding=1, dilation=2)), True),
    "pool0-other-settings": (_set("features.pool0")(lambda m: nn.MaxPool2d(
        2, stride=1, padding=1, dilation=1, ceil_mode=True)), True),
    "norm0-frozen": (_set("features.norm0")(_frozen), True),
    "conv0-bias": (_set("features.conv0")(lambda m: _conv_like(m, bias=True)), False),
    "norm0-groupnorm": (_set("features.norm0")(lambda m: nn.GroupNorm(2, m.num_features)),
                        False),
    "relu0-leaky": (_set("features.relu0")(lambda m: nn.LeakyReLU(0.1)), False),
    "pool0-avg": (_set("features.pool0")(lambda m: nn.AvgPool2d(3, 2, 1)), False),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(STEM_CHANGES))
def test_stem_changes_apply(models, name, train):
    modify, fused = STEM_CHANGES[name]
    fast, ref = _modified(models, modify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, calls = _counted_step(fast, train)
    assert_same_step(result, _step(ref, train), f"stem change {name}")
    assert calls == sum(FUSED_OPS.values())
    status = fast.fusion_report()["features.stem"]
    assert status == "fused" if fused else status.startswith("modules: "), status


# --- tracing, export, counters ---------------------------------------------------------

def test_fx_feature_extraction_has_torchvisions_nodes(models):
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    fast, ref = models
    for model in models:
        model.eval()
    assert get_graph_node_names(fast) == get_graph_node_names(ref)
    nodes = ["features.denseblock1", "features.transition1.conv", "features.norm5", "flatten"]
    x, _ = _batch()
    ours = create_feature_extractor(fast, nodes)(x)
    theirs = create_feature_extractor(ref, nodes)(x)
    for node in nodes:
        assert_close(ours[node], theirs[node], DTYPE, f"feature {node}")
    traced = torch.fx.symbolic_trace(fast)
    assert_close(traced(x), ref(x), DTYPE, "symbolic_trace output")


def test_jit_trace(models):
    fast, ref = models
    x, _ = _batch()
    for model in models:
        model.eval()
    traced = torch.jit.trace(fast, x)
    assert_close(traced(x), ref(x), DTYPE, "traced output")
    assert_close(traced(2 * x), ref(2 * x), DTYPE, "traced output, new input")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_jit_script(models):
    """Scripting compiles the modules' computation (test_torchvision_api.py: training)."""
    fast, ref = models
    x, _ = _batch()
    for model in models:
        model.eval()
    scripted = torch.jit.script(fast)
    assert_close(scripted(x), ref(x), DTYPE, "scripted output")
    assert_close(scripted(2 * x), ref(2 * x), DTYPE, "scripted output, new input")


def test_legacy_onnx_export_runs_in_onnxruntime(models):
    import onnxruntime

    fast, ref = (m.float().eval() for m in models)
    x = _batch()[0].float()
    exported = io.BytesIO()
    torch.onnx.export(fast, (x,), exported, dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(exported.getvalue(),
                                           providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    assert_close(out, ref(x), torch.float32, "onnxruntime output")


def _program_ops(program) -> list[str]:
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_export_gives_torchvisions_program(models, strict, train):
    """An exported program is what runtimes optimise and run (onnxruntime, AOTInductor):
    the model runs its modules while torch.export traces, strict (dynamo) or not, so the
    program is torchvision's, op for op, with no densenet_fast op in it; in training mode it
    updates the running statistics as torchvision's does."""
    fast, ref = models
    x, _ = _batch()
    for model in models:
        model.train(train)
    expected = copy.deepcopy(ref)(x)
    programs = [torch.export.export(model, (x,), strict=strict) for model in models]
    assert _program_ops(programs[0]) == _program_ops(programs[1])
    assert not any("densenet_fast" in op for op in _program_ops(programs[0]))
    modules = [program.module() for program in programs]
    outs = [module(x) for module in modules]
    assert_close(outs[0], outs[1], DTYPE, "exported program output")
    assert_close(outs[0], expected, DTYPE, "exported program against the module")
    states = [module.state_dict() for module in modules]
    assert states[0].keys() == states[1].keys()
    for name, value in states[1].items():
        assert_close(states[0][name], value, DTYPE, f"exported program's {name}")


def test_onnx_export_to_a_file_runs_in_onnxruntime(tmp_path):
    """``torch.onnx.export(model, (x,), path)`` with its defaults (the dynamo exporter, the
    weights in an external file) on a block of 17 layers: the fused block traced as ATen ops
    split 35 running-variance slices with a constant that the exporter moved to the external
    file, which onnxruntime's shape inference cannot read, and the file failed to load. The
    graph is torchvision's, node for node."""
    import onnx
    import onnxruntime

    config = dict(growth_rate=2, block_config=(17,), num_init_features=4, bn_size=1,
                  num_classes=3)
    fast, ref = twins(DenseNet, TorchvisionDenseNet, torch.float32, **config)
    for model in (fast, ref):
        model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    graphs = []
    for name, model in (("fast", fast), ("ref", ref)):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path))
        graphs.append([node.op_type for node in onnx.load(str(path)).graph.node])
    assert graphs[0] == graphs[1]
    session = onnxruntime.InferenceSession(str(tmp_path / "fast.onnx"),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    assert_close(out, ref(x), torch.float32, "onnxruntime output (dynamo exporter)")


def test_parameter_and_mult_add_counts(models):
    import thop
    import torchinfo
    from fvcore.nn import FlopCountAnalysis

    x, _ = _batch()
    fast, ref = models
    ours = torchinfo.summary(fast, input_data=x, verbose=0)
    theirs = torchinfo.summary(ref, input_data=x, verbose=0)
    assert (ours.total_params, ours.total_mult_adds) == (theirs.total_params,
                                                         theirs.total_mult_adds)
    assert sum(p.numel() for p in fast.parameters()) == ours.total_params
    fast, ref = (copy.deepcopy(m).eval() for m in models)  # thop leaves counters behind
    assert thop.profile(fast, inputs=(x,), verbose=False) == \
        thop.profile(ref, inputs=(x,), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert FlopCountAnalysis(fast, x).unsupported_ops_warnings(False).total() == \
            FlopCountAnalysis(ref, x).unsupported_ops_warnings(False).total()


def test_flop_counter_mode_totals(models):
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for model in models:
        with FlopCounterMode(display=False) as counter:
            _step(model)
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] > 0


def test_flop_formula_of_the_fused_block(models):
    """The fused block and stem, run directly (FlopCounterMode's module tracker registers
    global hooks, which send the model through its modules), count torchvision's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from densenet_fast.model import run_block

    fast, ref = models
    x = torch.randn(2, 8, 8, 8, dtype=DTYPE, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        run_block(fast.features.denseblock1, x, fast.features.transition1).sum().backward()
    fused = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        ref.features.transition1(ref.features.denseblock1(x)).sum().backward()
    assert fused == counter.get_total_flops() > 0

    from densenet_fast.model import run_stem

    image = torch.randn(2, 3, 32, 32, dtype=DTYPE, requires_grad=True)
    stem = [getattr(fast.features, name) for name in ("conv0", "norm0", "pool0")]
    with FlopCounterMode(display=False) as counter:
        run_stem(*stem, image).sum().backward()
    fused = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        ref.features[:4](image).sum().backward()
    assert fused == counter.get_total_flops() > 0


# --- torch.func, half precision (higher-order gradients: test_higher_order.py) ----------

def _per_sample_gradients(model):
    from torch.func import functional_call, grad, vmap

    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = _batch()

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_torch_func_per_sample_gradients(models):
    fast, ref = models
    ours, theirs = _per_sample_gradients(fast), _per_sample_gradients(ref)
    for name, grad in theirs.items():
        assert_close(ours[name], grad, DTYPE, f"per-sample grad {name}")


def test_half_precision_on_cpu(models):
    fast, ref = (m.half() for m in models)
    x = _batch()[0].half()
    for train in (False, True):
        for model in (fast, ref):
            model.train(train)
        assert_close(fast(x), ref(x), torch.float16, f"float16 logits, train={train}")
    assert fast.features.norm5.running_mean.dtype == torch.float16


# --- convert() -------------------------------------------------------------------------

def test_convert_shares_parameters_buffers_and_hooks():
    source = TorchvisionDenseNet(**CONFIG).to(DTYPE)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    fired = []
    source.features.denseblock2.denselayer1.conv2.register_forward_hook(
        lambda *args: fired.append("leaf"))
    source.features.denseblock1.register_forward_hook(lambda *args: fired.append("block"))
    fast = densenet_fast.convert(source)
    assert all(a is b for a, b in zip(fast.parameters(), source.parameters(), strict=True))
    assert all(a is b for a, b in zip(fast.buffers(), source.buffers(), strict=True))
    before = source.features.conv0.weight.detach().clone()
    x, y = _batch()
    F.cross_entropy(fast(x), y).backward()
    optimizer.step()
    assert not torch.equal(fast.features.conv0.weight, before)
    assert fired == ["block", "leaf"]
    assert fast.fusion_report()["features.denseblock1"].startswith("fused; ")
    assert fast.fusion_report()["features.denseblock2"].startswith("modules: ")


def test_convert_keeps_custom_containers_and_refuses_a_custom_forward():
    source = TorchvisionDenseNet(**CONFIG).to(DTYPE)
    source.features.denseblock2.denselayer2 = _ScaledLayer(source.features.denseblock2.denselayer2)
    fast = densenet_fast.convert(copy.deepcopy(source))
    x, _ = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(fast(x), source(x), DTYPE, "converted model with a custom layer")

    class Wrapped(TorchvisionDenseNet):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="cannot keep the forward of Wrapped"):
        densenet_fast.convert(Wrapped(**CONFIG))
