"""torchvision's behaviour at the edges of the API, side by side with torchvision's DenseNet:
an empty batch, the exception classes of bad input, ``torch.jit.script`` and the builders'
signatures and legacy ``pretrained`` interface. Values are compared in float64."""

import copy
import inspect
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from helpers import assert_models_match, twins
from test_errors import CASES, SMALL
from tolerances import assert_close
from torchvision.models.feature_extraction import create_feature_extractor

import densenet_fast
from densenet_fast import DenseNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = torch.float64
CONFIG = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
              num_classes=5)
ARCHS = ["densenet121", "densenet161", "densenet169", "densenet201"]

# torch.jit.script, save and load work and are tested; torch warns that they are deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]+` is deprecated")


@pytest.fixture
def models():
    """(densenet_fast, torchvision) with identical weights and non-trivial statistics."""
    fast, ref = twins(DenseNet, tvm.DenseNet, DTYPE, **CONFIG)
    with torch.no_grad():
        ref(torch.randn(4, 3, 32, 32, dtype=DTYPE))
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _assert_same_state(fast, ref, what):
    """Every buffer (running statistics, num_batches_tracked) equal to the bit."""
    theirs = dict(ref.named_buffers())
    for name, buffer in fast.named_buffers():
        assert torch.equal(buffer, theirs[name]), f"{what}: buffer {name} differs"


def _step(model, x, train):
    """A forward and a backward: logits, input gradient, every parameter's gradient."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)
    (F.cross_entropy(out, torch.arange(len(out)) % out.shape[1]) if out.numel()
     else out.sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads, [str(w.message) for w in caught]


def _assert_steps_match(ours, theirs, what):
    out, x_grad, grads, _ = ours
    ref_out, ref_x_grad, ref_grads, _ = theirs
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype, what
    assert_close(out, ref_out, DTYPE, f"{what} output")
    assert_close(x_grad, ref_x_grad, DTYPE, f"{what} input gradient")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (ref_grads[name] is None), f"{what} grad {name}"
        if grad is not None:
            assert_close(grad, ref_grads[name], DTYPE, f"{what} grad {name}")


# -- 5. an empty batch ------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_is_torchvisions(models, train):
    """(0, classes) out; in training every BN counts the batch in num_batches_tracked and
    leaves its running statistics; the backward gives torchvision's (zero) gradients."""
    fast, ref = models
    x = torch.empty(0, 3, 32, 32, dtype=DTYPE)
    ours, theirs = _step(fast, x, train), _step(ref, x, train)
    assert ours[0].shape == (0, CONFIG["num_classes"])
    _assert_steps_match(ours, theirs, "empty batch")
    assert ours[3] == theirs[3], "warnings differ"
    _assert_same_state(fast, ref, "after an empty batch")
    if train:  # the comparison is not vacuous: the counters moved
        assert fast.features.norm5.num_batches_tracked.item() == 2
    # The model still fuses and matches afterwards.
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    _assert_steps_match(_step(fast, x, train), _step(ref, x, train), "after the empty batch")
    assert_models_match(fast, ref, DTYPE, "after the next batch")


def test_empty_batch_float32_and_standalone_block():
    fast, ref = twins(DenseNet, tvm.DenseNet, torch.float32, **CONFIG)
    x = torch.empty(0, 3, 32, 32)
    for train in (True, False):
        fast.train(train), ref.train(train)
        out = fast(x)
        assert out.shape == ref(x).shape == (0, 5) and out.dtype == torch.float32
    _assert_same_state(fast, ref, "float32 empty batches")
    block, ref_block = fast.features.denseblock2, ref.features.denseblock2
    features = torch.empty(0, block.denselayer1.conv1.in_channels, 4, 4)
    assert block(features).shape == ref_block(features).shape == (0, 8 + 3 * 4, 4, 4)
    _assert_same_state(block, ref_block, "standalone block on an empty batch")


def _layout_strides(t: torch.Tensor) -> tuple:
    return tuple(stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_meta_device_forward_and_backward_are_torchvisions(train, layout):
    """A model built on the meta device (shape inference, deferred initialisation) runs
    forward and backward as torchvision's does: the same shapes, dtypes and strides of the
    output, the input gradient and every parameter's gradient, with the blocks fused (the
    ops' shape functions serve meta tensors; autocast, which does not know meta, is not
    asked)."""
    results = []
    for build in (DenseNet, tvm.DenseNet):
        with torch.device("meta"):
            model = build(**CONFIG).train(train).to(memory_format=layout)
            x = torch.randn(2, 3, 32, 32).to(memory_format=layout).requires_grad_()
        out = model(x)
        out.sum().backward()
        # Strides of dimensions of size 1 say nothing about the layout (torch 2.11 and 2.14
        # give a 1x1 convolution's weight gradient different ones there).
        results.append([(name, t.shape, t.dtype, _layout_strides(t), t.device.type)
                        for name, t in [("out", out), ("x.grad", x.grad),
                                        *((n, p.grad) for n, p in model.named_parameters())]])
        if build is DenseNet:
            assert all(how.startswith("fused") for how in model.fusion_report().values())
    assert results[0] == results[1]


# -- 6. torchvision's exception classes -------------------------------------------------------

@pytest.mark.parametrize("name, make_model, make_input, error, match", CASES,
                         ids=[c[0] for c in CASES])
def test_errors_are_instances_of_torchvisions(name, make_model, make_input, error, match):
    """torchvision's model, given the same bad input, raises a class that ours is an
    instance of; our message stays (test_errors.py checks it and the unchanged state)."""
    with pytest.raises(Exception) as theirs:
        make_model(tvm)(make_input())
    with pytest.raises(error, match=match) as ours:
        make_model(densenet_fast)(make_input())
    assert isinstance(ours.value, type(theirs.value)), \
        f"{name}: ours {type(ours.value).__mro__}, torchvision's {type(theirs.value).__name__}"


def test_standalone_block_error_is_torchvisions():
    ours = DenseNet(**SMALL).features.denseblock1
    theirs = tvm.DenseNet(**SMALL).features.denseblock1
    x = torch.randn(2, 5, 8, 8)
    with pytest.raises(Exception) as tv_error:
        theirs(x)
    with pytest.raises(type(tv_error.value), match="expects 8 input channels, got 5"):
        ours(x)


# -- 7. torch.jit.script ----------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_script_is_torchvisions(models, train):
    """The scripted model (the modules' computation) gives torchvision's logits, gradients
    and running statistics, in the original model's shared parameters and buffers."""
    fast, ref = models
    scripted = torch.jit.script(fast)
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE)
    for step in range(2):
        _assert_steps_match(_step(scripted, x, train), _step(ref, x, train), f"step {step}")
        assert_models_match(fast, ref, DTYPE, f"step {step}")
        for optimizer_model in (scripted, ref):  # an SGD step on the shared parameters
            with torch.no_grad():
                for p in optimizer_model.parameters():
                    p -= 0.1 * p.grad
    assert_close(fast.features.conv0.weight, ref.features.conv0.weight, DTYPE, "conv0 trained")
    if train:
        assert fast.features.norm0.num_batches_tracked.item() == 3
    # The eager model is unchanged by scripting: still fused, still torchvision's.
    assert fast.fusion_report()["features.denseblock1"] == "fused with features.transition1"
    _assert_steps_match(_step(fast, x, train), _step(ref, x, train), "eager after scripting")


def test_scripted_dropout_matches_with_the_same_seed():
    fast, ref = twins(DenseNet, tvm.DenseNet, DTYPE, **dict(CONFIG, drop_rate=0.3))
    scripted = torch.jit.script(fast)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    torch.manual_seed(3)
    ours = _step(scripted, x, True)
    torch.manual_seed(3)
    _assert_steps_match(ours, _step(ref, x, True), "dropout")


def test_script_of_a_feature_extractor(models):
    fast, ref = (m.eval() for m in models)
    nodes = ["features.denseblock1", "features.transition1.conv", "features.norm5", "flatten"]
    ours = torch.jit.script(create_feature_extractor(fast, return_nodes=nodes))
    theirs = create_feature_extractor(ref, return_nodes=nodes)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    ours_out, theirs_out = ours(x), theirs(x)
    assert list(ours_out) == nodes
    for node in nodes:
        assert_close(ours_out[node], theirs_out[node], DTYPE, f"scripted feature {node}")


def test_script_layers_and_blocks_on_their_own(models):
    """A layer takes a tensor or a list of tensors, as torchvision's overloads do."""
    fast, ref = (m.eval() for m in models)
    layer, ref_layer = fast.features.denseblock2.denselayer2, ref.features.denseblock2.denselayer2
    scripted = torch.jit.script(layer)
    parts = [torch.randn(2, 8, 4, 4, dtype=DTYPE), torch.randn(2, 4, 4, 4, dtype=DTYPE)]
    assert_close(scripted(parts), ref_layer(parts), DTYPE, "layer on a list")
    assert_close(scripted(torch.cat(parts, 1)), ref_layer(torch.cat(parts, 1)), DTYPE,
                 "layer on a tensor")
    block = torch.jit.script(fast.features.denseblock2)
    x = torch.randn(2, 8, 4, 4, dtype=DTYPE)
    assert_close(block(x), ref.features.denseblock2(x), DTYPE, "scripted block")


def test_check_jit_scriptable_of_the_builder():
    """torchvision's test_models._check_jit_scriptable on the swapped builder: eager and
    scripted agree, and so does a saved and reloaded script (also with torchvision's model of
    the same weights). Every builder makes the same classes; densenet121 stands for them."""
    model = densenet_fast.densenet121(num_classes=10).eval()
    reference = tvm.densenet121(num_classes=10).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.script(model).eval()
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    imported = torch.jit.load(buffer)
    with torch.no_grad():
        eager, script_out, imported_out = model(x), scripted(x), imported(x)
        assert_close(eager, reference(x), torch.float32, "eager vs torchvision")
    assert_close(script_out, eager, torch.float32, "scripted vs eager")
    assert_close(imported_out, script_out, torch.float32, "reloaded vs scripted")


# -- 8. the builders as torchvision's ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_builder_signatures_are_torchvisions(arch):
    ours, theirs = getattr(densenet_fast, arch), getattr(tvm, arch)
    assert inspect.signature(ours).parameters == inspect.signature(theirs).parameters
    assert tvm.get_model_weights(ours) is tvm.get_model_weights(theirs)
    assert tvm.get_model_weights(ours) is tvm.get_model_weights(arch)


# Configurations torchvision's DenseNet builds, trains and evaluates, however unusual.
EDGE_CONFIGS = {
    # name: (changes to CONFIG, how the blocks run)
    "no-classes": (dict(num_classes=0), ("fused with features.transition1",
                                         "fused with features.norm5")),
    "no-blocks": (dict(block_config=()), ()),
    "first-block-empty": (dict(block_config=(0, 3)), ("modules: it has no layers to fuse",
                                                      "fused with features.norm5")),
    "last-block-empty": (dict(block_config=(2, 0)), ("fused with features.transition1",
                                                     "modules: it has no layers to fuse")),
    "drop-rate-1": (dict(drop_rate=1.0), ("fused with features.transition1",
                                          "fused with features.norm5")),
    "drop-rate-negative": (dict(drop_rate=-0.2), ("fused with features.transition1",
                                                  "fused with features.norm5")),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
def test_unusual_configurations_are_torchvisions(name, train):
    """No classes (an ``(N, 0)`` output), no blocks, a block of no layers (it returns its
    input: nothing to fuse, and no warning), a drop rate of 1 (zeros, no random draws, as
    F.dropout) or below 0 (no dropout, as torchvision's layer skips it): built and run as
    torchvision's, outputs, gradients, buffers and the random stream after the step."""
    changes, blocks = EDGE_CONFIGS[name]
    fast, ref = twins(DenseNet, tvm.DenseNet, DTYPE, **{**CONFIG, **changes})
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE)
    torch.manual_seed(11)
    ours = _step(fast, x, train)
    rng = torch.get_rng_state()
    torch.manual_seed(11)
    theirs = _step(ref, x, train)
    _assert_steps_match(ours, theirs, name)
    assert ours[3] == theirs[3], "warnings differ"
    assert torch.equal(rng, torch.get_rng_state()), "random draws differ"
    assert_models_match(fast, ref, DTYPE, name)
    report = fast.fusion_report()
    assert tuple(v for k, v in report.items() if k != "features.stem") == blocks, report


@pytest.fixture
def checkpoint(monkeypatch):
    """DenseNet121_Weights without a download: their state_dict is a torchvision model's."""
    source = tvm.densenet121()
    state_dict = copy.deepcopy(source.state_dict())
    monkeypatch.setattr(tvm.DenseNet121_Weights, "get_state_dict",
                        lambda self, *args, **kwargs: copy.deepcopy(state_dict))
    return source


def _build(builder, args, kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = builder(*args, **kwargs)
    return model, [(w.category, str(w.message)) for w in caught]


LEGACY_CALLS = [
    ((), dict(pretrained=True)),
    ((), dict(pretrained=False)),
    ((True,), {}),
    ((False, False), {}),
    ((None,), {}),
    ((), dict(weights="DEFAULT")),
    ((), dict(weights=tvm.DenseNet121_Weights.IMAGENET1K_V1, progress=False)),
]


@pytest.mark.parametrize("args, kwargs", LEGACY_CALLS, ids=lambda v: repr(v))
def test_legacy_interface_is_torchvisions(checkpoint, args, kwargs):
    """``pretrained`` and positional arguments: torchvision's warnings, and the same weights
    (the default ones for pretrained=True)."""
    ours, our_warnings = _build(densenet_fast.densenet121, args, kwargs)
    theirs, their_warnings = _build(tvm.densenet121, args, kwargs)
    assert our_warnings == their_warnings
    assert isinstance(ours, DenseNet) and ours.classifier.out_features == 1000
    pretrained = kwargs.get("pretrained", args[0] if args else kwargs.get("weights"))
    if pretrained:
        ours_sd, source = ours.state_dict(), checkpoint.state_dict()
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(ours_sd[name], tensor) and torch.equal(tensor, source[name]), name


def test_weights_errors_are_torchvisions(checkpoint):
    for kwargs in (dict(weights=tvm.DenseNet161_Weights.DEFAULT), dict(weights="NOPE"),
                   dict(pretrained=True, weights=tvm.DenseNet121_Weights.DEFAULT)):
        with pytest.raises(Exception) as theirs:
            tvm.densenet121(**kwargs)
        with pytest.raises(type(theirs.value)) as ours:
            densenet_fast.densenet121(**kwargs)
        assert str(ours.value) == str(theirs.value).replace("torchvision.models.densenet.", "")


def test_building_from_a_name_as_in_the_readme(checkpoint):
    name = "densenet121"
    weights = tvm.get_model_weights(name).DEFAULT
    model = getattr(densenet_fast, name)(weights=weights)
    assert isinstance(model, DenseNet)
    assert torch.equal(model.features.conv0.weight, checkpoint.features.conv0.weight)
    assert type(tvm.get_model(name)) is tvm.DenseNet  # torchvision's registry is its own


def test_import_and_builders_without_torchvision():
    """torchvision is optional: ``import densenet_fast`` and weights=None work without it."""
    code = "\n".join([
        "import sys, inspect, typing, warnings",
        f"sys.path.insert(0, {ROOT!r})",
        "sys.modules['torchvision'] = None  # an import of it fails",
        "import densenet_fast",
        "assert not any(m.startswith('torchvision') and sys.modules[m] for m in sys.modules)",
        "ann = inspect.signature(densenet_fast.densenet121).parameters['weights'].annotation",
        "assert ann == typing.Optional[typing.Any], ann",
        "model = densenet_fast.DenseNet(growth_rate=4, block_config=(2,), num_classes=3)",
        "import torch",
        "assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)",
        "with warnings.catch_warnings(record=True) as caught:",
        "    warnings.simplefilter('always')",
        "    assert densenet_fast.densenet121(pretrained=False).classifier.out_features == 1000",
        "assert len(caught) == 2 and 'weights=None' in str(caught[1].message)",
        "for kwargs in (dict(pretrained=True), dict(weights='DEFAULT')):",
        "    try:",
        "        densenet_fast.densenet121(**kwargs)",
        "    except ImportError as error:",
        "        assert 'need torchvision installed' in str(error)",
        "    else:",
        "        raise AssertionError(kwargs)",
        "print('ok')",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
