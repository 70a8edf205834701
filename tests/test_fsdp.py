"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over two gloo processes on CPU, float64.

densenet_fast and torchvision's DenseNet, with the same weights and running statistics, are
sharded the same way: ``fully_shard`` on each dense block then on the root, or on the root
alone. Each rank's logits and input gradient, every parameter gradient (the full tensors of
the sharded DTensor gradients), the running statistics after the step and an eval forward
must equal torchvision's, with every block fused with the transition or norm after it: a
block sharded on its own is called as a module, so that FSDP's hooks (unshard before,
reshard and pre-backward hooks after) wrap the fused block and tail together.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from helpers import FusedOpCounter, twins
from tolerances import assert_close
from torchvision.models import DenseNet as TorchvisionDenseNet

from densenet_fast import DenseNet
from densenet_fast.model import _DenseBlock
from densenet_fast.validation import is_type

CONFIG = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
              num_classes=5)
DTYPE = torch.float64
PER_RANK = 2
SETUPS = ["blocks-then-root", "root"]
FUSED = {"features.stem": "fused", "features.denseblock1": "fused with features.transition1",
         "features.denseblock2": "fused with features.norm5"}
# Every layer's norm1-conv1 and the transition's norm-conv.
FUSED_OPS = sum(CONFIG["block_config"]) + 1


def _blocks(model):
    return [m for m in model.features.children() if isinstance(m, nn.ModuleDict)]


def _shard(model, setup, mesh):
    from torch.distributed.fsdp import fully_shard

    if setup == "blocks-then-root":
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _models():
    """(densenet_fast, torchvision) with identical weights and non-trivial statistics."""
    torch.manual_seed(0)
    fast, ref = twins(DenseNet, TorchvisionDenseNet, DTYPE, **CONFIG)
    with torch.no_grad():
        ref(torch.randn(4, 3, 32, 32, dtype=DTYPE, generator=torch.Generator().manual_seed(2)))
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _batch(rank):
    """This rank's share of one global batch."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * PER_RANK, 3, 32, 32, dtype=DTYPE, generator=generator)
    y = torch.randint(0, 5, (2 * PER_RANK,), generator=generator)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[shard], y[shard]


def _step(model, x, y, check_resharded=None):
    model.train()
    x = x.clone().requires_grad_()
    logits = model(x)
    if check_resharded is not None:
        check_resharded()
    F.cross_entropy(logits, y).backward()
    return logits.detach(), x.grad


def _check_resharded(model, setup):
    """After the forward, a block sharded on its own holds its sharded parameters again (its
    unsharded ones are freed until its pre-backward hook gathers them back)."""
    from torch.distributed.tensor import DTensor

    def check():
        if setup == "blocks-then-root":
            for block in _blocks(model):
                weight = block.denselayer1.conv1.weight
                assert isinstance(weight, DTensor), type(weight)

    return check


def _compare_step(fast, ref, x, y, rank, what, check_resharded=None):
    """One training step of each: logits, input gradient and every parameter gradient."""
    fast.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    ref_logits, ref_dx = _step(ref, x, y)
    logits, dx = _step(fast, x, y, check_resharded)
    assert_close(logits, ref_logits, DTYPE, f"rank {rank} {what} logits")
    assert_close(dx, ref_dx, DTYPE, f"rank {rank} {what} input gradient")
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert_close(p.grad.full_tensor(), ref_params[name].grad.full_tensor(), DTYPE,
                     f"rank {rank} {what} grad {name}")


def _check_user_hook(fast, ref, x, y, rank):
    """A user's hook beside FSDP's on a block: the hook sees the block's own output, so the
    block is called on its own (still fused inside) and the transition runs as a module."""
    seen = {}

    def hook(key):
        def record(module, args, out):
            seen[key] = out.detach().clone()
        return record

    handles = [model.features.denseblock1.register_forward_hook(hook(key))
               for key, model in (("fast", fast), ("ref", ref))]
    report = fast.fusion_report()
    assert report["features.denseblock1"] == (
        "fused; features.transition1 runs as a module: the block has hooks, so it is called "
        "as a module"), report
    assert report["features.denseblock2"] == FUSED["features.denseblock2"], report
    with FusedOpCounter() as ops:
        _compare_step(fast, ref, x, y, rank, "user hook")
    assert ops.calls == FUSED_OPS - 1, ops.calls
    assert_close(seen["fast"], seen["ref"], DTYPE, f"rank {rank} hooked block's output")
    for handle in handles:
        handle.remove()
    assert fast.fusion_report() == FUSED, fast.fusion_report()


def _check_output_cast(mesh, x, y, rank):
    """FSDP casting a block's output (``MixedPrecisionPolicy.output_dtype``) is a cast the
    transition must see: the block stays fused, the transition runs as a module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fast, ref = _models()
    for model in (fast, ref):
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(output_dtype=DTYPE))
        fully_shard(model, mesh=mesh)
    report = fast.fusion_report()
    reason = "FSDP casts the block's output (MixedPrecisionPolicy.output_dtype)"
    assert report == {**FUSED, **{
        f"features.denseblock{i}": f"fused; features.{tail} runs as a module: {reason}"
        for i, tail in ((1, "transition1"), (2, "norm5"))}}, report
    with FusedOpCounter() as ops:
        _compare_step(fast, ref, x, y, rank, "output_dtype")
    assert ops.calls == FUSED_OPS - 1, ops.calls


def _worker(rank, world, init_file, setup, failures):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        fast, ref = (_shard(m, setup, mesh) for m in _models())
        block = fast.features.denseblock1
        if setup == "blocks-then-root":  # FSDP's FSDP_DenseBlock(FSDPModule, _DenseBlock)
            assert type(block) is not _DenseBlock and is_type(block, _DenseBlock)
        else:
            assert type(block) is _DenseBlock
        assert fast.fusion_report() == FUSED, fast.fusion_report()
        plan = fast.features.fusion_plan()
        assert [len(s.modules) for s in plan] == [4, 2, 2], plan
        assert all(s.fused for s in plan)
        assert [s.called for s in plan[1:]] == [setup == "blocks-then-root"] * 2

        x, y = _batch(rank)
        with FusedOpCounter() as ops:  # counts densenet_fast's calls only
            # full_tensor() gathers over the ranks: both run the same names in order.
            _compare_step(fast, ref, x, y, rank, "training", _check_resharded(fast, setup))
        assert ops.calls == FUSED_OPS, ops.calls
        ref_buffers = dict(ref.named_buffers())
        for name, b in fast.named_buffers():
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b, ref_buffers[name]), name
            else:
                assert_close(b, ref_buffers[name], DTYPE, f"rank {rank} buffer {name}")

        fast.eval()
        ref.eval()
        with torch.no_grad(), FusedOpCounter() as ops:
            assert_close(fast(x), ref(x), DTYPE, f"rank {rank} eval logits")
        assert ops.calls == FUSED_OPS, ops.calls
        assert fast.fusion_report() == FUSED, fast.fusion_report()
        if setup == "blocks-then-root":
            _check_user_hook(fast, ref, x, y, rank)
            _check_output_cast(mesh, x, y, rank)
    except BaseException as exc:  # reported by the parent, with the rank
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(worker, *args):
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(worker, args=(2, os.path.join(tmp, "init"), *args, failures), nprocs=2)
        except Exception:
            messages = []
            while not failures.empty():
                messages.append(failures.get())
            pytest.fail("\n".join(messages) or "a worker failed")


def _fully_shard_refuses_module_dicts() -> bool:
    """torch 2.11's fully_shard refuses any ``nn.ModuleDict`` (torchvision's dense block is one)
    before it does anything else; later versions refuse only one without a forward."""
    from torch.distributed.fsdp import fully_shard

    class WithForward(nn.ModuleDict):
        def forward(self, x):
            return x

    try:
        fully_shard(WithForward({"conv": nn.Conv2d(1, 1, 1)}))
    except ValueError as exc:
        return "containers" in str(exc)
    except Exception:  # it went on, and needed a process group
        return False
    return False


@pytest.mark.parametrize("setup", SETUPS)
def test_fully_shard_matches_torchvision_with_blocks_and_tails_fused(setup):
    if setup == "blocks-then-root" and _fully_shard_refuses_module_dicts():
        from torch.distributed.fsdp import fully_shard

        # This torch refuses to shard a dense block on its own: ours as torchvision's.
        for model in _models():
            with pytest.raises(ValueError, match="containers that do not implement forward"):
                fully_shard(model.features.denseblock1)
        return
    _spawn(_worker, setup)


def test_is_type_accepts_wrappers_that_only_add_hooks_or_state():
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.utils import parametrize

    class Hooked(nn.Conv2d):  # adds a hook and a method, redefines nothing of Conv2d's
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_forward_hook(lambda *args: None)

        def describe(self):
            return "hooked"

    class OwnConv(nn.Conv2d):  # computes differently without touching forward
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, 2 * weight, bias)

    class Renamed(nn.Conv2d):  # a property shadowing a parameter is computation
        weight = property(lambda self: self._parameters["weight"] * 2)

    assert is_type(Hooked(3, 3, 1), nn.Conv2d)
    assert not is_type(OwnConv(3, 3, 1), nn.Conv2d)
    assert not is_type(nn.Module.__new__(Renamed), nn.Conv2d)  # the type is what is checked
    assert not is_type(nn.Conv2d(3, 3, 1), nn.Conv1d)
    parametrized = nn.Conv2d(3, 3, 1)
    parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    assert not is_type(parametrized, nn.Conv2d)
    # The class fully_shard makes for a module it shards (its _apply and __new__ only).
    fsdp_block = type("FSDP_DenseBlock", (FSDPModule, _DenseBlock), {})
    assert is_type(nn.Module.__new__(fsdp_block), _DenseBlock)
