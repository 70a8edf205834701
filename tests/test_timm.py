"""timm's DenseNets: convert(), the registered fused models, and timm's training code path,
each against timm's own model with the same weights, in float64."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    FusedOpCounter,
    assert_grads_match,
    assert_models_match,
    saved_storages,
    train_steps,
)
from timm.layers import BlurPool2d
from tolerances import assert_close

import densenet_fast
import densenet_fast.timm as fused_timm  # registers the fused models
from densenet_fast import validation

DTYPE = torch.float64
TINY = dict(growth_rate=4, block_config=(2, 3, 2), num_classes=5)
# One small model of each kind timm registers: its arguments, and how many of the stem and
# blocks run fused (the deep stem runs as modules).
KINDS = {
    "densenet121": (dict(TINY), "fused"),
    "densenet161": (dict(TINY, growth_rate=6), "fused"),
    "densenet264d": (dict(TINY, stem_type="deep"), "modules"),
    "densenetblur121d": (dict(TINY, stem_type="deep", aa_layer=BlurPool2d), "modules"),
}
REPORT_OF_THREE_BLOCKS = {
    "features.denseblock1": "fused with features.transition1",
    "features.denseblock2": "fused with features.transition2",
    "features.denseblock3": "fused with features.norm5",
}


def _timm_model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).to(DTYPE)


def _assert_same_steps(fast, ref, x, labels, what):
    """Two SGD steps with momentum, dropout masks drawn alike: each step's logits, input
    gradient and every parameter gradient agree."""
    (outputs, input_grads, grads), (ref_outputs, ref_input_grads, ref_grads) = (
        train_steps(model, x, labels, lr=0.05, momentum=0.9, seed=1) for model in (fast, ref))
    for step in range(len(ref_outputs)):
        assert_close(outputs[step], ref_outputs[step], DTYPE, f"{what} step {step} logits")
        assert_close(input_grads[step], ref_input_grads[step], DTYPE,
                     f"{what} step {step} input gradient")
        assert_grads_match(grads[step], ref_grads[step], DTYPE, f"{what} step {step}")


def _assert_same_training(fast, ref, x, labels, what):
    _assert_same_steps(fast, ref, x, labels, what)
    _assert_same_state(fast, ref, what)


def _assert_same_state(fast, ref, what):
    """The same state_dict keys in the same order, and every parameter and buffer equal
    (``num_batches_tracked`` exactly)."""
    assert list(fast.state_dict()) == list(ref.state_dict()), what
    assert_models_match(fast, ref, DTYPE, what)


def _batch(n=3, size=32, classes=5):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, size, size, generator=generator, dtype=DTYPE),
            torch.randint(0, classes, (n,), generator=generator))


@pytest.mark.parametrize("name", KINDS)
def test_convert_trains_as_timm(name):
    """Logits, input gradient, every parameter gradient and every running statistic after
    two SGD steps (momentum, dropout in the layers and the head) equal timm's model's with
    the same weights; the blocks fused with what follows them, the stem as expected."""
    kwargs, stem = KINDS[name]
    ref = _timm_model(name, drop_rate=0.2, proj_drop_rate=0.1, **kwargs)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    assert type(fast) is type(ref)
    report = fast.features.fusion_report()
    assert report.pop("features.stem").startswith(stem), report
    assert report == REPORT_OF_THREE_BLOCKS
    assert densenet_fast.fusion_report(fast) == fast.features.fusion_report()
    _assert_same_training(fast, ref, *_batch(), name)


def test_convert_shares_the_source_and_leaves_it_as_it_was():
    source = _timm_model("densenet121", **TINY)
    fast = densenet_fast.convert(source)
    assert dict(fast.named_parameters()).keys() == dict(source.named_parameters()).keys()
    assert all(p is q for p, q in zip(fast.parameters(), source.parameters(), strict=True))
    assert fast.pretrained_cfg is source.pretrained_cfg
    assert type(source.features) is torch.nn.Sequential  # the source still runs timm's forward
    assert type(fast.features.denseblock1.denselayer1) is type(source.features.denseblock1
                                                               .denselayer1)
    fast.reset_classifier(7)
    assert fast.classifier.out_features == 7 and source.classifier.out_features == 5


def test_timm_api_on_a_converted_model():
    """forward_features, forward_head (pre_logits), forward_intermediates (stop_early, which
    slices features), prune_intermediate_layers and reset_classifier behave as on timm's
    model."""
    ref = _timm_model("densenet121", growth_rate=4, block_config=(2, 1, 2, 1), num_classes=5)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    x, _ = _batch(size=64)
    ref.eval(), fast.eval()
    assert_close(fast.forward_features(x), ref.forward_features(x), DTYPE, "forward_features")
    features = ref.forward_features(x)
    assert_close(fast.forward_head(features, pre_logits=True),
                 ref.forward_head(features, pre_logits=True), DTYPE, "pre_logits")
    for kwargs in ({}, dict(indices=2, stop_early=True), dict(indices=[0, 3])):
        final, taken = fast.forward_intermediates(x, **kwargs)
        ref_final, ref_taken = ref.forward_intermediates(x, **kwargs)
        assert_close(final, ref_final, DTYPE, f"forward_intermediates {kwargs}")
        assert len(taken) == len(ref_taken)
        for a, b in zip(taken, ref_taken, strict=True):
            assert_close(a, b, DTYPE, f"intermediate {kwargs}")
    assert fast.prune_intermediate_layers(indices=2) == ref.prune_intermediate_layers(indices=2)
    assert list(fast.features._modules) == list(ref.features._modules)
    assert_close(fast(x), ref(x), DTYPE, "pruned model")


def test_features_only_models_match_timm():
    """A fused ``features_only`` model (timm's FeatureListNet over the converted model) gives
    timm's feature maps and input gradient; its blocks run fused, one by one."""
    config = dict(growth_rate=4, block_config=(2, 1, 2, 1), features_only=True,
                  out_indices=(0, 2, 4))
    ref = _timm_model("densenet121", **config)
    fast = _timm_model("densenet121_fast", **config)
    fast.load_state_dict(ref.state_dict())
    x, _ = _batch(size=64)
    maps = []
    for model in (fast, ref):
        x_ = x.clone().requires_grad_()
        with FusedOpCounter() as counter:
            outs = model(x_)
        sum(o.square().sum() for o in outs).backward()
        maps.append((outs, x_.grad, counter.calls))
    assert [o.shape for o in maps[0][0]] == [o.shape for o in maps[1][0]]
    for a, b in zip(maps[0][0], maps[1][0], strict=True):
        assert_close(a, b, DTYPE, "feature map")
    assert_close(maps[0][1], maps[1][1], DTYPE, "features_only input gradient")
    assert (maps[0][2], maps[1][2]) == (6, 0)  # every fused layer's 1x1 conv, one call each
    with pytest.raises(TypeError, match="create them fused"):
        densenet_fast.convert(ref)


@pytest.mark.parametrize("name", sorted(fused_timm.VARIANTS))
def test_registered_models_have_timms_structure_and_pretrained_tags(name):
    """Each ``<name>_fast`` builds timm's module tree (names, parameter shapes, module types
    but the block and transition containers) with timm's pretrained tags."""
    ref = timm.create_model(name, device="meta")
    fast = timm.create_model(f"{name}_fast", device="meta")
    assert type(fast) is type(ref)
    shapes = {n: p.shape for n, p in fast.state_dict().items()}
    assert shapes == {n: p.shape for n, p in ref.state_dict().items()}
    containers = (timm.models.densenet.DenseBlock, timm.models.densenet.DenseTransition,
                  torch.nn.Sequential)
    ref_types = {n: type(m) for n, m in ref.named_modules() if type(m) not in containers}
    assert {n: type(m) for n, m in fast.named_modules() if n in ref_types} == ref_types
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
    assert [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}_fast.*")] == tags
    if tags:
        cfg = timm.models.get_pretrained_cfg(f"{name}_fast.{tags[0]}")
        assert cfg.hf_hub_id == timm.models.get_pretrained_cfg(f"{name}.{tags[0]}").hf_hub_id


def test_create_model_takes_timms_names():
    assert fused_timm.fused_name("densenet121.tv_in1k") == "densenet121_fast.tv_in1k"
    assert fused_timm.fused_name("densenet264d_fast") == "densenet264d_fast"
    model = fused_timm.create_model("densenet169", growth_rate=4, block_config=(1, 1))
    assert model.pretrained_cfg["architecture"] == "densenet169_fast"
    with pytest.raises(ValueError, match="not one of timm's DenseNets"):
        fused_timm.create_model("resnet50")


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_pretrained_weights_load_offline(tmp_path, legacy_keys):
    """``pretrained=True`` with a local file (``pretrained_cfg_overlay``) loads a checkpoint
    as timm's model loads it (the 1000-class head of the default configuration is left out
    for 5 classes), also one with torchvision's legacy key names (``norm.1``)."""
    source = _timm_model("densenet121", **TINY)
    state = source.state_dict()
    if legacy_keys:
        state = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v
                 for k, v in state.items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    fast, ref = (_timm_model(name, pretrained=True, **TINY,
                             pretrained_cfg_overlay=dict(file=str(path)))
                 for name in ("densenet121_fast", "densenet121"))
    _assert_same_state(fast, ref, "pretrained")
    loaded = fast.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("classifier"):
            assert torch.equal(loaded[name], value), name
    ref.eval(), fast.eval()
    x, _ = _batch()
    assert_close(fast(x), ref(x), DTYPE, "pretrained logits")


def test_state_dict_round_trip():
    ref = _timm_model("densenet121", **TINY)
    fast = _timm_model("densenet121_fast", **TINY)
    fast.load_state_dict(ref.state_dict())
    back = _timm_model("densenet121", **TINY)
    back.load_state_dict(fast.state_dict())
    _assert_same_state(back, ref, "round trip")


def test_grad_checkpointing_is_the_recompute_setting():
    """``set_grad_checkpointing(True)`` (and ``memory_efficient=True``) keep timm's results
    and make the fused blocks keep what blocks with ``recompute_bottleneck=True`` keep."""
    def kept(model):
        return sum(saved_storages(model, lambda x: model(x)).values())

    base = timm.create_model("densenet121_fast", **TINY)
    plain = kept(base)
    base.set_grad_checkpointing(True)
    recompute = densenet_fast.convert(timm.create_model("densenet121", **TINY),
                                      recompute_bottleneck=True)
    recompute.features.recompute_bottleneck = False  # timm checkpoints layers, not the stem
    assert kept(base) == kept(recompute) < plain
    assert kept(timm.create_model("densenet121_fast", memory_efficient=True, **TINY)) \
        == kept(recompute)
    # timm's checkpointing runs norm1 again, in training mode, when backward recomputes it:
    # its running statistics take two updates a step. The fused blocks update them once, as
    # timm's model does without checkpointing; logits and gradients equal both.
    ref = _timm_model("densenet121", **TINY)
    checkpointed = copy.deepcopy(ref)
    checkpointed.set_grad_checkpointing(True)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    fast.set_grad_checkpointing(True)
    _assert_same_training(densenet_fast.convert(copy.deepcopy(checkpointed)), ref, *_batch(),
                          "grad checkpointing")
    _assert_same_steps(fast, checkpointed, *_batch(), "against timm's checkpointing")
    norm1 = "features.denseblock1.denselayer1.norm1.num_batches_tracked"
    assert (fast.state_dict()[norm1], checkpointed.state_dict()[norm1]) == (2, 4)


@pytest.mark.parametrize("variant", ["sync", "sync_after_convert", "frozen", "channels_last",
                                     "eval_batch_1"])
def test_norm_act_variants_stay_fused_and_exact(variant):
    """timm's SyncBatchNormAct (no process group: per-process statistics), before or after
    convert (as train.py's --sync-bn does it to a fused model), and FrozenBatchNormAct2d fuse
    like BatchNormAct2d; channels_last and eval at batch 1 too."""
    ref = _timm_model("densenet121", **TINY)
    if variant == "sync":
        ref = timm.layers.convert_sync_batchnorm(ref)
    elif variant == "frozen":
        ref = timm.layers.freeze_batch_norm_2d(ref)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    if variant == "sync_after_convert":
        fast = timm.layers.convert_sync_batchnorm(fast)
        assert type(fast.features.denseblock1.denselayer1.norm1).__name__ == "SyncBatchNormAct"
    assert set(fast.features.fusion_report().values()) - {"fused"} <= set(
        REPORT_OF_THREE_BLOCKS.values())
    x, labels = _batch()
    if variant == "channels_last":
        fast, ref = (m.to(memory_format=torch.channels_last) for m in (fast, ref))
        x = x.to(memory_format=torch.channels_last)
    if variant == "eval_batch_1":
        fast.eval(), ref.eval()
        assert_close(fast(x[:1]), ref(x[:1]), DTYPE, "eval batch 1")
        return
    _assert_same_training(fast, ref, x, labels, variant)


@pytest.mark.parametrize(("kwargs", "where", "reason"), [
    (dict(act_layer="silu"), "features.denseblock1", "norm1.act is SiLU"),
    (dict(aa_layer=BlurPool2d, aa_stem_only=False), "features.denseblock1",
     "features.transition1 runs as a module: pool is BlurPool2d"),
    (dict(aa_layer=BlurPool2d), "features.stem", "pool0 is Sequential"),
])
def test_what_the_fused_path_does_not_compute_runs_as_modules(kwargs, where, reason):
    """Another activation, blur-pooled transitions and the blur-pooled stem run as timm's
    modules, each with its reason in the report, and the model still trains as timm's."""
    ref = _timm_model("densenet121", **TINY, **kwargs)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    assert reason in fast.features.fusion_report()[where]
    _assert_same_training(fast, ref, *_batch(), str(kwargs))


def test_timm_training_loop_pieces():
    """timm's train.py code path on a few steps of a tiny model: the optimizer factory
    (train.py's default: SGD with Nesterov momentum, weight decay skipping norms and
    biases), a cosine scheduler with warmup stepped per update, and ModelEmaV3; fused and
    timm's own model end with the same weights, EMA weights and running statistics."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    x, labels = _batch()
    results = []
    for name in ("densenet121_fast", "densenet121"):
        model = _timm_model(name, **TINY)
        optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9,
                                        weight_decay=0.05)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4,
                                           warmup_epochs=1, warmup_lr=1e-3,
                                           updates_per_epoch=2, step_on_epochs=False)
        ema = ModelEmaV3(model, decay=0.9)
        updates = 0
        for epoch in range(2):
            for _ in range(2):
                loss = F.cross_entropy(model(x), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                updates += 1
                scheduler.step_update(num_updates=updates)
                ema.update(model, step=updates)
            scheduler.step(epoch + 1)
        results.append((model, ema.module))
    (fast, fast_ema), (ref, ref_ema) = results
    _assert_same_state(fast, ref, "trained")
    _assert_same_state(fast_ema, ref_ema, "EMA")
    assert_close(fast_ema.eval()(x), ref_ema.eval()(x), DTYPE, "EMA logits")


def test_launcher_registers_the_models_and_runs_the_script(tmp_path):
    """``python -m densenet_fast.timm_train SCRIPT ARGS`` runs SCRIPT as __main__ with ARGS,
    the fused names registered, as timm's train.py would be run."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        import timm
        model = timm.create_model(sys.argv[2], growth_rate=4, block_config=(1, 1))
        print(__name__, sys.argv[1:], type(model).__name__,
              model.features.fusion_report()["features.denseblock1"])
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(densenet_fast.__file__)),
         os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "densenet_fast.timm_train", str(script),
                          "--model", "densenet121_fast"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0] == (
        "__main__ ['--model', 'densenet121_fast'] DenseNet fused with features.transition1")
    missing = subprocess.run([sys.executable, "-m", "densenet_fast.timm_train",
                              str(tmp_path / "nowhere.py")], capture_output=True, text=True,
                             env=env, timeout=300)
    assert missing.returncode == 2 and "no script at" in missing.stderr


def test_benchmark_rows_build_timms_model_with_the_same_weights():
    from densenet_fast.benchmark.implementations import ModelConfig, build

    config = ModelConfig(growth_rate=4, block_config=(2, 2), num_init_features=8,
                         num_classes=3, batch_size=2, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    models = {name: build(name, config).eval() for name in (
        "torchvision", "timm", "timm-checkpointing", "densenet_fast-timm",
        "densenet_fast-timm-recompute")}
    expected = models.pop("torchvision")(x)
    for name, model in models.items():
        assert_close(model(x), expected, torch.float32, name)
    with pytest.raises(ValueError, match="2 \\* growth_rate"):
        build("timm", ModelConfig(growth_rate=4, block_config=(2,), num_init_features=6))


def test_compiled_fullgraph_training_step_matches_timm(monkeypatch):
    """``torch.compile(fullgraph=True)`` of a converted timm model: the plan's timm checks
    trace without a graph break, and a training step gives timm's logits and gradients.
    With the type checks' caches cold, as in a fresh process: on torch 2.11 dynamo could not
    trace the check that fills them (it passed only after another test had filled them)."""
    monkeypatch.setattr(validation, "_wrappers", {})
    monkeypatch.setattr(validation, "_named_classes", {})
    ref = _timm_model("densenet121", growth_rate=4, block_config=(2, 2), num_classes=5)
    fast = densenet_fast.convert(copy.deepcopy(ref))
    compiled = torch.compile(fast, fullgraph=True)
    x, labels = _batch()
    records = []
    for model, params in ((compiled, fast), (ref, ref)):
        logits = model(x)
        F.cross_entropy(logits, labels).backward()
        records.append((logits.detach(), {n: p.grad for n, p in params.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = records
    assert_close(logits, ref_logits, DTYPE, "compiled logits")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], DTYPE, f"compiled grad {name}")
    _assert_same_state(fast, ref, "compiled")


def test_jit_script_of_a_converted_model_computes_timms():
    """``torch.jit.script`` compiles a converted timm model, as it does timm's (the fused
    step is ``torch.jit.unused``: the scripted model runs the modules)."""
    ref = _timm_model("densenet121", **TINY).eval()
    scripted = torch.jit.script(densenet_fast.convert(copy.deepcopy(ref)))
    x, _ = _batch()
    assert_close(scripted(x), ref(x), DTYPE, "scripted logits")
