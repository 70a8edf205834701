"""A built implementation with its batch and optimizer, ready to run a workload."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .implementations import IMPLEMENTATIONS, ModelConfig, build, make_batch
from .roofline import describe_cpu
from .steps import inference_step, make_optimizer, train_step

WORKLOADS = ("train", "inference")


@dataclass(frozen=True)
class RunSettings:
    """Where and how every implementation runs: device, autocast dtype, memory format."""

    device: str = "cpu"
    autocast: str | None = None  # "bfloat16" or "float16"
    channels_last: bool = False

    def autocast_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.autocast) if self.autocast else None

    def to_json(self) -> dict:
        return asdict(self)

    def device_name(self) -> str:
        """The device as reports name it: the GPU's model, or the CPU and its threads."""
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(torch.device(self.device))
        return f"cpu ({describe_cpu()}; {torch.get_num_threads()} threads)"

    def compute_dtype(self) -> torch.dtype:
        """The dtype the convolutions compute in: autocast's, else float32."""
        return self.autocast_dtype() or torch.float32


class Runner:
    """``Runner(name, config, settings).step(workload)`` runs one training step or one
    inference forward of implementation ``name``, inside the implementation's context."""

    def __init__(self, name: str, config: ModelConfig, settings: RunSettings):
        self.name, self.settings = name, settings
        self.model = build(name, config).to(settings.device)
        self.x, self.y = make_batch(config, settings.device)
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model)
        self.context = IMPLEMENTATIONS[name].context

    def step(self, workload: str) -> None:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
        with self.context():
            if workload == "train":
                train_step(self.model, self.optimizer, self.x, self.y,
                           self.settings.autocast_dtype())
            else:
                inference_step(self.model, self.x, self.settings.autocast_dtype())

    def release_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
