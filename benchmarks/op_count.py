"""How many operations one training step issues, torchvision's DenseNet against densenet_fast's
on its GPU path, counted on a machine without a GPU.

    python benchmarks/op_count.py --autocast bfloat16 --channels-last
    python benchmarks/op_count.py --model tiny --json counts.json

On a GPU whose step is bound by the host (``profile_step.py`` tells), the step's time follows
the number of kernels it launches and the Python around them. This script counts what a
step issues without a GPU: it runs densenet_fast with the Triton backend on CPU tensors
(``TRITON_INTERPRET=1``) with every Triton launch counted and skipped, not run (their
results do not matter for the count; the step's values are garbage), and counts with
torch's profiler the ATen operations that do work: those without ATen operations of their
own beneath them, views and no-op casts left out, a ``_foreach`` operation once (one
kernel on a GPU for its whole list), the optimizer's update left out (the same for both).

The count is a proxy: on the CPU it includes work a GPU does not issue (the casts of
float32 convolutions where the CPU has no fast bf16 ones, the scalar casts of CPU
arithmetic) and a CPU convolution is a different number of ATen operations than a cuDNN
one. Compare counts between versions, and against torchvision's, on one machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

# Before densenet_fast is imported: its backend is chosen then.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["DENSENET_FAST_BACKEND"] = "triton"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import _runner, add_step_arguments  # noqa: E402

# Operations that only describe memory (views, allocations, shape queries): no kernel.
NO_WORK = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided",
    "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::t", "aten::transpose", "aten::permute", "aten::reshape", "aten::_reshape_alias",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::_unsafe_view", "aten::unflatten", "aten::result_type",
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::chunk",
    "aten::split", "aten::unbind", "aten::narrow", "aten::size", "aten::stride",
    "aten::to",  # without a copy beneath it: a cast to the dtype the tensor has
}


class LaunchCounter:
    """Counts Triton launches by kernel name and skips them (``InterpretedFunction.run``)."""

    def __init__(self):
        self.launches = collections.Counter()
        self.counting = False

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._run, counter = InterpretedFunction.run, self

        def run(function, *args, grid, warmup, **kwargs):
            if counter.counting and not warmup:
                counter.launches[function.fn.__name__] += 1
            return None

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run
        return False


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def count_step(kind: str, args) -> dict:
    """One training step of implementation ``kind``: ``{"aten": total, "triton": total,
    "by_op": {name: count}}``."""
    from torch.profiler import ProfilerActivity, profile

    with LaunchCounter() as launches:
        runner = _runner(kind, args)
        runner.step("train")  # first-call work (allocations, caches) stays out of the count
        launches.counting = True
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.step("train")
        launches.counting = False
    by_op = collections.Counter()
    for event in prof.events():
        names = [a.name for a in _ancestors(event)]
        if any(n.startswith("Optimizer.step") for n in names):
            continue
        if event.name.startswith("aten::_foreach"):
            if not any(n.startswith("aten::_foreach") for n in names):
                by_op[event.name] += 1
            continue
        if not event.name.startswith("aten::") or event.name in NO_WORK:
            continue
        if any(n.startswith("aten::_foreach") for n in names):
            continue
        if any(c.name.startswith("aten::") for c in event.cpu_children):
            continue
        by_op[event.name] += 1
    by_op.update({f"triton::{name}": n for name, n in launches.launches.items()})
    return {"aten": sum(n for op, n in by_op.items() if op.startswith("aten::")),
            "triton": sum(launches.launches.values()),
            "by_op": dict(by_op.most_common())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch=2, image=32)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    args.device = "cpu"
    import torch

    torch.set_num_threads(1)
    counts = {kind: count_step(kind, args) for kind in ("torchvision", "densenet_fast")}
    print(f"{args.model} batch {args.batch} {args.image}x{args.image}, autocast "
          f"{args.autocast}, channels_last {args.channels_last}, torch {torch.__version__}: "
          "operations per training step (Triton launches counted, not run)")
    for kind, c in counts.items():
        print(f"{kind:14s} {c['aten'] + c['triton']:6d}  (ATen {c['aten']}, Triton "
              f"{c['triton']})")
        for op, n in list(c["by_op"].items())[:args.rows]:
            print(f"    {n:6d}  {op}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "counts": counts},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
