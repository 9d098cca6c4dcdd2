"""Anchor fitting: choose anchor sizes and aspect ratios from the training boxes.

RetinaNet's weak spot is its fixed anchor design: the paper's anchors (areas 32^2 ..
512^2, ratios 1:2, 1:1, 2:1) match no anchor at IoU >= 0.5 for a 12 x 6 px vehicle, and
such a box gets only the low-quality-match consolation positive. This module measures
the share of training boxes that some anchor matches and searches an anchor layout that
maximises it.

The IoU is **centre-aligned**: a box of size (w, h) and an anchor of size (aw, ah)
placed on the same centre have

    IoU = min(w, aw) * min(h, ah) / (w * h + aw * ah - min(w, aw) * min(h, ah)).

This is the shape match alone, an upper bound on what the grid delivers: on level l the
anchor centres lie every stride_l = 2^(l + 3) pixels, so a box's best anchor is up to
stride/2 pixels off-centre. The search keeps the pyramid structure of the model
(one base size per level doubling from P3 to P7, ``scales`` octave steps per level, one
set of ratios shared by all levels, same number of anchors per location as before), so
the fitted layout is a drop-in ``anchor_sizes`` / ``aspect_ratios`` for RetinaNetConfig.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

NUM_LEVELS = 5  # P3 .. P7
MATCH_IOU = 0.5
# Candidate ratio sets (h / w), symmetric around 1: {1/r, 1, r}.
RATIO_CANDIDATES = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
MAX_BOXES = 20000  # boxes used by the search (a seeded sample beyond that)


def anchor_shapes(sizes: Sequence[Sequence[float]], ratios: Sequence[float]) -> np.ndarray:
    """(A, 2) widths and heights of every anchor of every level.

    Same geometry as :func:`retinanet.anchors.cell_anchors`: area size^2, ratio r = h / w,
    w = size / sqrt(r), h = size * sqrt(r), half-extents rounded to whole pixels.
    """
    out = []
    for level in sizes:
        for r in ratios:
            for s in level:
                half_w = np.round(s / np.sqrt(r) / 2)
                half_h = np.round(s * np.sqrt(r) / 2)
                out.append((2 * half_w, 2 * half_h))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def centred_iou(boxes_wh: np.ndarray, anchors_wh: np.ndarray) -> np.ndarray:
    """(N, A) centre-aligned IoU of box shapes (N, 2) with anchor shapes (A, 2), pixels."""
    w, h = boxes_wh[:, None, 0], boxes_wh[:, None, 1]
    aw, ah = anchors_wh[None, :, 0], anchors_wh[None, :, 1]
    inter = np.minimum(w, aw) * np.minimum(h, ah)
    return inter / np.maximum(w * h + aw * ah - inter, 1e-12)


def match_share(boxes_wh: np.ndarray, sizes: Sequence[Sequence[float]], ratios: Sequence[float],
                threshold: float = MATCH_IOU) -> tuple[float, float]:
    """(share of boxes whose best centre-aligned IoU >= threshold, mean best IoU)."""
    if len(boxes_wh) == 0:
        return 0.0, 0.0
    best = centred_iou(boxes_wh, anchor_shapes(sizes, ratios)).max(axis=1)
    return float((best >= threshold).mean()), float(best.mean())


def pyramid_sizes(base: float, scales: int, octave_step: float) -> tuple[tuple[float, ...], ...]:
    """Sizes per level: base * 2^l * 2^(k * octave_step), l = 0..4, k = 0..scales-1.

    base=32, scales=3, octave_step=1/3 gives the paper's layout (before truncation).
    """
    return tuple(tuple(float(base * 2 ** level * 2 ** (k * octave_step)) for k in range(scales))
                 for level in range(NUM_LEVELS))


@dataclass(frozen=True)
class AnchorFit:
    """Result of :func:`fit_anchors`: the layout and its match shares (before/after)."""

    anchor_sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...]
    share_before: float
    share_after: float
    mean_iou_before: float
    mean_iou_after: float
    boxes: int

    def to_dict(self) -> dict:
        return {"anchor_sizes": [list(level) for level in self.anchor_sizes],
                "aspect_ratios": list(self.aspect_ratios), "share_before": self.share_before,
                "share_after": self.share_after, "mean_iou_before": self.mean_iou_before,
                "mean_iou_after": self.mean_iou_after, "boxes": self.boxes,
                "iou_threshold": MATCH_IOU, "iou": "centre-aligned (shape only)"}


def fit_anchors(boxes_wh: np.ndarray, current_sizes: Sequence[Sequence[float]],
                current_ratios: Sequence[float], seed: int = 0) -> AnchorFit:
    """Grid search of (base size, octave step, ratio set) maximising the matched share.

    Keeps len(ratios) and the number of sizes per level of the current layout (the head's
    output channels depend on it). Ties on the share are broken by the mean best IoU.
    When nothing beats the current layout it is returned unchanged.

    Args:
        boxes_wh: (N, 2) box widths and heights in pixels (N >= 1).
        current_sizes: the model's anchor_sizes (5 levels).
        current_ratios: the model's aspect_ratios.
    """
    boxes_wh = np.asarray(boxes_wh, dtype=np.float64).reshape(-1, 2)
    if len(boxes_wh) == 0:
        raise ValueError("anchor fitting needs at least one training box")
    if len(boxes_wh) > MAX_BOXES:
        pick = np.random.default_rng(seed).choice(len(boxes_wh), MAX_BOXES, replace=False)
        boxes_wh = boxes_wh[np.sort(pick)]
    current_sizes = tuple(tuple(float(s) for s in level) for level in current_sizes)
    current_ratios = tuple(float(r) for r in current_ratios)
    scales = len(current_sizes[0])
    n_ratios = len(current_ratios)
    before = match_share(boxes_wh, current_sizes, current_ratios)

    ratio_sets = _ratio_sets(n_ratios)
    # Base sizes from a quarter of the smallest box side to the smallest box diagonal,
    # log-spaced: the smallest objects must be reachable by P3's smallest anchor.
    side = np.sqrt(boxes_wh.prod(axis=1))
    low, high = max(2.0, 0.5 * np.percentile(side, 1)), max(4.0, 2.0 * np.percentile(side, 1))
    bases = np.unique(np.round(np.geomspace(low, high, 24), 1))
    steps = sorted({1.0 / scales, 1.0 / max(scales - 1, 1) if scales > 1 else 1.0, 0.5 / scales})
    best_key, best = (before[0], before[1]), (current_sizes, current_ratios)
    for ratios in ratio_sets:
        for step in steps:
            for base in bases:
                sizes = pyramid_sizes(float(base), scales, step)
                share, mean_iou = match_share(boxes_wh, sizes, ratios)
                if (share, mean_iou) > best_key:
                    best_key, best = (share, mean_iou), (sizes, ratios)
    best_sizes, best_ratios = best
    after = match_share(boxes_wh, best_sizes, best_ratios)
    return AnchorFit(tuple(tuple(round(s, 2) for s in level) for level in best_sizes), tuple(best_ratios),
                     before[0], after[0], before[1], after[1], len(boxes_wh))


def _ratio_sets(n: int) -> list[tuple[float, ...]]:
    """Candidate ratio sets of size n: symmetric {1/r.., 1, ..r} (odd n) or {1/r, r}-style."""
    if n == 1:
        return [(1.0,)]
    out = []
    for r in RATIO_CANDIDATES:
        if n % 2:
            half = (n - 1) // 2
            extremes = np.geomspace(1.0, r, half + 1)[1:]
            out.append(tuple(sorted([1.0] + [float(1 / e) for e in extremes] + [float(e) for e in extremes])))
        else:
            out.append(tuple(float(v) for v in np.geomspace(1 / r, r, n)))
    return out
