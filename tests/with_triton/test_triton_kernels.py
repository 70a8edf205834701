"""Triton kernels against the pure-PyTorch kernels.

Runs in its own process with ``DENSENET_FAST_BACKEND=triton`` (launched by
``tests/test_triton_interpreter.py``): on CPU tensors through ``TRITON_INTERPRET=1`` here, and
on a GPU with the same tests plus the GPU-only ones (``benchmarks/gpu_check.py``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FusedOpCounter, assert_grads_match, assert_models_match, train_steps, twins
from op_cases import FORMAT_IDS, FORMATS, STATS_GRAD_IDS, assert_op_matches, op_case, shape_id
from tolerances import assert_close

import densenet_fast
from densenet_fast.ops import torch_impl, triton_impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

# Small shapes (the interpreter is slow): widths off the 32-wide tiles, 1x1 and odd planes.
SHAPES = [(2, 13, 11, 8, 5, 4), (2, 37, 33, 20, 1, 1), (3, 40, 35, 16, 7, 9)]
# densenet121's layer shapes at batch 8, 56x56 / 28x28 / 14x14 / 7x7 (GPU only).
GPU_SHAPES = [(8, 256, 224, 128, 56, 56), (8, 512, 320, 128, 28, 28),
              (8, 1024, 992, 128, 14, 14), (8, 1024, 512, 128, 7, 7)]


def test_triton_is_the_active_backend():
    info = densenet_fast.backend_info()
    assert info["active"][DEVICE] == "triton", info


def _compare(shape, memory_format, dtype, stats_grad):
    # The reference computes in float32 from the same (rounded) inputs.
    assert_op_matches(op_case(shape, dtype, memory_format, device=DEVICE), stats_grad,
                      "torch-float32")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_triton_matches_reference(shape, memory_format, dtype, stats_grad, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _compare(shape, memory_format, dtype, stats_grad)


ALL_CONFIGS = {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}": c
               for c in triton_impl.GEMM_CONFIGS + triton_impl.WEIGHT_GRAD_CONFIGS}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_every_autotune_config_matches_reference(name, monkeypatch):
    """The interpreter autotunes over one config only: run each of them explicitly."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with triton_impl.forced_config(ALL_CONFIGS[name]):
        _compare(SHAPES[2], torch.channels_last, torch.float32, stats_grad=True)
        _compare(SHAPES[0], torch.contiguous_format, torch.float32, stats_grad=False)


def test_autotune_trials_on_shared_buffers_leave_the_sums_exact():
    """What autotuning does on a first call: one config, then another, on the same
    buffers. A 128-row config fills a quarter of the partial-sum rows a 32-row trial left
    behind; only its own rows may be summed."""
    case = op_case(SHAPES[2], torch.float32, device=DEVICE)
    buffer, mean, invstd, gamma, beta, weight = case.args
    grad_out = case.grad_out
    channels, pixels = weight.shape[1], buffer.shape[0] * buffer.shape[2] * buffer.shape[3]
    _, want_weight, want_bias = torch_impl.bn_relu_conv1x1_backward(
        grad_out, buffer, mean, invstd, gamma, beta, weight, True, torch.zeros_like(buffer))
    scale, shift = (t.contiguous() for t in densenet_fast.ops.batchnorm.scale_shift(
        mean, invstd, gamma, beta))
    partial = torch.full((triton_impl.partial_rows(buffer), 2, channels), float("nan"),
                         device=DEVICE)
    store = torch.empty(pixels, channels, device=DEVICE)
    target = torch.zeros_like(buffer)
    for config in (triton_impl.GEMM_CONFIGS[0], triton_impl.GEMM_CONFIGS[-1]):
        with triton_impl.forced_config(config):
            sums = triton_impl.input_grad_pass(
                grad_out, weight.view(weight.shape[0], channels), buffer, scale, shift, mean,
                gamma * invstd, target, store, partial, True)
        assert_close(sums[0].float(), want_bias, torch.float32, f"sum(g), {config}")
        assert_close((sums[1] * invstd.double()).float(), want_weight, torch.float32,
                     f"sum(g xhat), {config}")


def test_kernels_launch_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the launchers make the tensors' device
    current, and size the weight-gradient split for that device."""
    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Properties:
        def __init__(self, sms):
            self.multi_processor_count = sms

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: Properties(100 if torch.device(device).index == 1 else 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_impl, "INTERPRETED", False)
    second = torch.device("cuda", 1)
    with triton_impl._device_guard(second):
        pass
    assert entered == [second]
    assert triton_impl._num_splits(1, 10**6, second) == 200  # 2 * cuda:1's 100 SMs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.cuda.set_device(0)
    assert_op_matches(op_case(SHAPES[2], torch.float32, torch.channels_last, device="cuda:1"),
                      True, "torch")


def test_float64_is_served_by_the_reference_kernels():
    args = op_case(SHAPES[0], torch.float64, device=DEVICE).args
    assert torch.equal(torch.ops.densenet_fast.bn_relu_conv1x1(*args),
                       torch_impl.bn_relu_conv1x1(*args))


def test_tiny_model_matches_naive_through_triton(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 parity on a GPU
    config = dict(growth_rate=5, block_config=(2, 2), num_init_features=7, bn_size=2,
                  num_classes=3)
    fast, ref = twins(densenet_fast.DenseNet, densenet_fast.NaiveDenseNet, torch.float32,
                      **config)
    fast, ref = fast.to(DEVICE), ref.to(DEVICE)
    x = torch.randn(2, 3, 24, 24, device=DEVICE)
    y = torch.tensor([0, 2], device=DEVICE)
    fast_out, fast_dx, fast_grads = train_steps(fast, x, y)
    ref_out, ref_dx, ref_grads = train_steps(ref, x, y)
    for step in range(2):
        assert_close(fast_out[step], ref_out[step], torch.float32, f"logits {step + 1}")
    assert_close(fast_dx[0], ref_dx[0], torch.float32, "input gradient")
    assert_grads_match(fast_grads[0], ref_grads[0], torch.float32)
    assert_models_match(fast, ref, torch.float32, params=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tiny_model_under_autocast_matches_torchvision_through_triton(dtype, monkeypatch):
    """Under autocast the Triton kernels compute in the autocast dtype (float32
    accumulation): logits, gradients (as close to float32's as torchvision's) and running
    statistics as torchvision's under the same autocast."""
    from tolerances import assert_as_accurate
    from torchvision.models import DenseNet as TorchvisionDenseNet

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = dict(growth_rate=5, block_config=(2, 2), num_init_features=7, bn_size=2,
                  num_classes=3)
    ref = TorchvisionDenseNet(**config).to(DEVICE)
    fast = densenet_fast.DenseNet(**config).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    start = copy.deepcopy(ref.state_dict())
    x = torch.randn(2, 3, 24, 24, device=DEVICE)
    y = torch.tensor([0, 2], device=DEVICE)

    def step(model, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        return out.float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    _, exact_grads = step(ref, False)
    ref.load_state_dict(start)
    ref_out, ref_grads = step(ref, True)
    with FusedOpCounter() as counter:
        fast_out, fast_grads = step(fast, True)
    assert counter.calls > 0 and counter.dtypes == {dtype}  # in the autocast dtype
    assert_close(fast_out, ref_out, dtype, "logits")
    assert_as_accurate(fast_grads, ref_grads, exact_grads, dtype, "gradients")
    assert_models_match(fast, ref, dtype, params=False)


@on_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_layer_shapes(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 without TF32
    _compare(shape, torch.channels_last, dtype, stats_grad=False)
    _compare(shape, torch.contiguous_format, dtype, stats_grad=True)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_densenet121_matches_torchvision(dtype, monkeypatch):
    from torchvision.models import densenet121

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref = densenet121(num_classes=10).to(DEVICE)
    fast = densenet_fast.convert(copy.deepcopy(ref))  # convert shares; compare two models
    x = torch.randn(8, 3, 128, 128, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=DEVICE)
    results = []
    for model in (fast, ref):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        results.append((out.float(), {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], dtype, "logits")
    assert_grads_match(results[0][1], results[1][1], dtype)
    assert_models_match(fast, ref, dtype, params=False)
