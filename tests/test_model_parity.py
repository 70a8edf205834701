"""Whole-model parity: densenet_fast against NaiveDenseNet and torchvision's DenseNet."""

import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_match, assert_models_match, train_steps, twins
from tolerances import assert_close
from torchvision.models import DenseNet as TorchvisionDenseNet

from densenet_fast import DenseNet, NaiveDenseNet

CONFIGS = {
    # name: (model kwargs, input shape, dtype)
    "odd-small": (dict(growth_rate=5, block_config=(3, 2), num_init_features=7, bn_size=3,
                       num_classes=4), (2, 3, 40, 40), torch.float64),
    "three-blocks-1ch": (dict(growth_rate=3, block_config=(2, 3, 1), num_init_features=9,
                              bn_size=2, num_classes=5, in_channels=1), (3, 1, 48, 36),
                         torch.float64),
    "densenet121": (dict(num_classes=10), (2, 3, 64, 64), torch.float64),
}


def _inputs(shape, dtype, num_classes):
    return torch.randn(shape, dtype=dtype), torch.randint(0, num_classes, (shape[0],))


REFERENCES = {"naive": NaiveDenseNet, "torchvision": TorchvisionDenseNet}


@pytest.fixture(params=[False, True], ids=["keep-bottleneck", "recompute-bottleneck"])
def fast_cls(request):
    """densenet_fast in both memory settings: the results must not depend on it."""
    return functools.partial(DenseNet, recompute_bottleneck=request.param)


# densenet121 against torchvision only: the naive model computes what torchvision's does,
# as the small configurations show, and float64 densenet121 is the suite's slowest case.
@pytest.mark.parametrize("name,reference", [
    (name, reference) for name in CONFIGS for reference in REFERENCES
    if name != "densenet121" or reference == "torchvision"])
def test_training_steps_match(name, reference, fast_cls):
    config, shape, dtype = CONFIGS[name]
    reference_cls = REFERENCES[reference]
    if reference_cls is TorchvisionDenseNet and config.get("in_channels", 3) != 3:
        config = {k: v for k, v in config.items() if k != "in_channels"}
        shape = (shape[0], 3, *shape[2:])
    fast, ref = twins(fast_cls, reference_cls, dtype, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    fast_out, fast_dx, fast_grads = train_steps(fast, x, y)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    for step in range(2):
        assert_close(fast_out[step], ref_out[step], dtype, f"logits, step {step + 1}")
        assert_close(fast_dx[step], ref_dx[step], dtype, f"input gradient, step {step + 1}")
        assert_grads_match(fast_grads[step], ref_grads[step], dtype, f"step {step + 1}")
    assert_models_match(fast, ref, dtype, "after two steps")


def test_float32_forward_and_running_statistics(fast_cls):
    """float32 densenet121: the forward and the running statistics of one step. Its
    gradients are ill-conditioned at this size (2x2 planes in the last block, batch 2: one
    ReLU mask flip moves a weight's gradient by several percent in every implementation,
    torchvision's included), so they are compared in float64 above."""
    config, shape, _ = CONFIGS["densenet121"]
    dtype = torch.float32
    fast, ref = twins(fast_cls, TorchvisionDenseNet, dtype, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    fast_out, _, _ = train_steps(fast, x, y, steps=1)
    ref_out, _, _ = train_steps(ref, x, y, steps=1)
    assert_close(fast_out[0], ref_out[0], dtype, "logits")
    assert_models_match(fast, ref, dtype, "running statistics after one step", params=False)


@pytest.mark.parametrize("name", ["odd-small", "densenet121"])
def test_eval_outputs_and_gradients_match(name, fast_cls):
    config, shape, dtype = CONFIGS[name]
    fast, ref = twins(fast_cls, NaiveDenseNet, dtype, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    train_steps(ref, x, y, steps=1)  # non-trivial running statistics, identical in both
    fast.load_state_dict(ref.state_dict())
    fast.eval()
    ref.eval()
    results = []
    for model in (fast, ref):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = model(xi)
        F.cross_entropy(out, y).backward()
        results.append((out, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], dtype, "eval logits")
    assert_close(results[0][1], results[1][1], dtype, "eval input gradient")
    assert_grads_match(results[0][2], results[1][2], dtype, "eval")
    assert_models_match(fast, ref, dtype, "eval must not touch running statistics")


def test_batch_of_one_in_eval_and_no_grad():
    config, _, dtype = CONFIGS["odd-small"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    fast.eval()
    ref.eval()
    x = torch.randn(1, 3, 40, 40, dtype=dtype)
    with torch.no_grad():
        assert_close(fast(x), ref(x), dtype, "batch 1 eval")
    with torch.inference_mode():
        assert_close(fast(x), ref(x), dtype, "batch 1 inference mode")


@pytest.mark.parametrize("layout", ["channels_last", "strided-view", "transposed-view"])
def test_input_layouts(layout, fast_cls):
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(fast_cls, NaiveDenseNet, dtype, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    if layout == "channels_last":
        x_fast = x.to(memory_format=torch.channels_last)
        fast = fast.to(memory_format=torch.channels_last)
    elif layout == "strided-view":
        big = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=dtype)
        x_fast, x = big[:, :, ::2, ::2], big[:, :, ::2, ::2].contiguous()
    else:
        x_fast = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_fast.is_contiguous()
    fast_out, fast_dx, fast_grads = train_steps(fast, x_fast, y)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    assert_close(fast_out[1], ref_out[1], dtype, f"{layout} logits")
    assert_close(fast_dx[1], ref_dx[1], dtype, f"{layout} input gradient")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, layout)
    assert_models_match(fast, ref, dtype, layout)


def test_dropout_matches_naive_under_the_same_seed(fast_cls):
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(fast_cls, NaiveDenseNet, dtype, drop_rate=0.25, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    results = []
    for model in (fast, ref):
        torch.manual_seed(7)
        results.append(train_steps(model, x, y))
    (fast_out, fast_dx, fast_grads), (ref_out, ref_dx, ref_grads) = results
    assert_close(fast_out[1], ref_out[1], dtype, "dropout logits")
    assert_close(fast_dx[1], ref_dx[1], dtype, "dropout input gradient")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, "dropout")
    assert_models_match(fast, ref, dtype, "dropout")
    fast.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(fast(x), ref(x), dtype, "dropout is off in eval")


def test_frozen_batchnorm_in_a_training_model(fast_cls):
    """A common fine-tuning recipe: model.train() with every BatchNorm put back in eval."""
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(fast_cls, NaiveDenseNet, dtype, **config)
    x, y = _inputs(shape, dtype, config["num_classes"])
    for model in (fast, ref):
        train_steps(model, x, y, steps=1)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    fast.features.denseblock1.denselayer2.norm1.train()  # one BN of a block in training mode
    ref.features.denseblock1.denselayer2.norm1.train()
    fast_out, fast_dx, fast_grads = train_steps(fast, x, y)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    assert_close(fast_out[1], ref_out[1], dtype, "frozen-BN logits")
    assert_close(fast_dx[1], ref_dx[1], dtype, "frozen-BN input gradient")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, "frozen BN")
    assert_models_match(fast, ref, dtype, "frozen BN")


# BNs of each kind: the stem's, a norm1 and a norm2 of a block, a transition's, the final one.
NORMS_OF_EACH_KIND = ["norm0", "denseblock1.denselayer1.norm1", "denseblock2.denselayer1.norm2",
                      "transition1.norm", "norm5"]


def _set_state(model, name, state):
    bn = model.features.get_submodule(name)
    bn.track_running_stats = False
    if state == "no-buffers":  # test-time adaptation's recipe (TENT): batch statistics always
        bn.running_mean = bn.running_var = None
    elif state == "eval":
        bn.eval()


@pytest.mark.parametrize("state", ["buffers-kept", "no-buffers", "eval"])
@pytest.mark.parametrize("name", NORMS_OF_EACH_KIND)
def test_track_running_stats_cleared_after_construction(name, state, fast_cls):
    """``bn.track_running_stats = False`` on a built model: in training the BN normalises
    with the batch and leaves its buffers alone (they were updated before the fix); with
    its buffers removed it uses the batch in eval too; in eval with them, the buffers."""
    config, shape, dtype = CONFIGS["three-blocks-1ch"]
    fast, ref = twins(fast_cls, NaiveDenseNet, dtype, **config)
    for model in (fast, ref):
        _set_state(model, name, state)
    assert all(how.startswith("fused") for how in fast.fusion_report().values())
    x, y = _inputs(shape, dtype, config["num_classes"])
    fast_out, fast_dx, fast_grads = train_steps(fast, x, y)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    assert_close(fast_out[1], ref_out[1], dtype, f"logits, {name} {state}")
    assert_close(fast_dx[1], ref_dx[1], dtype, f"input gradient, {name} {state}")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, f"{name} {state}")
    assert_models_match(fast, ref, dtype, f"{name} {state}")
    if state == "buffers-kept":
        bn = fast.features.get_submodule(name)
        assert int(bn.num_batches_tracked) == 0 and bool((bn.running_var == 1).all())


@pytest.mark.parametrize("state", ["one-buffer", "tracking-without-buffers", "no-counter"])
def test_running_statistics_states_the_fused_bns_do_not_model_fall_back(state):
    """Buffers set by hand into states that BatchNorm's own forward handles with rules of
    its own: the block falls back to its modules (and says why) instead of computing
    something else."""
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    for model in (fast, ref):
        bn = model.features.denseblock2.denselayer1.norm1
        if state == "one-buffer":
            bn.track_running_stats = False
            bn.running_mean = None
        elif state == "tracking-without-buffers":
            bn.running_mean = bn.running_var = None
        else:
            bn.num_batches_tracked = None
            bn.momentum = None  # without a counter, BatchNorm folds with factor 0
    reason = {"one-buffer": "has only one of running_mean and running_var",
              "tracking-without-buffers":
                  "has track_running_stats=True but no running_mean and running_var",
              "no-counter": "has track_running_stats=True but no num_batches_tracked"}[state]
    report = fast.fusion_report()
    assert report["features.denseblock1"].startswith("fused"), report
    assert report["features.denseblock2"] == f"modules: denselayer1.norm1 {reason}", report
    x, y = _inputs(shape, dtype, config["num_classes"])
    with pytest.warns(UserWarning, match=reason):
        fast_out, _, fast_grads = train_steps(fast, x, y)
    ref_out, _, ref_grads = train_steps(ref, x, y)
    assert_close(fast_out[1], ref_out[1], dtype, f"logits, {state}")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, state)
    assert_models_match(fast, ref, dtype, state)


# Where a BatchNorm sits decides what falls back: the stem, a block, or a block's tail.
AFFINE_PLACES = {
    "norm0": ("features.stem", "modules: norm0 {}"),
    "denseblock2.denselayer1.norm2": ("features.denseblock2", "modules: denselayer1.norm2 {}"),
    "transition1.norm": ("features.denseblock1",
                         "fused; features.transition1 runs as a module: norm {}"),
    "norm5": ("features.denseblock2",
              "fused; features.norm5 runs as a module: it {}, and is not a transition either"),
}


@pytest.mark.parametrize("missing", [("weight",), ("weight", "bias"), ("bias",)],
                         ids=["weight", "weight-and-bias", "bias"])
@pytest.mark.parametrize("place", list(AFFINE_PLACES))
def test_affine_batchnorm_without_its_parameters_falls_back(place, missing):
    """An ``affine=True`` BN whose weight or bias was set to None by hand: its forward
    leaves that term out, and the part of the model that holds it runs its modules and
    says why (the fused calls take both as tensors; they failed on the None before)."""
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    for model in (fast, ref):
        bn = model.features.get_submodule(place)
        for name in missing:
            setattr(bn, name, None)
    reason = (f"has affine=True but its {' and '.join(missing)} "
              f"{'are' if len(missing) > 1 else 'is'} None")
    step, status = AFFINE_PLACES[place]
    assert fast.fusion_report()[step] == status.format(reason)
    x, y = _inputs(shape, dtype, config["num_classes"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_out, fast_dx, fast_grads = train_steps(fast, x, y)
    # A block's fallback costs its memory saving and is warned about; the stem's and a
    # tail's are only reported.
    warned = any(reason in str(w.message) for w in caught)
    assert warned == (step == "features.denseblock2" and place.startswith("denseblock")), caught
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    assert_close(fast_out[1], ref_out[1], dtype, f"logits, {place} without {missing}")
    assert_close(fast_dx[1], ref_dx[1], dtype, f"input gradient, {place} without {missing}")
    assert_grads_match(fast_grads[1], ref_grads[1], dtype, f"{place} without {missing}")
    assert_models_match(fast, ref, dtype, f"{place} without {missing}")


@pytest.mark.filterwarnings("ignore:densenet_fast. a dense block runs through its modules")
@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("place", ["norm0", "denseblock2.denselayer1.norm1", "norm5"])
def test_batchnorm_eps_torch_refuses_is_refused_as_torch_does(place, train, eps):
    """An eps this torch's ``F.batch_norm`` refuses (torch 2.14: eps <= 0 with batch
    statistics, eps < 0 with running ones; torch 2.11 computes with it) raises the same error
    after the same modules have run (their running statistics counted) as the reference's
    forward; an eps it accepts computes what the reference computes."""
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    for model in (fast, ref):
        model.train(train)
        model.features.get_submodule(place).eps = eps
    x = torch.randn(shape, dtype=dtype)
    try:
        expected = ref(x)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            fast(x)
    else:
        assert_close(fast(x), expected, dtype, f"output, {place} eps={eps}")
    assert_models_match(fast, ref, dtype, f"{place} eps={eps}")


def test_features_and_standalone_modules_keep_torchvision_semantics():
    config, shape, dtype = CONFIGS["three-blocks-1ch"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    x = torch.randn(shape, dtype=dtype)
    assert_close(fast.features(x), ref.features(x), dtype, "features(x): norm5 output")
    stem = ref.features[:4](x)
    fast_stem = fast.features[:4](x).requires_grad_()
    block = fast.features.denseblock1(fast_stem)
    assert block.shape[1] == 9 + 2 * 3
    assert_close(block, ref.features.denseblock1(stem), dtype, "standalone block")
    partial = torch.nn.Sequential(*list(fast.features)[:6])  # stem, block 1, transition 1
    assert_close(partial(x), torch.nn.Sequential(*list(ref.features)[:6])(x), dtype,
                 "sliced features")
    assert_models_match(fast, ref, dtype, "both ran the same forwards")


@pytest.mark.parametrize("state", ["conv-bias-attribute", "running-stats-attributes"])
def test_members_set_outside_the_modules_tables_are_read_as_their_forward_reads_them(state):
    """A parameter or buffer deleted and set again as a plain tensor attribute leaves the
    module's tables: its forward reads the attribute, and so must the fusion checks and the
    fused call (which read the tables first, for speed). A bias on a conv keeps its block on
    the modules; plain running statistics of an eval-mode BN are the ones it normalises
    with."""
    config, shape, dtype = CONFIGS["odd-small"]
    fast, ref = twins(DenseNet, NaiveDenseNet, dtype, **config)
    for model in (fast, ref):
        model.eval()
        layer = model.features.denseblock2.denselayer1
        if state == "conv-bias-attribute":
            del layer.conv1.bias
            layer.conv1.bias = torch.linspace(-1, 1, layer.conv1.out_channels, dtype=dtype)
        else:
            mean, var = layer.norm1.running_mean, layer.norm1.running_var
            del layer.norm1.running_mean, layer.norm1.running_var
            layer.norm1.running_mean = torch.linspace(-0.5, 0.5, len(mean), dtype=dtype)
            layer.norm1.running_var = torch.linspace(0.5, 2.0, len(var), dtype=dtype)
    report = fast.fusion_report()
    assert report["features.denseblock1"].startswith("fused"), report
    if state == "conv-bias-attribute":
        assert report["features.denseblock2"].startswith(
            "modules: denselayer1.conv1 is Conv2d"), report
    else:
        assert report["features.denseblock2"].startswith("fused"), report
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    outs, grads = [], []
    for model in (fast, ref):
        out = model(x)
        outs.append(out)
        names, params = zip(*model.named_parameters(), strict=True)
        grads.append(dict(zip(("input", *names), torch.autograd.grad(
            out.square().sum(), [x, *params]), strict=True)))
    assert_close(outs[0], outs[1], dtype, state)
    assert_grads_match(grads[0], grads[1], dtype, state)
