"""Benchmark: scene-level COCO evaluation at real object densities.

    python bench/eval_bench.py                          # 1k, 4k, 16k objects per scene, then the table case
    python bench/eval_bench.py --objects 1000 4000 --reps 3
    python bench/eval_bench.py --table-only --profile   # the three-scene table case under cProfile

Two measurements, on synthetic boxes made here (the same data for both sides):

1. ``coco_metrics`` (pipeline.eval.metrics: faster-coco-eval's C++ matcher) against the
   textbook pycocotools run (COCO objects in memory, COCOeval.evaluate / accumulate) on
   one scene of N objects in two classes, for N in ``--objects``. Printed: seconds of
   each (median of ``--reps``), the ratio pycocotools / ours, and the largest difference
   of AP, AP50, AP75 and the per-class AP (they must agree to 1e-9). pycocotools matches a
   scene as one image, so its cost grows with the square of the objects per class; a run
   that would take minutes (``--max-pycoco-s``) is timed once and said so.
2. ``evaluate_table`` end to end: ``--scenes`` committed 8192² scenes of ~4,100 truth
   objects and ~4,300 detections each (two classes), truth in one COCO JSON, through the
   table read, truth parsing and matching (median of ``--reps``).

The machine's load average is printed beside them: measure when it is quiet.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.evaluate import evaluate_table  # noqa: E402
from pipeline.eval.metrics import ImageBoxes, coco_metrics  # noqa: E402
from pipeline.table.commit import RunInfo, commit_scene  # noqa: E402
from pipeline.table.schema import build_detection_table  # noqa: E402

CLASSES = ["tree", "vehicle"]
SIZE = 8192


def synthetic_scene(rng: np.random.Generator, scene_id: str, n_truth: int, size: int = SIZE,
                    classes: int = len(CLASSES)) -> tuple[ImageBoxes, ImageBoxes]:
    """Truth and detections of one scene: 85% of the objects found with a jitter of ~8% of
    their size (a few with the wrong class), plus 20% clutter; scores above 0.3 (a job's
    threshold), found objects scoring higher on average. About 1.05 detections per object."""
    wh = rng.uniform(8, 90, (n_truth, 2))
    xy = rng.uniform(0, size - 90, (n_truth, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    labels = rng.integers(0, classes, n_truth)
    found = rng.random(n_truth) < 0.85
    jitter = boxes[found] + rng.normal(0, 1, (found.sum(), 4)) * 0.08 * np.tile(wh[found], 2)
    jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
    found_labels = np.where(rng.random(found.sum()) < 0.05, rng.integers(0, classes, found.sum()), labels[found])
    n_clutter = int(0.2 * n_truth)
    cxy = rng.uniform(0, size - 90, (n_clutter, 2))
    clutter = np.concatenate([cxy, cxy + rng.uniform(8, 90, (n_clutter, 2))], axis=1)
    det_boxes = np.concatenate([jitter, clutter]).astype(np.float32).astype(np.float64)  # the table's float32
    det_labels = np.concatenate([found_labels, rng.integers(0, classes, n_clutter)])
    scores = np.concatenate([rng.uniform(0.4, 1.0, found.sum()), rng.uniform(0.3, 0.8, n_clutter)])
    scores = scores.astype(np.float32).astype(np.float64)
    return (ImageBoxes(scene_id, boxes, labels, None, size, size),
            ImageBoxes(scene_id, det_boxes, det_labels, scores, size, size))


def pycocotools_metrics(truth: list[ImageBoxes], detections: list[ImageBoxes], classes: list[str]) -> dict:
    """The reference: pycocotools' COCO objects and COCOeval, maxDets raised as ours."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {t.image_id: i + 1 for i, t in enumerate(truth)}
    images = [{"id": ids[t.image_id], "width": t.width, "height": t.height} for t in truth]
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]

    def anns(items, scored):
        out = []
        for item in items:
            for j, (x1, y1, x2, y2) in enumerate(item.boxes):
                ann = {"id": len(out) + 1, "image_id": ids[item.image_id], "category_id": int(item.labels[j]) + 1,
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                if scored:
                    ann["score"] = float(item.scores[j])
                out.append(ann)
        return out

    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "categories": cats, "annotations": anns(truth, False)}
        dt.dataset = {"images": images, "categories": cats, "annotations": anns(detections, True)}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 100, max([100] + [len(d.boxes) for d in detections])]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"]

    def mean(a):
        a = a[a > -1]
        return float(a.mean()) if a.size else None

    return {"AP": mean(p[:, :, :, 0, -1]), "AP50": mean(p[0, :, :, 0, -1]), "AP75": mean(p[5, :, :, 0, -1]),
            "per_class": {c: mean(p[:, :, k, 0, -1]) for k, c in enumerate(classes)}}


def largest_difference(ours: dict, ref: dict) -> float:
    pairs = [(ours[k], ref[k]) for k in ("AP", "AP50", "AP75")]
    pairs += [(ours["per_class"][c]["AP"], ref["per_class"][c]) for c in ref["per_class"]]
    return max(abs(a - b) for a, b in pairs)


def timed(fn, *args, **kwargs):
    """(wall seconds, result); the CPU seconds of the call are appended to CPU_SECONDS (on a
    shared machine the wall time moves with the load, the CPU time much less)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.perf_counter() - start, out


CPU_SECONDS: list[float] = []


def matcher_rows(objects: list[int], reps: int, max_pycoco_s: float, pycoco_up_to: int) -> list[dict]:
    rows = []
    for n in objects:
        truth, dets = synthetic_scene(np.random.default_rng(n), "scene", n)
        ours_s, ours_cpu = [], []
        for _ in range(reps):
            seconds, ours = timed(coco_metrics, [truth], [dets], CLASSES)
            ours_s.append(seconds)
            ours_cpu.append(CPU_SECONDS[-1])
        if n > pycoco_up_to:
            print(f"{n:>6} objects, {len(dets.boxes):>6} detections: ours {statistics.median(ours_s):.3f} s "
                  f"(CPU {statistics.median(ours_cpu):.3f}); AP {ours['AP']:.4f}; pycocotools not run", flush=True)
            continue
        ref_s, ref_cpu = [], []
        seconds, ref = timed(pycocotools_metrics, [truth], [dets], CLASSES)
        ref_s.append(seconds)
        ref_cpu.append(CPU_SECONDS[-1])
        once = seconds > max_pycoco_s
        for _ in range(0 if once else reps - 1):
            ref_s.append(timed(pycocotools_metrics, [truth], [dets], CLASSES)[0])
            ref_cpu.append(CPU_SECONDS[-1])
        row = {"objects": n, "detections": len(dets.boxes), "ours_s": statistics.median(ours_s),
               "ours_cpu_s": statistics.median(ours_cpu), "pycocotools_s": statistics.median(ref_s),
               "pycocotools_cpu_s": statistics.median(ref_cpu), "pycocotools_runs": len(ref_s),
               "AP": ours["AP"], "max_diff": largest_difference(ours, ref)}
        row["ratio"] = row["pycocotools_s"] / row["ours_s"]
        row["cpu_ratio"] = row["pycocotools_cpu_s"] / row["ours_cpu_s"]
        rows.append(row)
        print(f"{n:>6} objects, {row['detections']:>6} detections: ours {row['ours_s']:.3f} s "
              f"(CPU {row['ours_cpu_s']:.3f}), pycocotools {row['pycocotools_s']:.3f} s "
              f"(CPU {row['pycocotools_cpu_s']:.3f}; {len(ref_s)} run{'s' if len(ref_s) > 1 else ''}), "
              f"ratio {row['ratio']:.1f}x (CPU {row['cpu_ratio']:.1f}x); AP {row['AP']:.4f}, "
              f"largest AP difference {row['max_diff']:.1e}", flush=True)
    return rows


def build_table_case(root: Path, scenes: int, per_scene: int, seed: int = 0) -> Path:
    """``scenes`` committed scenes and their truth as one COCO JSON; returns its path."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    run = RunInfo("r1", "bench", "h", "m", None)
    for i in range(scenes):
        scene_id = f"scene{i}"
        truth, dets = synthetic_scene(rng, scene_id, per_scene + int(rng.integers(-50, 50)))
        images.append({"id": i + 1, "file_name": f"{scene_id}.tif", "width": SIZE, "height": SIZE})
        for box, label in zip(truth.boxes, truth.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        b = dets.boxes
        corners = np.stack([b[:, [0, 3]], b[:, [2, 3]], b[:, [2, 1]], b[:, [0, 1]]], axis=1)
        rows = build_detection_table(corners, b, dets.scores, dets.labels, CLASSES, run_id=run.run_id,
                                     job_name=run.job_name, scene_id=scene_id, scene_path=f"/data/{scene_id}.tif",
                                     model_id="m", job_hash="h")
        commit_scene(root / "table", run, scene_id, {"k": scene_id}, rows)
    path = root / "truth.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}))
    return path


def table_row(scenes: int, per_scene: int, reps: int, profile: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = build_table_case(root, scenes, per_scene)
        runs, cpu = [], []
        for _ in range(reps):
            seconds, metrics = timed(evaluate_table, root / "table", [truth])
            runs.append(seconds)
            cpu.append(CPU_SECONDS[-1])
        if profile:
            prof = cProfile.Profile()
            prof.runcall(evaluate_table, root / "table", [truth])
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    row = {"scenes": scenes, "ground_truth": metrics["ground_truth"], "detections": metrics["detections"],
           "seconds": statistics.median(runs), "cpu_s": statistics.median(cpu), "AP": metrics["AP"]}
    print(f"evaluate_table: {scenes} scenes of {SIZE}², {row['ground_truth']} truth objects, {row['detections']} "
          f"detections: {row['seconds']:.2f} s (CPU {row['cpu_s']:.2f} s; median of {reps}); AP {row['AP']:.4f}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-pycoco-s", type=float, default=60.0,
                        help="a pycocotools run longer than this is timed once")
    parser.add_argument("--pycocotools-up-to", type=int, default=10**9, metavar="N",
                        help="run the pycocotools reference only on scenes of at most N objects")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--per-scene", type=int, default=4100)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one evaluate_table call")
    args = parser.parse_args()
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"{platform.machine()}, {platform.python_version()}, load average before {' '.join(load)}", flush=True)
    if not args.table_only:
        matcher_rows(args.objects, args.reps, args.max_pycoco_s, args.pycocotools_up_to)
    table_row(args.scenes, args.per_scene, args.reps, args.profile)
    with open("/proc/loadavg") as fh:
        print(f"load average after {' '.join(fh.read().split()[:3])}")


if __name__ == "__main__":
    main()
