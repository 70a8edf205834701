"""torchvision's behaviour at the edges of the API, side by side with torchvision's DenseNet:
an empty batch, the exception classes of bad input, ``torch.jit.script`` and the builders'
signatures and legacy ``pretrained`` interface. Values are compared in float64."""

import io
import os
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
    (F.cross_entropy(out, torch.arange(len(out)) % out.shape[1]) if len(out)
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
