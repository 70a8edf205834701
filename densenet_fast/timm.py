"""timm's DenseNets, fused, in timm's model registry.

Importing this module registers, for each DenseNet timm registers, a fused twin named
``<name>_fast`` (``densenet121_fast``, ``densenet169_fast``, ``densenet201_fast``,
``densenet161_fast``, ``densenet264d_fast``, ``densenetblur121d_fast``), with timm's pretrained
tags and weights (``densenet121_fast.ra_in1k`` loads ``timm/densenet121.ra_in1k``)::

    import densenet_fast.timm
    model = timm.create_model("densenet121_fast", pretrained=True)

or, with timm's names, :func:`create_model`. A fused model is timm's ``DenseNet`` passed
through :func:`densenet_fast.convert`: timm's class, methods, ``pretrained_cfg`` and
state_dict keys, every timm keyword argument (``drop_rate``, ``memory_efficient``,
``features_only``, ``out_indices``, ``pretrained_cfg_overlay``...). timm's ``train.py`` trains
one unchanged through ``python -m densenet_fast.timm_train train.py --model densenet121_fast``.
"""

from __future__ import annotations

from typing import Any

try:
    import timm
    from timm.layers import BlurPool2d
    from timm.models import (
        build_model_with_cfg,
        generate_default_cfgs,
        get_arch_pretrained_cfgs,
        register_model,
    )
    from timm.models.densenet import DenseNet
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("densenet_fast.timm needs timm: pip install timm") from error

from .convert import convert
from .state_dict import upgrade_legacy_state_dict

SUFFIX = "_fast"

# timm's own arguments for each DenseNet it registers (timm/models/densenet.py);
# tests/test_timm.py checks that each builds timm's module tree.
VARIANTS: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16)),
    "densenetblur121d": dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type="deep",
                             aa_layer=BlurPool2d),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32)),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32)),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24)),
    "densenet264d": dict(growth_rate=48, block_config=(6, 12, 64, 48), stem_type="deep"),
}


def _pretrained_cfgs() -> dict:
    """timm's pretrained configurations of each variant (default tag first), under the fused
    names; their weights are timm's (``hf_hub_id`` stays ``timm/densenet121.ra_in1k``)."""
    cfgs = {}
    for name in VARIANTS:
        for name_tag, cfg in get_arch_pretrained_cfgs(name).items():
            cfgs[name + SUFFIX + name_tag[len(name):]] = cfg
    return cfgs


default_cfgs = generate_default_cfgs(_pretrained_cfgs())


def _fused_densenet(**kwargs: Any) -> DenseNet:
    """timm's ``DenseNet(**kwargs)``, converted; ``recompute_bottleneck`` is convert's."""
    recompute = kwargs.pop("recompute_bottleneck", False)
    return convert(DenseNet(**kwargs), recompute_bottleneck=recompute)


def _filter_pretrained(state_dict: dict, model: DenseNet | None = None) -> dict:
    # timm's and torchvision's checkpoints, legacy torchvision key names included
    return upgrade_legacy_state_dict(state_dict)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DenseNet:
    arch = variant[:-len(SUFFIX)]
    return build_model_with_cfg(
        _fused_densenet, variant, pretrained, feature_cfg=dict(flatten_sequential=True),
        pretrained_filter_fn=_filter_pretrained, **{**VARIANTS[arch], **kwargs})


@register_model
def densenet121_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenet121`` (k=32, blocks 6-12-24-16), fused."""
    return _create("densenet121_fast", pretrained, **kwargs)


@register_model
def densenetblur121d_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenetblur121d`` (deep stem, blur-pooled stem), fused; its stem runs as
    modules."""
    return _create("densenetblur121d_fast", pretrained, **kwargs)


@register_model
def densenet169_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenet169`` (k=32, blocks 6-12-32-32), fused."""
    return _create("densenet169_fast", pretrained, **kwargs)


@register_model
def densenet201_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenet201`` (k=32, blocks 6-12-48-32), fused."""
    return _create("densenet201_fast", pretrained, **kwargs)


@register_model
def densenet161_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenet161`` (k=48, blocks 6-12-36-24), fused."""
    return _create("densenet161_fast", pretrained, **kwargs)


@register_model
def densenet264d_fast(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """timm's ``densenet264d`` (k=48, blocks 6-12-64-48, deep stem), fused; its stem runs as
    modules."""
    return _create("densenet264d_fast", pretrained, **kwargs)


def fused_name(model_name: str) -> str:
    """The registered fused name for a timm DenseNet name, its tag kept
    (``"densenet121.ra_in1k"`` -> ``"densenet121_fast.ra_in1k"``); fused names are returned
    as they are."""
    arch, dot, tag = model_name.partition(".")
    if arch.endswith(SUFFIX) and arch[:-len(SUFFIX)] in VARIANTS:
        return model_name
    if arch not in VARIANTS:
        raise ValueError(f"{model_name!r} is not one of timm's DenseNets: "
                         f"{sorted(VARIANTS)} (with a tag such as '.ra_in1k' or none)")
    return arch + SUFFIX + dot + tag


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any):
    """``timm.create_model`` of the fused twin of timm's DenseNet ``model_name``
    (:func:`fused_name`): the same keyword arguments, the same weights, timm's model class."""
    return timm.create_model(fused_name(model_name), pretrained=pretrained, **kwargs)
