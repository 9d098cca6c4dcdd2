"""RetinaNet's postprocessing in numpy, for engines that run the network outside torch.

An OpenVINO actor whose graph is cached then never imports torch (~0.6 GB of resident
memory and ~2 s of start-up per process on this project's machine). The steps are those
of ``RetinaNet.postprocess``: scores above the threshold, at most ``topk_candidates`` per
image and pyramid level; boxes decoded from their anchors in float32 and clipped to the
network's image; class-aware NMS per image; the best ``detections_per_image`` kept; boxes
mapped back to input pixels. NMS is OpenVINO's NonMaxSuppression kernel, given the
threshold so that it suppresses exactly when IoU > threshold, as torchvision's ``nms``.
``tests/test_openvino.py`` checks the whole against the torch model on the same weights.

The geometry (anchors, level sizes, network size, box scale) is computed by the torch
model when its graph is converted and stored beside the graph (:class:`Geometry`), so
anchors and the resize rule have one implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinanet.config import MAX_LOG_SCALE, RetinaNetConfig, logit_bound


@dataclass(frozen=True)
class Geometry:
    """What postprocessing needs to know about one network input size.

    anchors: (A, 4) float32 XYXY network pixels, levels concatenated (``AnchorGenerator``'s
    order); level_counts: anchors per level; network_hw: the size the network sees after the
    config's resize rule; box_scale: (4,) float32 XYXY multipliers from network to input pixels.
    """

    anchors: np.ndarray
    level_counts: tuple[int, ...]
    network_hw: tuple[int, int]
    box_scale: np.ndarray

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, anchors=self.anchors, level_counts=np.asarray(self.level_counts, dtype=np.int64),
                     network_hw=np.asarray(self.network_hw, dtype=np.int64), box_scale=self.box_scale)

    @classmethod
    def load(cls, path: Path) -> "Geometry":
        with np.load(path) as z:
            return cls(z["anchors"], tuple(int(c) for c in z["level_counts"]),
                       (int(z["network_hw"][0]), int(z["network_hw"][1])), z["box_scale"])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def candidates(cls_logits: np.ndarray, level_counts: tuple[int, ...], score_threshold: float,
               topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image index, anchor index, label, score) of every score above the threshold, at
    most ``topk`` per image and level (the highest). cls_logits: (B, A, K) float32.
    The logits are compared first and the sigmoid taken of the survivors only."""
    batch, _, num_classes = cls_logits.shape
    flat = cls_logits.reshape(batch, -1)
    image_index, flat_index = np.nonzero(flat > logit_bound(score_threshold))
    scores = sigmoid(flat[image_index, flat_index])
    keep = scores > score_threshold
    image_index, flat_index, scores = image_index[keep], flat_index[keep], scores[keep]
    anchor_index, labels = np.divmod(flat_index, num_classes)
    level = np.searchsorted(np.cumsum(level_counts), anchor_index, side="right")
    group = image_index * len(level_counts) + level
    order = np.lexsort((-scores, group))  # by group, best score first within each
    best = order[rank_in_groups(group[order]) < topk]
    return image_index[best], anchor_index[best], labels[best], scores[best]


def rank_in_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal, sorted group ids.
    Example: [0, 0, 2, 2, 2] -> [0, 1, 0, 1, 2]."""
    if not len(sorted_groups):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_lengths = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, run_lengths)


def decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """``retinanet.boxes.decode`` with unit weights, in float32: (N, 4) deltas on (N, 4)
    XYXY anchors -> (N, 4) XYXY boxes; scale deltas clamped at MAX_LOG_SCALE."""
    deltas, anchors = deltas.astype(np.float32), anchors.astype(np.float32)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    cx = deltas[:, 0] * widths + (anchors[:, 0] + np.float32(0.5) * widths)
    cy = deltas[:, 1] * heights + (anchors[:, 1] + np.float32(0.5) * heights)
    half_w = np.float32(0.5) * np.exp(np.minimum(deltas[:, 2], np.float32(MAX_LOG_SCALE))) * widths
    half_h = np.float32(0.5) * np.exp(np.minimum(deltas[:, 3], np.float32(MAX_LOG_SCALE))) * heights
    return np.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), axis=1)


def clip_to_image(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Clamp XYXY boxes into [0, W] x [0, H] (torchvision's clip_boxes_to_image)."""
    limits = np.array([image_hw[1], image_hw[0]] * 2, dtype=np.float32)
    return np.clip(boxes, 0, limits).astype(np.float32)


def suppression_threshold(iou_threshold: float) -> np.float32:
    """The float32 threshold t' for which an NMS that suppresses at IoU >= t' suppresses
    exactly the float32 IoUs that torchvision's ``IoU > iou_threshold`` does."""
    t = np.float32(iou_threshold)
    return t if float(t) > iou_threshold else np.nextafter(t, np.float32(np.inf))


class Nms:
    """Class-aware NMS on OpenVINO's CPU kernel, compiled once per process."""

    def __init__(self):
        import openvino as ov
        import openvino.opset13 as ops

        boxes = ops.parameter([1, -1, 4], np.float32, name="boxes")
        scores = ops.parameter([1, -1, -1], np.float32, name="scores")  # (1, groups, boxes)
        iou = ops.parameter([], np.float32, name="iou")
        # A box belongs to one group: its score elsewhere is -1, below the -0.5 floor.
        nms = ops.non_max_suppression(boxes, scores, ops.constant(np.int64(np.iinfo(np.int32).max)), iou,
                                      ops.constant(np.float32(-0.5)), box_encoding="corner",
                                      sort_result_descending=False, output_type="i64")
        model = ov.Model([nms.output(0), nms.output(2)], [boxes, scores, iou], "class_aware_nms")
        self._compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                                 "INFERENCE_PRECISION_HINT": "f32"})

    def __call__(self, boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float) -> np.ndarray:
        """Indices of the boxes kept, best score first (ties: lower index first)."""
        if not len(boxes):
            return np.zeros(0, dtype=np.int64)
        group_ids, group_of = np.unique(groups, return_inverse=True)
        matrix = np.full((len(group_ids), len(boxes)), -1.0, dtype=np.float32)
        matrix[group_of, np.arange(len(boxes))] = scores
        selected, count = self._compiled([boxes[None].astype(np.float32), matrix[None],
                                          suppression_threshold(iou_threshold)]).values()
        kept = selected[: int(count[0]), 2]
        return kept[np.lexsort((kept, -scores[kept]))]


def check_anchor_count(returned: int, level_counts: tuple[int, ...] | list[int], source: str) -> None:
    """Raise when a graph's output does not hold the anchors its geometry expects."""
    if sum(level_counts) != returned:
        raise RuntimeError(f"{source}: the graph returned {returned} anchors, the config implies "
                           f"{sum(level_counts)} (file and metadata disagree)")


def postprocess(cls_logits: np.ndarray, box_deltas: np.ndarray, geometry: Geometry, config: RetinaNetConfig,
                nms: Nms) -> list[dict[str, np.ndarray]]:
    """Detections per image from the network's outputs (cls_logits (B, A, K), box_deltas
    (B, A, 4), float32) -> [{"boxes" (N, 4) float32 XYXY input pixels, "scores" (N,) float32,
    "labels" (N,) int64}], as ``RetinaNet.postprocess`` followed by ``boxes_to_input``."""
    batch, _, num_classes = cls_logits.shape
    image_index, anchor_index, labels, scores = candidates(cls_logits, geometry.level_counts,
                                                           config.score_threshold, config.topk_candidates)
    boxes = clip_to_image(decode(box_deltas[image_index, anchor_index], geometry.anchors[anchor_index]),
                          geometry.network_hw)
    kept = nms(boxes, scores, image_index * num_classes + labels, config.nms_threshold)
    kept = kept[np.argsort(image_index[kept], kind="stable")]  # by image, best score first in each
    kept = kept[rank_in_groups(image_index[kept]) < config.detections_per_image]
    boxes = boxes * geometry.box_scale  # network to input pixels (ones without a resize rule)
    return [{"boxes": boxes[mine], "scores": scores[mine], "labels": labels[mine].astype(np.int64)}
            for mine in (kept[image_index[kept] == i] for i in range(batch))]
