"""Collectives and bytes of one synchronised training step: densenet_fast against
``nn.SyncBatchNorm`` on torchvision's model.

densenet_fast's figures are counted while two gloo processes run one training step of the
model (CPU, float32; the image size does not change the traffic). ``nn.SyncBatchNorm``
refuses to run on CPU, so its figures are computed from its code, module by module: each
training BN of ``C`` channels all-gathers ``(mean, invstd, count)``, ``2C + 1`` values per
rank, in forward, and all-reduces ``(sum_dy, sum_dy_xmu)``, ``2C`` values, in backward
(``torch/nn/modules/_functions.py``).

    python benchmarks/sync_traffic.py [--model densenet121] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2


def _step_collectives(rank: int, init_file: str, model_name: str, queue) -> None:
    import densenet_fast
    from densenet_fast.sync import record_collectives

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = getattr(densenet_fast, model_name)(num_classes=10)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
        with record_collectives() as record:
            F.cross_entropy(model(x), y).backward()
        if rank == 0:
            queue.put(record)
    finally:
        dist.destroy_process_group()


def densenet_fast_traffic(model_name: str) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_step_collectives, args=(os.path.join(tmp, "init"), model_name, queue),
                 nprocs=WORLD)
    return queue.get()


def sync_batchnorm_traffic(model_name: str) -> list:
    import torchvision

    model = getattr(torchvision.models, model_name)()
    record = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            record.append(("all_gather", 2 * channels + 1, 4 * (2 * channels + 1)))
            record.append(("all_reduce", 2 * channels, 4 * 2 * channels))
    return record


def summary(record: list) -> dict:
    """Calls and values each rank sends, per kind; bytes are float32."""
    kinds = sorted({kind for kind, _, _ in record})
    rows = {kind: {"calls": sum(1 for k, _, _ in record if k == kind),
                   "values": sum(n for k, n, _ in record if k == kind),
                   "bytes": sum(b for k, _, b in record if k == kind)} for kind in kinds}
    rows["total"] = {key: sum(row[key] for row in rows.values())
                     for key in ("calls", "values", "bytes")}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    ours, theirs = summary(densenet_fast_traffic(args.model)), \
        summary(sync_batchnorm_traffic(args.model))
    result = {"model": args.model, "ranks": WORLD, "dtype": "float32",
              "densenet_fast": ours, "nn.SyncBatchNorm (torchvision)": theirs,
              "bytes_ratio": theirs["total"]["bytes"] / ours["total"]["bytes"]}
    print(f"{args.model}, {WORLD} ranks, one training step, sent by each rank:")
    for name, rows in (("densenet_fast", ours), ("nn.SyncBatchNorm", theirs)):
        for kind, row in rows.items():
            print(f"  {name:18s} {kind:10s} {row['calls']:5d} calls {row['values']:9d} values "
                  f"{row['bytes'] / 2**10:9.1f} KiB")
    print(f"nn.SyncBatchNorm sends {result['bytes_ratio']:.1f}x the bytes")
    out = Path(args.out) / f"sync-traffic-{args.model}-{WORLD}ranks.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
