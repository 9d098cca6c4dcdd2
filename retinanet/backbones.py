"""Backbones from torchvision.models, cut into C3, C4, C5 feature taps (strides 8, 16, 32)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.hub_cache import NamedSourceError, torchvision_weights_state
from retinanet.options import BACKBONES

TAP_STRIDES = (8, 16, 32)
# backbone_weights="imagenet": torchvision's ImageNet weights for each backbone (named, not
# DEFAULT, so that a torchvision upgrade does not change what a job trains from).
IMAGENET = "imagenet"
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "mobilenet_v3_large": "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "efficientnet_b3": "EfficientNet_B3_Weights.IMAGENET1K_V1",
    "vgg16": "VGG16_Weights.IMAGENET1K_V1",
}


class TappedBackbone(nn.Module):
    """A sequential trunk that returns the outputs of its tap layers (C3, C4, C5).

    body: nn.Sequential of named stages; taps: names of the stages whose outputs are C3..C5.
    Stages after the last tap are dropped. For ResNets the stage names are torchvision's
    (conv1, bn1, ..., layer4), so `body.*` weights load from torchvision checkpoints as is.
    """

    def __init__(self, body: nn.Sequential, taps: list[str], channels: list[int]):
        super().__init__()
        last = list(body._modules).index(taps[-1])
        self.body = nn.Sequential(OrderedDict(list(body._modules.items())[: last + 1]))
        self.taps = list(taps)
        self.out_channels = list(channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for name, stage in self.body.named_children():
            x = stage(x)
            if name in self.taps:
                features.append(x)
        return features


def _resnet_stages(net: nn.Module) -> nn.Sequential:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


def _feature_stages(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(net.get_submodule("features").children())))


def _find_taps(stages: nn.Sequential) -> tuple[list[str], list[int]]:
    """The last stage at each of strides 8, 16, 32, found by a tiny dry run."""
    was_training = stages.training
    stages.eval()
    size = 64
    x = torch.zeros(1, _first_conv(stages).in_channels, size, size)
    taps: dict[int, tuple[str, int]] = {}
    with torch.no_grad():
        for name, stage in stages.named_children():
            x = stage(x)
            stride = size // x.shape[-1]
            if stride in TAP_STRIDES:
                taps[stride] = (name, x.shape[1])
    stages.train(was_training)
    missing = [s for s in TAP_STRIDES if s not in taps]
    if missing:
        raise ValueError(f"backbone has no stage at stride(s) {missing}")
    return [taps[s][0] for s in TAP_STRIDES], [taps[s][1] for s in TAP_STRIDES]


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def adapt_first_conv(module: nn.Module, in_channels: int) -> None:
    """Give the first convolution `in_channels` inputs, carrying RGB-trained filters over.

    1 band: the sum of the R, G, B filters (a grey band seen through the RGB filters).
    n > 3 bands: R, G, B filters for bands 1-3, their mean for every extra band, all scaled
    by 3 / n so the first activation keeps its magnitude when bands are alike.
    2 bands: the mean RGB filter for both, scaled by 3 / 2.
    """
    conv = _first_conv(module)
    if conv.in_channels == in_channels:
        return
    old = conv.weight.data
    mean = old.mean(dim=1, keepdim=True)
    if in_channels == 1:
        new = old.sum(dim=1, keepdim=True)
    elif in_channels > 3:
        new = torch.cat([old, mean.expand(-1, in_channels - 3, -1, -1)], dim=1) * (3.0 / in_channels)
    else:
        new = mean.expand(-1, in_channels, -1, -1) * (3.0 / in_channels)
    conv.in_channels = in_channels
    conv.weight = nn.Parameter(new.contiguous())


def imagenet_weights_state(name: str, offline: bool = False) -> dict:
    """torchvision's ImageNet state dict for backbone ``name`` (IMAGENET_WEIGHTS), from torch's
    hub cache or downloaded into it; NamedSourceError for a backbone without ImageNet weights,
    NotCachedError (where the cache is, how to fill it) when it cannot be had."""
    what = f"backbone_weights: {IMAGENET} for {name}"
    if name not in IMAGENET_WEIGHTS:
        raise NamedSourceError(f"{what}: torchvision has no ImageNet weights for it here; backbones with them: "
                               f"{', '.join(IMAGENET_WEIGHTS)}")
    return torchvision_weights_state(models.get_weight(IMAGENET_WEIGHTS[name]), what, offline)


def _load_weights(net: nn.Module, path: str, name: str) -> None:
    """A local state dict, or ``"imagenet"``: torchvision's for backbone ``name`` (IMAGENET_WEIGHTS)."""
    if path == IMAGENET:
        state = imagenet_weights_state(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of ImageNet weights, got {type(state).__name__}")
    result = net.load_state_dict(state, strict=False)
    trunk_missing = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier."))]
    if trunk_missing:
        raise ValueError(f"{path}: not weights for this backbone; missing {trunk_missing[:5]}...")


_FACTORIES: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], nn.Sequential]]] = {
    "resnet18": (models.resnet18, _resnet_stages),
    "resnet34": (models.resnet34, _resnet_stages),
    "resnet50": (models.resnet50, _resnet_stages),
    "resnet101": (models.resnet101, _resnet_stages),
    "mobilenet_v3_large": (models.mobilenet_v3_large, _feature_stages),
    "efficientnet_b0": (models.efficientnet_b0, _feature_stages),
    "efficientnet_b3": (models.efficientnet_b3, _feature_stages),
    "vgg16": (models.vgg16, _feature_stages),
}


def build_backbone(name: str, in_channels: int = 3, weights_path: str | None = None,
                   frozen_bn: bool = True, trainable_stages: int | None = None) -> TappedBackbone:
    """A torchvision classification network turned into a C3-C5 feature extractor.

    weights_path: a local ImageNet state dict for the torchvision model, or ``"imagenet"``:
    torchvision's ImageNet weights (IMAGENET_WEIGHTS) from torch's hub cache, downloaded into
    it when missing. Weights are for RGB; other band counts get adapt_first_conv's rule.
    frozen_bn: ResNets use FrozenBatchNorm2d (detection batches are too small for BN stats).
    trainable_stages: freeze all but the last N top-level stages (None: all trainable).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    factory, stages_of = _FACTORIES[name]
    kwargs = {"weights": None}
    if name.startswith("resnet") and frozen_bn:
        kwargs["norm_layer"] = FrozenBatchNorm2d
    net = factory(**kwargs)
    if weights_path:
        _load_weights(net, weights_path, name)
    stages = stages_of(net)
    adapt_first_conv(stages, in_channels)
    taps, channels = _find_taps(stages)
    backbone = TappedBackbone(stages, taps, channels)
    if trainable_stages is not None:
        children = list(backbone.body.children())
        for stage in children[: max(0, len(children) - trainable_stages)]:
            stage.requires_grad_(False)
    return backbone
