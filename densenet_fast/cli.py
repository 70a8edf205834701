"""``densenet-fast``: compare implementations side by side, and report the backends."""

from __future__ import annotations

import argparse
import json
import os
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
    if "cpp" in info["active"].values():
        from .backends import cpu_gemm_engine
        from .cpu_engine_cache import cache_file

        engines = cpu_gemm_engine()
        print(f"cpu GEMM engines: {engines['policy']}, {len(engines['measured'])} choices kept "
              f"for this machine in {cache_file()}")
    # Named as the benchmarks name it: speed on a CPU depends on its model, not its ISA alone.
    from .machine import describe_cpu

    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, host cpu ({describe_cpu()})")
    else:
        print(f"device: cpu ({describe_cpu()})")
    return 0 if info["error"] is None else 1


def _config_from_args(args):
    from .benchmark.implementations import ModelConfig

    common = {"batch_size": args.batch_size, "image_size": args.image_size or 64,
              "in_channels": args.in_channels, "num_classes": args.num_classes}
    if args.block_config or args.growth_rate:
        if not (args.block_config and args.growth_rate):
            raise ValueError("--growth-rate and --block-config go together")
        return ModelConfig(growth_rate=args.growth_rate, block_config=args.block_config,
                           num_init_features=2 * args.growth_rate, **common)
    return ModelConfig.named(args.model, **common)


def _check_runnable(config, settings) -> None:
    """Refuse, before measuring anything, a configuration that cannot run."""
    from .backends import active_backend
    from .model import DenseNet

    device_type = settings.device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")
    active_backend(device_type)  # a forced, unavailable backend raises here
    model = DenseNet(**config.model_kwargs())  # validates the architecture's arguments
    shape = (config.batch_size, config.in_channels, config.image_size, config.image_size)
    model.features.check_spatial_size(torch.empty(shape, device="meta"))


def _parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(text[-1:])
    number = float(text[:-1] if scale else text)
    return int(number * (scale or 2**20))  # a bare number is MiB


def _write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"results written to {path}")


def _bench(args) -> int:
    from .benchmark.runner import RunSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = RunSettings(device=args.device, autocast=args.autocast,
                           channels_last=args.channels_last)
    if args.sweep == "depth":
        return _sweep_depth(args, settings)
    config = _config_from_args(args)
    _check_runnable(config, settings)
    if args.sweep == "batch":
        return _sweep_batch(args, config, settings)
    from .benchmark.implementations import available_implementations
    from .benchmark.report import format_table, run_comparison

    known = available_implementations(settings.device, optional=True)
    for name in args.impl or ():
        if name not in known:
            raise ValueError(f"--impl {name!r} is not available here; choose from {known}")
    results = run_comparison(config, settings, repeats=args.repeats,
                             implementations=args.impl, workloads=args.workload,
                             show_progress=not args.quiet)
    print(format_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def _sweep_depth(args, settings) -> int:
    from .benchmark.sweeps import (
        DEFAULT_DEPTHS,
        DEPTH_IMAGE_SIZE,
        DEPTH_IMPLEMENTATIONS,
        deepest_in_budget,
        depth_config,
        depth_ratios,
        plot_depth,
        sweep_depth,
    )

    depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else DEFAULT_DEPTHS
    image_size = args.image_size or DEPTH_IMAGE_SIZE
    for depth in depths:
        _check_runnable(depth_config(depth, batch_size=args.batch_size, image_size=image_size),
                        settings)
    result = sweep_depth(depths, args.impl or DEPTH_IMPLEMENTATIONS, settings,
                         batch_size=args.batch_size, image_size=image_size,
                         show_progress=not args.quiet)
    print(f"peak memory of one training step (MiB), DenseNet-BC k=12, batch "
          f"{args.batch_size}, {image_size}x{image_size}, {result['device']}")
    names = list(result["points"])
    print(f"{'depth':>6s} " + " ".join(f"{n:>20s}" for n in names))
    for i, depth in enumerate(depths):
        cells = []
        for name in names:
            peak = result["points"][name][i]["peak_bytes"]
            cells.append(f"{peak / 2**20:20.1f}" if peak is not None else f"{'failed':>20s}")
        print(f"{depth:6d} " + " ".join(cells))
    ratios = depth_ratios(result)
    result["ratios_at_deepest"] = ratios
    print(f"at depth {depths[-1]}, relative to densenet_fast: " + ", ".join(
        f"{n} {r:.2f}x" for n, r in ratios.items() if r is not None))
    print(f"plot written to {plot_depth(result, args.plot)}")
    if args.memory_budget:
        budget = _parse_bytes(args.memory_budget)
        result["budget_bytes"] = budget
        result["deepest"] = {}
        for name in names:  # saved after each row: the search takes long at large depths
            result["deepest"][name] = deepest_in_budget(name, budget, settings,
                                                        args.batch_size, args.max_layers,
                                                        image_size=image_size)
            _write_json(args.json or Path(args.plot).with_suffix(".json"), result)
        print(f"deepest DenseNet-BC (k=12, batch {args.batch_size}, {image_size}x{image_size}) "
              f"whose training job fits "
              f"{budget / 2**20:.0f} MiB:")
        for name, row in result["deepest"].items():
            print(f"  {name:24s} {row['max_depth']:6d}")
    _write_json(args.json or Path(args.plot).with_suffix(".json"), result)
    return 0


def _sweep_batch(args, config, settings) -> int:
    from .benchmark.implementations import available_implementations
    from .benchmark.sweeps import device_memory, sweep_batch

    budget = _parse_bytes(args.memory_budget) if args.memory_budget else \
        device_memory(settings.device)
    names = args.impl or [n for n in available_implementations(settings.device)
                          if n != "torchvision-compiled"]
    save = (lambda partial: _write_json(args.json, partial)) if args.json else None
    result = sweep_batch(config, names, budget, settings, max_batch=args.max_batch,
                         show_progress=not args.quiet, on_row=save)
    print(f"largest training batch within {budget / 2**20:.0f} MiB (model, optimizer and "
          f"activations), "
          f"{config.image_size}x{config.image_size}, {result['device']}")
    for name, row in result["rows"].items():
        capped = " (the --max-batch cap)" if row["max_batch"] == args.max_batch else ""
        print(f"  {name:20s} {row['max_batch']:6d}{capped}")
    if args.json:
        _write_json(args.json, result)
    return 0


def _train(args) -> int:
    from .training.loop import TrainConfig, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, growth_rate=args.growth_rate,
                      block_config=args.block_config,
                      recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr,
                      image_size=args.image_size, device=args.device, autocast=args.autocast,
                      channels_last=args.channels_last, compile=args.compile, seed=args.seed,
                      data_dir=args.data_dir, train_limit=args.train_limit,
                      test_limit=args.test_limit, out_dir=args.out_dir, save=args.save,
                      resume=args.resume, progress=not args.quiet, sync_bn=args.sync_bn)
    metrics = run_training(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return 0
    print(f"test accuracy {100 * metrics['test_accuracy']:.2f}% on {metrics['test_images']} "
          f"images ({metrics['data']}); figures and metrics.json in {args.out_dir}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="densenet121", choices=sorted(CONFIGS))
    parser.add_argument("--growth-rate", type=int, help="custom model: growth rate k")
    parser.add_argument("--block-config", type=_block_config,
                        help="custom model: layers per block, e.g. 6,12,24")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("bfloat16", "float16"),
                        help="run the forward under torch.autocast to this dtype")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last model and input")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _block_config(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, versions and device")
    info.set_defaults(func=_info)

    bench = sub.add_parser("bench", help="memory and time of one training step, side by side")
    _add_model_options(bench)
    _add_run_options(bench)
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--image-size", type=int,
                       help="input height and width (default: 64; depth sweep: 32)")
    bench.add_argument("--in-channels", type=int, default=3)
    bench.add_argument("--num-classes", type=int, default=1000)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--impl", action="append",
                       help="implementation to include (repeatable; default: all available)")
    bench.add_argument("--workload", action="append", choices=("train", "inference"),
                       help="workload to measure (repeatable; default: both)")
    bench.add_argument("--json", help="write the results as JSON to this path")
    bench.add_argument("--sweep", choices=("depth", "batch"),
                       help="depth: peak memory against DenseNet-BC depth, with a plot; "
                            "batch: the largest batch within --memory-budget")
    bench.add_argument("--depths", help="depth sweep: comma-separated depths (6n+4)")
    bench.add_argument("--plot", default="bench-out/depth-sweep.png",
                       help="depth sweep: where to write the PNG")
    bench.add_argument("--memory-budget",
                       help="batch sweep: e.g. 2GiB, 500MiB (default: what the device has); "
                            "depth sweep: also search the deepest model within it")
    bench.add_argument("--max-layers", type=int, default=256,
                       help="depth sweep with a budget: upper bound on layers per block")
    bench.add_argument("--max-batch", type=int, default=1024, help="batch sweep: upper bound")
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="the seed's MNIST experiment with densenet_fast")
    _add_model_options(train)
    _add_run_options(train)
    train.add_argument("--recipe", choices=("default", "seed"), default="default",
                       help="default: augmentation, one-cycle AdamW, running statistics "
                            "refreshed before evaluation, 32x32, 4 epochs; seed: the seed "
                            "article's Adam 1e-3 on raw 64x64 digits, 5 epochs")
    train.add_argument("--epochs", type=int, help="(default: the recipe's)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    train.add_argument("--image-size", type=int,
                       help="digits are resized to this (default: the recipe's)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--sync-bn", action="store_true",
                       help="under torchrun: BatchNorm statistics over every process "
                            "(nn.SyncBatchNorm.convert_sync_batchnorm, run fused)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir", help="MNIST IDX files (default: the embedded 5k digits)")
    train.add_argument("--train-limit", type=int, help="use the first N training images")
    train.add_argument("--test-limit", type=int, help="use the first N test images")
    train.add_argument("--out-dir", default="train-out",
                       help="figures and metrics.json go here")
    train.add_argument("--save", help="checkpoint path, written after every epoch")
    train.add_argument("--resume", help="checkpoint to continue from")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"densenet-fast {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
