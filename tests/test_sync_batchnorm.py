"""Synchronised BatchNorm across two gloo processes on CPU, where ``nn.SyncBatchNorm``
itself refuses to run: each rank's results must equal one process's on the global batch."""

import os
import tempfile
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from helpers import FusedOpCounter
from tolerances import assert_close

from densenet_fast import DenseNet
from densenet_fast.sync import record_collectives

CONFIG = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
              num_classes=5)
CASES = {
    # name: (images per rank, image size)
    "uneven-shards": ((3, 2), 32),  # the last batch of an epoch
    # One image per rank and 1x1 planes in the last block: one value per channel on each
    # rank, two over both, which the plan check asks the ranks for before anything runs.
    "one-image-per-rank": ((1, 1), 8),
}
DTYPE = torch.float64


def _model(**options):
    torch.manual_seed(0)
    return DenseNet(**CONFIG, **options).to(DTYPE)


def _models(kind, recompute):
    """``(reference, synchronised)``: the fused model of one process, and its twin with
    synchronised BatchNorms (``nn.SyncBatchNorm``; for timm's DenseNet of the same
    configuration, timm's ``SyncBatchNormAct``), the same weights."""
    if kind == "torchvision":
        return (_model(recompute_bottleneck=recompute),
                nn.SyncBatchNorm.convert_sync_batchnorm(_model(recompute_bottleneck=recompute)))
    import timm

    from densenet_fast import convert

    def timm_model():
        torch.manual_seed(0)
        assert CONFIG["num_init_features"] == 2 * CONFIG["growth_rate"]  # timm ties them
        return timm.models.densenet.DenseNet(
            growth_rate=CONFIG["growth_rate"], block_config=CONFIG["block_config"],
            bn_size=CONFIG["bn_size"], num_classes=CONFIG["num_classes"]).to(DTYPE)

    return (convert(timm_model(), recompute_bottleneck=recompute),
            convert(timm.layers.convert_sync_batchnorm(timm_model()),
                    recompute_bottleneck=recompute))


def _batch(shards, size):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(shards), 3, size, size, dtype=DTYPE, generator=generator)
    return x, torch.randint(0, 5, (sum(shards),), generator=generator)


def _step(model, x, y, total):
    """Forward and backward of this process's share of the global mean loss."""
    x = x.clone().requires_grad_()
    logits = model(x)
    (F.cross_entropy(logits, y, reduction="sum") / total).backward()
    return logits.detach(), x.grad


def expected_collectives(config=CONFIG, one_pixel_planes=False) -> list[tuple[str, int]]:
    """``(kind, elements)`` of every collective of one synchronised training step, in order:
    forward, per block, the input's statistics (2 C0 + 1), then per layer the bottleneck's
    (2 * bn_size * k + 1) and the new channels' (2 k + 1); backward, per layer in reverse,
    the new channels' coefficients (2 k) and norm2's sums (2 * bn_size * k), then the
    block input's coefficients (2 C0). The stem's norm0 takes one of each kind. With planes
    of one pixel, the plan check first sums the ranks' batch sizes."""
    k, width, channels = config["growth_rate"], config["bn_size"] * config["growth_rate"], \
        config["num_init_features"]
    forward, backward = [("all_gather", 2 * channels + 1)], [("all_reduce", 2 * channels)]
    for i, layers in enumerate(config["block_config"]):
        forward.append(("all_gather", 2 * channels + 1))
        block_backward = []
        for _ in range(layers):
            forward += [("all_gather", 2 * width + 1), ("all_gather", 2 * k + 1)]
            block_backward = [("all_reduce", 2 * k), ("all_reduce", 2 * width)] + block_backward
        block_backward.append(("all_reduce", 2 * channels))
        backward = block_backward + backward
        channels += layers * k
        if i != len(config["block_config"]) - 1:
            channels //= 2
    return [("all_reduce", 1)] * one_pixel_planes + forward + backward


def _in_process_group(rank, world, init_file, failures, worker, *args):
    """Run ``worker(rank, *args)`` in a gloo group of ``world`` processes; a failure is
    reported to the parent through ``failures``, with the rank."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        worker(rank, *args)
    except BaseException as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(worker, *args, world=2):
    """``worker(rank, *args)`` on each of ``world`` spawned processes; fails the test with
    every rank's message if one fails."""
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_in_process_group,
                     args=(world, os.path.join(tmp, "init"), failures, worker, *args),
                     nprocs=world)
        except Exception:
            messages = []
            while not failures.empty():
                messages.append(failures.get())
            pytest.fail("\n".join(messages) or "a worker failed")


def _assert_rank_matches(what, model, reference, results):
    """``results``, ``(name, this rank's tensor, the reference's for this shard)``, then the
    parameter gradients summed over the ranks and the buffers against the reference's on
    the global batch."""
    for name, got, want in results:
        assert_close(got, want, DTYPE, f"{what} {name}")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        assert_close(grad, ref_params[name].grad, DTYPE, f"{what} summed grad {name}")
    ref_buffers = dict(reference.named_buffers())
    for name, b in model.named_buffers():
        assert_close(b, ref_buffers[name], DTYPE, f"{what} buffer {name}")


def _shard(shards, rank) -> slice:
    start = sum(shards[:rank])
    return slice(start, start + shards[rank])


def _worker(rank, case, recompute, kind):
    shards, size = CASES[case]
    x, y = _batch(shards, size)
    reference, model = _models(kind, recompute)
    assert isinstance(model.features.denseblock2.denselayer3.norm2, nn.SyncBatchNorm)
    ref_logits, ref_dx = _step(reference, x, y, x.shape[0])
    shard = _shard(shards, rank)
    with record_collectives() as collectives, FusedOpCounter() as ops:
        logits, dx = _step(model, x[shard], y[shard], x.shape[0])
    expected = expected_collectives(one_pixel_planes=size == 8)
    assert [(kind, n) for kind, n, _ in collectives] == expected, collectives
    layers = sum(CONFIG["block_config"])
    # Every layer's norm1-conv1 and the transition, plus each bottleneck recomputed.
    assert ops.calls == layers + 1 + (layers if recompute else 0), ops.calls
    report = model.features.fusion_report()
    assert report["features.stem"] == "fused"
    assert all(v.startswith("fused") for v in report.values()), report
    _assert_rank_matches(f"rank {rank}", model, reference,
                         [("logits", logits, ref_logits[shard]),
                          ("input gradient", dx, ref_dx[shard])])


@pytest.mark.parametrize(("case", "recompute", "kind"), [
    (case, recompute, "torchvision") for case in CASES for recompute in (False, True)
] + [("uneven-shards", False, "timm")])
def test_two_processes_match_one_process_on_the_global_batch(case, recompute, kind):
    _spawn(_worker, case, recompute, kind)


def _compiled_worker(rank):
    shards, size = CASES["uneven-shards"]
    x, y = _batch(shards, size)
    reference, model = _models("torchvision", False)
    compiled = torch.compile(model, fullgraph=True)
    shard = _shard(shards, rank)
    for step in range(2):  # the second step reuses the graph and folds the statistics again
        ref_logits, ref_dx = _step(reference, x, y, x.shape[0])
        with torch.compiler.set_stance("fail_on_recompile") if step else nullcontext():
            logits, dx = _step(compiled, x[shard], y[shard], x.shape[0])
        _assert_rank_matches(f"rank {rank}, compiled step {step + 1}", model, reference,
                             [("logits", logits, ref_logits[shard]),
                              ("input gradient", dx, ref_dx[shard])])
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


def test_compiled_synchronised_steps_match_one_process_on_the_global_batch():
    """``torch.compile(fullgraph=True)`` of a model with ``nn.SyncBatchNorm``: the blocks and
    the stem stay opaque ops whose kernels merge the statistics over the ranks, so two
    compiled steps on uneven shards give one process's results on the global batch."""
    _spawn(_compiled_worker)


def _penalised(model, x, y, total):
    """An R1-style penalty: the input gradient of this process's share of the global mean
    loss, taken with ``create_graph=True``, squared and added; the parameter gradients of
    the sum, and the input gradient."""
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y, reduction="sum") / total
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + dx.pow(2).sum()).backward(inputs=list(model.parameters()))
    return dx.detach()


def _penalty_worker(rank, recompute):
    shards, size = CASES["uneven-shards"]
    x, y = _batch(shards, size)
    reference, model = _models("torchvision", recompute)
    ref_dx = _penalised(reference, x, y, x.shape[0])
    shard = _shard(shards, rank)
    dx = _penalised(model, x[shard], y[shard], x.shape[0])
    _assert_rank_matches(f"rank {rank}, penalised", model, reference,
                         [("input gradient", dx, ref_dx[shard])])


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_gradient_penalty_over_two_processes_matches_one_process(recompute):
    """A penalty on the input gradient (``create_graph=True``) with synchronised BatchNorm:
    the backward that builds a graph recomputes the blocks and the stem with BatchNorms over
    every rank's batch through differentiable collectives, so the second-order terms cross
    the ranks too: each rank's input gradient and the summed parameter gradients equal one
    process's on the global batch."""
    _spawn(_penalty_worker, recompute)


def _vmap_worker(rank):
    import densenet_fast.fusion as fusion
    import densenet_fast.model as fast_model
    import densenet_fast.plan as plan
    from densenet_fast.sync import StatsSync

    # A world of one takes the synchronised path when asked to (nn.SyncBatchNorm itself
    # does not synchronise one rank).
    monkey = pytest.MonkeyPatch()
    for module in (fusion, fast_model, plan):
        monkey.setattr(module, "sync_of", lambda bn: StatsSync() if bn.training else None)
    model = _model()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="vmap over the backward .* synchronised"):
        torch.autograd.functional.jacobian(lambda t: model(t).sum(0), x, vectorize=True)
    monkey.undo()


def test_vmap_over_a_synchronised_backward_is_refused_with_a_reason():
    _spawn(_vmap_worker, world=1)


def test_expected_collectives_follow_the_layers():
    # densenet121 at 2 ranks: what the README's traffic table counts.
    calls = expected_collectives(dict(growth_rate=32, block_config=(6, 12, 24, 16),
                                      num_init_features=64, bn_size=4))
    assert len(calls) == 2 * (1 + 4 + 2 * 58)


def _one_value_worker(rank):
    from densenet_fast.sync import StatsSync

    model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    before = {name: b.clone() for name, b in model.named_buffers()}
    sync = StatsSync()
    with pytest.raises(ValueError, match="got 1 over all processes at norm0"):
        sync.merge(torch.zeros(3), torch.zeros(3), 1, "norm0")
    # The plan check asks the ranks before anything runs: here, one rank of one image
    # with 1x1 planes (a world of one takes the path that a world of several does).
    import densenet_fast.model as fast_model

    monkey = pytest.MonkeyPatch()
    monkey.setattr(fast_model, "sync_of", lambda bn: sync)
    with pytest.raises(ValueError, match=r"\(1 over all processes\)"):
        model(torch.randn(1, 3, 8, 8, dtype=DTYPE))
    monkey.undo()
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"{name} changed before the error"


def test_one_value_over_all_processes_is_refused_before_any_statistic_changes():
    _spawn(_one_value_worker, world=1)
