"""COCO metrics at real densities: faster-coco-eval runs the matching, pycocotools' own
COCOeval on the same boxes is the oracle (dense multi-class scenes and the edge cases);
PR curves end at their last recall and mark the job's score threshold."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from pipeline.eval.evaluate import evaluate_table, pr_figure, scene_detections
from pipeline.eval.metrics import ImageBoxes, coco_metrics, pr_curve_points, split_for_matching
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.maintenance import write_run_report
from pipeline.table.schema import build_detection_table
from pipeline.table.state import committed_files, read_committed

KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR")


def scene(rng, image_id, n, classes, size=2048, found=0.85, clutter=0.2):
    """Truth and detections of one scene: most objects found with a jitter, a few with the
    wrong class, plus clutter; sizes from small to large (COCO's area ranges)."""
    wh = rng.uniform(6, 140, (n, 2))
    xy = rng.uniform(0, size - 140, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    labels = rng.integers(0, classes, n)
    hit = rng.random(n) < found
    jitter = boxes[hit] + rng.normal(0, 1, (hit.sum(), 4)) * 0.1 * np.tile(wh[hit], 2)
    jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
    hit_labels = np.where(rng.random(hit.sum()) < 0.05, rng.integers(0, classes, hit.sum()), labels[hit])
    m = int(clutter * n)
    cxy = rng.uniform(0, size - 140, (m, 2))
    det_boxes = np.concatenate([jitter, np.concatenate([cxy, cxy + rng.uniform(6, 100, (m, 2))], axis=1)])
    det_labels = np.concatenate([hit_labels, rng.integers(0, classes, m)])
    scores = np.concatenate([rng.uniform(0.35, 1, hit.sum()), rng.uniform(0.3, 0.8, m)])
    return (ImageBoxes(image_id, boxes, labels, None, size, size),
            ImageBoxes(image_id, det_boxes, det_labels, scores, size, size))


def pycocotools_eval(truth, detections, classes, max_dets):
    """pycocotools' COCOeval on the same boxes (COCO JSON built as a user would), maxDets
    (1, 100, max_dets) as ours; returns its eval dict."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {t.image_id: i + 1 for i, t in enumerate(truth)}
    anns = []
    for t in truth:
        for box, label in zip(t.boxes, t.labels):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": ids[t.image_id], "category_id": int(label) + 1,
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h),
                         "iscrowd": 0})
    results = [{"image_id": ids[d.image_id], "category_id": int(label) + 1,
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
               for d in detections if d.image_id in ids for b, label, s in zip(d.boxes, d.labels, d.scores)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": ids[t.image_id], "width": t.width, "height": t.height} for t in truth],
                      "annotations": anns, "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:  # loadRes refuses an empty list; an empty result set is still a result set
            dt.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 100, max_dets]
        ev.evaluate()
        ev.accumulate()
    return ev.eval


def mean_valid(a):
    a = a[a > -1]
    return float(a.mean()) if a.size else None


def reference_metrics(ev, classes):
    """The figures of coco_metrics, read off pycocotools' arrays (IoU 0.5 = index 0, 0.75 = 5)."""
    p, r = ev["precision"], ev["recall"]
    out = {"AP": mean_valid(p[:, :, :, 0, -1]), "AP50": mean_valid(p[0, :, :, 0, -1]),
           "AP75": mean_valid(p[5, :, :, 0, -1]), "AP_small": mean_valid(p[:, :, :, 1, -1]),
           "AP_medium": mean_valid(p[:, :, :, 2, -1]), "AP_large": mean_valid(p[:, :, :, 3, -1]),
           "AR": mean_valid(r[:, :, 0, -1])}
    out["per_class"] = {c: {"AP": mean_valid(p[:, :, k, 0, -1]), "AP50": mean_valid(p[0, :, k, 0, -1])}
                        for k, c in enumerate(classes)}
    return out


def assert_same_as_pycocotools(truth, detections, classes):
    ours = coco_metrics(truth, detections, classes)
    ev = pycocotools_eval(truth, detections, classes, ours["max_dets"])
    ref = reference_metrics(ev, classes)
    for key in KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    for name in classes:
        for key in ("AP", "AP50"):
            assert ours["per_class"][name][key] == pytest.approx(ref["per_class"][name][key], abs=1e-12), (name, key)
    return ours, ev


def area_101(curve):
    """COCO's 101-point interpolated area under a curve of :func:`pr_curve_points`: at each
    recall threshold the best precision at that recall or beyond, 0 past the last point."""
    recall, precision = np.asarray(curve["recall"]), np.asarray(curve["precision"])
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 101)]))


def test_dense_multiclass_scenes_equal_pycocotools():
    # 3 scenes of ~300 objects in 3 classes, ~315 detections each: more than COCO's 100
    # detections per image, so maxDets is raised (to the largest scene) on both sides.
    rng = np.random.default_rng(7)
    classes = ["tree", "vehicle", "building"]
    pairs = [scene(rng, f"s{i}", 300 + 10 * i, 3) for i in range(3)]
    truth, detections = [t for t, _ in pairs], [d for _, d in pairs]
    ours, ev = assert_same_as_pycocotools(truth, detections, classes)
    assert ours["max_dets"] == max(len(d.boxes) for d in detections) > 100
    assert 0.2 < ours["AP"] < ours["AP50"] < 1  # neither perfect nor empty
    parts = split_for_matching(truth[0], detections[0])  # each scene is matched in parts
    assert len(parts) > 3 and sum(len(d.boxes) for _, d in parts) == len(detections[0].boxes)
    # Each class's curve: every point, ending at pycocotools' final recall with a non-zero
    # precision; its 101-point area is pycocotools' AP50 of the class.
    for k, name in enumerate(classes):
        curve = ours["pr_curve"][name]
        assert curve["recall"][-1] == pytest.approx(ev["recall"][0, k, 0, -1], abs=1e-12)
        assert curve["precision"][-1] > 0
        assert np.all(np.diff(curve["recall"]) > 0) and np.all(np.diff(curve["precision"]) <= 0)
        assert area_101(curve) == pytest.approx(ours["per_class"][name]["AP50"], abs=1e-12)
        assert len(curve["recall"]) > 101  # every true positive, not the 101-point grid


def box(x, y, w=20, h=20):
    return [x, y, x + w, y + h]


def edge_case(name):
    """(truth, detections) of one named edge case; classes a, b, c."""
    one = ImageBoxes
    if name == "empty_scene":  # a scene without truth still counts its false positives
        return ([one("A", np.array([box(0, 0)]), np.array([0]), None, 100, 100),
                 one("B", np.zeros((0, 4)), np.zeros(0, int), None, 100, 100)],
                [one("A", np.array([box(0, 0), box(50, 50)]), np.array([0, 0]), np.array([0.9, 0.4]), 100, 100),
                 one("B", np.array([box(10, 10)]), np.array([0]), np.array([0.8]), 100, 100)])
    if name == "scene_without_detections":
        return ([one("A", np.array([box(0, 0)]), np.array([0]), None, 100, 100),
                 one("B", np.array([box(5, 5), box(40, 40)]), np.array([0, 1]), None, 100, 100)],
                [one("A", np.array([box(1, 0)]), np.array([0]), np.array([0.9]), 100, 100),
                 one("B", np.zeros((0, 4)), np.zeros(0, int), np.zeros(0), 100, 100)])
    if name == "class_without_detections":  # b has truth, no detection; c has neither
        return ([one("A", np.array([box(0, 0), box(40, 40)]), np.array([0, 1]), None, 100, 100)],
                [one("A", np.array([box(0, 2)]), np.array([0]), np.array([0.7]), 100, 100)])
    if name == "class_without_truth":  # c is detected, never true
        return ([one("A", np.array([box(0, 0)]), np.array([0]), None, 100, 100)],
                [one("A", np.array([box(0, 0), box(60, 60)]), np.array([0, 2]), np.array([0.7, 0.95]), 100, 100)])
    if name == "no_detections_at_all":
        return ([one("A", np.array([box(0, 0)]), np.array([0]), None, 100, 100)], [])
    if name == "detections_of_other_images":  # ignored: the images are the truth's
        return ([one("A", np.array([box(0, 0)]), np.array([0]), None, 100, 100)],
                [one("A", np.array([box(0, 0)]), np.array([0]), np.array([0.6]), 100, 100),
                 one("Z", np.array([box(0, 0)]), np.array([0]), np.array([0.9]), 100, 100)])
    if name == "score_ties":  # equal scores: the ranking must break ties as COCO does
        xy = np.arange(12) * 30.0
        boxes = np.array([box(x, 0) for x in xy])
        found = boxes + np.array([3, 0, 3, 0])  # IoU 17/23 = 0.74: a TP at 0.5 and 0.7, not 0.75
        return ([one("A", boxes, np.zeros(12, int), None, 400, 100)],
                [one("A", np.concatenate([found, boxes + 200]), np.zeros(24, int), np.full(24, 0.5), 400, 100)])
    if name == "score_ties_across_parts":
        # 100 separate objects (the scene is matched in parts of ~64 boxes). Two detections
        # score 0.5: a true one on the last object, listed first, and a poor one (IoU 1/7)
        # on the first object. Ranked in the scene's order the true one comes first.
        xy = np.stack(np.meshgrid(np.arange(10) * 40.0, np.arange(10) * 40.0), -1).reshape(-1, 2)
        boxes = np.concatenate([xy, xy + 20], axis=1)
        found = np.concatenate([boxes[99:], boxes[:99], [[15.0, 0.0, 35.0, 20.0]]])
        scores = np.concatenate([[0.5], np.linspace(0.99, 0.6, 99), [0.5]])
        return ([one("A", boxes, np.zeros(100, int), None, 400, 400)],
                [one("A", found, np.zeros(101, int), scores, 400, 400)])
    rng = np.random.default_rng(3)  # maxDets: exactly 100, 101 and 250 detections in a scene
    n = {"max_dets_100": 100, "max_dets_101": 101, "max_dets_250": 250}[name]
    xy = np.stack(np.meshgrid(np.arange(16) * 30.0, np.arange(16) * 30.0), -1).reshape(-1, 2)[:n]
    boxes = np.concatenate([xy, xy + 20], axis=1)
    labels = rng.integers(0, 2, n)
    return ([one("A", boxes[: n - 10], labels[: n - 10], None, 500, 500)],
            [one("A", boxes + rng.normal(0, 2, boxes.shape), labels, rng.uniform(0.3, 1, n), 500, 500)])


@pytest.mark.parametrize("name", ["empty_scene", "scene_without_detections", "class_without_detections",
                                  "class_without_truth", "no_detections_at_all", "detections_of_other_images",
                                  "score_ties", "score_ties_across_parts", "max_dets_100", "max_dets_101",
                                  "max_dets_250"])
def test_edge_cases_equal_pycocotools(name):
    truth, detections = edge_case(name)
    ours, ev = assert_same_as_pycocotools(truth, detections, ["a", "b", "c"])
    for k, cls in enumerate("abc"):
        if cls in ours["pr_curve"] and ours["pr_curve"][cls]["recall"]:
            assert area_101(ours["pr_curve"][cls]) == pytest.approx(ours["per_class"][cls]["AP50"], abs=1e-12)
            assert ours["pr_curve"][cls]["recall"][-1] == pytest.approx(ev["recall"][0, k, 0, -1], abs=1e-12)


def test_pr_curve_points_hand_worked():
    # 4 truth boxes; detections by score 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP, 0.5 TP.
    # cumulative TP 1,1,2,2,3 over 1..5 detections: precision 1, 1/2, 2/3, 1/2, 3/5.
    # Points at the TPs: recall 1/4, 2/4, 3/4; interpolated precision (best at that recall
    # or beyond) max(1, ...) = 1, max(2/3, 1/2, 3/5) = 2/3, 3/5; scores 0.9, 0.7, 0.5.
    # The curve ends at recall 3/4 (the fourth object is never found): no point at 0.
    curve = pr_curve_points(np.array([False, True, True, False, True]), np.array([0.8, 0.9, 0.7, 0.6, 0.5]), 4)
    assert curve["recall"] == pytest.approx([0.25, 0.5, 0.75])
    assert curve["precision"] == pytest.approx([1.0, 2 / 3, 0.6])
    assert curve["score"] == pytest.approx([0.9, 0.7, 0.5])
    assert pr_curve_points(np.zeros(3, bool), np.array([0.9, 0.5, 0.4]), 2) == {"recall": [], "precision": [],
                                                                                 "score": []}


def test_pr_plot_lines_end_at_last_recall_and_mark_the_threshold():
    rng = np.random.default_rng(1)
    pairs = [scene(rng, "s0", 120, 2)]
    m = coco_metrics([pairs[0][0]], [pairs[0][1]], ["a", "b"])
    fig = pr_figure(m, score_threshold=0.3)
    ax = fig.axes[0]
    curves = {line.get_label().split(" (")[0]: line for line in ax.lines if not line.get_label().startswith("_")}
    for name in ("a", "b"):
        x, y = curves[name].get_xdata(), curves[name].get_ydata()
        assert x[-1] == pytest.approx(m["pr_curve"][name]["recall"][-1]) and y[-1] > 0  # no drop to zero
        assert np.all(np.asarray(y) > 0)
    marks = [line for line in ax.lines if "score" in line.get_label()]
    assert len(marks) == 1 and "0.3" in marks[0].get_label()
    # One marker per class, where the detections scoring >= 0.3 take the curve: its end here
    # (every detection scored >= 0.3).
    ends = sorted((m["pr_curve"][n]["recall"][-1], m["pr_curve"][n]["precision"][-1]) for n in ("a", "b"))
    assert sorted(zip(marks[0].get_xdata(), marks[0].get_ydata())) == ends
    # A stricter threshold marks the last point scoring at least it.
    fig = pr_figure(m, score_threshold=0.6)
    marks = [line for line in fig.axes[0].lines if "score" in line.get_label()]
    for name in ("a", "b"):
        c = m["pr_curve"][name]
        last = max(i for i, s in enumerate(c["score"]) if s >= 0.6)
        assert (c["recall"][last], c["precision"][last]) in set(zip(marks[0].get_xdata(), marks[0].get_ydata()))
    # Unknown threshold: no mark.
    fig = pr_figure(m, score_threshold=None)
    assert not [line for line in fig.axes[0].lines if "score" in line.get_label()]


def commit(table, run, scene_id, boxes, labels, scores, classes):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    corners = np.stack([boxes[:, [0, 3]], boxes[:, [2, 3]], boxes[:, [2, 1]], boxes[:, [0, 1]]], axis=1)
    rows = build_detection_table(corners, boxes, np.asarray(scores, float), np.asarray(labels, int), classes,
                                 run_id=run.run_id, job_name=run.job_name, scene_id=scene_id,
                                 scene_path=f"/data/{scene_id}.tif", model_id="m", job_hash="h")
    commit_scene(table, run, scene_id, {"k": scene_id}, rows)


def write_truth(path, pairs, classes):
    images, anns = [], []
    for i, (t, _) in enumerate(pairs):
        images.append({"id": i + 1, "file_name": f"{t.image_id}.tif", "width": t.width, "height": t.height})
        for b, label in zip(t.boxes.tolist(), t.labels.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": 1, "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))


def test_evaluate_table_equals_pycocotools_on_dense_scenes(tmp_path):
    # Three committed scenes (the table stores float32 boxes and scores): the figures of
    # evaluate_table are pycocotools' on the rows as stored.
    rng = np.random.default_rng(11)
    classes = ["tree", "vehicle"]
    pairs = [scene(rng, f"s{i}", 250, 2) for i in range(3)]
    table = tmp_path / "table"
    run = RunInfo("r1", "job", "h", "m", None)
    for _, d in pairs:
        commit(table, run, d.image_id, d.boxes, d.labels, d.scores, classes)
    write_truth(tmp_path / "truth.json", pairs, classes)
    m = evaluate_table(table, [tmp_path / "truth.json"])
    stored = [ImageBoxes(d.image_id, d.boxes.astype(np.float32).astype(float), d.labels,
                         d.scores.astype(np.float32).astype(float), d.width, d.height) for _, d in pairs]
    ref = reference_metrics(pycocotools_eval([t for t, _ in pairs], stored, classes, m["max_dets"]), classes)
    for key in KEYS:
        assert m[key] == pytest.approx(ref[key], abs=1e-12), key
    for name in classes:
        assert m["per_class"][name] == pytest.approx(ref["per_class"][name], abs=1e-12), name
    assert m["score_threshold"] is None  # the run report does not say


def test_scene_detections_agree_with_duckdb(tmp_path):
    # Rows of many scenes, labels mapped, unknown and null labels: per scene and class the
    # counts and score sums equal DuckDB's GROUP BY over the committed files.
    import duckdb

    rng = np.random.default_rng(2)
    names = ["tree", "car", "ghost"]
    table = tmp_path / "table"
    run = RunInfo("r1", "job", "h", "m", None)
    for i in range(6):
        n = int(rng.integers(0, 40))
        xy = rng.uniform(0, 500, (n, 2))
        commit(table, run, f"s{i}", np.concatenate([xy, xy + 10], axis=1), rng.integers(0, 3, n),
               rng.uniform(0.3, 1, n), names)
    rows = read_committed(table, columns=["scene_id", "label", "score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"])
    scenes = ["s0", "s2", "s3", "s5"]  # s1 and s4 have no truth
    got = scene_detections(rows, scenes, ["Tree", "car"], {"tree": "Tree"})
    files = ", ".join(f"'{f}'" for f in committed_files(table))
    sql = (f"SELECT scene_id, label, count(*), sum(score::DOUBLE) FROM read_parquet([{files}]) "
           "GROUP BY ALL")
    expected = {(s, label): (n, total) for s, label, n, total in duckdb.sql(sql).fetchall()}
    for scene_id in scenes:
        boxes, labels, scores = got.per_scene[scene_id]
        assert len(boxes) == len(labels) == len(scores)
        for k, label in enumerate(["tree", "car"]):
            n, total = expected.get((scene_id, label), (0, 0.0))
            assert (labels == k).sum() == n
            assert scores[labels == k].sum() == pytest.approx(total, rel=1e-6)
    ghosts = sum(expected.get((s, "ghost"), (0, 0))[0] for s in scenes)
    assert got.unknown_labels == ({"ghost": ghosts} if ghosts else {})
    assert got.reached == {"Tree", "car", "ghost"}


def test_evaluate_table_reads_the_score_threshold_from_the_run_report(tmp_path):
    classes = ["tree"]
    rng = np.random.default_rng(4)
    pairs = [scene(rng, "s0", 30, 1)]
    table = tmp_path / "table"
    run = RunInfo("r1", "job", "h", "m", None)
    commit(table, run, "s0", pairs[0][1].boxes, pairs[0][1].labels, pairs[0][1].scores, classes)
    write_truth(tmp_path / "truth.json", pairs, classes)
    assert evaluate_table(table, [tmp_path / "truth.json"])["score_threshold"] is None
    write_run_report(table, "r1", {"run_id": "r1", "score_threshold": 0.3})
    m = evaluate_table(table, [tmp_path / "truth.json"], out_dir=tmp_path / "ev")
    assert m["score_threshold"] == 0.3
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["score_threshold"] == 0.3
    # Given explicitly, it wins over the report.
    assert evaluate_table(table, [tmp_path / "truth.json"], score_threshold=0.5)["score_threshold"] == 0.5


def test_overlap_components_equal_shapely_intersections():
    # Components of boxes overlapping with a positive area: shapely's intersection areas and
    # a breadth-first search are the oracle; boxes that only touch stay apart. Small chunks
    # make the sweep take several rounds.
    import shapely

    from pipeline.eval import metrics

    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 1000, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (300, 2))], axis=1)
    boxes = np.concatenate([boxes, [[2000, 0, 2010, 10], [2010, 0, 2020, 10], [2000, 10, 2010, 20]]])  # touching
    polys = shapely.box(*boxes.T)
    area = shapely.area(shapely.intersection(polys[:, None], polys[None, :]))
    n = len(boxes)
    expected = np.full(n, -1)
    for start in range(n):
        if expected[start] >= 0:
            continue
        todo, expected[start] = [start], start
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(area[i] > 0):
                if expected[j] < 0:
                    expected[j] = start
                    todo.append(j)
    chunk = metrics.PAIR_CHUNK
    try:
        metrics.PAIR_CHUNK = 50
        got = metrics.overlap_components(boxes)
    finally:
        metrics.PAIR_CHUNK = chunk
    assert np.array_equal(got, expected)  # both name a component by its smallest index
    assert len(set(got[-3:])) == 3 and 30 < len(set(got)) < n - 3
    # Joined members behave as overlapping: the three touching boxes become one component.
    assert set(metrics.overlap_components(boxes, [np.array([n - 3, n - 2, n - 1])])[-3:]) == {n - 3}


def devkit_voc_ap(truth, detections, label, iou_threshold=0.5):
    """The VOC devkit's loop, plainly: detections one by one in score order, each checks its
    best-overlapping truth box of the class in its image (shapely areas), claims it if free."""
    import shapely

    gt = {t.image_id: [shapely.box(*b) for b, k in zip(t.boxes, t.labels) if k == label] for t in truth}
    n_gt = sum(len(v) for v in gt.values())
    rows = sorted(((float(s), d.image_id, shapely.box(*b)) for d in detections if d.image_id in gt
                   for b, k, s in zip(d.boxes, d.labels, d.scores) if k == label), key=lambda r: -r[0])
    taken = {k: [False] * len(v) for k, v in gt.items()}
    tp = []
    for _, image_id, det in rows:
        ious = [det.intersection(g).area / det.union(g).area for g in gt[image_id]]
        j = int(np.argmax(ious)) if ious else -1
        hit = j >= 0 and ious[j] >= iou_threshold and not taken[image_id][j]
        if hit:
            taken[image_id][j] = True
        tp.append(hit)
    cum = np.cumsum(tp)
    recall, precision = cum / n_gt, cum / np.arange(1, len(tp) + 1)
    # all-point interpolation: sum over recall steps of the best precision from there on
    ap, last = 0.0, 0.0
    for i in np.flatnonzero(np.diff(np.concatenate([[0], cum])) > 0):
        ap += (recall[i] - last) * precision[i:].max()
        last = recall[i]
    return ap


def test_voc_ap_equals_the_devkit_loop_on_dense_scenes():
    from pipeline.eval.metrics import voc_class_ap

    rng = np.random.default_rng(12)
    pairs = [scene(rng, f"s{i}", 150, 2, size=800) for i in range(2)]  # crowded: boxes overlap a lot
    truth, detections = [t for t, _ in pairs], [d for _, d in pairs]
    for label in (0, 1):
        for thr in (0.5, 0.75):
            assert voc_class_ap(truth, detections, label, thr) == pytest.approx(
                devkit_voc_ap(truth, detections, label, thr), abs=1e-12)
