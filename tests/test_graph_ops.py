"""The block's and the stem's ops, checked with ``torch.library.opcheck``: schema (nothing
mutated that is not declared), fake implementations that give the real outputs' shapes,
dtypes and strides (inductor lays out what follows from them), and AOT dispatch. Layouts
and modes the model produces: NCHW and channels-last, training and eval, each tail."""

import dataclasses

import pytest
import torch
from helpers import block_case, norm_state_case
from tolerances import assert_close

from densenet_fast import graph
from densenet_fast.block import BlockForward, BlockSaved
from densenet_fast.spec import BatchNormSpec, StemSpec, Tail, from_op_arguments, op_arguments

# opcheck's utilities without test_autograd_registration: the ops are called from autograd
# Functions (densenet_fast.graph), never with gradients recorded through them.
CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _layout(x, channels_last):
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _detached(tensors):
    return [t.detach() for t in tensors]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tail", [Tail.NONE, Tail.TRANSITION, Tail.NORM], ids=lambda t: t.value)
def test_block_ops(tail, training, channels_last):
    spec, params = block_case(c0=3, k=2, layers=2, tail=tail, training=training,
                              dtype=torch.float32)
    params = _detached(params)
    x = _layout(torch.randn(2, 3, 4, 6), channels_last)
    # Everything trainable, a frozen input, the first layer frozen too, only the tail.
    for backward_from, input_grad in ((0, True), (0, False), (1, False), (2, False)):
        running, args = op_arguments(dataclasses.replace(spec, backward_from=backward_from))
        forward_args = (x, params, running, *args)
        torch.library.opcheck(graph.dense_block_forward, forward_args, test_utils=CHECKS)

        out, *saved = graph.dense_block_forward(*forward_args)
        grad_out = _layout(torch.randn_like(out), channels_last)
        torch.library.opcheck(graph.dense_block_backward,
                              (grad_out, saved, params, running, *args, input_grad),
                              test_utils=CHECKS)


def test_block_forward_keeps_what_eager_keeps():
    # Recompute mode saves no bottleneck, and dropout masks only where a layer drops; layers
    # below backward_from (frozen, as is the input) keep neither.
    for recompute, backward_from in ((False, 0), (True, 0), (False, 2), (True, 3)):
        spec, params = block_case(c0=3, k=2, layers=3, drop=0.5, dtype=torch.float32)
        spec = dataclasses.replace(spec, recompute_bottleneck=recompute,
                                   backward_from=backward_from)
        running, args = op_arguments(spec)
        _, *saved = graph.dense_block_forward(torch.randn(2, 3, 4, 4), _detached(params),
                                              running, *args)
        fwd = BlockForward(torch.randn(2, 3, 4, 4), spec, _detached(params), keep=True)
        fwd.run()
        expected = BlockSaved.of(fwd, None).tensors()
        assert [t.shape for t in saved] == [t.shape for t in expected]
        kept_layers = 3 - backward_from
        # No count: unsynchronised, backward reads it off the buffer's shape.
        assert len(saved) == 1 + (0 if recompute else kept_layers) + 2 * 3 + kept_layers + 2


def _stem_case(training, recompute, dtype=torch.float32):
    spec = StemSpec(norm=norm_state_case(5, training, torch.float32), conv_stride=(2, 2),
                    conv_padding=(3, 3), conv_dilation=(1, 1), conv_groups=1,
                    pool_kernel=(3, 3), pool_stride=(2, 2), pool_padding=(1, 1),
                    pool_dilation=(1, 1), pool_ceil_mode=False, recompute_bottleneck=recompute)
    params = [(torch.randn(5, 3, 7, 7) / 10).to(dtype), torch.rand(5) + 0.5, torch.randn(5)]
    return spec, params


# bfloat16: on the CPU conv0 then runs on a channels-last copy of NCHW data
# (ops/conv_layout.py), so the kept conv0 output is channels-last, in the fake kernel too.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-conv", "recompute-conv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stem_ops(training, recompute, channels_last, dtype):
    spec, params = _stem_case(training, recompute, dtype)
    x = _layout(torch.randn(2, 3, 16, 12).to(dtype), channels_last)
    running, args = op_arguments(spec)
    forward_args = (x, params, running, *args)
    torch.library.opcheck(graph.stem_forward, forward_args, test_utils=CHECKS)

    out, *saved = graph.stem_forward(*forward_args)
    # conv0's output unless recomputed, the batch mean and variance in training (no count:
    # unsynchronised, backward reads it off conv0's output).
    assert len(saved) == (0 if recompute else 1) + (2 if training else 0)
    grad_out = _layout(torch.randn_like(out), channels_last)
    for input_grad in (False, True):
        torch.library.opcheck(graph.stem_backward,
                              (grad_out, x, saved, params, running, *args, input_grad),
                              test_utils=CHECKS)


@pytest.mark.parametrize("case", ["block", "stem"])
def test_a_spec_crosses_the_op_boundary_unchanged(case):
    """Encoding a spec into op arguments and decoding them gives the spec back, but for what
    stays with the caller (running statistics to update)."""
    if case == "block":
        spec, _ = block_case(c0=3, k=2, layers=3, tail=Tail.TRANSITION, drop=0.25,
                             dtype=torch.float32)
        spec = dataclasses.replace(spec, recompute_bottleneck=True, backward_from=1)
    else:
        spec, _ = _stem_case(training=False, recompute=True)
    running, settings = op_arguments(spec)
    decoded = from_op_arguments(type(spec), running, settings)
    assert decoded == _without_running_updates(spec)
    assert op_arguments(decoded)[1] == settings


def test_batch_norm_specs_compare_their_buffers_by_identity():
    """Two specs of one BN are equal (their buffers are the same objects); specs of two BNs
    whose buffers hold the same values are not, nor are specs that differ in a setting. No
    comparison evaluates a tensor's truth value, which raised on Python 3.13 for specs of the
    same BN, and on every version for two BNs' specs."""
    first, twin = torch.nn.BatchNorm2d(3).eval(), torch.nn.BatchNorm2d(3).eval()
    spec = BatchNormSpec.of(first)
    assert spec == BatchNormSpec.of(first) and hash(spec) == hash(BatchNormSpec.of(first))
    assert spec != BatchNormSpec.of(twin)
    assert spec != dataclasses.replace(spec, eps=1e-3)
    assert spec != dataclasses.replace(spec, running_mean=None)
    assert spec != "not a spec"
    assert len({spec, BatchNormSpec.of(first), BatchNormSpec.of(twin)}) == 2


def _without_running_updates(spec):
    def strip(norm):
        return dataclasses.replace(norm, num_batches_tracked=None, momentum=None,
                                   update_running_stats=False, **(
                                       {"running_mean": None, "running_var": None}
                                       if norm.batch_stats else {}))
    return spec.with_norms([strip(norm) for norm in spec.norms()])


# The count of values per channel: this batch's, or (synchronised) every rank's, which the
# forward op returned as a CPU scalar and which takes precedence.
@pytest.mark.parametrize("count, merged_count", [(8, None), (3, torch.tensor(8))],
                         ids=["local", "merged"])
def test_update_running_stats_op_declares_its_mutations(count, merged_count):
    # Two BNs share a momentum (one group of _foreach ops), one averages cumulatively.
    batch = ([torch.randn(3), torch.randn(2), torch.randn(4)],
             [torch.rand(3), torch.rand(2), torch.rand(4)])

    def op_args():
        means = [torch.zeros(3), torch.zeros(2), torch.full((4,), 2.0)]
        vars_ = [torch.ones(3), torch.ones(2), torch.ones(4)]
        tracked = [torch.tensor(0), torch.tensor(4), torch.tensor(7)]
        return means, vars_, tracked, *batch, [0.1, None, 0.1], count, merged_count

    torch.library.opcheck(torch.ops.densenet_fast.update_running_stats, op_args(),
                          test_utils=CHECKS)
    means, vars_, tracked, *_ = fresh = op_args()
    versions = [t._version for t in (*means, *vars_, *tracked)]
    torch.ops.densenet_fast.update_running_stats(*fresh)
    # Modified in place as far as autograd knows, whichever kernel ran (the CPU's is C++).
    assert all(t._version > v for t, v in zip((*means, *vars_, *tracked), versions,
                                              strict=True))
    torch.testing.assert_close(means[0], 0.1 * batch[0][0])
    torch.testing.assert_close(means[1], batch[0][1] / 5)  # momentum None: 1 / batches
    torch.testing.assert_close(means[2], 0.9 * 2.0 + 0.1 * batch[0][2])
    torch.testing.assert_close(vars_[0], 0.9 + 0.1 * batch[1][0] * 8 / 7)
    torch.testing.assert_close(vars_[2], 0.9 + 0.1 * batch[1][2] * 8 / 7)
    assert [int(t) for t in tracked] == [1, 5, 8]


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone: enough for a synchronised op to run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["block", "stem"])
def test_only_synchronised_forward_ops_return_a_count(case, one_rank_group):
    """Synchronised, the forward ops return the values per channel over every rank as a CPU
    scalar, and their fakes give it too (opcheck compares them); unsynchronised they return
    none (a CPU tensor among the outputs would keep a CUDA graph from capturing them), and
    backward reads the count off a shape."""
    from densenet_fast.sync import StatsSync

    if case == "block":
        spec, params = block_case(c0=3, k=2, layers=2, tail=Tail.TRANSITION,
                                  dtype=torch.float32)
        params, x, values = _detached(params), torch.randn(2, 3, 4, 6), 2 * 4 * 6
        forward, backward = graph.dense_block_forward, graph.dense_block_backward
    else:
        spec, params = _stem_case(training=True, recompute=True)
        x, values = torch.randn(2, 3, 16, 12), 2 * 8 * 6  # conv0's output plane
        forward, backward = graph.stem_forward, graph.stem_backward
    counts, grads = [], []
    for sync in (None, StatsSync(None)):
        running, args = op_arguments(dataclasses.replace(spec, sync=sync))
        torch.library.opcheck(forward, (x, params, running, *args), test_utils=CHECKS)
        out, *saved = forward(x, params, running, *args)
        counts.append([t for t in saved if t.dtype == torch.int64])
        inputs = (x,) if case == "stem" else ()
        backward_args = (torch.ones_like(out), *inputs, saved, params, running, *args, True)
        torch.library.opcheck(backward, backward_args, test_utils=CHECKS)
        grads.append(backward(*backward_args))
    assert counts[0] == []
    (count,) = counts[1]
    assert count.device.type == "cpu" and count.dim() == 0 and int(count) == values
    # One rank: the synchronised gradients are the unsynchronised ones.
    for local, merged in zip(*grads, strict=True):
        torch.testing.assert_close(merged, local)


@pytest.mark.parametrize("running_dtype, batch_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32)], ids=str)
def test_running_stats_kernels_agree(running_dtype, batch_dtype):
    """The op's kernel on the CPU (C++ where built) against the reference's ``_foreach``
    operations, for the running-statistics dtypes a model can hold (``model.double()``,
    ``.bfloat16()``, ``.half()``), over three steps with a momentum and a cumulative one."""
    generator = torch.Generator().manual_seed(0)

    def state():
        return ([torch.zeros(5, dtype=running_dtype), torch.full((3,), 0.5, dtype=running_dtype)],
                [torch.ones(5, dtype=running_dtype), torch.ones(3, dtype=running_dtype)],
                [torch.tensor(0), torch.tensor(2)])

    kernel, reference = state(), state()
    for _ in range(3):
        batch = ([torch.randn(5, dtype=batch_dtype, generator=generator),
                  torch.randn(3, dtype=batch_dtype, generator=generator)],
                 [torch.rand(5, dtype=batch_dtype, generator=generator),
                  torch.rand(3, dtype=batch_dtype, generator=generator)])
        torch.ops.densenet_fast.update_running_stats(*kernel, *batch, [0.1, None], 12, None)
        graph._update_running_stats_kernel(*reference, *batch, [0.1, None], 12, None)
    # Not bitwise: ATen's vectorised add fuses the multiply-add where the C++ loop rounds the
    # product; the counters exactly.
    for what, got, want in zip(("running_mean", "running_var", "num_batches_tracked"), kernel,
                               reference, strict=True):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            if g.is_floating_point():
                assert_close(g, w, what=what)
            else:
                assert torch.equal(g, w), what


@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
@pytest.mark.parametrize("count, merged_count", [(1, None), (0, None), (5, torch.tensor(1))],
                         ids=["one-value", "no-value", "one-value-over-the-ranks"])
def test_update_running_stats_refuses_fewer_than_two_values(kernel, count, merged_count):
    """Bessel's correction divides by ``count - 1``: with one value per channel the C++
    kernel wrote inf into ``running_var``, silently. ``nn.BatchNorm2d`` refuses such a batch
    in training, and so does the model before any op runs; this is the op's own contract."""
    running = ([torch.zeros(3)], [torch.ones(3)], [torch.tensor(0)])
    batch = ([torch.randn(3)], [torch.rand(3)])
    run = (torch.ops.densenet_fast.update_running_stats if kernel == "dispatcher"
           else graph._update_running_stats_kernel)
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        run(*running, *batch, [0.1], count, merged_count)
    assert torch.equal(running[0][0], torch.zeros(3)) and torch.equal(running[1][0], torch.ones(3))
    assert int(running[2][0]) == 0
