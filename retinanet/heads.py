"""The classification and box subnets of RetinaNet, shared across pyramid levels."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Subnet(nn.Module):
    """depth x (3x3 conv, width ch, [GroupNorm], ReLU), then a 3x3 conv to A * outputs_per_anchor.

    forward takes the pyramid [P3..P7] and returns (B, sum_l H_l W_l A, outputs_per_anchor),
    location-major then anchor, matching AnchorGenerator's order.
    """

    def __init__(self, in_channels: int, num_anchors: int, outputs_per_anchor: int, width: int = 256,
                 depth: int = 4, group_norm: bool = False, prior_bias: float = 0.0):
        super().__init__()
        layers = []
        channels = in_channels
        for _ in range(depth):
            block: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=not group_norm)]
            if group_norm:
                block.append(nn.GroupNorm(32, width))
            block.append(nn.ReLU(inplace=True))
            layers.append(nn.Sequential(*block))
            channels = width
        self.tower = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(channels, num_anchors * outputs_per_anchor, 3, padding=1)
        self.outputs_per_anchor = outputs_per_anchor
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.predictor.bias, prior_bias)  # type: ignore[arg-type]  # built with a bias

    def forward(self, features: list[Tensor]) -> Tensor:
        outputs = []
        for x in features:  # levels differ in size; one conv call per level is unavoidable
            y = self.predictor(self.tower(x))
            b, _, h, w = y.shape
            y = y.view(b, -1, self.outputs_per_anchor, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(y.reshape(b, -1, self.outputs_per_anchor))
        return torch.cat(outputs, dim=1)


def prior_logit(prior_probability: float) -> float:
    """Classifier bias b = -log((1 - pi) / pi) so every anchor starts at foreground probability pi."""
    return -math.log((1 - prior_probability) / prior_probability)
