"""Anchor boxes for the P3-P7 pyramid, cached per feature-map shape and device."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from retinanet.config import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0) for one level: (len(ratios) * len(sizes), 4) XYXY, rounded.

    An aspect ratio r = h / w keeps the area size^2: h = size * sqrt(r), w = size / sqrt(r).
    Order is ratio-major, size-minor (torchvision's order, so head channels line up).
    Example: size 32, ratio 1 -> (-16, -16, 16, 16).
    """
    sizes_t = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratio = torch.sqrt(ratios)
    widths = (sizes_t[None, :] / h_ratio[:, None]).reshape(-1)
    heights = (sizes_t[None, :] * h_ratio[:, None]).reshape(-1)
    return (torch.stack((-widths, -heights, widths, heights), dim=1) / 2).round()


def grid_anchors(base: Tensor, grid_hw: tuple[int, int], stride_hw: tuple[int, int]) -> Tensor:
    """Tile `base` (A, 4) over a feature grid -> (H * W * A, 4), location-major, row-major.

    The anchor of cell (i, j) is centred on pixel (j * stride_w, i * stride_h).
    """
    gh, gw = grid_hw
    sh, sw = stride_hw
    ys = torch.arange(gh, dtype=torch.float32, device=base.device) * sh
    xs = torch.arange(gw, dtype=torch.float32, device=base.device) * sw
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(torch.nn.Module):
    """Anchors for every pyramid level of an image batch.

    sizes: one tuple of sizes per level; aspect_ratios: shared by all levels.
    Results are cached by (image size, feature shapes, device): fixed-size chips make every
    batch after the first a dictionary lookup.
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
                 aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS):
        super().__init__()
        self.sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        lengths = {len(level) for level in self.sizes}
        if len(lengths) != 1:
            raise ValueError(f"every level needs the same number of anchor sizes, got {self.sizes}")
        return lengths.pop() * len(self.aspect_ratios)

    def forward(self, image_hw: tuple[int, int], feature_hws: Sequence[tuple[int, int]], device) -> Tensor:
        """All anchors of one image, levels concatenated: (sum_l H_l * W_l * A, 4) float32."""
        key = (tuple(image_hw), tuple(map(tuple, feature_hws)), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            if len(feature_hws) != len(self.sizes):
                raise ValueError(f"{len(feature_hws)} feature maps but anchor sizes for {len(self.sizes)} levels")
            per_level = []
            for sizes, (fh, fw) in zip(self.sizes, feature_hws):
                stride = (image_hw[0] // fh, image_hw[1] // fw)
                base = cell_anchors(sizes, self.aspect_ratios).to(device)
                per_level.append(grid_anchors(base, (fh, fw), stride))
            anchors = torch.cat(per_level)
            self._cache[key] = anchors
        return anchors
