"""torch.autocast on CPU (bfloat16, float16): the fused model computes what torchvision and the
unfused model compute under the same autocast."""

import pytest
import torch
import torch.nn.functional as F
from helpers import twins
from tolerances import assert_as_accurate, assert_close

from densenet_fast import DenseNet, NaiveDenseNet
from densenet_fast.ops import conv_layout, lowp_conv
from densenet_fast.plan import run_stem


def _logits_and_grads(model, x, y, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logits.float().detach(), grads


def test_bfloat16_autocast_matches_float32_as_well_as_the_unfused_model():
    fast, naive = twins(DenseNet, NaiveDenseNet, growth_rate=8, block_config=(3, 3),
                        num_init_features=16, num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    exact_logits, exact_grads = _logits_and_grads(fast, x, y, autocast=False)
    fast_logits, fast_grads = _logits_and_grads(fast, x, y, autocast=True)
    naive_logits, naive_grads = _logits_and_grads(naive, x, y, autocast=True)
    assert fast_logits.dtype == torch.float32
    assert_close(fast_logits, exact_logits, torch.bfloat16, "bf16 logits vs float32")
    # bf16 gradients are far from float32 ones in any implementation; the bar is the
    # unfused model's own distance under the same autocast.
    assert_as_accurate(fast_grads, naive_grads, exact_grads, torch.bfloat16, "bf16 gradients")
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


def _torchvision_twin(**config):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.DenseNet(**config)
    fast = DenseNet(**config)
    fast.load_state_dict(reference.state_dict())
    return fast, reference


def _autocast_step(model, x, y, dtype):
    """Logits, every parameter gradient (flat, float32) and the buffers after one step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    return logits.float().detach(), grads, dict(model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("conv_in_float32", [False, True], ids=["native-conv", "float32-conv"])
def test_autocast_matches_torchvision(dtype, conv_in_float32, monkeypatch):
    """Under CPU autocast the fused model computes what torchvision computes: logits within
    the dtype's tolerance, gradients as close to float32's as torchvision's, the same
    running statistics, and eval logits; with the 3x3 and stem convolutions run natively in
    ``dtype`` or as float32 convolutions of ``dtype`` values (ops/lowp_conv.py)."""
    monkeypatch.setattr(lowp_conv, "runs_in_float32", lambda x: conv_in_float32 and
                        x.dtype in (torch.bfloat16, torch.float16))
    config = dict(growth_rate=8, block_config=(3, 2), num_init_features=16, num_classes=10)
    fast, reference = _torchvision_twin(**config)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    exact_logits, exact_grads, _ = _autocast_step(reference, x, y, None)
    reference.load_state_dict(fast.state_dict())  # running statistics back to the start
    ref_logits, ref_grads, ref_buffers = _autocast_step(reference, x, y, dtype)
    fast_logits, fast_grads, fast_buffers = _autocast_step(fast, x, y, dtype)
    assert_close(fast_logits, ref_logits, dtype, f"{dtype} train logits")
    assert_as_accurate(fast_grads, ref_grads, exact_grads, dtype, f"{dtype} gradients")
    for name, buffer in fast_buffers.items():
        assert_close(buffer.float(), ref_buffers[name].float(), dtype, f"{dtype} {name}")
    fast.eval(), reference.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert_close(fast(x).float(), reference(x).float(), dtype, f"{dtype} eval logits")


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_leaves_a_float64_model_in_float64(autocast):
    """Autocast casts floating-point tensors other than float64: torchvision's float64 model
    computes in float64 under it, and so does the fused one (it ran its convolutions'
    weights in ``autocast`` against float64 activations and failed inside the first GEMM).
    A float64 input to a float32 model is refused as torchvision refuses it (a RuntimeError),
    before anything runs; a float16 input to it computes as torchvision's does."""
    config = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5)
    fast, reference = _torchvision_twin(**config)
    fast.double(), reference.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (fast, reference):
        with torch.autocast("cpu", dtype=autocast):
            logits = model(x)
        logits.sum().backward()
        outs.append((logits, [p.grad for p in model.parameters()],
                     [b.clone() for b in model.buffers()]))
    (fast_logits, fast_grads, fast_buffers), (ref_logits, ref_grads, ref_buffers) = outs
    assert fast_logits.dtype == ref_logits.dtype == torch.float64
    assert_close(fast_logits, ref_logits, torch.float64, "float64 logits under autocast")
    for got, want in zip(fast_grads + fast_buffers, ref_grads + ref_buffers, strict=True):
        assert_close(got, want, torch.float64, "float64 gradient or buffer under autocast")

    fast.float(), reference.float()
    before = [b.clone() for b in fast.buffers()]
    for model in (fast, reference):
        with pytest.raises(RuntimeError), torch.autocast("cpu", dtype=autocast):
            model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, fast.buffers(), strict=True))
    half = x.to(torch.float16)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast):
        assert_close(fast.eval()(half).float(), reference.eval()(half).float(), autocast,
                     "float16 input under autocast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_float32_convolution_of_low_precision_values(dtype, memory_format):
    """The float32 execution computes the native convolution's function: outputs and both
    gradients within the dtype's tolerance, in the data's dtype and layout."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 7).to(dtype).contiguous(memory_format=memory_format)
    w = torch.randn(5, 12, 3, 3).to(dtype)
    args = ((1, 1), (1, 1), (1, 1), 1)
    outs = {up: lowp_conv.conv2d(x, w, *args, upcast=up) for up in (False, True)}
    grad = torch.randn_like(outs[True])
    grads = {up: lowp_conv.conv2d_backward(grad, x, w, *args, (True, True), upcast=up)
             for up in (False, True)}
    exact = torch.nn.functional.conv2d(x.double(), w.double(), None, *args)
    assert outs[True].dtype == dtype and outs[True].is_contiguous(memory_format=memory_format)
    assert_close(outs[True], exact, dtype, "float32 execution vs exact")
    assert_close(outs[False], exact, dtype, "native vs exact")
    for native, upcast, name in zip(grads[False], grads[True], ("input", "weight"), strict=True):
        assert upcast.dtype == dtype
        assert_close(upcast, native.float(), dtype, f"{name} gradient")


def test_float32_convolution_is_not_chosen_where_it_cannot_apply():
    assert not lowp_conv.runs_in_float32(torch.zeros(1, 1, 2, 2))  # float32 data
    with torch.device("meta"):
        assert not lowp_conv.runs_in_float32(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not lowp_conv.runs_in_float32(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    finally:
        torch.use_deterministic_algorithms(previous)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not lowp_conv.runs_in_float32(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))


def test_float32_convolution_is_not_chosen_under_a_lowered_convolution_precision(monkeypatch):
    # A machine where float32 convolutions of bfloat16 data were measured faster: with float32
    # convolutions set to bfloat16 that measurement no longer describes them, and the native
    # kernels serve (nothing is measured or kept: test_cpu_engine_cache).
    monkeypatch.setattr(lowp_conv, "_float32_is_faster", lambda *args: True)
    data = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    assert lowp_conv.runs_in_float32(data)
    conv = torch.backends.mkldnn.conv
    saved = conv.fp32_precision  # a property, which monkeypatch cannot restore
    try:
        conv.fp32_precision = "bf16"
        assert not lowp_conv.runs_in_float32(data)
    finally:
        conv.fp32_precision = saved


def test_stem_convolution_runs_channels_last_only_where_it_pays(monkeypatch):
    def image(dtype=torch.bfloat16, channels=3, **kwargs):
        return torch.zeros(2, channels, 8, 8, dtype=dtype, **kwargs)

    assert conv_layout.runs_channels_last(image())
    assert conv_layout.runs_channels_last(image(torch.float16, channels=1))
    assert not conv_layout.runs_channels_last(image(torch.float32))  # ran level: not worth it
    assert not conv_layout.runs_channels_last(image(channels=16))  # a dense layer's input
    assert not conv_layout.runs_channels_last(image().to(memory_format=torch.channels_last))
    assert not conv_layout.runs_channels_last(image(device="meta"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not conv_layout.runs_channels_last(image())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_stem_convolution_keeps_the_layout_and_the_results(dtype, training,
                                                                          monkeypatch):
    """With conv0 on a channels-last copy of NCHW data, the stem's output and its input's
    gradient come back NCHW, with what the NCHW convolution gives (one oneDNN kernel or
    another: the gradients within the dtype's tolerance)."""
    model = DenseNet(growth_rate=8, block_config=(2,), num_init_features=16, num_classes=10)
    model.train(training)
    f = model.features
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    grad_out = torch.randn(2, 16, 8, 8)

    rule, chosen = conv_layout.runs_channels_last, []

    def run(channels_last: bool):
        monkeypatch.setattr(conv_layout, "runs_channels_last",
                            lambda t: chosen.append(rule(t) and channels_last) or chosen[-1])
        for module in (f.conv0, f.norm0):
            for p in module.parameters():
                p.grad = None
        x.grad = None
        with torch.autocast("cpu", dtype=dtype):
            out = run_stem(f.conv0, f.norm0, f.pool0, x)
        out.backward(grad_out.to(out.dtype))
        monkeypatch.undo()
        return out.detach(), x.grad, [p.grad for m in (f.conv0, f.norm0) for p in m.parameters()]

    with torch.no_grad():
        f.norm0.running_mean.normal_(), f.norm0.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in f.norm0.state_dict().items()}
    out, grad_x, grads = run(channels_last=True)
    assert any(chosen), "conv0 never ran channels-last"
    f.norm0.load_state_dict(state)
    ref_out, ref_grad_x, ref_grads = run(channels_last=False)
    assert out.dtype == dtype and out.is_contiguous()
    assert grad_x.is_contiguous() and grad_x.dtype == torch.float32
    assert_close(out, ref_out, dtype, "stem output")
    assert_close(grad_x, ref_grad_x, dtype, "input gradient")
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref, dtype, "parameter gradient")
