"""Randomised parity: seeded random models and settings against the unfused computation.

Each case draws a small DenseNet (torchvision's, or timm's converted) and what users change on
a built model: a BN's eps, momentum, ``track_running_stats`` or mode, a layer's mode or dropout
rate, frozen parameters, a hook, an activation swapped, the input's layout, whether it needs a
gradient, and how the step runs (plain, ``no_grad``, two forwards before one backward,
``retain_graph``). Two SGD steps in float64 must give torchvision's (timm's) outputs, input
gradients, parameters and buffers; random stems (conv0 and pool0 replaced) likewise, or the
same class of error where torchvision refuses the input. A randomised comparison of this kind
found that a BN whose ``track_running_stats`` was cleared after construction had its buffers
updated, and that the input check sized ceil-mode pools in floor mode (docs/notes.md).

The references run without checkpointing: torchvision's ``memory_efficient=True`` and timm's
``set_grad_checkpointing`` run ``norm1`` twice per step and so count each batch twice in its
running statistics (docs/timm.md), which densenet_fast, like the unfused model, does not.
"""

import copy
import random

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import assert_models_match
from tolerances import assert_close

import densenet_fast

DTYPE = torch.float64

# A hook or a swapped activation keeps its block on the modules, with a warning that says so.
pytestmark = pytest.mark.filterwarnings("ignore:densenet_fast. a dense block runs through")


def _random_config(rng: random.Random) -> dict:
    return dict(growth_rate=rng.choice([1, 2, 3, 5]),
                block_config=tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 4))),
                num_init_features=rng.choice([1, 3, 4, 8]), bn_size=rng.choice([1, 2, 4]),
                drop_rate=rng.choice([0.0, 0.0, 0.3]), num_classes=rng.choice([1, 3, 10]))


def _change_norms(models, rng: random.Random) -> None:
    """The same random changes to every BatchNorm of each model, with random statistics."""
    names = [n for n, m in models[0].named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in names:
        bns = [m.get_submodule(name) for m in models]
        draw, first = rng.random(), bns[0]
        mean, var = torch.randn_like(first.running_mean) * 0.3, torch.rand_like(first.running_var)
        weight, bias = torch.randn_like(first.weight) * 0.5 + 1, torch.randn_like(first.bias) * 0.5
        for bn in bns:
            with torch.no_grad():
                bn.running_mean.copy_(mean), bn.running_var.copy_(var + 0.5)
                bn.weight.copy_(weight), bn.bias.copy_(bias)
            if draw < 0.1:
                bn.eps = 0.5
            elif draw < 0.2:
                bn.momentum = None  # cumulative average
            elif draw < 0.25:
                bn.momentum = 0.7
            elif draw < 0.3:
                bn.track_running_stats = False
            elif draw < 0.35:
                bn.eval()
            elif draw < 0.38:
                bn.weight.requires_grad_(False), bn.bias.requires_grad_(False)


def _change_layers(models, rng: random.Random) -> None:
    layers = [n for n, m in models[0].named_modules() if type(m).__name__ == "_DenseLayer"]
    for name in layers:
        draw, rate = rng.random(), rng.choice([0.0, 0.5])
        for model in models:
            layer = model.get_submodule(name)
            if draw < 0.1:
                layer.drop_rate = rate
            elif draw < 0.15:
                layer.eval()


def _change_modules(models, rng: random.Random) -> None:
    """Frozen parameters, a forward hook that scales, an activation swapped, a pre-hook: the
    blocks they touch run through their modules, the others stay fused."""
    frozen = [n for n, _ in models[0].named_parameters() if rng.random() < 0.05]
    names = [n for n, _ in models[0].named_modules() if n]
    hooked = rng.choice(names) if rng.random() < 0.2 else None
    scale = rng.choice([1.0, 1.5])
    relus = [n for n in names if n.rsplit(".", 1)[-1] in ("relu1", "relu2", "relu")]
    swapped = rng.choice(relus) if relus and rng.random() < 0.1 else None
    pre_hooked = rng.choice(names) if rng.random() < 0.1 else None
    for model in models:
        params = dict(model.named_parameters())
        for name in frozen:
            params[name].requires_grad_(False)
        if hooked is not None:
            model.get_submodule(hooked).register_forward_hook(
                lambda module, args, out: out * scale if torch.is_tensor(out) else out)
        if swapped is not None:
            parent, _, attr = swapped.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.SiLU())
        if pre_hooked is not None:
            model.get_submodule(pre_hooked).register_forward_pre_hook(lambda module, args: None)


def _input(rng: random.Random, training: bool, min_size: int) -> torch.Tensor:
    n = rng.choice([2, 3]) if training else rng.choice([1, 2, 3])
    h, w = rng.randint(min_size, min_size + 13), rng.randint(min_size, min_size + 13)
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    x = torch.randn(n, 3, h, w + 3, dtype=DTYPE)[..., :w]  # strided: a slice of a wider image
    if layout == "contiguous":
        x = x.contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _steps(model, x, how: str, input_grad: bool, steps: int = 2) -> tuple[list, dict]:
    """Two SGD steps (momentum, weight decay) run ``how``; every output, input gradient, and
    the state_dict after."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3) if params else None
    results = []
    for step in range(steps):
        torch.manual_seed(1000 + step)  # the same dropout draws in both models
        inp = x.detach().clone(memory_format=torch.preserve_format)
        inp.requires_grad_(input_grad)
        if how == "no_grad":
            with torch.no_grad():
                results.append(model(inp))
            continue
        out = model(inp)
        weights = torch.linspace(-1, 1, out.numel(), dtype=DTYPE).view_as(out)
        loss = (out * weights).sum()
        if how == "two forwards":
            loss = loss + 0.3 * (model(inp.flip(0) * 0.5) * weights).sum()
        elif how == "retain_graph" and loss.requires_grad:
            loss.backward(retain_graph=True)
        if loss.requires_grad:
            loss.backward()
        results += [out.detach(), inp.grad]
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return results, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(fast_run, ref_run, what: str) -> None:
    (fast_results, fast_state), (ref_results, ref_state) = fast_run, ref_run
    for i, (a, b) in enumerate(zip(fast_results, ref_results, strict=True)):
        assert (a is None) == (b is None), f"{what}: result {i}"
        if a is not None:
            assert_close(a, b, DTYPE, f"{what}: result {i}")
    assert fast_state.keys() == ref_state.keys(), what
    for key, value in ref_state.items():
        if value.dtype == torch.long:
            assert torch.equal(fast_state[key], value), f"{what}: {key}"
        else:
            assert_close(fast_state[key], value, DTYPE, f"{what}: {key}")


@pytest.mark.parametrize("seed", range(24))
def test_random_torchvision_models_and_settings(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = _random_config(rng)
    ref = torchvision.models.DenseNet(**config, memory_efficient=False).to(DTYPE)
    fast = densenet_fast.DenseNet(**config, memory_efficient=rng.random() < 0.3,
                                  recompute_bottleneck=rng.random() < 0.3).to(DTYPE)
    fast.load_state_dict(ref.state_dict())
    training = rng.random() < 0.7
    models = (ref.train(training), fast.train(training))
    _change_norms(models, rng)
    _change_layers(models, rng)
    _change_modules(models, rng)
    blocks = len(config["block_config"])
    x = _input(rng, training, min_size=2 ** (blocks + 1))
    how = rng.choice(["plain", "plain", "no_grad", "two forwards", "retain_graph"])
    input_grad = how != "no_grad" and rng.random() < 0.5
    what = f"seed {seed}: {config}, {'train' if training else 'eval'}, {how}, x {tuple(x.shape)}"
    _assert_same(_steps(fast, x, how, input_grad), _steps(ref, x, how, input_grad), what)
    assert_models_match(fast, ref, DTYPE, what)


@pytest.mark.parametrize("seed", range(12))
def test_random_timm_models_and_settings(seed):
    timm = pytest.importorskip("timm")
    from timm.models.densenet import DenseNet as TimmDenseNet

    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks = rng.randint(1, 4)
    config = dict(growth_rate=rng.choice([8, 12, 16]),
                  block_config=tuple(rng.randint(1, 3) for _ in range(blocks)),
                  num_classes=rng.choice([1, 5]), bn_size=rng.choice([1, 2]),
                  stem_type=rng.choice(["", "deep", "deep_tiered"]),
                  act_layer=rng.choice(["relu", "relu", "silu"]),
                  drop_rate=rng.choice([0.0, 0.2]), proj_drop_rate=rng.choice([0.0, 0.0, 0.3]),
                  global_pool=rng.choice(["avg", "max", "avgmax"]),
                  aa_layer=rng.choice([None, None, timm.layers.BlurPool2d]))
    ref = TimmDenseNet(**config).to(DTYPE)
    fast = densenet_fast.convert(copy.deepcopy(ref), recompute_bottleneck=rng.random() < 0.3)
    training = rng.random() < 0.7
    ref.train(training), fast.train(training)
    _change_norms((ref, fast), rng)  # timm's norm-act modules are BatchNorm2d subclasses
    if rng.random() < 0.3:
        fast.set_grad_checkpointing(True)
        if config["act_layer"] != "relu":  # then the blocks run timm's own layers
            ref.set_grad_checkpointing(True)
    min_size = 2 ** (blocks + 1) * (2 if config["aa_layer"] is not None else 1)
    x = _input(rng, training, min_size)
    what = f"seed {seed}: {config}, {'train' if training else 'eval'}, x {tuple(x.shape)}"
    _assert_same(_steps(fast, x, "plain", True), _steps(ref, x, "plain", True), what)


def _random_stem(rng: random.Random, features: int):
    """A conv0 and pool0 in place of torchvision's: the CIFAR recipe (3x3 conv, no pool) and
    any stride, padding, dilation, bias and max-pool setting (ceil mode included)."""
    kernel, stride = rng.choice([1, 3, 5, 7]), rng.choice([1, 1, 2, 3])
    conv = nn.Conv2d(3, features, kernel, stride, rng.randint(0, kernel // 2 + 1),
                     dilation=rng.choice([1, 1, 2]), bias=rng.random() < 0.2)
    draw, pool_kernel = rng.random(), rng.choice([2, 3, 4])
    if draw < 0.5:
        pool = nn.MaxPool2d(pool_kernel, rng.choice([1, 2, pool_kernel]),
                            rng.randint(0, pool_kernel // 2), dilation=rng.choice([1, 1, 2]),
                            ceil_mode=rng.random() < 0.4)
    elif draw < 0.75:
        pool = nn.Identity()
    else:
        pool = nn.AvgPool2d(2)
    return conv.to(DTYPE), pool


@pytest.mark.parametrize("seed", range(24))
def test_random_stems(seed):
    """Where torchvision's model runs, the same outputs, gradients and statistics; where it
    refuses the input, an error of its class."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    features = rng.choice([4, 7, 16])
    config = dict(growth_rate=rng.choice([2, 5]), num_init_features=features, bn_size=2,
                  block_config=tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 3))),
                  num_classes=3)
    ref = torchvision.models.DenseNet(**config).to(DTYPE)
    ref.features.conv0, ref.features.pool0 = _random_stem(rng, features)
    fast = densenet_fast.DenseNet(**config).to(DTYPE)
    fast.features.conv0 = copy.deepcopy(ref.features.conv0)
    fast.features.pool0 = copy.deepcopy(ref.features.pool0)
    fast.load_state_dict(ref.state_dict())
    training = rng.random() < 0.7
    ref.train(training), fast.train(training)
    x = torch.randn(2, 3, rng.randint(12, 32), rng.randint(12, 32), dtype=DTYPE)
    what = f"seed {seed}: {ref.features.conv0}, {ref.features.pool0}, x {tuple(x.shape)}"
    try:
        ref_run = _steps(ref, x, "plain", True)
    except (RuntimeError, ValueError) as error:  # ValueError: one value per channel
        with pytest.raises(type(error)):
            _steps(fast, x, "plain", True)
        return
    _assert_same(_steps(fast, x, "plain", True), ref_run, what)
