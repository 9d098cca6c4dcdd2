"""Detection quality of a run or a checkpoint: reports, tables and PR curves.

Three entry points:

- :func:`evaluate_table`: scene-level evaluation of a committed run (``pipeline eval``):
  merged detections read with :func:`pipeline.table.state.read_committed` against ground truth
  (COCO JSON, VOC XML, CSV: scene id = file stem; or vector labels, placed on each scene
  through the raster named in the table).
- :func:`evaluate_checkpoint`: chip-level evaluation of a checkpoint on labelled scenes,
  without running the pipeline (``pipeline eval-checkpoint``); also used for validation
  during training.
- the metric functions on in-memory boxes live in :mod:`pipeline.eval.metrics`.

Evaluation on a training job's own split (``pipeline eval-checkpoint --job``) needs that
job's split rules, so it sits with training, above this module
(:func:`pipeline.train.driver.evaluate_checkpoint_on_job`).

COCO protocol notes: images are scenes (or chips); area ranges small < 32^2 <= medium <
96^2 <= large, in pixels; ``maxDets`` is (1, 100, M) where M is at least the largest
number of detections of any image, so big scenes are not cut at COCO's 100 detections
(every AP below uses M). Metrics that have no ground truth (e.g. AP_small when there is
no small object) are ``None``. Boxes are pixel EDGE coordinates (no VOC "+1").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.eval.labelled import (
    Region,
    build_records,
    expand_scene_paths,
    labelled_scenes,
    predict_records,
    records_truth,
    split_regions,
)
from pipeline.eval.metrics import ImageBoxes, coco_metrics, voc_metrics
from pipeline.io.inputs import match_label_images
from pipeline.io.labels import by_scene, load_coco, read_coco, read_labels
from pipeline.io.raster import read_scene_info
from pipeline.table.store import open_store

# ---------------------------------------------------------------------- reporting


def format_table(metrics: dict) -> str:
    """The metrics as an aligned text table (overall, then per class)."""
    def num(v):
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f"images {metrics['images']}, ground truth {metrics['ground_truth']}, "
             f"detections {metrics['detections']} (maxDets {metrics['max_dets']})",
             "  ".join(f"{k:>9}" for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")),
             "  ".join(f"{num(metrics[k]):>9}" for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium",
                                                          "AP_large"))]
    voc = metrics.get("voc")
    header = f"{'class':<16}{'AP':>9}{'AP50':>9}" + (f"{'VOC AP50':>10}" if voc else "")
    lines += ["", header]
    for name, row in metrics["per_class"].items():
        line = f"{name:<16}{num(row['AP']):>9}{num(row['AP50']):>9}"
        if voc:
            line += f"{num(voc['per_class'].get(name)):>10}"
        lines.append(line)
    if voc:
        lines.append(f"{'VOC mAP@0.5':<16}{'':>18}{num(voc['mAP']):>10}")
    return "\n".join(lines)


def pr_figure(metrics: dict, title: str = "", score_threshold: Optional[float] = None):
    """The precision-recall curves at IoU 0.5 as a matplotlib Figure, one line per class
    (the :func:`pipeline.eval.metrics.pr_curve_points`: each ends at the class's final
    recall). ``score_threshold``: the score the detections were cut at; each class's point
    where the detections scoring at least it take the curve is marked (one marker line
    labelled with the threshold); None: no mark."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.subplots()
    marks = []
    for name, curve in (metrics.get("pr_curve") or {}).items():
        if not curve["recall"]:
            continue
        ap50 = metrics["per_class"][name]["AP50"]
        # from recall 0 at the first point's precision; "steps-pre": between two points the
        # interpolated precision is the right-hand one's
        ax.plot([0.0, *curve["recall"]], [curve["precision"][0], *curve["precision"]], drawstyle="steps-pre",
                label=f"{name} (AP50 {ap50:.3f})")
        if score_threshold is not None:
            kept = [i for i, s in enumerate(curve["score"]) if s >= score_threshold]
            if kept:
                marks.append((curve["recall"][kept[-1]], curve["precision"][kept[-1]]))
    if marks:
        ax.plot([x for x, _ in marks], [y for _, y in marks], linestyle="none", marker="o", color="black",
                label=f"score \u2265 {score_threshold:g} (job threshold)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ap50 = metrics.get("AP50")
    ax.set_title(title or "precision-recall at IoU 0.5" + (f" (AP50 {ap50:.3f})" if ap50 is not None else ""))
    fig.tight_layout()
    return fig


def plot_pr_curves(metrics: dict, path: str | os.PathLike, title: str = "",
                   score_threshold: Optional[float] = None) -> Optional[Path]:
    """:func:`pr_figure` as a PNG. None when there is no curve to draw (no ground truth)."""
    if not any(curve["recall"] for curve in (metrics.get("pr_curve") or {}).values()):
        return None
    fig = pr_figure(metrics, title, score_threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(metrics: dict, out_dir: str | os.PathLike, stem: str = "eval") -> dict:
    """Write ``<stem>.json`` (the metrics), ``<stem>_pr.json`` (the PR curves) and
    ``<stem>_pr.png`` (their plot) into ``out_dir``; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in metrics.items() if k != "pr_curve"}
    paths = {"json": out / f"{stem}.json", "pr_json": out / f"{stem}_pr.json"}
    paths["json"].write_text(json.dumps(summary, indent=2, sort_keys=True))
    paths["pr_json"].write_text(json.dumps(metrics.get("pr_curve", {})))
    png = plot_pr_curves(metrics, out / f"{stem}_pr.png", score_threshold=metrics.get("score_threshold"))
    if png is not None:
        paths["png"] = png
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------- scene level


def truth_by_scene(truth_paths: Sequence[str | os.PathLike], scene_paths: Mapping[str, Optional[str]],
                   label_field: str = "label", scene_field: Optional[str] = None
                   ) -> tuple[dict[str, tuple[np.ndarray, list[str], int, int]], list[str]]:
    """Ground truth per scene id -> ((N, 4) boxes, N label names, width, height) and the
    class names (COCO category order when a COCO file is given, else sorted names).

    Image-indexed formats are matched to the table's scene ids by
    :func:`pipeline.io.inputs.match_label_images`; vector files are read per scene on
    the raster at ``scene_paths[scene_id]`` (the table's scene_path; a scene without one
    gets no vector truth).
    """
    out: dict[str, tuple[np.ndarray, list[str], int, int]] = {}
    classes: list[str] = []
    for path in truth_paths:
        path = Path(path)
        if path.suffix.lower() in (".json", ".xml", ".csv"):
            sizes: dict[str, tuple[int, int]] = {}
            if path.suffix.lower() == ".json":  # COCO: parsed once for its header and its boxes
                document = load_coco(path)
                names, sizes = _coco_header(document)
                classes += [c for c in names if c not in classes]
                images = by_scene(read_coco(path, document))
            else:
                images = by_scene(read_labels(path))
            matched = match_label_images(images, list(scene_paths), str(path))
            for image_id, ann in images.items():
                # truth of a scene the table lacks keeps its own id: reported as not in the table
                _add_truth(out, matched.get(image_id, image_id), ann.boxes, ann.labels, sizes.get(ann.image, (0, 0)),
                           path)
        else:
            for scene_id, scene_path in scene_paths.items():
                if not scene_path:
                    continue
                info = read_scene_info(scene_path)
                for ann in read_labels(path, info, label_field=label_field, scene_field=scene_field):
                    _add_truth(out, scene_id, ann.boxes, ann.labels, (info.width, info.height), path)
    names = sorted({label for _, labels, _, _ in out.values() for label in labels})
    classes += [n for n in names if n not in classes]
    return out, classes


def _add_truth(out: dict, scene_id: str, boxes: np.ndarray, labels: list[str], size, source) -> None:
    if scene_id in out:
        old_boxes, old_labels, w, h = out[scene_id]
        out[scene_id] = (np.concatenate([old_boxes, boxes.reshape(-1, 4)]), old_labels + list(labels),
                         max(w, size[0]), max(h, size[1]))
    else:
        out[scene_id] = (boxes.reshape(-1, 4), list(labels), size[0], size[1])


def _coco_header(data: dict) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """A parsed COCO file's category names (in id order) and {file_name: (width, height)}."""
    names = [c["name"] for c in sorted(data.get("categories", []), key=lambda c: c["id"])]
    sizes = {img.get("file_name"): (int(img.get("width", 0) or 0), int(img.get("height", 0) or 0))
             for img in data.get("images", [])}
    return names, sizes


def parse_label_map(pairs: Sequence[str]) -> dict[str, str]:
    """``["tree=Tree", "car=vehicle"]`` -> ``{"tree": "Tree", "car": "vehicle"}``
    (detection label = truth label). Raises ConfigError on a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        for item in (p for p in pair.split(",") if p.strip()):
            detected, sep, truth = item.partition("=")
            if not sep or not detected.strip() or not truth.strip():
                raise ConfigError(f"--label-map: expected DETECTED=TRUTH (e.g. tree=Tree), got {item!r}")
            out[detected.strip()] = truth.strip()
    return out


def evaluate_table(table: str | os.PathLike, truth: Sequence[str | os.PathLike], run_id: Optional[str] = None,
                   job_name: Optional[str] = None, voc: bool = False, out_dir: Optional[str | os.PathLike] = None,
                   label_field: str = "label", scene_field: Optional[str] = None,
                   label_map: Optional[Mapping[str, str]] = None, score_threshold: Optional[float] = None) -> dict:
    """Scene-level evaluation of the committed detections of a table.

    ``table``: a local folder or an object-store prefix (``s3://``, ``gs://``), as
    ``output.table``. Evaluated scenes: those committed in the table (current manifests;
    filtered by ``run_id`` / ``job_name`` when given) that have ground truth. A committed
    scene with no detections counts (all its objects missed). Truth scenes that are not
    committed are listed under ``scenes_not_in_table`` and left out; committed scenes
    without truth under ``scenes_without_truth``. Detection labels are matched to truth
    classes by name, after ``label_map`` (detection label -> truth label, e.g.
    ``{"tree": "Tree"}``). Detection labels that still match no truth class are counted in
    ``unknown_labels``; truth classes that no detection label reaches are listed in
    ``truth_labels_unmatched``.

    ``score_threshold``: the score the detections were cut at, marked on the PR plot;
    default: the one value the evaluated runs' reports record (:func:`runs_score_threshold`),
    else none.

    Returns the :func:`coco_metrics` dict plus ``voc`` (when asked), ``scenes``, the
    lists above, ``score_threshold`` and ``files`` (written reports, when ``out_dir`` is
    given). Raises InputError when nothing can be evaluated.
    """
    import pyarrow.dataset as pds

    from pipeline.table.state import committed_scenes, read_committed, require_table

    table = str(table)  # a URL stays a URL (pathlib would fold s3:// into s3:/)
    require_table(table)
    entries = [m for (job, _), m in committed_scenes(table).items()
               if (run_id is None or m["run_id"] == run_id) and (job_name is None or job == job_name)]
    if not entries:
        raise InputError(f"{table}: no committed scene" + (f" for run {run_id}" if run_id else "")
                         + (f" of job {job_name}" if job_name else ""))
    jobs_per_scene: dict[str, set] = {}
    for m in entries:
        jobs_per_scene.setdefault(m["scene_id"], set()).add(m["job_name"])
    shared = sorted(s for s, jobs in jobs_per_scene.items() if len(jobs) > 1)
    if shared:
        raise InputError(f"{table}: scenes {shared[:5]} are committed by several jobs "
                         f"({sorted(set().union(*jobs_per_scene.values()))}); "
                         "pass --job JOB.yaml, --job-name NAME or --run-id")
    scene_paths = {m["scene_id"]: m.get("scene_path") for m in entries}
    gt, classes = truth_by_scene(truth, scene_paths, label_field, scene_field)

    evaluated = sorted(s for s in scene_paths if s in gt)
    if not evaluated:
        raise InputError(f"{table}: none of the {len(scene_paths)} committed scenes has ground truth in "
                         f"{', '.join(map(str, truth))} (scene id = file stem)")
    # read_committed sees only the current manifests' files; narrow to the run / job asked for.
    expr = None
    if run_id is not None:
        expr = pds.field("run_id") == run_id
    if job_name is not None:
        term = pds.field("job_name") == job_name
        expr = term if expr is None else expr & term
    rows = read_committed(table, columns=["scene_id", "label", "score", *BOX_COLUMNS], filters=expr)
    detections = scene_detections(rows, evaluated, classes, label_map or {})

    truth_images, det_images = [], []
    lookup = {name: k for k, name in enumerate(classes)}
    for scene_id in evaluated:
        boxes, labels, w, h = gt[scene_id]
        truth_images.append(ImageBoxes(scene_id, boxes, np.array([lookup[name] for name in labels], dtype=np.int64),
                                       None, w, h))
        det_boxes, det_labels, det_scores = detections.per_scene[scene_id]
        det_images.append(ImageBoxes(scene_id, det_boxes, det_labels, det_scores, w, h))
    metrics = coco_metrics(truth_images, det_images, classes)
    if voc:
        metrics["voc"] = voc_metrics(truth_images, det_images, classes)
    metrics["scenes"] = evaluated
    metrics["scenes_not_in_table"] = sorted(s for s in gt if s not in scene_paths)
    metrics["scenes_without_truth"] = sorted(s for s in scene_paths if s not in gt)
    metrics["unknown_labels"] = detections.unknown_labels
    metrics["truth_labels_unmatched"] = sorted(c for c in classes if c not in detections.reached)
    metrics["table"] = table
    metrics["run_id"] = run_id
    metrics["score_threshold"] = (score_threshold if score_threshold is not None
                                  else runs_score_threshold(table, sorted({m["run_id"] for m in entries})))
    if out_dir is not None:
        metrics["files"] = write_report(metrics, out_dir, "eval")
    return metrics


BOX_COLUMNS = ("px_xmin", "px_ymin", "px_xmax", "px_ymax")


@dataclass
class SceneDetections:
    """A table's detections split by scene and read as truth classes (:func:`scene_detections`).

    per_scene: scene id -> ((N, 4) float64 XYXY pixel boxes, (N,) class indices, (N,) scores),
    detections whose label matches no class left out; unknown_labels: {label: count} of those
    left out (evaluated scenes only); reached: the class names some row's label reaches.
    """

    per_scene: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    unknown_labels: dict[str, int]
    reached: set[str]


def scene_detections(rows, scenes: Sequence[str], classes: Sequence[str],
                     label_map: Mapping[str, str]) -> SceneDetections:
    """Split detection rows (columns scene_id, label, score and the pixel box) by scene and
    map their labels to class indices, through ``label_map`` (detection label -> class name).

    Columnar: each distinct label and scene id is looked up once, the rows are grouped by
    one stable sort (a filter per scene would read every row once per scene).
    """
    import pyarrow.compute as pc

    labels = pc.dictionary_encode(pc.fill_null(rows["label"], "")).combine_chunks()
    names = [label_map.get(n, n) for n in labels.dictionary.to_pylist()]
    lookup = {name: k for k, name in enumerate(classes)}
    class_of_name = np.array([lookup.get(n, -1) for n in names], dtype=np.int64)
    label_class = class_of_name[labels.indices.to_numpy()] if len(names) else np.zeros(0, np.int64)

    scene_ids = pc.dictionary_encode(rows["scene_id"]).combine_chunks()
    wanted = {s: i for i, s in enumerate(scenes)}
    scene_of_id = np.array([wanted.get(s, -1) for s in scene_ids.dictionary.to_pylist()], dtype=np.int64)
    row_scene = scene_of_id[scene_ids.indices.to_numpy()] if len(scene_of_id) else np.zeros(0, np.int64)

    boxes = np.stack([rows[c].to_numpy() for c in BOX_COLUMNS], axis=1).astype(np.float64).reshape(-1, 4)
    scores = rows["score"].to_numpy().astype(np.float64)
    in_scenes = row_scene >= 0
    unknown = in_scenes & (label_class < 0)
    counts = (np.bincount(labels.indices.to_numpy()[unknown], minlength=len(names)) if len(names)
              else np.zeros(0, np.int64))
    unknown_labels = {names_raw: int(c) for names_raw, c in zip(labels.dictionary.to_pylist(), counts) if c}
    keep = np.flatnonzero(in_scenes & (label_class >= 0))
    keep = keep[np.argsort(row_scene[keep], kind="stable")]
    bounds = np.searchsorted(row_scene[keep], np.arange(len(scenes) + 1))
    per_scene = {}
    for i, scene_id in enumerate(scenes):
        part = keep[bounds[i]:bounds[i + 1]]
        per_scene[scene_id] = (boxes[part], label_class[part], scores[part])
    used = np.unique(labels.indices.to_numpy()) if len(names) else np.zeros(0, np.int64)
    return SceneDetections(per_scene, unknown_labels, {names[i] for i in used})


def runs_score_threshold(table: str, run_ids: Sequence[str]) -> Optional[float]:
    """The score threshold the runs' detections were made at, when their reports
    (``_reports/<run_id>.json``, key ``score_threshold``) record one and agree; else None."""
    from pipeline.table.state import REPORTS

    store = open_store(table)
    found = set()
    for run in run_ids:
        key = f"{REPORTS}/{run}.json"
        if store.stat(key) is None:
            return None
        try:
            value = json.loads(store.read(key)).get("score_threshold")
        except (OSError, ValueError):
            return None
        if value is None:
            return None
        found.add(float(value))
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------ chip level


def evaluate_records(model, records, classes: Sequence[str], bands, chip_size: int, batch_size: int = 8,
                     device: str = "cpu", precision: str = "fp32", voc: bool = False) -> dict:
    """Chip-level COCO (and optionally VOC) metrics of a model on chip records."""
    if not records:
        raise InputError("no chips to evaluate on")
    detections = predict_records(model, records, bands, chip_size, batch_size, device, precision)
    truth = records_truth(records, chip_size)
    metrics = coco_metrics(truth, detections, classes)
    if voc:
        metrics["voc"] = voc_metrics(truth, detections, classes)
    return metrics


def model_for_eval(checkpoint: str | os.PathLike, untrained: bool, seed: int):
    """(model in eval mode, class names) of a checkpoint; ``untrained``: same config, fresh
    weights (seeded), the "before training" reference."""
    import torch

    from retinanet.checkpoint import CheckpointError, load_checkpoint
    from retinanet.model import build_model

    try:
        model, info = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise InputError(str(err)) from None
    if untrained:
        torch.manual_seed(seed)
        model = build_model(info["config"]).eval()
    return model, list(info["class_names"])


def finish_report(metrics: dict, extra: dict, out_dir, stem: str) -> dict:
    """``metrics`` with ``extra`` (what was evaluated) added; with ``out_dir``, the report
    written there (:func:`write_report`) and its files listed under ``files``."""
    metrics.update(extra)
    if out_dir is not None:
        metrics["files"] = write_report(metrics, out_dir, stem)
    return metrics


def evaluate_checkpoint(checkpoint: str | os.PathLike, scenes: Sequence[str], labels: Sequence[str],
                        chip_size: int = 512, overlap: int = 64, bands: Optional[Sequence[int]] = None,
                        region: Optional[tuple[str, float]] = None, min_box_inside: float = 0.5,
                        batch_size: int = 8, voc: bool = False, out_dir: Optional[str | os.PathLike] = None,
                        precision: str = "fp32", untrained: bool = False, seed: int = 0) -> dict:
    """Chip-level evaluation of a checkpoint on labelled scenes, without the pipeline.

    The checkpoint's class names are the classes (a label outside them is an error).
    ``region`` = (side, fraction), e.g. ("right", 0.3): evaluate only on that held-out
    band of every scene (the rule of ``train.val_split: {by: region}``).
    ``untrained``: evaluate a freshly initialised model of the checkpoint's config
    instead of its weights (``seed`` fixes the init).
    """
    model, classes = model_for_eval(checkpoint, untrained, seed)
    labelled = labelled_scenes(expand_scene_paths(scenes, "--scenes"), [str(p) for p in labels], classes)
    if region is None:
        regions = [Region(s.scene_id, 0, 0, s.info.width, s.info.height) for s in labelled]
    else:
        side, fraction = region
        _, regions = split_regions(labelled, "region", fraction, 0, side)
    records = build_records(labelled, regions, chip_size, overlap, min_box_inside, 0.0)
    metrics = evaluate_records(model, records, classes, bands, chip_size, batch_size, "cpu", precision, voc)
    return finish_report(metrics, {"checkpoint": str(checkpoint), "chips": len(records), "untrained": untrained,
                                   "region": list(region) if region else None}, out_dir, "eval_checkpoint")


__all__ = ["evaluate_table", "evaluate_checkpoint", "evaluate_records", "finish_report", "format_table",
           "model_for_eval", "plot_pr_curves", "pr_figure", "runs_score_threshold", "scene_detections", "write_report"]
