"""Seam merge: de-duplicate detections from overlapping chips, in scene pixels, per class.

Inputs are the detections of one scene, already translated from chip to scene pixel
coordinates, with the chip each came from:

- ``boxes``: (N, 4) float, XYXY, scene pixels (x to the right, y down);
- ``scores``: (N,) float in [0, 1]; ``labels``: (N,) int class ids;
- ``chip_index``: (N,) int, row of ``windows`` the detection came from;
- ``windows``: (M, 4) float/int, XYXY scene pixels of every chip that was run.

The rule (documented here because tests and users rely on it)
------------------------------------------------------------
1. **Seam zone.** For each chip and each of its four sides, the zone depth is the
   overlap with the other windows that extend past that side, raised to at least
   ``seam_margin``; a side no other window extends past (the scene border, or a
   neighbour that was skipped as empty) has no zone. Measuring the real overlap matters
   because the last chip of a row is snapped to the scene edge and overlaps its
   neighbour by more than the nominal overlap.
2. **Candidates.** A detection whose box reaches into its chip's seam zone is a seam
   candidate; every other detection is kept exactly as it is. This is safe: two
   detections of one object from chips A and B both intersect W_A ∩ W_B (axis-aligned
   boxes that pairwise intersect share a point), which lies in both chips' zones.
3. **Matching.** Two candidates match when they have the same label, come from
   different chips, and either IoU(a, b) > ``iou_threshold`` or, compared only where
   both chips could see, IoU(a ∩ W_B, b ∩ W_A) > ``iou_threshold``. The second test is
   what makes truncation harmless: a box cut by chip A's edge is F ∩ W_A for the
   object's full box F; restricted to the common area both views equal F ∩ W_A ∩ W_B,
   so a truncated box matches the full one (IoU 1) even when its plain IoU is tiny.
   Detections from the same chip are never compared: the model's own NMS already ran
   there, and interior detections get no second pass either.
4. **Clustering.** Greedy, as in NMS: in order of decreasing score (ties: lower input
   index first) a detection not yet taken becomes a keeper and takes every matching
   detection not yet taken. A taken detection that is *cut* (below) passes the take
   on to its own matches, because its object continues into further chips: an object
   crossing three chips along one axis (next to the snapped last chip, where windows
   overlap a lot) is seen as three views, and the first and third need not overlap.
5. **Reduction.** A side of a box is *cut* when it lies within ``cut_tolerance`` px of a
   chip edge that has a seam zone (the object may go on beyond it).
   - ``nms``: the keeper's box and score, except that each cut side of the keeper is
     pushed out to the outermost value of that side among its cluster. So the full
     view wins over a truncated one, and an object larger than the overlap, which no
     chip sees whole, comes out as the union of its partial views.
   - ``wbf`` (weighted box fusion, Solovyev et al., 2021, with clusters formed by step 4
     instead of against the running fused box): each side is the score-weighted mean of
     that side over the members where it is not cut (the outermost value if it is cut
     in all of them); the score is the mean score of the complete members (no cut side;
     all members if none is complete) times ``min(T, N) / N``, T the number of those
     members and N the number of chips that would see the fused box complete (at least 1):
     an object two chips saw whole but only one detected is down-weighted.

Cost: pairs are found with a uniform grid hash, so the work is O(N log N + P) for P
pairs of intersecting same-class candidates, not O(N²). torchvision's CPU NMS kernel
compares every kept box with every later one of its class, which is quadratic in the
scene's detection count, so it is used only as a test oracle for :func:`nms`.

Choose ``overlap`` at least as large as the objects: then every object is seen whole
by some chip and the result does not hang on partial views. Larger objects come out
as the union of their views when each view is detected; a view the model misses
(too little of the object visible) leaves the union short on that side.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from pipeline.config.options import MERGE_METHODS, MergeMethod

# Side indices in (N, 4) XYXY arrays and (M, 4) zone-depth arrays.
LEFT, TOP, RIGHT, BOTTOM = 0, 1, 2, 3
KEPT = -1  # parent value of a detection that heads its own cluster


class MergeResult(NamedTuple):
    """Merged detections of one scene.

    boxes: (K, 4) float32 XYXY scene px; scores: (K,) float32; labels: (K,) int64;
    source: (K,) int64 row of the input detection each output came from (the cluster
    keeper for merged ones), to carry other per-detection columns along. Sorted by source.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    source: np.ndarray


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return b


def _cell_size(boxes: np.ndarray) -> float:
    """Grid cell edge in px: about the size of a large box, so each box lands in ≤ 4 cells."""
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return float(max(8.0, np.percentile(sides, 90)))


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts (c0, c1, ...), without a Python loop."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def intersecting_pairs(
    boxes: np.ndarray, groups: Optional[np.ndarray] = None, cell: Optional[float] = None
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of boxes of the same group whose intersection has positive area.

    boxes: (N, 4) XYXY; groups: (N,) int (e.g. labels), None for one group.
    Returns (i, j): (P,) int64 arrays, i < j, each pair once.

    Each box is entered in every grid cell it touches; pairs are formed within a cell
    and a pair is reported only by the cell holding the top-left corner of the two
    boxes' intersection, so pairs sharing several cells are not repeated.
    """
    b = _as_boxes(boxes)
    n = len(b)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n < 2:
        return empty
    g = np.zeros(n, np.int64) if groups is None else np.asarray(groups, np.int64)
    c = _cell_size(b) if cell is None else float(cell)
    gx0, gy0 = np.floor(b[:, 0] / c).astype(np.int64), np.floor(b[:, 1] / c).astype(np.int64)
    gx1, gy1 = np.floor(b[:, 2] / c).astype(np.int64), np.floor(b[:, 3] / c).astype(np.int64)
    nx = gx1 - gx0 + 1
    per_box = nx * (gy1 - gy0 + 1)
    box = np.repeat(np.arange(n, dtype=np.int64), per_box)
    local = _ranges(per_box)
    cx = gx0[box] + local % nx[box]
    cy = gy0[box] + local // nx[box]
    cg = g[box]

    order = np.lexsort((box, cx, cy, cg))
    box, cx, cy, cg = box[order], cx[order], cy[order], cg[order]
    new_cell = np.ones(len(box), bool)
    new_cell[1:] = (cx[1:] != cx[:-1]) | (cy[1:] != cy[:-1]) | (cg[1:] != cg[:-1])
    cell_start = np.flatnonzero(new_cell)
    cell_end = np.append(cell_start[1:], len(box))
    cell_of = np.cumsum(new_cell) - 1
    # Entry at position p pairs with the later entries p+1 .. end-1 of its cell.
    later = cell_end[cell_of] - np.arange(len(box)) - 1
    pi = np.repeat(np.arange(len(box), dtype=np.int64), later)
    pj = pi + 1 + _ranges(later)
    i, j = box[pi], box[pj]
    ix0 = np.maximum(b[i, 0], b[j, 0])
    iy0 = np.maximum(b[i, 1], b[j, 1])
    ix1 = np.minimum(b[i, 2], b[j, 2])
    iy1 = np.minimum(b[i, 3], b[j, 3])
    ok = (ix1 > ix0) & (iy1 > iy0)
    ok &= (np.floor(ix0 / c).astype(np.int64) == cx[pi]) & (np.floor(iy0 / c).astype(np.int64) == cy[pi])
    i, j = i[ok], j[ok]
    return np.minimum(i, j), np.maximum(i, j)


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (P, 4) XYXY arrays; 0 where either box is empty."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _clip_to(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Row-wise intersection of boxes with windows (may come out empty: x1 ≤ x0)."""
    return np.concatenate([np.maximum(boxes[:, :2], windows[:, :2]), np.minimum(boxes[:, 2:], windows[:, 2:])], axis=1)


def greedy_clusters(
    scores: np.ndarray, i: np.ndarray, j: np.ndarray, spreads: Optional[np.ndarray] = None
) -> np.ndarray:
    """Greedy NMS-style clustering over a sparse match graph.

    scores: (N,); (i, j): (P,) matching pairs (either orientation).
    spreads: (N,) bool or None. In decreasing score order (ties: lower index first) a
    box not yet taken becomes a keeper and takes its untaken matches; a taken box with
    ``spreads`` set also takes *its* untaken matches for the same keeper (used for
    truncated views, whose object goes on into further chips). None: plain NMS.
    Returns parent: (N,) int64, KEPT (-1) for keepers, else the keeper that took it.
    """
    n = len(scores)
    parent = np.full(n, KEPT, np.int64)
    if len(i) == 0:
        return parent
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    # Undirected adjacency (CSR): when a keeper is visited every better box has already
    # been visited, so its untaken neighbours are all worse than it.
    a, b = np.r_[i, j], np.r_[j, i]
    srt = np.lexsort((rank[b], rank[a]))
    a, b = a[srt], b[srt]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    nodes = a[starts]
    first = np.full(n, 0, np.int64)
    last = np.full(n, 0, np.int64)
    first[nodes], last[nodes] = starts, ends
    taken = np.zeros(n, bool)
    # The one sequential step: whether a box may take others depends on whether a
    # better box took it first. Only boxes with matches are visited.
    for h in nodes.tolist():
        if taken[h]:
            continue
        taken[h] = True
        stack = [h]
        while stack:
            u = stack.pop()
            nb = b[first[u]:last[u]]
            nb = nb[~taken[nb]]
            if len(nb) == 0:
                continue
            taken[nb] = True
            parent[nb] = h
            if spreads is not None:
                stack.extend(nb[spreads[nb]].tolist())
    return parent


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-wise NMS without the quadratic all-pairs step.

    boxes: (N, 4) XYXY px; scores: (N,); labels: (N,) int. A box is suppressed when a
    kept box of the same label has IoU > iou_threshold with it (torchvision's rule).
    Returns kept indices, (K,) int64, by decreasing score (ties: lower index first).
    """
    b = _as_boxes(boxes)
    s = np.asarray(scores, np.float64)
    i, j = intersecting_pairs(b, labels)
    match = pair_iou(b[i], b[j]) > iou_threshold
    parent = greedy_clusters(s, i[match], j[match])
    keep = np.flatnonzero(parent == KEPT)
    return keep[np.lexsort((keep, -s[keep]))]


def seam_zones(windows: np.ndarray, seam_margin: float = 0.0) -> np.ndarray:
    """Seam-zone depth of each side of each chip window (rule 1 of the module doc).

    windows: (M, 4) XYXY scene px. Returns (M, 4) float64 depths in px for
    (LEFT, TOP, RIGHT, BOTTOM); 0 where no other window extends past that side.
    A window lying inside another one gets its whole extent as zone on every side.
    """
    w = _as_boxes(windows)
    depth = np.zeros((len(w), 4), np.float64)
    i, j = intersecting_pairs(w)
    a = np.r_[i, j]  # each pair in both directions: b's effect on a
    o = np.r_[j, i]
    ow = np.minimum(w[a, 2], w[o, 2]) - np.maximum(w[a, 0], w[o, 0])
    oh = np.minimum(w[a, 3], w[o, 3]) - np.maximum(w[a, 1], w[o, 1])
    past = [w[o, 0] < w[a, 0], w[o, 1] < w[a, 1], w[o, 2] > w[a, 2], w[o, 3] > w[a, 3]]
    for side, extent in ((LEFT, ow), (TOP, oh), (RIGHT, ow), (BOTTOM, oh)):
        sel = past[side]
        np.maximum.at(depth[:, side], a[sel], extent[sel])
    inside = ~(past[0] | past[1] | past[2] | past[3])
    if inside.any():
        size = np.stack([w[:, 2] - w[:, 0], w[:, 3] - w[:, 1]] * 2, axis=1)
        depth[a[inside]] = size[a[inside]]
    return np.where(depth > 0, np.maximum(depth, seam_margin), 0.0)


def _cut_sides(boxes: np.ndarray, win: np.ndarray, zone: np.ndarray, tol: float) -> np.ndarray:
    """(N, 4) bool: side lies on a chip edge that has a seam zone (object may continue)."""
    near = np.stack(
        [
            boxes[:, 0] <= win[:, 0] + tol,
            boxes[:, 1] <= win[:, 1] + tol,
            boxes[:, 2] >= win[:, 2] - tol,
            boxes[:, 3] >= win[:, 3] - tol,
        ],
        axis=1,
    )
    return near & (zone > 0)


def _in_zone(boxes: np.ndarray, win: np.ndarray, zone: np.ndarray) -> np.ndarray:
    """(N,) bool: the box reaches into its chip's seam zone on some side."""
    return (
        (boxes[:, 0] < win[:, 0] + zone[:, LEFT])
        | (boxes[:, 1] < win[:, 1] + zone[:, TOP])
        | (boxes[:, 2] > win[:, 2] - zone[:, RIGHT])
        | (boxes[:, 3] > win[:, 3] - zone[:, BOTTOM])
    )


def _extend_cut_sides(boxes: np.ndarray, cut: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """NMS reduction: push each cut side of each keeper out to its cluster's extreme."""
    out = boxes.copy()
    head = np.where(parent == KEPT, np.arange(len(boxes)), parent)
    lo = boxes[:, :2].copy()
    hi = boxes[:, 2:].copy()
    np.minimum.at(lo, head, boxes[:, :2])
    np.maximum.at(hi, head, boxes[:, 2:])
    out[:, :2] = np.where(cut[:, :2], lo, boxes[:, :2])
    out[:, 2:] = np.where(cut[:, 2:], hi, boxes[:, 2:])
    return out


def _fuse_wbf(
    boxes: np.ndarray,
    scores: np.ndarray,
    cut: np.ndarray,
    parent: np.ndarray,
    chip: np.ndarray,
    windows: np.ndarray,
    zone: np.ndarray,
    tol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """WBF reduction (rule 5): fused (N, 4) boxes and (N,) scores, valid at keeper rows."""
    n = len(boxes)
    head = np.where(parent == KEPT, np.arange(n), parent)
    fused = np.empty_like(boxes)
    for side in range(4):
        ok = ~cut[:, side]
        w = np.where(ok, scores, 0.0)
        num = np.bincount(head, weights=w * boxes[:, side], minlength=n)
        den = np.bincount(head, weights=w, minlength=n)
        any_ok = np.bincount(head, weights=ok.astype(np.float64), minlength=n) > 0
        extreme = boxes[:, side].copy()
        (np.minimum if side < 2 else np.maximum).at(extreme, head, boxes[:, side])
        # den can be 0 with any_ok when uncut members all score 0: fall back to the mean.
        plain = np.bincount(head, weights=np.where(ok, boxes[:, side], 0.0), minlength=n)
        count = np.bincount(head, weights=ok.astype(np.float64), minlength=n)
        mean_ok = np.divide(num, den, out=np.divide(plain, np.maximum(count, 1)), where=den > 0)
        fused[:, side] = np.where(any_ok, mean_ok, extreme)

    complete = ~cut.any(axis=1)
    has_complete = np.bincount(head, weights=complete.astype(np.float64), minlength=n) > 0
    use = np.where(has_complete[head], complete, True)
    t = np.bincount(head, weights=use.astype(np.float64), minlength=n)
    mean_score = np.bincount(head, weights=np.where(use, scores, 0.0), minlength=n) / np.maximum(t, 1)
    n_see = _windows_seeing_whole(fused, chip, windows, zone, tol)
    fused_score = mean_score * np.minimum(t, n_see) / n_see
    return fused, fused_score


def _windows_seeing_whole(
    boxes: np.ndarray, chip: np.ndarray, windows: np.ndarray, zone: np.ndarray, tol: float
) -> np.ndarray:
    """(N,) float: in how many windows each box would be complete (at least 1).

    Complete in a window: inside it and, on sides with a seam zone, more than ``tol``
    px from the edge (the same test that marks a detection's side as cut). Only the
    box's own chip and the windows overlapping it are tested: a window containing a box
    that lies in (or next to) its chip overlaps that chip.
    """
    wi, wj = intersecting_pairs(windows)
    ids = np.arange(len(windows))
    nbr_a, nbr_b = np.r_[wi, wj, ids], np.r_[wj, wi, ids]
    srt = np.argsort(nbr_a, kind="stable")
    nbr_a, nbr_b = nbr_a[srt], nbr_b[srt]
    start = np.searchsorted(nbr_a, ids)
    reps = np.bincount(nbr_a, minlength=len(windows))[chip]
    row = np.repeat(np.arange(len(boxes)), reps)
    cand = nbr_b[np.repeat(start[chip], reps) + _ranges(reps)]
    b, w = boxes[row], windows[cand]
    z = zone[cand] > 0
    # Strict on zoned sides, mirroring _cut_sides (a side within tol of the edge is cut).
    whole = (
        np.where(z[:, LEFT], b[:, 0] > w[:, 0] + tol, b[:, 0] >= w[:, 0])
        & np.where(z[:, TOP], b[:, 1] > w[:, 1] + tol, b[:, 1] >= w[:, 1])
        & np.where(z[:, RIGHT], b[:, 2] < w[:, 2] - tol, b[:, 2] <= w[:, 2])
        & np.where(z[:, BOTTOM], b[:, 3] < w[:, 3] - tol, b[:, 3] <= w[:, 3])
    )
    return np.maximum(np.bincount(row, weights=whole.astype(np.float64), minlength=len(boxes)), 1.0)


def merge_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    chip_index: np.ndarray,
    windows: np.ndarray,
    method: MergeMethod = "nms",
    iou_threshold: float = 0.5,
    seam_margin: float = 0.0,
    cut_tolerance: float = 1.0,
) -> MergeResult:
    """Merge one scene's chip detections across seams (rules in the module docstring).

    boxes: (N, 4) float XYXY scene px; scores: (N,) float; labels: (N,) int;
    chip_index: (N,) int row of ``windows``; windows: (M, 4) XYXY scene px of the chips.
    seam_margin: minimum seam-zone depth in px on sides that overlap another chip
    (the job's ``merge.seam_margin``, by default the tiling overlap).
    cut_tolerance: px within which a box side counts as lying on a chip edge.
    Returns a MergeResult; detections outside every seam zone pass through unchanged.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    b = _as_boxes(boxes)
    s = np.asarray(scores, np.float64).reshape(-1)
    lab = np.asarray(labels, np.int64).reshape(-1)
    chip = np.asarray(chip_index, np.int64).reshape(-1)
    win = _as_boxes(windows)
    n = len(b)
    if not (len(s) == len(lab) == len(chip) == n):
        raise ValueError(f"boxes, scores, labels, chip_index differ in length: {n}, {len(s)}, {len(lab)}, {len(chip)}")
    if n and (chip.min() < 0 or chip.max() >= len(win)):
        raise ValueError(f"chip_index must index the {len(win)} windows, got range {chip.min()}..{chip.max()}")
    if n == 0:
        return MergeResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           np.zeros(0, np.int64))

    zone = seam_zones(win, seam_margin)
    cand = np.flatnonzero(_in_zone(b, win[chip], zone[chip]))
    cb, cs, cl, cc = b[cand], s[cand], lab[cand], chip[cand]
    cut = _cut_sides(cb, win[cc], zone[cc], cut_tolerance)

    i, j = intersecting_pairs(cb, cl)
    cross = cc[i] != cc[j]
    i, j = i[cross], j[cross]
    plain = pair_iou(cb[i], cb[j])
    restricted = pair_iou(_clip_to(cb[i], win[cc[j]]), _clip_to(cb[j], win[cc[i]]))
    match = (plain > iou_threshold) | (restricted > iou_threshold)
    parent = greedy_clusters(cs, i[match], j[match], spreads=np.asarray(cut.any(axis=1)))

    if method == "nms":
        merged, merged_scores = _extend_cut_sides(cb, cut, parent), cs
    else:
        merged, merged_scores = _fuse_wbf(cb, cs, cut, parent, cc, win, zone, cut_tolerance)
    heads = np.flatnonzero(parent == KEPT)

    out_boxes = b.copy()
    out_scores = s.copy()
    out_boxes[cand[heads]] = merged[heads]
    out_scores[cand[heads]] = merged_scores[heads]
    keep = np.ones(n, bool)
    keep[cand[parent != KEPT]] = False
    src = np.flatnonzero(keep)
    return MergeResult(
        out_boxes[src].astype(np.float32), out_scores[src].astype(np.float32), lab[src], src.astype(np.int64)
    )
