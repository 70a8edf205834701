"""Bad input is refused with a message naming the problem, before anything is computed.

test_torchvision_api.py checks that each error is an instance of the class torchvision's
DenseNet raises for the same input (``CASES`` builds either library's model).
"""

import pytest
import torch

import densenet_fast
from densenet_fast import DenseNet, densenet121
from densenet_fast.validation import InputError, InputTypeError

SMALL = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)


def _small(**kwargs):
    return DenseNet(**SMALL, **kwargs)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _small_of(lib):
    return lib.DenseNet(**SMALL)


def _densenet121_of(lib):
    return lib.densenet121(num_classes=2)


# (name, model of a library (densenet_fast or torchvision.models), input, error, message)
CASES = [
    ("not a tensor", _small_of, lambda: [[1.0]], TypeError, "expects a torch.Tensor"),
    ("3-D input", _small_of, lambda: torch.randn(3, 32, 32), InputError,
     r"4-D input \[N, C, H, W\], got shape \(3, 32, 32\)"),
    ("5-D input", _small_of, lambda: torch.randn(1, 2, 3, 32, 32), InputError,
     r"4-D input \[N, C, H, W\], got shape \(1, 2, 3, 32, 32\)"),
    ("integer dtype", _small_of, lambda: torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
     InputTypeError, "floating-point input, got dtype torch.uint8"),
    ("wrong channels", _small_of, lambda: torch.randn(2, 1, 32, 32), InputError,
     "expects 3 input channels, got 1"),
    ("other device", _small_of, lambda: torch.randn(2, 3, 32, 32, device="meta"),
     RuntimeError, "input is on meta but the model's parameters are on cpu"),
    ("dtype mismatch", _small_of, lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64),
     InputTypeError,
     "input dtype torch.float64 differs from the parameters' dtype torch.float32"),
    ("too small for transitions", _densenet121_of, lambda: torch.randn(2, 3, 16, 16),
     InputError,
     r"input spatial size 16x16 is too small.*transition3 receives 1x1 but its 2x2 "
     r"average pool needs at least 2x2"),
    ("1x1 image", _small_of, lambda: torch.randn(2, 3, 1, 1), InputError,
     r"input spatial size 1x1 is too small.*features.transition1 receives 1x1"),
    ("empty image", _small_of, lambda: torch.randn(2, 3, 0, 32), InputError,
     r"input spatial size 0x32 is too small.*features.conv0 receives 0x32"),
    ("empty batch too small", _densenet121_of, lambda: torch.randn(0, 3, 16, 16), InputError,
     r"input spatial size 16x16 is too small"),
    ("one value per channel", _densenet121_of, lambda: torch.randn(1, 3, 32, 32), ValueError,
     r"more than 1 value per channel when training, got input size \[1, 512, 1, 1\] at "
     r"features.denseblock4.denselayer1.norm1"),
]


@pytest.mark.parametrize("name, make_model, make_input, error, match", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_state_changes(name, make_model, make_input, error,
                                                        match):
    model = make_model(densenet_fast)
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        model(make_input())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed on error"


def _with_stem_pool(lib, pool, conv0=None):
    model = lib.DenseNet(**{**SMALL, "block_config": (2, 2, 2)})
    model.features.pool0 = pool
    if conv0 is not None:
        model.features.conv0 = conv0
    return model


def test_ceil_mode_pools_are_sized_as_torch_sizes_them():
    """A dilated ceil-mode stem pool leaves 6x4 where floor mode would leave 5x3, too small
    for the second transition: the input check must size it as the module will (it refused
    this input, which torchvision's model runs)."""
    import torchvision

    pool = torch.nn.MaxPool2d(3, stride=3, dilation=2, ceil_mode=True)
    conv0 = torch.nn.Conv2d(3, 8, 5, padding=3, dilation=2, bias=False)
    x = torch.randn(3, 3, 20, 14)
    fast = _with_stem_pool(densenet_fast, pool, conv0)
    ref = _with_stem_pool(torchvision.models, pool, conv0)
    ref.load_state_dict(fast.state_dict())
    assert fast.fusion_report()["features.stem"] == "fused"
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-4, atol=1e-5)


def test_a_stem_pool_torch_refuses_raises_torchs_error():
    """Padding over half the kernel, which a dilation makes look acceptable to
    max_pool2d's meta function: the stem is not fused, and the pool raises torch's error,
    as in torchvision's model, before any statistic changes."""
    import torchvision

    pool = torch.nn.MaxPool2d(3, stride=2, padding=2, dilation=2)
    fast, ref = _with_stem_pool(densenet_fast, pool), _with_stem_pool(torchvision.models, pool)
    assert "pool0 has padding 2 over half its kernel size 3" in fast.fusion_report()[
        "features.stem"]
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    before = _snapshot(fast)
    with pytest.raises(type(expected.value), match="pad should be"):
        fast(x)
    after = fast.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed on error"


def test_one_value_per_channel_is_fine_in_eval():
    model = densenet121(num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_standalone_block_checks_its_channels():
    block = _small().features.denseblock1
    before = _snapshot(block)
    with pytest.raises(InputError, match="expects 8 input channels, got 5"):
        block(torch.randn(2, 5, 8, 8))
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed on error"


def test_running_stats_changed_between_eval_forward_and_backward():
    model = _small().eval()
    out = model(torch.randn(2, 3, 32, 32, requires_grad=True))
    model.train()
    model(torch.randn(2, 3, 32, 32))  # updates running statistics in place
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


@pytest.mark.parametrize("norm", ["norm0", "denseblock1.denselayer2.norm1", "transition1.norm",
                                  "norm5"])
def test_one_running_statistic_changed_before_backward_is_refused_as_torchvision_does(norm):
    """Whichever eval-mode BN's running variance changes in place between forward and
    backward, the backward raises, as torchvision's does (autograd's version check). The
    stem's gave a gradient computed with the changed statistics instead, silently."""
    import torchvision

    for lib in (torchvision.models, densenet_fast):
        model = _small_of(lib).double().eval()
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True))
        with torch.no_grad():
            model.features.get_submodule(norm).running_var.mul_(2)
        with pytest.raises(RuntimeError, match="modified"):
            out.sum().backward()


@pytest.mark.parametrize("retained", [False, True], ids=["first-backward", "second-backward"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("name", [
    "features.norm0.weight", "features.denseblock1.denselayer2.conv1.weight",
    "features.denseblock1.denselayer1.norm2.weight",
    "features.denseblock2.denselayer1.conv2.weight", "features.transition1.conv.weight",
    "features.norm5.weight", "features.denseblock1.denselayer2.norm1.bias"])
def test_a_parameter_changed_before_backward_is_refused_as_torchvision_does(name, autocast,
                                                                           retained):
    """A parameter changed in place between forward and backward (an optimizer step before
    the backward, as in a GAN's alternating updates) makes backward raise where it does in
    torchvision's model, autograd's error; under autocast a conv weight's bf16 copy is what
    both saved, and both compute on. The block's tensors are saved through hooks, which
    autograd checks no version of: its parameters were read changed, silently. A BN's bias
    is refused where torchvision's backward, which keeps the ReLU's output, needs no bias:
    the fused backward recomputes BN-ReLU from it. ``retained``: changed between a first
    backward that kept the graph and a second one, which the block checks again (its own
    references to autocast's casts are dropped after the first, the leaves kept)."""
    import torchvision

    raised = {}
    for lib in (torchvision.models, densenet_fast):
        torch.manual_seed(0)
        model = _small_of(lib)
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = model(x).float().sum()
        if retained:
            out.backward(retain_graph=True)
        with torch.no_grad():
            model.get_parameter(name).mul_(2)
        try:
            out.backward()
            raised[lib] = False
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            raised[lib] = True
    expected = raised[torchvision.models] or name.endswith(".bias")
    assert raised[densenet_fast] == expected, raised


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="growth_rate must be a positive integer"):
        DenseNet(growth_rate=0)
    with pytest.raises(ValueError, match="block_config must be a sequence of non-negative"):
        DenseNet(block_config=(6, -1))
    with pytest.raises(ValueError, match="num_classes must be a non-negative integer"):
        DenseNet(num_classes=-1)
    with pytest.raises(ValueError, match="drop_rate must be at most 1"):
        DenseNet(drop_rate=1.5)
