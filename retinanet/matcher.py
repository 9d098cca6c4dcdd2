"""Anchor-to-ground-truth matching for a whole batch at once."""
from __future__ import annotations

import torch
from torch import Tensor

from retinanet.boxes import pairwise_iou

# Matcher states stored in place of a ground-truth index.
BACKGROUND = -1  # best IoU < low threshold: a negative
IGNORE = -2      # low <= best IoU < high threshold: contributes to no loss


def match(iou: Tensor, valid_gt: Tensor, high: float = 0.5, low: float = 0.4,
          allow_low_quality: bool = True) -> Tensor:
    """Assign every anchor a ground-truth index, BACKGROUND or IGNORE.

    iou: (B, G, A) IoU of each (padded) ground-truth box with each anchor.
    valid_gt: (B, G) bool, False for padding rows.
    Returns (B, A) int64.

    Rules (the paper's): IoU >= high -> that box; IoU < low -> BACKGROUND; else IGNORE.
    Low-quality rule (torchvision's): for each box, the anchors that reach its highest IoU
    keep their best match even below `high`, so every box gets at least one positive.
    Unlike torchvision, a box whose best IoU is 0 (it overlaps no anchor) recruits nothing.
    """
    if low > high:
        raise ValueError(f"low threshold {low} must not exceed high threshold {high}")
    B, G, A = iou.shape
    if G == 0:
        return torch.full((B, A), BACKGROUND, dtype=torch.int64, device=iou.device)
    iou = iou.masked_fill(~valid_gt[:, :, None], -1.0)
    best_iou, best_gt = iou.max(dim=1)  # (B, A)
    matches = best_gt.clone()
    matches[best_iou < high] = IGNORE
    matches[best_iou < low] = BACKGROUND
    if allow_low_quality:
        best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, G, 1)
        reaches_best = (iou == best_per_gt) & (best_per_gt > 0) & valid_gt[:, :, None]
        promote = reaches_best.any(dim=1)  # (B, A)
        matches[promote] = best_gt[promote]
    return matches


def pad_targets(targets: list[dict], device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into padded tensors.

    Returns boxes (B, G, 4) float32, labels (B, G) int64, valid (B, G) bool, G = max boxes.
    """
    B = len(targets)
    G = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros((B, G, 4), dtype=torch.float32, device=device)
    labels = torch.zeros((B, G), dtype=torch.int64, device=device)
    valid = torch.zeros((B, G), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):  # a loop over images only to copy ragged lists in
        n = len(t["boxes"])
        boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, :n] = t["labels"].to(device=device, dtype=torch.int64)
        valid[i, :n] = True
    return boxes, labels, valid


def match_batch(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, high: float, low: float,
                allow_low_quality: bool) -> Tensor:
    """Match (A, 4) anchors to padded (B, G, 4) boxes -> (B, A) matches (see `match`)."""
    if gt_boxes.shape[1] == 0:
        return torch.full((gt_boxes.shape[0], anchors.shape[0]), BACKGROUND, dtype=torch.int64,
                          device=anchors.device)
    iou = pairwise_iou(gt_boxes, anchors[None])
    return match(iou, gt_valid, high, low, allow_low_quality)
