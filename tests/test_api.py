"""The drop-in API: constructors, state_dict names, weights, convert(), backends."""

import pytest
import torch
import torchvision.models as tvm
from helpers import assert_models_match
from tolerances import assert_close

import densenet_fast
from densenet_fast import DenseNet, NaiveDenseNet


def test_seed_article_usage():
    model = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_classes=10)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    positional = DenseNet(12, (2, 2), 16, 4, 0.0, 7, True, 1)
    assert positional(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_named_models_have_torchvision_state_dicts(arch):
    ours = getattr(densenet_fast, arch)(num_classes=11)
    theirs = getattr(tvm, arch)(num_classes=11)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    ours.load_state_dict(theirs_sd, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_in_channels_and_kwargs_reach_the_model():
    model = densenet_fast.densenet121(num_classes=3, in_channels=1, drop_rate=0.1, bn_size=2)
    assert model.features.conv0.in_channels == 1
    assert model.classifier.out_features == 3
    assert model.features.denseblock1.denselayer1.conv1.out_channels == 64
    assert model.features.denseblock1.denselayer1.drop_rate == 0.1


class _FakeWeights:
    """Stands in for a torchvision WeightsEnum value (no download here)."""

    def __init__(self, state_dict, categories):
        self._state_dict, self.meta = state_dict, {"categories": categories}

    def get_state_dict(self, progress, check_hash):
        return self._state_dict


def _legacy(state_dict):
    """The key names of torchvision's original checkpoints, which had no num_batches_tracked."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"),
                         ("conv2", "conv.2")):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        renamed[key] = value
    return renamed


def test_weights_argument_loads_legacy_checkpoints():
    source = NaiveDenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_classes=5)
    legacy = _legacy(source.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    model = densenet_fast.densenet121(weights=_FakeWeights(legacy, list("abcde")))
    assert model.classifier.out_features == 5
    assert_models_match(model, source, torch.float32)
    with pytest.raises(ValueError, match="num_classes=3 does not match the 5 categories"):
        densenet_fast.densenet121(weights=_FakeWeights(legacy, list("abcde")), num_classes=3)
    fresh = densenet_fast.densenet121(num_classes=5)
    densenet_fast.load_torchvision_state_dict(fresh, legacy)
    assert_models_match(fresh, source, torch.float32)


def test_convert_a_torchvision_model():
    source = tvm.DenseNet(growth_rate=6, block_config=(2, 3), num_init_features=10, bn_size=2,
                          drop_rate=0.0, num_classes=4, memory_efficient=True).double()
    source.features.conv0 = torch.nn.Conv2d(1, 10, 3, 1, 1, bias=False).double()  # 1-ch stem
    source.features.denseblock2.denselayer1.norm1.momentum = None
    source.features.conv0.weight.requires_grad_(False)
    x = torch.randn(2, 1, 24, 24, dtype=torch.float64)
    source(x)  # non-trivial running statistics
    source.eval()
    fast = densenet_fast.convert(source)
    assert isinstance(fast, DenseNet) and not fast.training
    assert fast.features.denseblock2.denselayer1.norm1.momentum is None
    assert not fast.features.conv0.weight.requires_grad
    assert next(fast.parameters()).dtype == torch.float64
    assert_models_match(fast, source, torch.float64)
    with torch.no_grad():
        assert_close(fast(x), source(x), torch.float64, "converted model output")
    with pytest.raises(TypeError, match="expects a torchvision or timm DenseNet"):
        densenet_fast.convert(torch.nn.Linear(2, 2))


def test_fusion_report_of_any_model_holding_converted_features():
    """``densenet_fast.fusion_report(model)``: the model's own report for a DenseNet, the
    names in the outer model for one wrapped in another; an unconverted model is refused."""
    model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                   num_classes=3)
    assert densenet_fast.fusion_report(model) == model.fusion_report()
    wrapper = torch.nn.Sequential(model)
    assert densenet_fast.fusion_report(wrapper) == {
        f"0.{key}": value for key, value in model.fusion_report().items()}
    with pytest.raises(TypeError, match="holds no densenet_fast features"):
        densenet_fast.fusion_report(torch.nn.Linear(2, 2))
