"""Seam merge: pair search, NMS against oracles, the oracle-detector scene, WBF by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from pipeline.infer.merge import (
    KEPT,
    greedy_clusters,
    intersecting_pairs,
    merge_detections,
    nms,
    pair_iou,
    seam_zones,
)

CHIP, OVERLAP = 512, 64


# ---------------------------------------------------------------- helpers / oracles


def chip_starts(size: int, chip: int = CHIP, overlap: int = OVERLAP) -> list[int]:
    """Chip offsets along one axis: stride chip - overlap, last chip snapped to the edge.

    Written here on purpose (not imported from pipeline.chips.tiling) so the merge test does
    not depend on the tiling code it would otherwise share mistakes with.
    """
    stride = chip - overlap
    starts = list(range(0, size - chip + 1, stride))
    if starts[-1] + chip < size:
        starts.append(size - chip)
    return starts


def chip_windows(width: int, height: int) -> np.ndarray:
    """(M, 4) XYXY windows of the chip grid over a width x height scene."""
    return np.array(
        [[x, y, x + CHIP, y + CHIP] for y in chip_starts(height) for x in chip_starts(width)], np.float64
    )


def iou_one(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def python_nms(boxes, scores, labels, thr) -> list[int]:
    """Plain greedy class-wise NMS: the textbook loop, quadratic, obviously right."""
    order = sorted(range(len(boxes)), key=lambda k: (-scores[k], k))
    kept: list[int] = []
    for k in order:
        if all(labels[k] != labels[m] or iou_one(boxes[k], boxes[m]) <= thr for m in kept):
            kept.append(k)
    return kept


def oracle_detector(objects: np.ndarray, labels: np.ndarray, windows: np.ndarray):
    """Each chip 'detects' every object that shows in it: the true box clipped to the
    chip, score 0.9 x visible fraction (a truncated view is less certain), in scene px."""
    out_b, out_s, out_l, out_c = [], [], [], []
    area = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    for k, w in enumerate(windows):
        clipped = np.concatenate([np.maximum(objects[:, :2], w[:2]), np.minimum(objects[:, 2:], w[2:])], axis=1)
        vis = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
        seen = vis > 0
        out_b.append(clipped[seen])
        out_s.append(0.9 * vis[seen] / area[seen])
        out_l.append(labels[seen])
        out_c.append(np.full(seen.sum(), k))
    return tuple(np.concatenate(x) for x in (out_b, out_s, out_l, out_c))


def place_objects(rng, n, width, height, min_side, max_side, fixed=()):
    """n random boxes (plus ``fixed`` ones) that keep a 2 px gap from each other, so a
    correct merge must return every one of them."""
    boxes = [np.asarray(f, np.float64) for f in fixed]
    while len(boxes) < n + len(fixed):
        w, h = rng.uniform(min_side, max_side, 2)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cand = np.array([x0, y0, x0 + w, y0 + h])
        if all(cand[0] >= b[2] + 2 or b[0] >= cand[2] + 2 or cand[1] >= b[3] + 2 or b[1] >= cand[3] + 2 for b in boxes):
            boxes.append(cand)
    return np.stack(boxes)


def assert_each_object_once(result, objects, labels, min_iou=0.9):
    """Every object matched by exactly one output of its class, with IoU >= min_iou,
    and no output left over."""
    assert len(result.boxes) == len(objects)
    iou = pair_iou(
        np.repeat(objects, len(result.boxes), axis=0), np.tile(result.boxes.astype(np.float64), (len(objects), 1))
    ).reshape(len(objects), len(result.boxes))
    iou[labels[:, None] != result.labels[None, :]] = 0
    best = iou.argmax(axis=1)
    assert (iou.max(axis=1) >= min_iou).all(), np.flatnonzero(iou.max(axis=1) < min_iou)
    assert len(set(best.tolist())) == len(objects)  # a one-to-one assignment


# ---------------------------------------------------------------- pair search and NMS


def test_intersecting_pairs_equals_brute_force():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 300, (400, 2))
    wh = rng.uniform(0, 40, (400, 2)) ** rng.uniform(0.5, 1.5, (400, 1))  # some zero-width, some big
    boxes = np.concatenate([xy, xy + wh], axis=1)
    groups = rng.integers(0, 3, 400)
    i, j = intersecting_pairs(boxes, groups)
    got = set(zip(i.tolist(), j.tolist()))
    want = {
        (a, b)
        for a in range(400)
        for b in range(a + 1, 400)
        if groups[a] == groups[b]
        and min(boxes[a, 2], boxes[b, 2]) > max(boxes[a, 0], boxes[b, 0])
        and min(boxes[a, 3], boxes[b, 3]) > max(boxes[a, 1], boxes[b, 1])
    }
    assert len(i) == len(got)  # no pair reported twice
    assert got == want


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7])
def test_nms_equals_python_oracle(thr):
    rng = np.random.default_rng(int(thr * 10))
    # Clumps of jittered boxes so suppression chains actually happen.
    centres = rng.uniform(0, 500, (40, 2))
    pts = centres[rng.integers(0, 40, 600)] + rng.normal(0, 6, (600, 2))
    wh = rng.uniform(10, 40, (600, 2))
    boxes = np.concatenate([pts - wh / 2, pts + wh / 2], axis=1)
    scores = np.round(rng.uniform(0, 1, 600), 2)  # rounded: ties happen and must break by index
    labels = rng.integers(0, 2, 600)
    keep = nms(boxes, scores, labels, thr)
    assert keep.tolist() == python_nms(boxes.tolist(), scores.tolist(), labels.tolist(), thr)
    assert 0 < len(keep) < 600


def test_nms_equals_torchvision_batched_nms():
    rng = np.random.default_rng(11)
    pts = rng.uniform(0, 400, (800, 2))
    wh = rng.uniform(5, 60, (800, 2))
    boxes = np.concatenate([pts, pts + wh], axis=1).astype(np.float32)
    scores = rng.permutation(800).astype(np.float32) / 800  # distinct: torchvision's tie order is unspecified
    labels = rng.integers(0, 4, 800)
    ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5)
    assert nms(boxes, scores, labels, 0.5).tolist() == ref.tolist()


def test_greedy_clusters_spreading_follows_chains_only_through_spreaders():
    # 0 matches 1, 1 matches 2; 0 and 2 do not match. Scores decrease 0 > 1 > 2.
    scores = np.array([0.9, 0.8, 0.7])
    i, j = np.array([0, 1]), np.array([1, 2])
    assert greedy_clusters(scores, i, j).tolist() == [KEPT, 0, KEPT]  # plain NMS: 2 survives
    spreads = np.array([False, True, False])
    assert greedy_clusters(scores, i, j, spreads).tolist() == [KEPT, 0, 0]


# ---------------------------------------------------------------- seam zones


def test_seam_zones_measure_real_overlap_next_to_snapped_chip():
    # 1500 px wide, one row: offsets 0, 448, 896 and the snapped 988 (= 1500 - 512).
    w = chip_windows(1500, 512)
    assert w[:, 0].tolist() == [0, 448, 896, 988]
    z = seam_zones(w)
    # Columns: LEFT, TOP, RIGHT, BOTTOM. Overlaps: 512-448 = 64, 960-896 = 64,
    # 1408-988 = 420 between the last two; scene borders have no zone.
    assert z.tolist() == [[0, 0, 64, 0], [64, 0, 64, 0], [64, 0, 420, 0], [420, 0, 0, 0]]
    # seam_margin raises shallow zones but never creates one at the scene border.
    assert seam_zones(w, 100)[:, [0, 2]].tolist() == [[0, 100], [100, 100], [100, 420], [420, 0]]


# ---------------------------------------------------------------- the oracle scene


def seam_straddlers():
    """Objects placed on purpose across seams, on 4-chip corners and next to the
    snapped last chip of a 1500 x 1500 scene (chip offsets 0, 448, 896, 988)."""
    return [
        [490, 100, 530, 130],  # across x=512 (right edge of chip 0)
        [440, 200, 470, 240],  # across x=448 (left edge of chip 1)
        [100, 500, 140, 520],  # across y=512
        [500, 500, 530, 530],  # in the 4-chip overlap square
        [440, 440, 455, 455],  # across both left/top edges of chip (1, 1)
        [950, 700, 1000, 740],  # three chips along x: 960, 988 and 896 edges
        [1400, 1400, 1420, 1420],  # across x=1408 and y=1408 (snapped chip overlap)
    ]


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_oracle_detector_every_object_once(method):
    rng = np.random.default_rng(5)
    windows = chip_windows(1500, 1500)
    objects = place_objects(rng, 250, 1500, 1500, 6, 60, fixed=seam_straddlers())
    labels = rng.integers(0, 3, len(objects))
    boxes, scores, det_labels, chip = oracle_detector(objects, labels, windows)
    assert len(boxes) > len(objects) * 1.2  # plenty of duplicates to remove
    result = merge_detections(boxes, scores, det_labels, chip, windows, method=method, seam_margin=OVERLAP)
    assert_each_object_once(result, objects, labels)
    # Objects smaller than the overlap are each seen whole by some chip, so the merge
    # returns the true box exactly and the full-view score.
    np.testing.assert_allclose(np.sort(result.scores), 0.9, rtol=1e-6)


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_oracle_detector_objects_larger_than_overlap(method):
    # Up to 200 px: no chip sees some of them whole; the merge must join the views.
    rng = np.random.default_rng(8)
    windows = chip_windows(1500, 1500)
    objects = place_objects(rng, 40, 1500, 1500, 20, 200, fixed=[[400, 400, 580, 590], [900, 820, 1010, 1010]])
    labels = np.zeros(len(objects), np.int64)
    boxes, scores, det_labels, chip = oracle_detector(objects, labels, windows)
    result = merge_detections(boxes, scores, det_labels, chip, windows, method=method, seam_margin=OVERLAP)
    assert_each_object_once(result, objects, labels, min_iou=0.999)


def test_interior_detections_pass_through_untouched():
    windows = chip_windows(1500, 1500)
    # Two same-class boxes in the middle of chip 0 with IoU 0.81: the model's NMS kept
    # both, the seam pass must not second-guess it. One seam pair of different classes.
    boxes = np.array([[200, 200, 300, 300], [205, 205, 305, 305], [490, 50, 530, 90], [490, 50, 530, 90]], np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 1, 0, 2])
    chip = np.array([0, 0, 0, 1])
    r = merge_detections(boxes, scores, labels, chip, windows, seam_margin=OVERLAP)
    assert r.source.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(r.boxes, boxes.astype(np.float32))
    np.testing.assert_array_equal(r.scores, scores.astype(np.float32))


# ---------------------------------------------------------------- hand-computed cases

# Two chips side by side: A = [0, 100] and B = [60, 160] in x, both [0, 100] in y.
TWO = np.array([[0, 0, 100, 100], [60, 0, 160, 100]], np.float64)


def test_wbf_hand_example_two_complete_views():
    # Object inside the overlap, seen whole by both chips.
    boxes = np.array([[70, 10, 90, 30], [72, 12, 92, 32]], np.float64)
    # IoU = 18*18 / (400 + 400 - 324) = 324/476 = 0.68 > 0.5: one cluster.
    r = merge_detections(boxes, [0.8, 0.6], [0, 0], [0, 1], TWO, method="wbf")
    # Score-weighted sides: x0 = (0.8*70 + 0.6*72)/1.4 = 99.2/1.4 = 70.857..., etc.
    np.testing.assert_allclose(r.boxes, [[99.2 / 1.4, 15.2 / 1.4, 127.2 / 1.4, 43.2 / 1.4]], rtol=1e-6)
    # Mean score 0.7; T = 2 views, N = 2 chips see it whole: 0.7 * min(2, 2)/2 = 0.7.
    np.testing.assert_allclose(r.scores, [0.7], rtol=1e-6)
    assert r.source.tolist() == [0]


def test_wbf_hand_example_missed_by_one_chip():
    # The same object detected only by A: WBF halves it, 0.8 * min(1, 2)/2 = 0.4.
    r = merge_detections(np.array([[70, 10, 90, 30]]), [0.8], [0], [0], TWO, method="wbf")
    np.testing.assert_allclose(r.scores, [0.4], rtol=1e-6)
    np.testing.assert_allclose(r.boxes, [[70, 10, 90, 30]])
    # NMS keeps scores as they are.
    assert merge_detections(np.array([[70, 10, 90, 30]]), [0.8], [0], [0], TWO).scores.tolist() == pytest.approx([0.8])


@pytest.mark.parametrize("a_score, b_score", [(0.3, 0.9), (0.95, 0.9)])
def test_truncated_view_never_shrinks_the_box(a_score, b_score):
    # Object [90, 120] x [50, 70]: A sees [90, 100] (cut at its right edge x=100);
    # B sees it whole. Plain IoU = 10*20 / (30*20) = 0.33 < 0.5, but restricted to the
    # common strip [60, 100] both views are [90, 100]: IoU 1, one cluster.
    boxes = np.array([[90, 50, 100, 70], [90, 50, 120, 70]], np.float64)
    for method in ("nms", "wbf"):
        r = merge_detections(boxes, [a_score, b_score], [0, 0], [0, 1], TWO, method=method)
        np.testing.assert_allclose(r.boxes, [[90, 50, 120, 70]])
    # NMS keeps the keeper's score (the higher one); WBF the complete view's: B's 0.9,
    # T = 1 complete view, N = 1 chip (B) sees [90, 120] whole.
    nms_r = merge_detections(boxes, [a_score, b_score], [0, 0], [0, 1], TWO, method="nms")
    wbf_r = merge_detections(boxes, [a_score, b_score], [0, 0], [0, 1], TWO, method="wbf")
    assert nms_r.scores.tolist() == pytest.approx([max(a_score, b_score)])
    assert wbf_r.scores.tolist() == pytest.approx([b_score])


def test_wbf_split_object_takes_each_side_from_the_view_that_saw_it():
    # Object [40, 130] in x, larger than the 40 px overlap: A sees [40, 100] (cut right),
    # B sees [60, 130] (cut left). Left side only uncut in A, right only in B; top and
    # bottom uncut in both: (0.6*10 + 0.4*12)/1.0 = 10.8 and (0.6*30 + 0.4*32) = 30.8.
    boxes = np.array([[40, 10, 100, 30], [60, 12, 130, 32]], np.float64)
    r = merge_detections(boxes, [0.6, 0.4], [0, 0], [0, 1], TWO, method="wbf")
    np.testing.assert_allclose(r.boxes, [[40, 10.8, 130, 30.8]], rtol=1e-6)
    # No complete view: mean of both 0.5; N = max(1, 0 chips seeing it whole) = 1.
    np.testing.assert_allclose(r.scores, [0.5], rtol=1e-6)


# ---------------------------------------------------------------- scale and contracts


def test_merge_scales_to_200k_detections():
    # 40 x 40 stride grid (no snapping), 150k objects on a jittered lattice so none
    # overlap; every chip that shows an object reports its clipped box.
    stride, k = CHIP - OVERLAP, 40
    size = CHIP + stride * k
    rng = np.random.default_rng(0)
    side = 388
    pitch = size / side
    n = 150_000
    gx, gy = (np.indices((side, side)).reshape(2, -1)[:, :n])
    wh = rng.uniform(6, pitch * 0.6, (n, 2))
    x0 = gx * pitch + rng.uniform(0, 1, n) * (pitch - wh[:, 0] - 1e-3)
    y0 = gy * pitch + rng.uniform(0, 1, n) * (pitch - wh[:, 1] - 1e-3)
    objects = np.stack([x0, y0, x0 + wh[:, 0], y0 + wh[:, 1]], axis=1)

    def chip_range(lo, hi):  # chips c with c*stride < hi and c*stride + CHIP > lo
        return (np.clip(np.floor((lo - CHIP) / stride).astype(int) + 1, 0, k),
                np.clip(np.ceil(hi / stride).astype(int) - 1, 0, k))

    ax, bx = chip_range(objects[:, 0], objects[:, 2])
    ay, by = chip_range(objects[:, 1], objects[:, 3])
    nx, per = bx - ax + 1, (bx - ax + 1) * (by - ay + 1)
    obj = np.repeat(np.arange(n), per)
    local = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    cx, cy = ax[obj] + local % nx[obj], ay[obj] + local // nx[obj]
    windows = np.array([[i * stride, j * stride, i * stride + CHIP, j * stride + CHIP]
                        for j in range(k + 1) for i in range(k + 1)], np.float64)
    chip = cy * (k + 1) + cx
    boxes = np.concatenate([np.maximum(objects[obj, :2], windows[chip, :2]),
                            np.minimum(objects[obj, 2:], windows[chip, 2:])], axis=1)
    visible = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) / np.prod(objects[obj, 2:] - objects[obj, :2], axis=1)
    assert len(boxes) > 200_000
    for method in ("nms", "wbf"):
        r = merge_detections(boxes, 0.9 * visible, obj % 3, chip, windows, method=method, seam_margin=OVERLAP)
        assert len(r.boxes) == n
        assert np.unique(obj[r.source]).size == n  # one output per object
        np.testing.assert_allclose(r.boxes, objects[obj[r.source]].astype(np.float32), atol=1e-3)


def test_empty_and_bad_inputs():
    r = merge_detections(np.zeros((0, 4)), [], [], [], TWO)
    assert r.boxes.shape == (0, 4) and len(r.scores) == len(r.labels) == len(r.source) == 0
    with pytest.raises(ValueError, match="method"):
        merge_detections(np.zeros((1, 4)), [1], [0], [0], TWO, method="soft")
    with pytest.raises(ValueError, match="length"):
        merge_detections(np.zeros((2, 4)), [1], [0], [0], TWO)
    with pytest.raises(ValueError, match="chip_index"):
        merge_detections(np.zeros((1, 4)), [1], [0], [2], TWO)
