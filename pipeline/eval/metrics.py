"""Detection metrics on in-memory boxes: COCO (pycocotools' protocol, run by faster-coco-eval),
PASCAL VOC AP.

No pipeline imports: the evaluation of runs and checkpoints (:mod:`pipeline.eval.evaluate`),
training's validation and the INT8 gate all score boxes with these functions.

COCO protocol notes: images are scenes (or chips); area ranges small < 32^2 <= medium <
96^2 <= large, in pixels; ``maxDets`` is (1, 100, M) where M is at least the largest
number of detections of any image, so big scenes are not cut at COCO's 100 detections
(every AP below uses M). Metrics that have no ground truth (e.g. AP_small when there is
no small object) are ``None``. Boxes are pixel EDGE coordinates (no VOC "+1"). Each
scene is matched in independent parts (:func:`split_for_matching`), which gives the
figures of the scene matched as one image at a cost linear in its boxes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

AREA_NAMES = ("all", "small", "medium", "large")


@dataclass(frozen=True, eq=False)
class ImageBoxes:
    """Boxes of one image (scene or chip).

    boxes: (N, 4) float XYXY pixel edges; labels: (N,) int class indices;
    scores: (N,) float for detections, None for ground truth.
    """

    image_id: str
    boxes: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    scores: Optional[np.ndarray] = field(default=None, repr=False)
    width: int = 0
    height: int = 0


# ----------------------------------------------------------------------------- COCO


def _coco_objects(truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes], classes: Sequence[str]):
    """faster-coco-eval COCO objects for ground truth and detections, built in memory, and
    each detection annotation's (class index, score), indexed by annotation id - 1."""
    from faster_coco_eval import COCO

    ids = {t.image_id: i + 1 for i, t in enumerate(truth)}
    images = [{"id": ids[t.image_id], "file_name": t.image_id, "width": t.width, "height": t.height}
              for t in truth]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]

    def annotations(items: Sequence[ImageBoxes], with_scores: bool) -> tuple[list[dict], np.ndarray, np.ndarray]:
        out: list[dict] = []
        all_labels, all_scores = [], []
        for item in items:
            if item.image_id not in ids:
                continue
            boxes = np.asarray(item.boxes, dtype=np.float64).reshape(-1, 4)
            labels = np.asarray(item.labels, dtype=np.int64).reshape(-1)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            area = xywh[:, 2] * xywh[:, 3]
            scores = np.asarray(item.scores, dtype=np.float64).reshape(-1) if with_scores else np.zeros(len(boxes))
            image = ids[item.image_id]
            # tolist() once per image: the per-annotation loop then touches plain Python numbers only
            for bbox, a, label, score in zip(xywh.tolist(), area.tolist(), (labels + 1).tolist(), scores.tolist()):
                ann = {"id": len(out) + 1, "image_id": image, "category_id": label, "bbox": bbox, "area": a,
                       "iscrowd": 0}
                if with_scores:
                    ann["score"] = score
                out.append(ann)
            all_labels.append(labels)
            all_scores.append(scores)
        return (out, np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64),
                np.concatenate(all_scores) if all_scores else np.zeros(0))

    gt_anns, _, _ = annotations(truth, False)
    dt_anns, dt_labels, dt_scores = annotations(detections, True)
    gt = COCO({"images": images, "categories": categories, "annotations": gt_anns}, print_function=_quiet)
    dt = COCO({"images": images, "categories": categories, "annotations": dt_anns}, print_function=_quiet)
    return gt, dt, dt_labels, dt_scores


def _quiet(*_args, **_kwargs) -> None:
    """faster-coco-eval's progress lines are not ours to print."""


def _mean_valid(values: np.ndarray) -> Optional[float]:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def pr_curve_points(matched: np.ndarray, scores: np.ndarray, n_truth: int) -> dict[str, list[float]]:
    """The precision-recall curve of one class at one IoU threshold, every point.

    matched: (D,) bool, detection is a true positive; scores: (D,) its scores; n_truth: the
    class's ground-truth boxes (> 0). Detections are ranked by score (stable, as COCO).
    A point per true positive (where recall steps up): ``recall`` = TP / n_truth,
    ``precision`` = COCO's interpolated precision there (the best precision at this recall
    or beyond), ``score`` = the score of that detection (keeping detections scoring at
    least it gives that point). The curve ends at the class's final recall; it has no
    point when nothing matched.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    tp = np.asarray(matched, dtype=bool)[order]
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
    steps = np.flatnonzero(tp)
    return {"recall": (cum_tp[steps] / n_truth).tolist(), "precision": envelope[steps].tolist(),
            "score": np.asarray(scores, dtype=np.float64)[order][steps].tolist()}


# Boxes per matching part: COCO's matcher compares every detection with every truth box of
# its image, so a scene of N objects costs ~N^2; parts of about this many boxes cost ~N.
PART_BOXES = 64
# Candidate box pairs examined at once by overlap_components (bounds its memory).
PAIR_CHUNK = 2_000_000


def overlap_components(boxes: np.ndarray, tied: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Connected components of boxes that overlap with a positive area.

    boxes: (N, 4) float XYXY; tied: index arrays whose members are joined as if they
    overlapped. Returns (N,) int64: for each box the smallest index of its component.
    Pairs come from a sweep along x (sorted x1; a box meets the boxes starting before its
    x2), checked on y; components by hooking each pair's larger root under the smaller
    one, then path compression, until no pair joins two roots.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    parent = np.arange(n)
    order = np.argsort(boxes[:, 0], kind="stable")
    x1, y1, x2, y2 = (boxes[order, c] for c in range(4))
    ends = np.searchsorted(x1, x2, side="left")  # sorted boxes j < ends[i] start before box i ends
    counts = np.maximum(ends - np.arange(1, n + 1), 0)
    firsts, seconds = [], []
    start = 0
    while start < n:
        stop = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]), PAIR_CHUNK, side="right")))
        c = counts[start:stop]
        i = np.repeat(np.arange(start, stop), c)
        j = i + 1 + np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
        meet = (x1[i] < x2[j]) & (y1[j] < y2[i]) & (y1[i] < y2[j])
        firsts.append(order[i[meet]])
        seconds.append(order[j[meet]])
        start = stop
    for members in tied:
        members = np.asarray(members, dtype=np.int64)
        firsts.append(members[:-1])
        seconds.append(members[1:])
    a = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    b = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[apart], np.minimum(ra, rb)[apart])
        while True:  # every box points at its root again
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        a, b = a[apart], b[apart]
    return parent


def split_for_matching(truth: ImageBoxes, detections: ImageBoxes, part_boxes: int = PART_BOXES
                       ) -> list[tuple[ImageBoxes, ImageBoxes]]:
    """One scene as independent parts whose COCO evaluation equals the scene's.

    COCO matches each detection to a truth box of its image with IoU >= a threshold (> 0),
    and only then ranks all images' detections together by score. A part is a union of
    whole components of overlapping boxes (:func:`overlap_components`), so no match can
    cross two parts; parts keep the scene's order of boxes, and every detection whose score
    equals another's in the scene is joined into one component, so equal scores rank in
    the scene's order as they do when the scene is one image. Components are packed, in
    the order of their first box, into parts of about ``part_boxes`` boxes.
    Returns [(truth part, detections part)], sharing the scene's width and height.
    """
    gt_boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
    dt_boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    n_gt = len(gt_boxes)
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    by_score = np.argsort(scores, kind="stable")
    _, first, size = np.unique(scores[by_score], return_index=True, return_counts=True)
    tied = [n_gt + by_score[f:f + s] for f, s in zip(first[size > 1], size[size > 1])]
    root = overlap_components(np.concatenate([gt_boxes, dt_boxes]), tied)
    roots, root_of_box, sizes = np.unique(root, return_inverse=True, return_counts=True)
    part_of_root = (np.cumsum(sizes) - sizes) // part_boxes  # roots ascend: components in order of first box
    part = part_of_root[root_of_box]
    gt_labels = np.asarray(truth.labels).reshape(-1)
    dt_labels = np.asarray(detections.labels).reshape(-1)
    gt_order, dt_order = np.argsort(part[:n_gt], kind="stable"), np.argsort(part[n_gt:], kind="stable")
    parts = np.arange(int(part.max()) + 2 if part.size else 1)
    gt_cut = np.searchsorted(part[:n_gt][gt_order], parts)
    dt_cut = np.searchsorted(part[n_gt:][dt_order], parts)
    out = []
    for k in parts[:-1]:
        g, d = gt_order[gt_cut[k]:gt_cut[k + 1]], dt_order[dt_cut[k]:dt_cut[k + 1]]
        out.append((ImageBoxes(f"{truth.image_id}#{k}", gt_boxes[g], gt_labels[g], None, truth.width, truth.height),
                    ImageBoxes(f"{truth.image_id}#{k}", dt_boxes[d], dt_labels[d], scores[d], truth.width,
                               truth.height)))
    return out


def coco_metrics(truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes],
                 classes: Sequence[str]) -> dict:
    """COCO box metrics of ``detections`` against ``truth``: the COCOeval protocol of
    pycocotools, run by faster-coco-eval (its C++ matcher; pycocotools' Python matcher
    grows with the square of the objects in a scene: minutes for one dense scene).

    Images are the ``truth`` images (an image with no ground truth still counts its
    false positives); detections of other images are ignored.

    Returns a dict: AP, AP50, AP75, AP_small, AP_medium, AP_large, AR (at M detections),
    per_class {name: {"AP", "AP50"}}, pr_curve {name: :func:`pr_curve_points` at IoU 0.5,
    area all} for classes with ground truth, images, ground_truth, detections, max_dets.
    """
    from faster_coco_eval import COCOeval_faster

    scene_dets: dict[str, list[ImageBoxes]] = {}
    for d in detections:
        scene_dets.setdefault(d.image_id, []).append(d)
    parts_truth, parts_dets = [], []
    for t in truth:  # each scene as independent parts: the same figures, at a cost linear in its boxes
        found = scene_dets.get(t.image_id, [])
        merged = ImageBoxes(t.image_id, np.concatenate([np.asarray(d.boxes, np.float64).reshape(-1, 4) for d in found]
                                                       + [np.zeros((0, 4))]),
                            np.concatenate([np.asarray(d.labels, np.int64).reshape(-1) for d in found]
                                           + [np.zeros(0, np.int64)]),
                            np.concatenate([np.asarray(d.scores, np.float64).reshape(-1) for d in found]
                                           + [np.zeros(0)]), t.width, t.height)
        for part_truth, part_dets in split_for_matching(t, merged):
            parts_truth.append(part_truth)
            parts_dets.append(part_dets)
    gt, dt, dt_labels, dt_scores = _coco_objects(parts_truth, parts_dets, classes)
    most = max([len(d.boxes) for d in detections] + [0])
    max_dets = max(100, most)
    n_gt = sum(len(t.boxes) for t in truth)
    n_dt = len(dt_labels)
    # counts, then the metrics (None when there is no ground truth), per_class and pr_curve
    result: dict[str, Any] = {"images": len(truth), "ground_truth": n_gt, "detections": n_dt, "max_dets": max_dets}
    keys = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR")
    if n_gt == 0:
        result.update({k: None for k in keys})
        result.update(per_class={name: {"AP": None, "AP50": None} for name in classes}, pr_curve={})
        return result
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
    ev.params.maxDets = [1, 100, max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"]  # (T=10 IoUs, R=101 recalls, K classes, A=4 areas, M=3)
    recall = ev.eval["recall"]        # (T, K, A, M)
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    iou75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    area = {name: AREA_NAMES.index(name) for name in AREA_NAMES}
    result.update({
        "AP": _mean_valid(precision[:, :, :, area["all"], -1]),
        "AP50": _mean_valid(precision[iou50, :, :, area["all"], -1]),
        "AP75": _mean_valid(precision[iou75, :, :, area["all"], -1]),
        "AP_small": _mean_valid(precision[:, :, :, area["small"], -1]),
        "AP_medium": _mean_valid(precision[:, :, :, area["medium"], -1]),
        "AP_large": _mean_valid(precision[:, :, :, area["large"], -1]),
        "AR": _mean_valid(recall[:, :, area["all"], -1]),
    })
    # faster-coco-eval's "matched": {"<dt id>_<gt id>": IoU} at the first IoU threshold (COCO's
    # 0.5), area all, the largest maxDets: the true positives of the AP50 curve (the tests
    # check the curve's 101-point area against pycocotools' AP50).
    true_positive = np.zeros(n_dt, dtype=bool)
    dt_ids = [int(pair.split("_", 1)[0]) for pair in ev.eval["matched"]]
    true_positive[np.asarray(dt_ids, dtype=np.int64) - 1] = True
    gt_labels = np.concatenate([np.asarray(t.labels, dtype=np.int64).reshape(-1) for t in truth])
    per_class, curves = {}, {}
    for k, name in enumerate(classes):
        per_class[name] = {"AP": _mean_valid(precision[:, :, k, area["all"], -1]),
                           "AP50": _mean_valid(precision[iou50, :, k, area["all"], -1])}
        n_truth = int((gt_labels == k).sum())
        if n_truth:
            mine = dt_labels == k
            curves[name] = pr_curve_points(true_positive[mine], dt_scores[mine], n_truth)
    result["per_class"] = per_class
    result["pr_curve"] = curves
    return result


# ------------------------------------------------------------------------------ VOC


def pairwise_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of XYXY boxes a (N, 4) and b (M, 4), pixel edges (no +1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the interpolated PR curve, all points (VOC 2010+ devkit).

    The precision envelope p_interp(r) = max_{r' >= r} p(r') is integrated exactly over
    the recall steps: AP = sum_i (r_i - r_{i-1}) * p_interp(r_i), with r_0 = 0.
    """
    r = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def match_detections(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                     iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Match one image's detections of one class to its ground truth (the VOC devkit rule).

    boxes: (N, 4) XYXY pixel edges, scores: (N,), truth: (M, 4). Detections are taken by
    descending score (ties in input order); each is a true positive when its
    best-overlapping truth box has IoU >= ``iou_threshold`` and was not taken by a
    higher-scoring detection (no fall-back to the second-best box).
    Returns (matched: (N,) bool per detection, found: (M,) bool per truth box); the
    detections not matched are false alarms, the truth boxes not found are misses.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    matched = np.zeros(len(boxes), dtype=bool)
    found = np.zeros(len(truth), dtype=bool)
    if not len(boxes) or not len(truth):
        return matched, found
    ious = pairwise_iou_np(boxes, truth)
    best = ious.argmax(axis=1)
    for i in np.argsort(-np.asarray(scores, np.float64).reshape(-1), kind="stable"):
        j = best[i]
        if ious[i, j] >= iou_threshold and not found[j]:
            found[j] = matched[i] = True
    return matched, found


def best_overlaps(boxes: np.ndarray, others: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``boxes`` (N, 4) XYXY: the index of its best-overlapping box among
    ``others`` (M >= 1, the first on equal IoU, as np.argmax) and that IoU; (N,) int64 and
    (N,) float64. Rows are done ``chunk`` at a time so memory stays O(chunk * M)."""
    index, iou = np.zeros(len(boxes), dtype=np.int64), np.zeros(len(boxes))
    for start in range(0, len(boxes), chunk):
        ious = pairwise_iou_np(boxes[start:start + chunk], others)
        index[start:start + chunk] = np.argmax(ious, axis=1)
        iou[start:start + chunk] = ious[np.arange(len(ious)), index[start:start + chunk]]
    return index, iou


def voc_class_ap(truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes], label: int,
                 iou_threshold: float = 0.5) -> Optional[float]:
    """VOC AP of one class: detections sorted by score; each is a true positive when its
    best-overlapping ground-truth box of the class (same image) has IoU >= threshold and
    was not taken by a higher-scoring detection, else a false positive (the devkit rule:
    no fall-back to the second-best box). None when the class has no ground truth.

    The best box of a detection does not depend on the others, so it is found for all at
    once; a detection is then a true positive when it is the first, in score order, to
    claim its box above the threshold."""
    gt = {t.image_id: np.asarray(t.boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(t.labels) == label]
          for t in truth}
    image_index = {image_id: i for i, image_id in enumerate(gt)}
    n_gt = sum(len(b) for b in gt.values())
    if n_gt == 0:
        return None
    scores, claims = [], []  # per detection of the class, in input order: score, (image, box) claimed or -1
    for d in detections:
        if d.image_id not in gt:
            continue
        keep = np.asarray(d.labels) == label
        boxes = np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4)[keep]
        scores.append(np.asarray(d.scores, dtype=np.float64)[keep])
        claim = np.full((len(boxes), 2), -1, dtype=np.int64)
        if len(gt[d.image_id]) and len(boxes):
            index, iou = best_overlaps(boxes, gt[d.image_id])
            hit = iou >= iou_threshold
            claim[hit] = np.stack([np.full(hit.sum(), image_index[d.image_id]), index[hit]], axis=1)
        claims.append(claim)
    if not scores or not sum(len(s) for s in scores):
        return 0.0
    score = np.concatenate(scores)
    order = np.argsort(-score, kind="stable")  # ties keep input order
    claim = np.concatenate(claims)[order]
    tp = np.zeros(len(order))
    claimed = np.flatnonzero(claim[:, 0] >= 0)
    _, first = np.unique(claim[claimed], axis=0, return_index=True)  # the first claim of each box wins
    tp[claimed[first]] = 1
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_gt
    precision = cum_tp / np.arange(1, len(order) + 1)
    return all_point_ap(recall, precision)


def voc_metrics(truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes],
                classes: Sequence[str], iou_threshold: float = 0.5) -> dict:
    """{"mAP": mean over classes with ground truth, "per_class": {name: AP or None}}."""
    per_class = {name: voc_class_ap(truth, detections, k, iou_threshold) for k, name in enumerate(classes)}
    valid = [v for v in per_class.values() if v is not None]
    return {"mAP": float(np.mean(valid)) if valid else None, "per_class": per_class,
            "iou_threshold": iou_threshold, "interpolation": "all-point"}
