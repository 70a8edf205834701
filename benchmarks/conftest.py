"""Options for the pytest-benchmark suite (run: ``pytest benchmarks --benchmark-only``)."""

import pytest

from densenet_fast.benchmark.implementations import ModelConfig


def pytest_addoption(parser):
    group = parser.getgroup("densenet_fast benchmarks")
    group.addoption("--model", default="densenet121", help="densenet121/161/169/201")
    group.addoption("--batch-size", type=int, default=8)
    group.addoption("--image-size", type=int, default=224)
    group.addoption("--rounds", type=int, default=3, help="timed rounds per benchmark")


@pytest.fixture(scope="session")
def model_config(request) -> ModelConfig:
    opt = request.config.getoption
    return ModelConfig.named(opt("--model"), batch_size=opt("--batch-size"),
                             image_size=opt("--image-size"))


@pytest.fixture(scope="session")
def rounds(request) -> int:
    return request.config.getoption("--rounds")
