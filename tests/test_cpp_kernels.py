"""The compiled CPU kernels against the pure-PyTorch kernels, entry point by entry point."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import (
    ACTIVE_KERNELS,
    FORMAT_IDS,
    FORMATS,
    STATS_GRAD_IDS,
    OpResult,
    assert_nan_propagates_as_in_torch,
    assert_op_matches,
    op_case,
    run_kernels,
    shape_id,
)
from tolerances import assert_close

import densenet_fast

ROOT = Path(__file__).resolve().parent.parent
cpp_active = densenet_fast.backend_info()["active"].get("cpu") == "cpp"
needs_cpp = pytest.mark.skipif(
    not cpp_active,
    reason="C++ backend not active here (test_backends.py fails where it should be)")

# (N, C_total, C, C_out, H, W): odd widths; 1x1 and odd planes; several pixel tiles per
# image (64x112 with 40 channels: float32 tiles hold 3264 pixels, bfloat16 ones 6544).
SHAPES = [(3, 13, 11, 8, 5, 4), (2, 37, 37, 20, 1, 1), (2, 40, 33, 12, 7, 9),
          (2, 48, 40, 16, 64, 112)]
# Several channel chunks in the two-pass backward: 4 x 64 x 64 pixels x 300 channels exceeds
# the 4M-element store. float32 only, to keep the suite short.
CHUNKED = (4, 320, 300, 8, 64, 64)
# Small channel-major planes pack several whole images into one forward tile: 5x5 planes
# with 1030 channels fit 4 images in a float32 tile, so 10 images make tiles of 4, 4 and 2
# (bfloat16 tiles hold twice the elements: 9 and 1).
PACKED = (10, 1040, 1030, 20, 5, 5)
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# Tiles large enough for the kernels to measure their GEMM engines (1024 pixels x 128
# channels x 128 outputs, over kMeasuredMinMacs), with a shorter last tile per channel-major
# image (48x48 = 2 x 1024 + 256 in float32, 2048 + 256 in bfloat16/float16).
ONEDNN = (4, 136, 128, 128, 48, 48)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_cpp_matches_reference(shape, memory_format, dtype, stats_grad):
    assert_op_matches(op_case(shape, dtype, memory_format), stats_grad, "torch")


@needs_cpp
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
def test_cpp_matches_reference_across_channel_chunks(memory_format):
    assert_op_matches(op_case(CHUNKED, torch.float32, memory_format), True, "torch")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_matches_reference_with_images_packed_per_tile(dtype):
    assert_op_matches(op_case(PACKED, dtype), False, "torch")


# Channels-last tiles are cut by the thread count (equal tiles, as many as a multiple of it,
# none under 64 pixels), and shared out only where there are as many as threads: 392 pixels
# are one tile on one thread, 196 + 196 on two, 132 + 132 + 128 on three; 98 pixels stay one
# tile on the calling thread; 14336 pixels make six float32 tiles on two or three threads,
# and four or three bfloat16 ones (of up to 6544 pixels).
THREAD_SHAPES = [(2, 72, 64, 40, 14, 14), (2, 40, 33, 24, 7, 7), (2, 48, 40, 16, 64, 112)]


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op thread count for one test, then restores it."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_cpp_matches_reference_on_any_thread_count(threads, shape, dtype, stats_grad,
                                                  torch_threads):
    # The suite's workers run one thread each (conftest.py): the tiles shared among threads,
    # with a weight-gradient partial per thread, only run here.
    torch_threads(threads)
    assert_op_matches(op_case(shape, dtype, torch.channels_last), stats_grad, "torch")


# Channel-major tiles, shared where each thread gets two or more, go out in ATen's chunks of
# ceil(items / threads): 9 tiles (3 images of a 24x24 plane in float32 tiles of 256 pixels,
# 512 channels wide) on 4 threads leave the fourth none, whose weight-gradient partial no
# tile writes (left unzeroed, here filled with 7, it failed this test).
IDLE_THREAD_SHAPE = (3, 520, 512, 40, 24, 24)


@needs_cpp
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_cpp_matches_reference_with_a_thread_that_takes_no_tile(stats_grad, torch_threads):
    torch_threads(4)
    assert_op_matches(op_case(IDLE_THREAD_SHAPE, torch.float32), stats_grad, "torch")


@pytest.fixture
def gemm_engine():
    """Sets the kernels' GEMM engine policy for one test, then restores it."""
    from densenet_fast.backends import cpu_gemm_engine

    previous = cpu_gemm_engine()["policy"]
    yield cpu_gemm_engine
    cpu_gemm_engine(previous)


@needs_cpp
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("policy", ["measure", "blas", "onednn", "lowp", "mkldnn-disabled"])
def test_cpp_matches_reference_with_each_gemm_engine(memory_format, dtype, policy, gemm_engine,
                                                    monkeypatch):
    # Forced, every GEMM of the forward and of the input gradient takes that engine where it
    # applies (oneDNN: the strided grad_out of a short tile too; lowp: bfloat16/float16
    # operands, else float32 BLAS), and the weight gradient's too but oneDNN (lowp: the
    # tiles then built in the data's dtype); measured, the large ones run with each; with
    # oneDNN disabled in torch.backends.mkldnn, none runs through it.
    if policy == "mkldnn-disabled":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        policy = "onednn"
    gemm_engine(policy)
    assert_op_matches(op_case(ONEDNN, dtype, memory_format), True, "torch")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", ["blas", "onednn", "lowp"])
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_backward_tiles_of_several_whole_images(dtype, policy, stats_grad, gemm_engine):
    # 3x5 planes of 40 channels: the backward's channel-major tiles hold all 7 images side by
    # side (grad_out gathered, each channel's runs masked and reduced image by image), with
    # each engine (lowp: grad_out converted back from the gathered tile).
    gemm_engine(policy)
    assert_op_matches(op_case((7, 40, 33, 24, 3, 5), dtype), stats_grad, "torch")


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_input_gradient_kept_in_the_data_dtype(shape, dtype, gemm_engine):
    # The low-precision engine forced, channels-last, no statistics term (the block's case):
    # the input gradient's GEMM result stays in the data's dtype through the ReLU mask, the
    # sums and the added dx (mask_reduce_add_row) wherever the AMX micro-kernel does not take
    # the tile (everywhere on a CPU without AMX); a NaN reaches what torch's ops send it to.
    gemm_engine("lowp")
    case = op_case(shape, dtype, torch.channels_last)
    assert_op_matches(case, False, "torch")
    assert_nan_propagates_as_in_torch(case)


# bfloat16 channels-last tiles through the AMX micro-kernel (csrc/amx_gemm.h), beside operands
# it does not take: C_out 40 (not a multiple of 16: the forward keeps at::mm) with tiles that
# are not a multiple of the transpose's 32-row blocks (2090 pixels: 1046 and 1044 on two
# threads, one tile on one); C_out 48 with an odd tile (2115 pixels: 1058 and 1057, or one;
# that tile's weight gradient keeps at::mm); 80 channels in two chunks of the two-pass
# backward (64 and 16: each packs its own part of the weight).
AMX_SHAPES = [(2, 72, 64, 40, 55, 19), (1, 72, 64, 48, 47, 45), (4, 96, 80, 32, 128, 128)]


@needs_cpp
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=shape_id)
@pytest.mark.parametrize("stats_grad", [True, False], ids=STATS_GRAD_IDS)
def test_bfloat16_channels_last_tiles_through_the_amx_micro_kernel(shape, stats_grad,
                                                                   gemm_engine):
    gemm_engine("lowp")
    case = op_case(shape, torch.bfloat16, torch.channels_last, batch_stats=stats_grad)
    assert_op_matches(case, stats_grad, "torch")
    assert_nan_propagates_as_in_torch(case)


@needs_cpp
def test_amx_micro_kernel_serves_where_the_cpu_has_amx(gemm_engine, monkeypatch):
    # Every GEMM of an op whose operands fit runs through the micro-kernel on a CPU with AMX
    # (no at::mm call), and through at::mm without it, or with oneDNN disabled.
    case = op_case(ONEDNN, torch.bfloat16, torch.channels_last)
    gemm_engine("lowp")

    def mm_calls():
        with torch.profiler.profile() as prof:
            run_kernels(ACTIVE_KERNELS, case, True)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    has_amx = torch.cpu._is_amx_tile_supported()
    assert gemm_engine()["amx"] == has_amx
    assert (mm_calls() == 0) == has_amx
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not gemm_engine()["amx"]
    assert mm_calls() > 0


# A layer of 18 pixels (densenet121's last block at batch 2, 96x96 images): GEMMs too small
# to be measured.
SMALL_AMX = (2, 72, 64, 32, 3, 3)


@needs_cpp
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
def test_small_bfloat16_gemms_take_the_amx_micro_kernel_unmeasured(memory_format, gemm_engine):
    # Measuring policy, GEMMs below the measured size: bfloat16 channels-last tiles on a CPU
    # with AMX run through the micro-kernel (no at::mm call), the others through float32
    # BLAS (at::mm); nothing is measured. The results match the oracle either way.
    gemm_engine("measure")
    case = op_case(SMALL_AMX, torch.bfloat16, memory_format)
    measured = len(gemm_engine()["measured"])
    with torch.profiler.profile() as prof:
        run_kernels(ACTIVE_KERNELS, case, True)
    mm_calls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    amx_serves = gemm_engine()["amx"] and memory_format == torch.channels_last
    assert (mm_calls == 0) == amx_serves, mm_calls
    assert len(gemm_engine()["measured"]) == measured
    assert_op_matches(case, True, "torch")


@needs_cpp
def test_gemm_engine_policy_is_checked_and_reports_measured_choices(gemm_engine):
    with pytest.raises(ValueError, match="policy must be 'measure', 'blas', 'onednn' or 'lowp'"):
        gemm_engine("mkl")
    gemm_engine("measure")
    for dtype in (torch.float32, torch.bfloat16):
        assert_op_matches(op_case(ONEDNN, dtype), False, "torch")
    measured = gemm_engine()["measured"]
    assert any(line.startswith("Float, ") and line.endswith((": blas", ": onednn"))
               for line in measured), measured
    assert any(line.startswith("BFloat16, ") and line.endswith((": blas", ": onednn", ": lowp"))
               for line in measured), measured


def _assert_same_bits(got: OpResult, want: OpResult) -> None:
    for name, a, b in zip(OpResult._fields, got, want, strict=True):
        assert torch.equal(a, b), name


@needs_cpp
@pytest.mark.parametrize("memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("policy", ["measure", "blas", "onednn"])
def test_float32_gemms_follow_the_convolution_precision_not_the_matmul_one(memory_format,
                                                                           policy,
                                                                           gemm_engine):
    # torch.set_float32_matmul_precision("medium") lets ATen's float32 GEMMs run in bfloat16
    # on a CPU with bfloat16 instructions; torchvision's convolutions, the same 1x1 products,
    # keep float32: so do the fused op's (4e-3 relative error in densenet121's eval features
    # before, on an Intel Xeon with AMX). The process's settings are as they were after it.
    mkldnn = torch.backends.mkldnn
    gemm_engine(policy)
    case = op_case(ONEDNN, torch.float32, memory_format, batch_stats=True)
    saved = mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision
    try:
        mkldnn.matmul.fp32_precision = "ieee"
        full = run_kernels(ACTIVE_KERNELS, case, True)
        mkldnn.matmul.fp32_precision = "bf16"
        lowered = run_kernels(ACTIVE_KERNELS, case, True)
        assert (mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision) == ("bf16", saved[1])
        # Convolutions let to compute in bfloat16, matmuls left to the default: the op runs
        # as the convolutions do, and "none" (not what it resolves to) is restored.
        mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision = "none", "bf16"
        run_kernels(ACTIVE_KERNELS, case, True)
        assert (mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision) == ("none", "bf16")
    finally:
        mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision = saved
    _assert_same_bits(lowered, full)


@needs_cpp
def test_float32_gemms_keep_the_convolution_precision_with_ops_on_several_threads(gemm_engine):
    # Ops of several threads at once: each runs under the convolution's precision until the
    # last one ends, and the matmul setting found before the first is what is left after.
    import threading

    mkldnn = torch.backends.mkldnn
    gemm_engine("blas")
    case = op_case(ONEDNN, torch.float32, batch_stats=True)
    saved = mkldnn.matmul.fp32_precision
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(run_kernels(ACTIVE_KERNELS, case, True))
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    try:
        mkldnn.matmul.fp32_precision = "ieee"
        full = run_kernels(ACTIVE_KERNELS, case, True)
        mkldnn.matmul.fp32_precision = "bf16"
        threads = [threading.Thread(target=work) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert mkldnn.matmul.fp32_precision == "bf16"
    finally:
        mkldnn.matmul.fp32_precision = saved
    assert not errors, errors
    assert len(results) == 9
    for result in results:
        _assert_same_bits(result, full)


@needs_cpp
def test_cpp_accepts_other_layouts_of_its_arguments():
    shape = (2, 9, 7, 5, 6, 5)
    # A buffer in neither layout: copied by the kernel.
    assert_op_matches(op_case(shape, torch.float32, strided=True), True, "torch")
    # Gradients in another layout than the buffer.
    case = op_case(shape, torch.float32, grad_out_format=torch.channels_last,
                   grad_buffer_format=torch.channels_last)
    assert_op_matches(case, True, "torch")


@needs_cpp
def test_batch_of_one_in_eval_through_the_cpp_kernels():
    model = densenet_fast.DenseNet(growth_rate=6, block_config=(3, 2), num_init_features=10,
                                   num_classes=4).eval()
    reference = densenet_fast.NaiveDenseNet(growth_rate=6, block_config=(3, 2),
                                            num_init_features=10, num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        assert_close(model(x), reference(x), torch.float32, "batch 1 eval")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="needs a compiler driver to replace with a failing one")
def test_install_without_a_working_compiler_still_installs(tmp_path):
    """A failed build leaves a package that imports and says why it has no C++ kernels."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "densenet_fast", tmp_path / "densenet_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_C_build_error.txt", "__pycache__"))
    env = dict(os.environ, CXX="/nonexistent/c++", CC="/nonexistent/cc")
    env.pop("DENSENET_FAST_BACKEND", None)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    error_file = tmp_path / "densenet_fast" / "_C_build_error.txt"
    assert error_file.exists() and "the build failed" in error_file.read_text()
    # An editable install of the repository maps densenet_fast.* to the checkout through a
    # meta-path finder; drop it so the copy in tmp_path is what imports.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if "
         "'__editable__' not in getattr(f, '__module__', '')]\n"
         "import densenet_fast as d; i = d.backend_info(); "
         "print(i['active']['cpu']); print(i['backends']['cpp']['reason'])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert probe.returncode == 0, probe.stderr
    active, reason = probe.stdout.splitlines()
    assert active == "torch" and reason.startswith("not built: the build failed")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_non_finite_values_stay_non_finite_in_low_precision(dtype):
    """The kernels round to bfloat16 with a branch-free bit trick; NaN and infinity in the
    buffer give NaN where the reference kernels give NaN, and nowhere else."""
    case = op_case((2, 9, 7, 5, 4, 3), dtype)
    buffer = case.args[0]
    buffer[0, 1, 2, 1] = float("nan")
    buffer[1, 3, 0, 0] = float("inf")
    out = torch.ops.densenet_fast.bn_relu_conv1x1(*case.args)
    with densenet_fast.ops.reference_kernels():
        expected = densenet_fast.ops.bn_relu_conv1x1(*case.args)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.equal(out.isinf(), expected.isinf())
