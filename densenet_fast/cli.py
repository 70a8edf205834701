"""``densenet-fast``: compare implementations side by side, and report the backends."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from .architecture import CONFIGS
from .backends import backend_info


def _info(_args) -> int:
    info = backend_info()
    print(f"densenet_fast backends (requested: {info['requested']})")
    for name, entry in info["backends"].items():
        state = "available" if entry["available"] else "unavailable"
        print(f"  {name:8s} {state:12s} devices={','.join(entry['devices'])}  {entry['reason']}")
    for device, name in info["active"].items():
        print(f"  active on {device}: {name}")
    for device, reason in info["unavailable"].items():
        print(f"  no backend on {device}: {reason}")
    if info["error"]:
        print(f"  error: {info['error']}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()})")
    return 0 if info["error"] is None else 1


def _config_from_args(args):
    from .benchmark.implementations import ModelConfig

    common = {"batch_size": args.batch_size, "image_size": args.image_size,
              "in_channels": args.in_channels, "num_classes": args.num_classes}
    if args.block_config or args.growth_rate:
        if not (args.block_config and args.growth_rate):
            raise SystemExit("--growth-rate and --block-config go together")
        return ModelConfig(growth_rate=args.growth_rate,
                           block_config=tuple(int(n) for n in args.block_config.split(",")),
                           num_init_features=2 * args.growth_rate, **common)
    return ModelConfig.named(args.model, **common)


def _bench(args) -> int:
    from .benchmark.report import format_table, run_comparison

    config = _config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_comparison(config, device=args.device, repeats=args.repeats,
                             implementations=args.impl, workloads=args.workload,
                             show_progress=not args.quiet)
    print(format_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, versions and device")
    info.set_defaults(func=_info)

    bench = sub.add_parser("bench", help="memory and time of one training step, side by side")
    bench.add_argument("--model", default="densenet121", choices=sorted(CONFIGS))
    bench.add_argument("--growth-rate", type=int, help="custom model: growth rate k")
    bench.add_argument("--block-config", help="custom model: layers per block, e.g. 6,12,24")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--image-size", type=int, default=64)
    bench.add_argument("--in-channels", type=int, default=3)
    bench.add_argument("--num-classes", type=int, default=1000)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--impl", action="append",
                       help="implementation to include (repeatable; default: all available)")
    bench.add_argument("--workload", action="append", choices=("train", "inference"),
                       help="workload to measure (repeatable; default: both)")
    bench.add_argument("--json", help="write the results as JSON to this path")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
