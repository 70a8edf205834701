"""One training step and one inference forward per implementation, grouped side by side."""

import pytest

from densenet_fast.benchmark.implementations import available_implementations, build, make_batch
from densenet_fast.benchmark.steps import inference_step, make_optimizer, train_step

IMPLEMENTATIONS = available_implementations()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_train_step(benchmark, impl, model_config, rounds):
    benchmark.group = f"train step {model_config.batch_size}x{model_config.image_size}"
    model = build(impl, model_config)
    optimizer = make_optimizer(model)
    x, y = make_batch(model_config)
    benchmark.pedantic(train_step, args=(model, optimizer, x, y), rounds=rounds,
                       warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_inference(benchmark, impl, model_config, rounds):
    benchmark.group = f"inference {model_config.batch_size}x{model_config.image_size}"
    model = build(impl, model_config)
    x, _ = make_batch(model_config)
    benchmark.pedantic(inference_step, args=(model, x), rounds=rounds, warmup_rounds=1)
