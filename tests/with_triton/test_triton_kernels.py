"""Triton kernels against the pure-PyTorch kernels.

Runs in its own process with ``DENSENET_FAST_BACKEND=triton`` (launched by
``tests/test_triton_interpreter.py``): on CPU tensors through ``TRITON_INTERPRET=1`` here, and
on a GPU with the same tests plus the GPU-only ones (``benchmarks/gpu_check.py``).
"""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FusedOpCounter,
    assert_grads_match,
    assert_models_match,
    float32_precision,
    train_steps,
    twins,
)
from op_cases import (
    ACTIVE_KERNELS,
    FORMAT_IDS,
    FORMATS,
    LAYOUT_KINDS,
    STATS_GRAD_IDS,
    TORCH_KERNELS,
    OpResult,
    assert_kernels_match_reference,
    assert_laid_out_as_fake,
    assert_nan_propagates_as_in_torch,
    assert_op_matches,
    expanded,
    layout_cases,
    op_case,
    run_kernels,
    shape_id,
)
from tolerances import assert_close

import densenet_fast
from densenet_fast.ops import torch_impl, triton_impl, triton_tuning

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

# Small shapes (the interpreter is slow): widths off the 32-wide tiles, 1x1 and odd planes,
# and an 8x6 plane (48 pixels, a multiple of 16: Triton specialises on such planes).
SHAPES = [(2, 13, 11, 8, 5, 4), (2, 37, 33, 20, 1, 1), (3, 40, 35, 16, 7, 9),
          (3, 21, 19, 9, 8, 6)]
# densenet121's layer shapes at batch 8, 56x56 / 28x28 / 14x14 / 7x7 (GPU only).
GPU_SHAPES = [(8, 256, 224, 128, 56, 56), (8, 512, 320, 128, 28, 28),
              (8, 1024, 992, 128, 14, 14), (8, 1024, 512, 128, 7, 7)]


def test_triton_is_the_active_backend():
    info = densenet_fast.backend_info()
    assert info["active"][DEVICE] == "triton", info


@pytest.fixture
def ieee():
    """float32 GEMMs without TF32, so that float32 results meet float32's tolerance."""
    with float32_precision("ieee"):
        yield


def _compare(shape, memory_format, dtype, stats_grad):
    # The reference computes in float32 from the same (rounded) inputs.
    assert_op_matches(op_case(shape, dtype, memory_format, device=DEVICE), stats_grad,
                      "torch-float32")


@pytest.mark.parametrize("memory_format, shape, flat", [
    (torch.channels_last, SHAPES[0], True), (torch.channels_last, SHAPES[3], True),
    (torch.contiguous_format, SHAPES[3], False)])
def test_pixels_are_flat_in_channels_last(memory_format, shape, flat):
    """Channels-last tensors are flat, NCHW ones and mixed layouts are not."""
    case = op_case(shape, torch.float32, memory_format, device=DEVICE)
    hw = shape[4] * shape[5]
    assert triton_impl.pixels_flat(hw, case.buffer, case.grad_out) == flat
    other = case.grad_out.contiguous(memory_format=FORMATS[memory_format == FORMATS[0]])
    assert not triton_impl.pixels_flat(hw, case.buffer, other)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_triton_matches_reference(shape, memory_format, dtype, stats_grad, ieee):
    _compare(shape, memory_format, dtype, stats_grad)


@pytest.mark.parametrize("memory_format, shape", [
    (torch.channels_last, SHAPES[0]), (torch.contiguous_format, SHAPES[0]),
    (torch.contiguous_format, SHAPES[3])], ids=["flat", "nchw", "nchw-48-pixels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_as_through_torchs_ops(memory_format, shape, dtype, ieee):
    assert_nan_propagates_as_in_torch(op_case(shape, dtype, memory_format, device=DEVICE))


ALL_CONFIGS = {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}": c
               for c in triton_impl.GEMM_CONFIGS + triton_impl.WEIGHT_GRAD_CONFIGS}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_every_autotune_config_matches_reference(name, ieee):
    """The interpreter runs one config only: run each of them explicitly."""
    with triton_impl.forced_config(ALL_CONFIGS[name]):
        _compare(SHAPES[2], torch.channels_last, torch.float32, stats_grad=True)
        _compare(SHAPES[0], torch.contiguous_format, torch.float32, stats_grad=False)
        _compare(SHAPES[3], torch.contiguous_format, torch.float32, stats_grad=True)


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_weight_gradient_split_over_pixel_ranges_matches_reference(splits, monkeypatch, ieee):
    """On a GPU the weight gradient's pixel reduction is split to fill the SMs
    (``_num_splits``), each split summing a range of pixel tiles into its own partial row;
    the interpreter runs one split unless told otherwise. Splits that do not divide the
    tiles (189 pixels: 6 tiles of 32), and more splits than tiles (the empty ranges store
    zeros)."""
    monkeypatch.setattr(triton_impl, "_num_splits", lambda tiles, pixels, device: splits)
    _compare(SHAPES[2], torch.channels_last, torch.float32, stats_grad=True)
    _compare(SHAPES[2], torch.contiguous_format, torch.bfloat16, stats_grad=False)


def test_autotune_trials_on_shared_buffers_leave_the_sums_exact(ieee):
    """What autotuning does on a first call: one config, then another, on the same
    buffers. A 128-row config fills a quarter of the partial-sum rows a 32-row trial left
    behind; only its own rows may be summed."""
    case = op_case(SHAPES[2], torch.float32, device=DEVICE)
    buffer, mean, invstd, gamma, beta, weight = case.args
    grad_out = case.grad_out
    channels, pixels = weight.shape[1], buffer.shape[0] * buffer.shape[2] * buffer.shape[3]
    _, want_weight, want_bias = torch_impl.bn_relu_conv1x1_backward(
        grad_out, buffer, mean, invstd, gamma, beta, weight, True, torch.zeros_like(buffer))
    partial = torch.full((triton_impl.partial_rows(buffer), 2, channels), float("nan"),
                         device=DEVICE)
    store = torch.empty(pixels, channels, device=DEVICE)
    target = torch.zeros_like(buffer)
    for config in (triton_impl.GEMM_CONFIGS[0], triton_impl.GEMM_CONFIGS[-1]):
        with triton_impl.forced_config(config):
            rows = triton_impl.input_grad_pass(
                grad_out, weight.view(weight.shape[0], channels), buffer,
                (mean, invstd, gamma, beta), target, store, partial, True)
        grad_scale, grad_bias = triton_impl.bn_grads(partial, rows, invstd, torch.float32,
                                                     torch.float32)
        assert_close(grad_bias, want_bias, torch.float32, f"sum(g), {config}")
        assert_close(grad_scale, want_weight, torch.float32, f"sum(g xhat), {config}")


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
def test_second_gpu_while_the_first_is_current(ieee):
    torch.cuda.set_device(0)
    assert_op_matches(op_case(SHAPES[2], torch.float32, torch.channels_last, device="cuda:1"),
                      True, "torch")


def test_float64_is_served_by_the_reference_kernels():
    args = op_case(SHAPES[0], torch.float64, device=DEVICE).args
    assert torch.equal(torch.ops.densenet_fast.bn_relu_conv1x1(*args),
                       torch_impl.bn_relu_conv1x1(*args))


# The elementwise ops: (N, C, H, W), odd sizes, 1x1 planes, more channels than a 32-wide
# tile; layouts the block gives them and a strided one (every other column).
ELEMENTWISE_SHAPES = [(2, 5, 7, 3), (3, 37, 1, 1), (1, 40, 6, 8)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _laid_out(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _dense_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.fixture
def elementwise_launches(monkeypatch):
    """Kernels launched through the Triton elementwise launcher: the op must not be served
    by the reference kernel (which a comparison with it would not notice)."""
    launched = []
    launch = triton_impl._launch_elementwise

    def counting(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(triton_impl, "_launch_elementwise", counting)
    return launched


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_relu_inplace_kernel_writes_bn_relus_values(shape, layout, dtype,
                                                       elementwise_launches):
    """``bn_relu_inplace``: the bits of the Triton ``bn_relu`` (one launch each), over ``x``."""
    torch.manual_seed(0)
    c = shape[1]
    x = _laid_out(torch.randn(shape, device=DEVICE).to(dtype), layout)
    x[-1, -1, -1, -1] = float("nan")
    vectors = (torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5,
               torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))
    expected = torch.ops.densenet_fast.bn_relu(x, *vectors)
    address = x.data_ptr()
    torch.ops.densenet_fast.bn_relu_inplace(x, *vectors)
    assert elementwise_launches == ["bn_relu_kernel"] * 2
    assert x.data_ptr() == address and x.is_contiguous(memory_format=_dense_format(layout))
    assert torch.equal(x.isnan(), expected.isnan())
    assert torch.equal(x.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("widen", [False, True], ids=["same-dtype", "to-float32"])
def test_bn_relu_kernel_matches_reference(shape, layout, dtype, widen, elementwise_launches):
    """``bn_relu``: values (NaN where torch keeps it), the output's dtype and layout."""
    torch.manual_seed(0)
    c = shape[1]
    x = _laid_out(torch.randn(shape, device=DEVICE).to(dtype), layout)
    x[-1, -1, -1, -1] = float("nan")
    mean, invstd = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    weight, bias = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    out_dtype = torch.float32 if widen else None
    out = torch.ops.densenet_fast.bn_relu(x, mean, invstd, weight, bias, out_dtype)
    expected = torch_impl.bn_relu(x, mean, invstd, weight, bias, out_dtype)
    assert elementwise_launches == ["bn_relu_kernel"]
    assert out.dtype == expected.dtype == (out_dtype or dtype)
    assert out.is_contiguous(memory_format=_dense_format(layout))
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert_close(out.nan_to_num(), expected.nan_to_num(), dtype, "bn_relu")
    if widen:  # rounded to the data's dtype first, as the reference does
        assert torch.equal(out.to(dtype).to(out.dtype).nan_to_num(), out.nan_to_num())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", [(3, 9), (0, 40)], ids=["slice", "whole"])
def test_stats_term_kernel_matches_reference(layout, dtype, channels, elementwise_launches):
    """``add_stats_term`` on channel slices of a gradient buffer and of the data buffer."""
    torch.manual_seed(0)
    start, stop = channels
    shape = (2, 40, 5, 3)
    grad = _laid_out(torch.randn(shape, device=DEVICE).to(dtype), layout)[:, start:stop]
    x = _laid_out(torch.randn(shape, device=DEVICE).to(dtype), layout)[:, start:stop]
    x[0, 0, 0, 0] = float("inf")
    kx, k0 = torch.randn(stop - start, device=DEVICE), torch.randn(stop - start, device=DEVICE)
    out = torch.ops.densenet_fast.add_stats_term(grad, x, kx, k0)
    expected = torch_impl.add_stats_term(grad, x, kx, k0)
    assert elementwise_launches == ["stats_term_kernel"]
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == expected.stride()
    assert torch.equal(out.isinf(), expected.isinf()) and out.isinf().any()
    assert_close(out.nan_to_num(0, 0, 0), expected.nan_to_num(0, 0, 0), dtype, "stats term")


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (through ``kernel[grid](...)``), in order."""
    launched = []
    for name in ("bn_grads_kernel", "stats_coefficients_kernel"):
        kernel = getattr(triton_impl, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(triton_impl, name, Counting(kernel, name))
    return launched


@pytest.mark.parametrize("rows, channels", [(1, 5), (130, 37), (64, 70)],
                         ids=["one-row", "rows-and-channels-off-the-tiles", "whole-tiles"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64,) * 2,
                                    (torch.bfloat16, torch.float16)], ids=str)
def test_bn_grads_kernel_sums_the_filled_rows_in_float64(rows, channels, dtypes, launches):
    """The BN gradients from the input-gradient kernel's partial sums: only the first
    ``rows`` rows count (later ones hold another config's leftovers), summed in float64
    (the float32 rows' sum would lose the small addends), NaN kept, the outputs' dtypes."""
    torch.manual_seed(0)
    partial = torch.randn(rows + 3, 2, channels, device=DEVICE)
    partial[rows:] = float("inf")  # not filled by this launch: must not be read
    wide = dtypes[1] == torch.float64
    if wide:
        partial[0, 0, 1] = 1e8  # float32 sums of the rest would round against it
    partial[rows - 1, 1, 2] = float("nan")
    invstd = torch.rand(channels, device=DEVICE) + 0.5
    grad_scale, grad_bias = triton_impl.bn_grads(partial, rows, invstd, *dtypes)
    assert launches == ["bn_grads_kernel"]
    assert (grad_scale.dtype, grad_bias.dtype) == dtypes
    sums = partial[:rows].sum(0, dtype=torch.float64)
    want_scale, want_bias = (sums[1] * invstd).to(dtypes[0]), sums[0].to(dtypes[1])
    assert torch.equal(grad_scale.isnan(), want_scale.isnan()) and grad_scale[2].isnan()
    assert_close(grad_scale, want_scale, dtypes[0], "sum(g xhat)", equal_nan=True)
    assert_close(grad_bias, want_bias, dtypes[1], "sum(g)")
    if wide:  # the small addends count beside 1e8 (a float32 sum
        # would be off by several units: float32's spacing at 1e8 is 8)
        large = 1e8 * (torch.arange(channels, device=DEVICE) == 1)
        assert_close(grad_bias - large, want_bias - large, torch.float32,
                     "sum(g) beside a large addend")


def test_bn_grads_of_no_rows_are_zero_and_of_no_channels_launch_nothing(launches):
    zeros = triton_impl.bn_grads(torch.full((3, 2, 4), float("nan"), device=DEVICE), 0,
                                 torch.ones(4, device=DEVICE), torch.float32, torch.float32)
    assert all(torch.equal(t, torch.zeros(4, device=DEVICE)) for t in zeros)
    assert launches == ["bn_grads_kernel"]
    empty = triton_impl.bn_grads(torch.zeros(3, 2, 0, device=DEVICE), 3,
                                 torch.ones(0, device=DEVICE), torch.float32, torch.float32)
    assert [t.shape for t in empty] == [(0,), (0,)] and launches == ["bn_grads_kernel"]


@pytest.mark.parametrize("channels", [5, 300], ids=["narrow", "wider-than-a-tile"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_coefficients_kernel_matches_reference(channels, param_dtype, launches):
    """``add_stats_coefficients`` into slices of longer coefficient vectors (as the block
    passes them), twice (they accumulate), with BN parameters of a lower precision than
    the statistics (a ``.bfloat16()`` model)."""
    torch.manual_seed(0)
    mean, invstd = torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE) + .5
    weight, dweight, dbias = (torch.randn(channels, device=DEVICE).to(param_dtype)
                              for _ in range(3))
    got, want = (torch.randn(2, channels + 7, device=DEVICE) for _ in range(2))
    want.copy_(got)
    for _ in range(2):
        torch.ops.densenet_fast.add_stats_coefficients(
            got[0, :channels], got[1, :channels], mean, invstd, weight, dweight, dbias, 49)
        torch_impl.add_stats_coefficients(want[0, :channels], want[1, :channels], mean, invstd,
                                          weight, dweight, dbias, 49)
    assert launches == ["stats_coefficients_kernel"] * 2
    assert torch.equal(got[:, channels:], want[:, channels:])  # past the slices: untouched
    assert_close(got, want, torch.float32, "kx, k0")


def test_elementwise_ops_reject_bad_arguments_before_launching(elementwise_launches, launches):
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    vectors = [torch.ones(4, device=DEVICE) for _ in range(4)]
    with pytest.raises(ValueError, match="mean"):
        torch.ops.densenet_fast.bn_relu(x, vectors[0][:3], *vectors[1:])
    with pytest.raises(TypeError, match="kx must be torch.float32"):
        torch.ops.densenet_fast.add_stats_term(x, x, vectors[0].double(), vectors[1])
    with pytest.raises(TypeError, match="k0 must have kx's dtype"):
        torch.ops.densenet_fast.add_stats_coefficients(vectors[0], vectors[1].double(),
                                                       *vectors, vectors[0], 8)
    assert elementwise_launches == [] and launches == []


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_outputs_are_laid_out_as_the_fakes_say(kind, ieee):
    """Every op's outputs as its fake lays them out (``torch.compile`` plans with the fake),
    from inputs of every layout (``tests/test_op_layouts.py`` for the other kernels)."""
    for name, args in layout_cases(kind, torch.float32, DEVICE).items():
        assert_laid_out_as_fake(name, getattr(torch.ops.densenet_fast, name), args)
    # and the values: a transposed input's output layout is one the kernels cannot address
    assert_kernels_match_reference(kind, torch.float32, DEVICE)


@pytest.fixture
def gemm_launches(monkeypatch):
    """Names of the GEMM kernels launched (through the tuned launcher), in order."""
    launched = []
    launch = triton_impl._launch

    def counting(tuner, *args, **kwargs):
        launched.append(tuner.kernel.fn.__name__)
        return launch(tuner, *args, **kwargs)

    monkeypatch.setattr(triton_impl, "_launch", counting)
    return launched


def test_expanded_tensors_to_add_into_are_refused_before_launching(gemm_launches, launches):
    """An expanded gradient buffer or coefficient vector: the kernels' stores would race
    (ATen refuses such in-place writes); refused before any launch, nothing written."""
    args = list(layout_cases("nhwc", torch.float32, DEVICE)["bn_relu_conv1x1_backward"])
    grad_buffer = torch.zeros_like(args[-1])
    args[-1] = expanded(grad_buffer)
    with pytest.raises(RuntimeError, match="grad_buffer has elements that share one memory"):
        torch.ops.densenet_fast.bn_relu_conv1x1_backward(*args)
    kx, k0 = torch.zeros(2, 6, device=DEVICE)
    vectors = [torch.rand(6, device=DEVICE) + 0.5 for _ in range(5)]
    with pytest.raises(RuntimeError, match="kx has elements that share one memory"):
        torch.ops.densenet_fast.add_stats_coefficients(expanded(kx), k0, *vectors, 10)
    assert gemm_launches == [] and launches == []
    assert not grad_buffer.any() and not kx.any() and not k0.any()


def test_tiny_model_matches_naive_through_triton(ieee):
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
def test_tiny_model_under_autocast_matches_torchvision_through_triton(dtype, ieee):
    """Under autocast the Triton kernels compute in the autocast dtype (float32
    accumulation): logits, gradients (as close to float32's as torchvision's) and running
    statistics as torchvision's under the same autocast."""
    from tolerances import assert_as_accurate
    from torchvision.models import DenseNet as TorchvisionDenseNet

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
def test_gpu_layer_shapes(shape, dtype, ieee):
    _compare(shape, torch.channels_last, dtype, stats_grad=False)
    _compare(shape, torch.contiguous_format, dtype, stats_grad=True)


@on_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[1::2], ids=shape_id)
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
def test_gpu_float32_default_is_tf32_within_tf32_tolerance(shape, memory_format):
    """torch's default for float32 convolutions on a GPU is TF32, and the kernels follow it:
    judged by TF32's tolerance against the float32 reference."""
    with float32_precision("tf32"):
        assert triton_impl._precision(torch.float32) == "tf32"
        case = op_case(shape, torch.float32, memory_format, device=DEVICE)
        got = run_kernels(ACTIVE_KERNELS, case, stats_grad=False)
    with float32_precision("ieee"):
        want = run_kernels(TORCH_KERNELS, case, stats_grad=False)
    for g, w, what in zip(got, want, OpResult._fields, strict=True):
        assert_close(g, w, "tf32", what)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_densenet121_matches_torchvision(dtype, ieee):
    """The logits elementwise; the gradients as close to a more exact reference (relative
    L2) as torchvision's (``assert_as_accurate``). float32: each parameter's gradient against
    float64's; elementwise bars do not fit it at this depth and size (the first GPU run: the
    stem convolution's gradient 3e-3 of its largest element off torchvision's, both
    summing 32768 pixels of a gradient that crossed 120 layers of ReLU masks). bf16
    autocast: all gradients at once against float32's."""
    from tolerances import assert_as_accurate
    from torchvision.models import densenet121

    ref = densenet121(num_classes=10).to(DEVICE)
    start = copy.deepcopy(ref.state_dict())
    fast = densenet_fast.convert(copy.deepcopy(ref))  # convert shares; compare two models
    x = torch.randn(8, 3, 128, 128, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=DEVICE)

    def step(model, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        return out.float(), {n: p.grad for n, p in model.named_parameters()}

    low = dtype != torch.float32
    fast_out, fast_grads = step(fast, low)
    ref_out, ref_grads = step(ref, low)
    assert_close(fast_out, ref_out, dtype, "logits")
    assert_models_match(fast, ref, dtype, params=False)
    if not low:
        exact_model = densenet121(num_classes=10).to(DEVICE, torch.float64)
        exact_model.load_state_dict(start)
        exact_model = exact_model.to(memory_format=torch.channels_last)
        exact_model.zero_grad(set_to_none=True)
        F.cross_entropy(exact_model(x.double()), y).backward()
        for name, p in exact_model.named_parameters():
            assert_as_accurate(fast_grads[name], ref_grads[name], p.grad, dtype, name)
        return
    ref.load_state_dict(start)
    _, exact = step(ref, False)
    flat = lambda grads: torch.cat([grads[n].flatten().float() for n in exact])  # noqa: E731
    assert_as_accurate(flat(fast_grads), flat(ref_grads), flat(exact), dtype, "gradients")


@pytest.fixture
def two_configs_untimed(monkeypatch):
    """The input-gradient kernel chooses between a 32-row and a 128-row config, the first
    timed fastest, with no disk cache: what a GPU process does on a class's first call."""
    tuner = triton_impl._input_grad
    configs = [triton_impl.GEMM_CONFIGS[0], triton_impl.GEMM_CONFIGS[-1]]
    monkeypatch.setenv(triton_tuning.TUNING_ENV, "on")  # gpu_check's parity stage turns it off
    monkeypatch.setattr(tuner, "configs", configs)
    timed = []

    def first_is_fastest(run, device):
        run()
        timed.append(run)
        return float(len(timed))

    monkeypatch.setattr(tuner, "timer", first_is_fastest)
    monkeypatch.setattr(triton_tuning.DISK, "get", lambda key: None)
    monkeypatch.setattr(triton_tuning.DISK, "put", lambda key, value: None)
    tuner.forget()
    yield tuner, configs
    tuner.forget()


def test_concurrent_backwards_sum_the_rows_their_own_launch_filled(two_configs_untimed,
                                                                  monkeypatch, ieee):
    """Multi-threaded autograd runs backwards in threads at once, and another thread's
    tuning can change a class's chosen config while a kernel runs. Each launch must sum the
    partial-sum rows of the config it ran (a 32-row config fills four times the rows of a
    128-row one), not read the shared choice after launching: here every launch flips it."""
    tuner, configs = two_configs_untimed
    kernel = tuner.kernel

    class FlipsTheChoiceWhileRunning:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel[grid](*args, **kwargs)
                for key, config in list(tuner._chosen.items()):
                    tuner._chosen[key] = configs[1 - configs.index(config)]
            return launch

    monkeypatch.setattr(tuner, "kernel", FlipsTheChoiceWhileRunning())
    case = op_case(SHAPES[2], torch.float32, batch_stats=True, device=DEVICE)
    want = run_kernels(TORCH_KERNELS, case, True)
    failures = []

    def backward_passes():
        for _ in range(3):
            try:
                got = run_kernels(ACTIVE_KERNELS, case, True)
                for g, w, what in zip(got, want, OpResult._fields, strict=True):
                    assert_close(g, w, torch.float32, what)
            except Exception as exc:  # noqa: BLE001 (a thread's error must fail the test)
                failures.append(exc)

    threads = [threading.Thread(target=backward_passes) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_tuning_trials_leave_the_gradient_buffer_alone(two_configs_untimed, ieee):
    """On a class's first call the input-gradient kernel's configs are tried on scratch
    buffers (no copy of the gradient buffer is made or timed); the gradient buffer receives
    the one launch of the chosen config."""
    case = op_case(SHAPES[2], torch.float32, batch_stats=True, device=DEVICE)
    before = triton_tuning.tuning_stats()["trials"]
    tuned = run_kernels(ACTIVE_KERNELS, case, stats_grad=False)
    assert triton_tuning.tuning_stats()["trials"] - before == 2
    with triton_impl.forced_config(triton_impl.GEMM_CONFIGS[0]):
        single = run_kernels(ACTIVE_KERNELS, case, stats_grad=False)
    for a, b, what in zip(tuned, single, OpResult._fields, strict=True):
        assert torch.equal(a, b), what


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def test_deterministic_mode_pins_the_config_and_the_split(deterministic, monkeypatch, ieee):
    """No timing decides a config, and the split does not follow the device's SM count:
    the summation order is the shape's alone, in every process and on every device."""

    def no_timing(run, device):
        raise AssertionError("deterministic mode timed a config")

    for tuner in triton_impl.TUNERS:
        monkeypatch.setattr(tuner, "timer", no_timing)
        monkeypatch.setattr(tuner, "configs", triton_impl.GEMM_CONFIGS)  # several to choose
        assert tuner.choose(("float32", 0, 64, 64, 64), torch.device(DEVICE),
                            lambda config: None) is tuner.pinned

    class Properties:
        def __init__(self, sms):
            self.multi_processor_count = sms

    # The fake device properties only while the split is chosen: on a GPU, Triton's launch
    # reads the real ones (the first GPU run failed here when they stayed patched).
    splits = set()
    with monkeypatch.context() as patched:
        patched.setattr(triton_impl, "INTERPRETED", False)
        for sms in (46, 132, 170):
            patched.setattr(torch.cuda, "get_device_properties",
                            lambda d, s=sms: Properties(s))
            splits.add(triton_impl._num_splits(4, 10**6, torch.device("cuda", 0)))
    assert len(splits) == 1

    case = op_case(SHAPES[3], torch.float32, torch.contiguous_format, batch_stats=True,
                   device=DEVICE)
    first, second = (run_kernels(ACTIVE_KERNELS, case, True) for _ in range(2))
    for a, b, what in zip(first, second, OpResult._fields, strict=True):
        assert torch.equal(a, b), what
    assert_op_matches(case, True, "torch-float32")
