"""Focal loss and box-regression losses."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

from retinanet.options import BOX_LOSSES


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., eq. 5).

    logits, targets: same shape, targets in {0, 1}. alpha < 0 disables the class weighting;
    with alpha < 0 and gamma = 0 it equals binary cross-entropy. Returns the same shape.
    torchvision's, in float32: bf16 logits from autocast would round the many tiny
    losses of easy negatives away.
    """
    return torchvision_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")


def box_regression_loss(kind: str, deltas: Tensor, target_deltas: Tensor | None, pred_boxes: Tensor | None = None,
                        target_boxes: Tensor | None = None, beta: float = 0.1) -> Tensor:
    """Summed box loss over (P, 4) positive anchors.

    kind: "l1" and "smooth_l1" compare deltas (need target_deltas); "giou" compares decoded
    boxes (needs pred_boxes, target_boxes in XYXY pixels; target_deltas may be None).
    """
    if kind in ("l1", "smooth_l1"):
        if target_deltas is None:
            raise ValueError(f"box loss {kind!r} compares deltas: target_deltas is required")
        if kind == "l1":
            return F.l1_loss(deltas.float(), target_deltas, reduction="sum")
        return F.smooth_l1_loss(deltas.float(), target_deltas, beta=beta, reduction="sum")
    if kind == "giou":
        return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")
    choices = ", ".join(repr(k) for k in BOX_LOSSES[:-1]) + f" or {BOX_LOSSES[-1]!r}"
    raise ValueError(f"unknown box loss {kind!r}: expected {choices}")
