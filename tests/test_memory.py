"""The memory claim, on structure: bytes autograd keeps for backward, per block depth."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import FusedOpCounter, saved_storages
from torch.utils._python_dispatch import TorchDispatchMode

import densenet_fast
from densenet_fast import DenseNet, NaiveDenseNet

DEPTHS = (2, 4, 6, 8, 10)


def saved_bytes(model_cls, layers: int, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for one training step's backward,
    parameters excluded (they exist anyway and grow with the weights, not the activations)."""
    torch.manual_seed(0)
    model = model_cls(growth_rate=4, block_config=(layers,), num_init_features=8, bn_size=2,
                      num_classes=3, **kwargs)
    storages = saved_storages(
        model, lambda x: F.cross_entropy(model(x), torch.tensor([0, 1]), reduction="none"))
    return sum(storages.values())


def _second_differences(values):
    first = [b - a for a, b in zip(values, values[1:], strict=False)]
    return [b - a for a, b in zip(first, first[1:], strict=False)]


def test_fused_model_saves_memory_linear_in_depth():
    sizes = [saved_bytes(DenseNet, n) for n in DEPTHS]
    # Equal steps in depth add equal bytes: no term grows faster than the depth.
    assert _second_differences(sizes) == [0] * (len(DEPTHS) - 2), sizes


def test_naive_model_saves_memory_quadratic_in_depth():
    sizes = [saved_bytes(NaiveDenseNet, n) for n in DEPTHS]
    assert all(d > 0 for d in _second_differences(sizes)), sizes


@pytest.mark.parametrize("layers", [4, 10])
def test_fused_model_saves_less_than_naive(layers):
    assert saved_bytes(DenseNet, layers) < saved_bytes(NaiveDenseNet, layers)


def test_recomputed_bottlenecks_leave_no_per_layer_activation():
    # Per layer the block then keeps only statistics: each layer adds k channels to the block
    # buffer and to norm5's output (the classifier's ReLU keeps it), and a few per-channel
    # vectors; no bottleneck.
    sizes = [saved_bytes(DenseNet, n, recompute_bottleneck=True) for n in DEPTHS]
    per_layer = [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    kept = [saved_bytes(DenseNet, n) for n in DEPTHS]
    kept_per_layer = [b - a for a, b in zip(kept, kept[1:], strict=False)]
    buffer_channels = 4 * 2 * 8 * 8 * 4 * 2  # k=4 channels, N=2, 8x8, float32, two layers
    bottleneck = 8 * 2 * 8 * 8 * 4 * 2  # bn_size * k = 8 channels, two layers
    assert all(0 <= step - 2 * buffer_channels < 1024 for step in per_layer), per_layer
    assert [b - a for a, b in zip(per_layer, kept_per_layer, strict=True)] == \
        [bottleneck] * len(per_layer)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-conv0", "recompute"])
def test_stem_keeps_only_the_convolution_output(recompute):
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, num_classes=3,
                     recompute_bottleneck=recompute)
    stem = model.features[:4]
    assert stem.recompute_bottleneck == recompute
    conv_out_bytes = 2 * 8 * 16 * 16 * 4  # N, channels, 16x16 after the stride-2 conv
    fused = saved_storages(model, stem)
    kept = 0 if recompute else conv_out_bytes
    assert kept <= sum(fused.values()) < kept + 1024, fused  # and statistics
    stem.pool0.register_forward_hook(lambda *args: None)  # now it runs as modules
    modules = saved_storages(model, stem)
    # conv0's output, norm0's (relu0 in place) and the pool's int64 indices.
    assert sum(modules.values()) >= 2.5 * conv_out_bytes, modules


def test_inference_keeps_no_graph():
    model = DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = model(x)
        model.eval()
        with torch.inference_mode():
            out_inference = model(x)
    assert not saved and out.grad_fn is None and out_inference.grad_fn is None


def test_gradcam_hooks_keep_a_training_step_below_torchvision_checkpointing():
    """Grad-CAM's hooks on the last block or on norm5 keep the blocks fused (only the module
    after the hooked block runs on its own): one densenet121 training step still needs less
    than torchvision's ``memory_efficient=True`` model."""
    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.memory import measure_peak_memory

    config = ModelConfig.named("densenet121", num_classes=10, batch_size=4, image_size=96)
    checkpointed = measure_peak_memory("torchvision-memeff", config, threads=1)["peak_bytes"]
    for impl in ("densenet_fast-gradcam-block", "densenet_fast-gradcam-norm5"):
        hooked = measure_peak_memory(impl, config, threads=1)["peak_bytes"]
        assert hooked <= checkpointed, (impl, hooked / 2**20, checkpointed / 2**20)


def test_compiled_step_keeps_eager_memory():
    """Under torch.compile the blocks and the stem are opaque ops, so the compiled step keeps
    what the eager one keeps (at most 5% more, plus 0.5 MiB of resident pages that a busy
    machine moves: 3.41 MiB eager against 3.62 MiB compiled was seen under load; a graph
    break in the block's glue cost 1.06 MiB; inductor may save less around them)."""
    from densenet_fast.benchmark.implementations import ModelConfig
    from densenet_fast.benchmark.memory import measure_peak_memory

    config = ModelConfig(growth_rate=8, block_config=(4, 4), num_init_features=16,
                         num_classes=10, batch_size=8, image_size=64)
    eager = measure_peak_memory("densenet_fast", config, threads=1)["peak_bytes"]
    compiled = measure_peak_memory("densenet_fast-compiled", config, threads=1)["peak_bytes"]
    assert compiled <= 1.05 * eager + 2**19, (compiled / 2**20, eager / 2**20)


def test_one_setter_sets_the_memory_setting_everywhere():
    """``set_recompute_bottleneck`` on the model, the constructor argument and ``convert``'s
    keep the same bytes: every block and the stem recompute."""
    from densenet_fast import convert

    def kept(model):
        return sum(saved_storages(model, lambda x: model(x).sum()).values())

    def tiny(**kwargs):
        torch.manual_seed(0)
        return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                        num_classes=3, **kwargs)

    constructed = tiny(recompute_bottleneck=True)
    set_later = tiny()
    keeping = kept(set_later)
    set_later.set_recompute_bottleneck(True)
    assert [m.recompute_bottleneck for m in set_later.modules()
            if hasattr(m, "recompute_bottleneck")] == [True] * 3  # features and two blocks
    assert kept(set_later) == kept(constructed) < keeping
    assert kept(convert(tiny(), recompute_bottleneck=True)) == kept(constructed)
    set_later.set_recompute_bottleneck(False)
    assert kept(set_later) == keeping
    set_later.features.denseblock1.recompute_bottleneck = True  # one block on its own
    assert kept(constructed) < kept(set_later) < keeping


class _LiveCastWeights(TorchDispatchMode):
    """The most bfloat16 copies of 4-d parameters (convolution weights) alive at once."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.data_ptr() for p in model.parameters() if p.dim() == 4}
        self.live, self.most = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.weights \
                and out.dtype == torch.bfloat16:
            self.live = [ref for ref in self.live if ref() is not None] + [weakref.ref(out)]
            self.most = max(self.most, len(self.live))
        return out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_forward_without_gradients_casts_one_layers_weights_at_a_time(memory_format):
    """Under bfloat16 autocast without a graph, each convolution weight's bfloat16 copy is
    gone before the next is made (as in torchvision's layer-by-layer forward), instead of a
    whole block's weights alive at once: densenet121's third block casts 5.3 MiB, torchvision's
    whole batch-1 inference forward peaked at 5.9 MiB (AMD EPYC, Zen 4)."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(3, 3), num_init_features=8, bn_size=2,
                     num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=memory_format)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        with densenet_fast.unfused():
            unfused = model(x)
        with FusedOpCounter() as fused, _LiveCastWeights(model) as casts:
            out = model(x)
    assert fused.calls == 3 + 1 + 3  # layers and the transition: the blocks ran fused
    assert casts.most == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), unfused.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("how", ["train", "recompute", "no_grad"])
def test_a_bottleneck_backward_does_not_read_is_normalised_in_place(how):
    """norm2-relu2 writes over the bottleneck where nothing reads it again (a forward without
    gradients, the recompute setting's training forward): one bottleneck-sized tensor fewer
    per layer at the peak (densenet121 batch-8 inference: 55 -> 46 MiB in float32, Zen 4)."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2,
                     num_classes=3, recompute_bottleneck=how == "recompute").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = list(model.parameters())
    with torch.set_grad_enabled(how != "no_grad"):
        with densenet_fast.unfused():
            expected = model(x)
        # Before the next forward updates the running statistics this graph saved.
        expected_grads = torch.autograd.grad(expected.sum(), params) if how != "no_grad" else ()
        with FusedOpCounter("bn_relu_inplace") as in_place, FusedOpCounter("bn_relu") as copied:
            out = model(x)
    layers = 3 + 2
    assert (in_place.calls, copied.calls) == ((0, layers) if how == "train" else (layers, 0))
    torch.testing.assert_close(out, expected)
    if how != "no_grad":  # the recompute setting's backward recomputes the bottleneck
        grads = torch.autograd.grad(out.sum(), params)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want)


def test_blocks_free_their_weight_casts_once_their_backward_has_run():
    """Under autocast a block receives bf16 casts of its weights and keeps them for its
    backward; autograd frees them once that backward has run, as it frees the casts
    torchvision's convolutions save. A reference the in-place check held kept every block's
    casts alive to the end of the step's backward: densenet121's bf16 recompute step peaked
    at 92 MiB instead of 79 (batch 8, 224x224)."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                     num_classes=3)
    shapes = {tuple(m.weight.shape) for name, m in model.features.named_modules()
              if isinstance(m, torch.nn.Conv2d) and name.startswith(("denseblock", "transition"))}
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    alive = []

    def count_casts(grad):  # the input's gradient: every block's backward has run
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                         and o.dtype == torch.bfloat16 and tuple(o.shape) in shapes))

    x.register_hook(count_casts)
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(x).float().sum()
    loss.backward()
    assert alive == [0]
