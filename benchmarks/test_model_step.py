"""One training step and one inference forward per implementation, grouped side by side."""

import pytest

from densenet_fast.benchmark.implementations import available_implementations
from densenet_fast.benchmark.runner import Runner, RunSettings

IMPLEMENTATIONS = available_implementations()


@pytest.mark.parametrize("workload", ["train", "inference"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_model_step(benchmark, impl, workload, model_config, rounds):
    benchmark.group = f"{workload} {model_config.batch_size}x{model_config.image_size}"
    runner = Runner(impl, model_config, RunSettings())
    benchmark.pedantic(runner.step, args=(workload,), rounds=rounds, warmup_rounds=1)
