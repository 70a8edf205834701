"""The implementations a benchmark compares, built from one configuration and one set of
weights, so any difference in time or memory is the implementation's."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..architecture import CONFIGS


@dataclass(frozen=True)
class ModelConfig:
    """A DenseNet-BC configuration and the input it is measured on."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    num_classes: int = 1000
    in_channels: int = 3
    batch_size: int = 8
    image_size: int = 224

    @classmethod
    def named(cls, arch: str, **overrides) -> ModelConfig:
        if arch not in CONFIGS:
            raise ValueError(f"unknown model {arch!r}; choose one of {sorted(CONFIGS)}")
        growth_rate, block_config, num_init_features = CONFIGS[arch]
        return cls(growth_rate=growth_rate, block_config=block_config,
                   num_init_features=num_init_features, **overrides)

    def model_kwargs(self) -> dict:
        kwargs = asdict(self)
        del kwargs["batch_size"], kwargs["image_size"]
        return kwargs

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["block_config"] = tuple(data["block_config"])
        return cls(**data)


def _naive(config: ModelConfig) -> nn.Module:
    from ..reference import NaiveDenseNet

    return NaiveDenseNet(**config.model_kwargs())


def _torchvision(memory_efficient: bool) -> Callable[[ModelConfig], nn.Module]:
    def build(config: ModelConfig) -> nn.Module:
        from torchvision.models import DenseNet as TorchvisionDenseNet

        kwargs = config.model_kwargs()
        in_channels = kwargs.pop("in_channels")
        model = TorchvisionDenseNet(memory_efficient=memory_efficient, **kwargs)
        if in_channels != 3:
            old = model.features.conv0
            model.features.conv0 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        return model

    return build


def _fast(config: ModelConfig, **options) -> nn.Module:
    from ..model import DenseNet

    return DenseNet(**config.model_kwargs(), **options)


def _fast_recompute(config: ModelConfig) -> nn.Module:
    return _fast(config, recompute_bottleneck=True)


def _timm(grad_checkpointing: bool = False, convert: bool = False,
          recompute_bottleneck: bool = False) -> Callable[[ModelConfig], nn.Module]:
    """timm's DenseNet of ``config`` (timm ties the stem's width to twice the growth rate),
    with ``set_grad_checkpointing``, or converted by :func:`densenet_fast.convert`."""
    def build(config: ModelConfig) -> nn.Module:
        from timm.models.densenet import DenseNet as TimmDenseNet

        if config.num_init_features != 2 * config.growth_rate:
            raise ValueError(
                f"timm's DenseNet has 2 * growth_rate = {2 * config.growth_rate} stem "
                f"channels; this configuration has num_init_features="
                f"{config.num_init_features}")
        model = TimmDenseNet(growth_rate=config.growth_rate, block_config=config.block_config,
                             bn_size=config.bn_size, num_classes=config.num_classes,
                             in_chans=config.in_channels)
        model.set_grad_checkpointing(grad_checkpointing)
        if convert:
            from ..convert import convert as to_fast

            model = to_fast(model, recompute_bottleneck=recompute_bottleneck)
        return model

    return build


LAST_BLOCK = "last dense block"


def _fast_with_gradcam_hook(target: str) -> Callable[[ModelConfig], nn.Module]:
    """densenet_fast with what Grad-CAM attaches to ``target`` (a module name, or
    ``LAST_BLOCK``): a forward hook that keeps the output, and a tensor hook on it that keeps
    its gradient."""
    def build(config: ModelConfig) -> nn.Module:
        model = _fast(config)
        name = target
        if target == LAST_BLOCK:
            blocks = [n for n, _ in model.features.named_children() if n.startswith("denseblock")]
            name = f"features.{blocks[-1]}"
        captured = {}

        def keep(module, inputs, output):
            captured["activation"] = output
            if output.requires_grad:
                output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

        model.get_submodule(name).register_forward_hook(keep)
        return model

    return build


@dataclass(frozen=True)
class Implementation:
    """One row of a comparison: how to build the model, and a context its steps run in.
    ``optional`` rows run only when named (``--impl``)."""

    description: str
    build: Callable[[ModelConfig], nn.Module]
    context: Callable[[], AbstractContextManager] = nullcontext
    compiled: bool = False
    optional: bool = False


def _reference_kernels() -> AbstractContextManager:
    from ..ops import reference_kernels

    return reference_kernels()


IMPLEMENTATIONS: dict[str, Implementation] = {
    "naive": Implementation("NaiveDenseNet: torch.cat per layer (the seed's algorithm)", _naive),
    "torchvision": Implementation("torchvision DenseNet, memory_efficient=False",
                                  _torchvision(False)),
    "torchvision-memeff": Implementation(
        "torchvision DenseNet, memory_efficient=True (checkpointing)", _torchvision(True)),
    "torchvision-compiled": Implementation(
        "torch.compile of torchvision DenseNet, memory_efficient=False", _torchvision(False),
        compiled=True),
    "densenet_fast": Implementation("densenet_fast.DenseNet, active backend", _fast),
    "densenet_fast-recompute": Implementation(
        "densenet_fast.DenseNet(recompute_bottleneck=True), active backend", _fast_recompute),
    "densenet_fast-compiled": Implementation(
        "torch.compile of densenet_fast.DenseNet, active backend", _fast, compiled=True,
        optional=True),
    "densenet_fast-recompute-compiled": Implementation(
        "torch.compile of densenet_fast.DenseNet(recompute_bottleneck=True), active backend",
        _fast_recompute, compiled=True, optional=True),
    "densenet_fast-torch": Implementation("densenet_fast.DenseNet, pure-PyTorch kernels", _fast,
                                          context=_reference_kernels),
    "densenet_fast-gradcam-block": Implementation(
        "densenet_fast.DenseNet, Grad-CAM hooks on the last dense block",
        _fast_with_gradcam_hook(LAST_BLOCK), optional=True),
    "densenet_fast-gradcam-norm5": Implementation(
        "densenet_fast.DenseNet, Grad-CAM hooks on features.norm5",
        _fast_with_gradcam_hook("features.norm5"), optional=True),
    "timm": Implementation("timm DenseNet", _timm(), optional=True),
    "timm-checkpointing": Implementation(
        "timm DenseNet, set_grad_checkpointing(True)", _timm(grad_checkpointing=True),
        optional=True),
    "densenet_fast-timm": Implementation(
        "densenet_fast.convert(timm DenseNet), active backend", _timm(convert=True),
        optional=True),
    "densenet_fast-timm-recompute": Implementation(
        "densenet_fast.convert(timm DenseNet, recompute_bottleneck=True), active backend",
        _timm(convert=True, recompute_bottleneck=True), optional=True),
}
BASELINE = "torchvision"


def describe(name: str, device: str) -> str:
    """The row's description, naming the backend that serves densenet_fast on ``device``."""
    description = IMPLEMENTATIONS[name].description
    if "active backend" in description:
        from ..backends import active_backend

        backend = f"{active_backend(device.split(':')[0])} backend"
        description = description.replace("active backend", backend)
    return description


def available_implementations(device: str = "cpu", optional: bool = False) -> list[str]:
    """The rows that can run here: torchvision's need torchvision, and the pure-PyTorch row
    appears when another backend serves the device. ``optional`` adds the rows that run only
    when named, among them, off a GPU, compiled torchvision (compiling it for a CPU takes
    minutes)."""
    from ..backends import active_backend

    have_torchvision = importlib.util.find_spec("torchvision") is not None
    names = []
    for name, impl in IMPLEMENTATIONS.items():
        cpu_compile = name == "torchvision-compiled" and not device.startswith("cuda")
        if (impl.optional or cpu_compile) and not optional:
            continue
        if name.startswith("torchvision") and not have_torchvision:
            continue
        if "timm" in name and importlib.util.find_spec("timm") is None:
            continue
        if name == "densenet_fast-torch" and active_backend(device.split(":")[0]) == "torch":
            continue
        names.append(name)
    return names


def build(name: str, config: ModelConfig, seed: int = 0) -> nn.Module:
    """Build implementation ``name`` with weights drawn from ``seed`` (identical across
    implementations: the naive model's initialisation is copied into the others)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose from {list(IMPLEMENTATIONS)}")
    torch.manual_seed(seed)
    reference = _naive(config)
    impl = IMPLEMENTATIONS[name]
    model = impl.build(config)
    model.load_state_dict(reference.state_dict())
    return torch.compile(model) if impl.compiled else model


def make_batch(config: ModelConfig, device: torch.device | str = "cpu", seed: int = 0):
    """A deterministic input batch and labels for ``config``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch_size, config.in_channels, config.image_size, config.image_size,
                    generator=generator)
    y = torch.randint(0, config.num_classes, (config.batch_size,), generator=generator)
    return x.to(device), y.to(device)
