"""The standard-tree check that every forward runs before choosing the fused path, beside
the step it guards (``pytest benchmarks/test_fusion_check.py --benchmark-only``)."""

import time

from densenet_fast.architecture import DenseBlock
from densenet_fast.benchmark.runner import Runner, RunSettings
from densenet_fast.fusion import runtime_blocker


def _check(model, x):
    """Everything ``features.forward`` decides before computing: the runtime conditions and
    the plan, which inspects every module of every block and tail."""
    return runtime_blocker(x), model.features.fusion_plan()


def test_fusion_check_beside_a_training_step(benchmark, model_config, rounds):
    benchmark.group = f"standard-tree check vs step, {model_config.batch_size}x" \
                      f"{model_config.image_size}"
    runner = Runner("densenet_fast", model_config, RunSettings())
    runner.step("train")
    check = benchmark.pedantic(_check, args=(runner.model, runner.x), rounds=200,
                               iterations=10, warmup_rounds=5)
    assert all(step.fused for step in check[1] if isinstance(step.module, DenseBlock))
    if benchmark.disabled:  # --benchmark-disable: the check ran once, untimed
        return
    check_s = benchmark.stats.stats.median
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runner.step("train")
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    benchmark.extra_info.update(check_s=check_s, step_s=step_s, check_to_step=check_s / step_s)
    print(f"\nstandard-tree check {check_s * 1e6:.0f} us per forward, training step "
          f"{step_s * 1e3:.0f} ms: {check_s / step_s:.2e} of the step")
