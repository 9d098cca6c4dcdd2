"""Box math on tensors. Boxes are (N, 4) float, XYXY, pixels, with x2 > x1 and y2 > y1."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

from retinanet.config import MAX_LOG_SCALE


def box_area(boxes: Tensor) -> Tensor:
    """Area of (..., 4) XYXY boxes; (...,)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in a (..., N, 4) with every box in b (..., M, 4) -> (..., N, M).

    Works batched: leading dimensions broadcast, so matching a whole batch is one call.
    """
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def encode(reference: Tensor, target: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression deltas (dx, dy, dw, dh) that turn `reference` boxes into `target` boxes.

    reference, target: (..., 4) XYXY pixels -> (..., 4) deltas, as in Girshick et al.:
    dx = wx * (tx - rx) / rw, dw = ww * log(tw / rw). Invariant: decode(encode(r, t), r) == t.
    """
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    tw = target[..., 2] - target[..., 0]
    th = target[..., 3] - target[..., 1]
    tx = target[..., 0] + 0.5 * tw
    ty = target[..., 1] + 0.5 * th
    return torch.stack(
        (wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)), dim=-1
    )


def decode(deltas: Tensor, reference: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Apply (..., 4) deltas to (..., 4) XYXY reference boxes -> (..., 4) XYXY boxes.

    Always computed in float32 (half-precision exp() of a scale delta loses whole pixels);
    dw, dh are clamped at log(1000/16).
    """
    deltas = deltas.float()
    reference = reference.float()
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=MAX_LOG_SCALE)
    dh = (deltas[..., 3] / wh).clamp(max=MAX_LOG_SCALE)
    cx = dx * rw + rx
    cy = dy * rh + ry
    half_w = 0.5 * torch.exp(dw) * rw
    half_h = 0.5 * torch.exp(dh) * rh
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (class, or image x class), as ONE ``torchvision.ops.nms`` call.

    boxes: (N, 4) XYXY pixels; scores: (N,); groups: (N,) int64 -> int64 indices of the kept
    boxes, by decreasing score. Same kept set as ``torchvision.ops.batched_nms``, whose
    coordinate trick it uses at every size: above 4,000 (CPU) / 100,000 (CUDA) coordinates
    torchvision switches to one NMS call per group instead, i.e. 128 synchronising calls for a
    batch of 64 two-class chips. Each group is shifted by group * (span + 1) so no two groups
    overlap; the shift is done in float64, where float32 coordinates plus integer offsets are
    exact, so every IoU equals the unshifted one (in float32 the offsets would round the
    coordinates of high groups to 1/128 px).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    exact = boxes.double()
    low = exact.min()
    span = exact.max() - low + 1
    shifted = exact - low + (groups.to(exact) * span)[:, None]
    return nms(shifted, scores.double(), iou_threshold)
