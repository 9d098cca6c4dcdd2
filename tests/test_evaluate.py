"""Evaluation: pycocotools is the oracle, VOC AP is checked on a hand-worked example,
and scene-level evaluation runs on a real committed table."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from pipeline.eval.evaluate import evaluate_table, format_table, write_report
from pipeline.eval.metrics import ImageBoxes, all_point_ap, coco_metrics, voc_class_ap, voc_metrics
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.schema import build_detection_table


def truth(image_id, boxes, labels, size=100):
    return ImageBoxes(image_id, np.asarray(boxes, float).reshape(-1, 4), np.asarray(labels, int), None, size, size)


def dets(image_id, boxes, labels, scores, size=100):
    return ImageBoxes(image_id, np.asarray(boxes, float).reshape(-1, 4), np.asarray(labels, int),
                      np.asarray(scores, float), size, size)


# ------------------------------------------------------------------------- VOC


def test_voc_ap_hand_worked_example():
    # Two images, one class, 3 ground-truth boxes:
    #   A: g1 (0,0,10,10), g2 (20,20,30,30);  B: g3 (0,0,10,10)
    # Detections by score:
    #   0.9 A (0,0,10,10)  -> TP (g1)
    #   0.8 A (0,0,10,10)  -> FP (its best box g1 is taken; VOC does not fall back)
    #   0.7 B (50,50,60,60)-> FP (no overlap)
    #   0.6 B (0,0,10,9)   -> TP (IoU 90/100 with g3)
    # cumulative TP 1,1,1,2 -> precision 1, 1/2, 1/3, 1/2; recall 1/3, 1/3, 1/3, 2/3.
    # Envelope: p(r<=1/3) = 1, p(1/3<r<=2/3) = 1/2, nothing beyond 2/3.
    # AP = 1/3 * 1 + (2/3 - 1/3) * 1/2 = 1/3 + 1/6 = 0.5
    gt = [truth("A", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), truth("B", [[0, 0, 10, 10]], [0])]
    dt = [dets("A", [[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], [0.9, 0.8]),
          dets("B", [[50, 50, 60, 60], [0, 0, 10, 9]], [0, 0], [0.7, 0.6])]
    assert voc_class_ap(gt, dt, 0) == pytest.approx(0.5)
    # At IoU 0.95 the 0.6 detection (IoU 0.9) is a FP too: AP = 1/3 * 1 = 1/3.
    assert voc_class_ap(gt, dt, 0, iou_threshold=0.95) == pytest.approx(1 / 3)


def test_all_point_ap_uses_the_precision_envelope():
    # recall 0.5 at precision 0.5, then recall 1.0 at precision 2/3: the envelope lifts
    # the first step to 2/3 -> AP = 0.5 * 2/3 + 0.5 * 2/3 = 2/3.
    assert all_point_ap([0.5, 1.0], [0.5, 2 / 3]) == pytest.approx(2 / 3)
    assert all_point_ap([0.25, 0.5], [1.0, 1.0]) == pytest.approx(0.5)


def test_voc_metrics_skips_classes_without_truth_and_counts_misses():
    gt = [truth("A", [[0, 0, 10, 10]], [1])]
    dt = [dets("A", [[0, 0, 10, 10], [40, 40, 50, 50]], [1, 0], [0.9, 0.8])]
    m = voc_metrics(gt, dt, ["a", "b"])
    assert m["per_class"] == {"a": None, "b": pytest.approx(1.0)}
    assert m["mAP"] == pytest.approx(1.0)
    assert voc_class_ap(gt, [], 1) == 0.0


# ------------------------------------------------------------------------ COCO


def random_case(seed, images=4, classes=3, per_image=12):
    """Ground truth and noisy detections (jittered truth plus clutter), < 100 per image."""
    rng = np.random.default_rng(seed)
    gt, dt = [], []
    for i in range(images):
        n = rng.integers(3, per_image)
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(4, 150, (n, 2))  # small, medium and large objects
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, classes, n)
        gt.append(truth(f"img{i}", boxes, labels, 600))
        keep = rng.random(n) < 0.8
        jitter = boxes[keep] + rng.normal(0, 3, (keep.sum(), 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        clutter_xy = rng.uniform(0, 400, (5, 2))
        clutter = np.concatenate([clutter_xy, clutter_xy + rng.uniform(5, 80, (5, 2))], axis=1)
        d_boxes = np.concatenate([jitter, clutter])
        d_labels = np.concatenate([labels[keep], rng.integers(0, classes, 5)])
        dt.append(dets(f"img{i}", d_boxes, d_labels, rng.uniform(0.05, 1, len(d_boxes)), 600))
    return gt, dt


def pycocotools_stats(gt, dt, classes, tmp_path):
    """The textbook pycocotools run: JSON files, loadRes, evaluate, summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {g.image_id: i + 1 for i, g in enumerate(gt)}
    anns, k = [], 1
    for g in gt:
        for box, label in zip(g.boxes, g.labels):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": k, "image_id": ids[g.image_id], "category_id": int(label) + 1,
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h),
                         "iscrowd": 0})
            k += 1
    data = {"images": [{"id": ids[g.image_id], "width": g.width, "height": g.height, "file_name": g.image_id}
                       for g in gt],
            "annotations": anns, "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    results = [{"image_id": ids[d.image_id], "category_id": int(label) + 1,
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
               for d in dt for b, label, s in zip(d.boxes, d.labels, d.scores)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_metrics_equal_pycocotools_reference_run(seed, tmp_path):
    classes = ["a", "b", "c"]
    gt, dt = random_case(seed)
    ours = coco_metrics(gt, dt, classes)
    ref = pycocotools_stats(gt, dt, classes, tmp_path)
    for i, key in enumerate(("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")):
        expected = None if ref[i] == -1 else ref[i]
        assert ours[key] == pytest.approx(expected), key
    assert 0 < ours["AP"] < ours["AP50"] <= 1  # the noisy case is neither perfect nor empty


def test_perfect_detections_score_one_and_shifted_ones_lower():
    classes = ["a", "b", "c"]
    gt, _ = random_case(5)
    perfect = [dets(g.image_id, g.boxes, g.labels, np.linspace(1, 0.5, len(g.boxes)), 600) for g in gt]
    m = coco_metrics(gt, perfect, classes)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert all(v["AP"] == pytest.approx(1.0) for v in m["per_class"].values() if v["AP"] is not None)
    assert voc_metrics(gt, perfect, classes)["mAP"] == pytest.approx(1.0)
    # Shift every box by 30% of its width: IoU = 0.7 / 1.3 = 0.54 -> still matched at 0.5,
    # never at 0.75 or above.
    shifted = []
    for d in perfect:
        b = d.boxes.copy()
        w = b[:, 2] - b[:, 0]
        b[:, [0, 2]] += 0.3 * w[:, None]
        shifted.append(dets(d.image_id, b, d.labels, d.scores, 600))
    s = coco_metrics(gt, shifted, classes)
    assert s["AP50"] == pytest.approx(1.0)
    assert s["AP75"] == pytest.approx(0.0)
    assert s["AP"] < m["AP"]


def test_images_with_more_than_100_detections_are_not_truncated():
    # 150 true objects in one scene, detected perfectly: COCO's default maxDets=100 would
    # cap recall at 100/150; the evaluation raises maxDets to the largest image.
    xy = np.stack(np.meshgrid(np.arange(15) * 40.0, np.arange(10) * 40.0), -1).reshape(-1, 2)
    boxes = np.concatenate([xy, xy + 20], axis=1)
    gt = [truth("scene", boxes, np.zeros(150), 700)]
    dt = [dets("scene", boxes, np.zeros(150), np.linspace(1, 0.1, 150), 700)]
    m = coco_metrics(gt, dt, ["obj"])
    assert m["max_dets"] == 150 and m["AP50"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)


def test_no_truth_gives_none_and_report_files(tmp_path):
    m = coco_metrics([truth("A", np.zeros((0, 4)), [])], [dets("A", [[0, 0, 5, 5]], [0], [0.9])], ["a"])
    assert m["AP"] is None and m["per_class"]["a"]["AP"] is None
    gt, dt = random_case(3)
    m = coco_metrics(gt, dt, ["a", "b", "c"])
    m["voc"] = voc_metrics(gt, dt, ["a", "b", "c"])
    files = write_report(m, tmp_path, "x")
    assert json.loads(open(files["json"]).read())["AP50"] == pytest.approx(m["AP50"])
    with open(files["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    text = format_table(m)
    assert "VOC mAP@0.5" in text and "AP50" in text


# ------------------------------------------------------------------ scene level


def commit(table, run_id, scene_id, boxes, labels, scores, classes, job="job"):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    corners = np.stack([boxes[:, [0, 3]], boxes[:, [2, 3]], boxes[:, [2, 1]], boxes[:, [0, 1]]], axis=1)
    rows = build_detection_table(corners, boxes, np.asarray(scores, float), np.asarray(labels, int), classes,
                                 run_id=run_id, job_name=job, scene_id=scene_id,
                                 scene_path=f"/data/{scene_id}.tif", model_id="m", job_hash="h")
    commit_scene(table, RunInfo(run_id, job, "h", "m", None), scene_id, {"k": scene_id}, rows)


def write_coco(path, scenes, classes):
    images, anns = [], []
    for i, (scene_id, boxes, labels) in enumerate(scenes):
        images.append({"id": i + 1, "file_name": f"{scene_id}.tif", "width": 500, "height": 500})
        for box, label in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": 1, "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))


def test_evaluate_table_perfect_shifted_and_missing_scenes(tmp_path):
    classes = ["vehicle", "building"]
    truth_scenes = [("s1", [[10, 10, 30, 20], [100, 100, 180, 170]], [0, 1]),
                    ("s2", [[50, 50, 70, 60]], [0]),
                    ("s3", [[5, 5, 25, 15]], [0])]  # never committed
    write_coco(tmp_path / "truth.json", truth_scenes, classes)
    table = tmp_path / "table"
    commit(table, "run-perfect", "s1", truth_scenes[0][1], truth_scenes[0][2], [0.9, 0.8], classes)
    commit(table, "run-perfect", "s2", truth_scenes[1][1], truth_scenes[1][2], [0.7], classes)
    m = evaluate_table(table, [tmp_path / "truth.json"], run_id="run-perfect", voc=True, out_dir=tmp_path / "ev")
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert m["voc"]["mAP"] == pytest.approx(1.0)
    assert m["scenes"] == ["s1", "s2"] and m["scenes_not_in_table"] == ["s3"]
    assert (tmp_path / "ev" / "eval.json").is_file() and (tmp_path / "ev" / "eval_pr.png").is_file()

    # A later run of s2 with the box shifted by half its width supersedes the perfect one.
    commit(table, "run-shifted", "s2", [[60, 50, 80, 60]], [0], [0.7], classes)
    m2 = evaluate_table(table, [tmp_path / "truth.json"])
    assert m2["AP50"] < 1.0 and m2["per_class"]["building"]["AP"] == pytest.approx(1.0)
    # Filtering on the first run now finds only s1 (s2's current manifest is the new run).
    m3 = evaluate_table(table, [tmp_path / "truth.json"], run_id="run-perfect")
    assert m3["scenes"] == ["s1"] and m3["AP"] == pytest.approx(1.0)


def test_evaluate_table_counts_committed_scenes_without_detections(tmp_path):
    classes = ["vehicle"]
    write_coco(tmp_path / "truth.json", [("s1", [[10, 10, 30, 20]], [0]), ("s2", [[10, 10, 30, 20]], [0])], classes)
    table = tmp_path / "table"
    commit(table, "r", "s1", [[10, 10, 30, 20]], [0], [0.9], classes)
    commit(table, "r", "s2", np.zeros((0, 4)), [], [], classes)  # processed, nothing found
    m = evaluate_table(table, [tmp_path / "truth.json"])
    assert m["scenes"] == ["s1", "s2"]
    assert m["AP50"] == pytest.approx(0.5, abs=0.01)  # recall stops at 1/2 (101-point)


def test_evaluate_table_errors_name_the_problem(tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="not found"):
        evaluate_table(tmp_path / "nope", [tmp_path / "t.json"])
    write_coco(tmp_path / "truth.json", [("other", [[1, 1, 5, 5]], [0])], ["a"])
    commit(tmp_path / "table", "r", "s1", [[10, 10, 30, 20]], [0], [0.9], ["a"])
    with pytest.raises(InputError, match="has ground truth"):
        evaluate_table(tmp_path / "table", [tmp_path / "truth.json"])
    with pytest.raises(InputError, match="no committed scene for run x"):
        evaluate_table(tmp_path / "table", [tmp_path / "truth.json"], run_id="x")


def test_vector_truth_equals_coco_truth_on_synthetic_scenes(tmp_path):
    # truth.geojson (map coordinates) placed on each scene through the raster path the
    # table records must give the same boxes, hence the same metrics, as truth.json.
    from pipeline.io.labels import by_scene, read_coco
    from pipeline.tools.synth import SYNTH_CLASSES, synthesize

    paths = synthesize(tmp_path / "synth", scenes=2, size=256, seed=4)
    truth = by_scene(read_coco(tmp_path / "synth" / "truth.json"))
    table = tmp_path / "table"
    rng = np.random.default_rng(0)
    for path in paths:
        ann = truth[path.stem]
        boxes = ann.boxes + rng.normal(0, 1.5, ann.boxes.shape)  # near-perfect, not exact
        labels = [SYNTH_CLASSES.index(label) for label in ann.labels]
        corners = np.stack([boxes[:, [0, 3]], boxes[:, [2, 3]], boxes[:, [2, 1]], boxes[:, [0, 1]]], axis=1)
        rows = build_detection_table(corners, boxes, rng.uniform(0.3, 1, len(boxes)), labels, list(SYNTH_CLASSES),
                                     run_id="r", job_name="j", scene_id=path.stem, scene_path=str(path),
                                     model_id="m", job_hash="h")
        commit_scene(table, RunInfo("r", "j", "h", "m", None), path.stem, {"k": path.stem}, rows)
    by_json = evaluate_table(table, [tmp_path / "synth" / "truth.json"])
    by_vector = evaluate_table(table, [tmp_path / "synth" / "truth.geojson"], scene_field="scene_id")
    assert by_json["ground_truth"] == by_vector["ground_truth"] > 0
    for key in ("AP", "AP50", "AP75"):
        assert by_vector[key] == pytest.approx(by_json[key], abs=1e-6)
    assert by_json["AP50"] > 0.9


def test_label_map_reads_detection_labels_as_truth_labels(tmp_path):
    """DeepForest's CSV labels say `Tree`; a model whose class is `tree` scores 0 until mapped,
    and the console says which labels matched nothing."""
    import pandas as pd
    from click.testing import CliRunner
    from real_data import real

    from pipeline.cli import main

    csv = real("OSBS_029.csv")
    truth = pd.read_csv(csv)
    assert set(truth["label"]) == {"Tree"}
    boxes = truth[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    table = tmp_path / "table"
    commit(table, "r", "OSBS_029", boxes, [0] * len(boxes), np.linspace(0.9, 0.5, len(boxes)), ["tree"])

    def run_eval(*extra):
        result = CliRunner().invoke(main, ["eval", "--table", str(table), "--truth", str(csv), "--out",
                                           str(tmp_path / "ev"), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output, json.loads((tmp_path / "ev" / "eval.json").read_text())

    out, metrics = run_eval()
    assert metrics["detections"] == 0 and metrics["unknown_labels"] == {"tree": len(boxes)}
    assert f"detections labelled 'tree' ({len(boxes)}) match no truth class (Tree)" in out
    assert "--label-map" in out and "no detection carries the truth classes Tree" in out
    out, metrics = run_eval("--label-map", "tree=Tree")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["detections"] == len(boxes)
    assert "warning" not in out
    result = CliRunner().invoke(main, ["eval", "--table", str(table), "--truth", str(csv), "--label-map", "tree"])
    assert result.exit_code == 2 and "expected DETECTED=TRUTH" in result.output
