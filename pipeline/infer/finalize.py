"""Per-scene finishing on the driver: chip detections -> seam merge -> map polygons -> rows."""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import numpy as np

from pipeline.chips.tiling import chip_id
from pipeline.geo.georef import boxes_to_polygons, clip_boxes_to_scene, valid_polygons
from pipeline.infer.merge import merge_detections
from pipeline.infer.predictor import decode_detections


def gather_scene_detections(chip_results: list[tuple[str, bytes]], chip_index_of: dict[str, int]):
    """Concatenate a scene's chip detections -> (boxes (N,4), scores (N,), labels (N,), chip_index (N,))."""
    parts, chips = [], []
    for cid, blob in chip_results:
        rows = decode_detections(blob)
        parts.append(rows)
        chips.append(np.full(len(rows), chip_index_of[cid], dtype=np.int64))
    rows = np.concatenate(parts) if parts else np.zeros((0, 6), np.float32)
    chip_index = np.concatenate(chips) if chips else np.zeros(0, np.int64)
    return rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64), chip_index


def scene_acquired_at(stac_time: Optional[dt.datetime], info: Any) -> tuple[Optional[dt.datetime], Optional[str]]:
    """When a scene was imaged -> (acquired_at, warning for the run report).

    Its STAC item's time (``SceneInput.acquired_at``) when it came from STAC; else the
    raster's acquisition tag as read with its header (``info``, the scene's
    :class:`pipeline.io.raster.SceneInfo`: ``acquired_at``, with the
    warning of a tag that did not parse); else unknown (None, None).
    """
    if stac_time is not None:
        return stac_time, None
    return info.acquired_at, info.acquired_at_warning


def finalize_scene(spec, plan, chip_results: list[tuple[str, bytes]], class_names: list[str], run_id: str,
                   model_id: str, job_hash: str, acquired_at: Optional[dt.datetime] = None):
    """Merged, georeferenced detections of one scene as a GeoParquet-ready Arrow table.

    Polygons are in output.crs, or in scene pixels when the scene or the job has no CRS.
    Boxes are clipped to the scene first (empty ones dropped); a geometry that is not a
    valid polygon after reprojection is written as null. acquired_at: the scene's
    acquisition time (:func:`scene_acquired_at`), None when unknown.
    """
    from pipeline.table.schema import build_detection_table

    windows = np.array([[w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height] for w in plan.windows],
                       dtype=np.float64).reshape(-1, 4)
    index_of = {chip_id(plan.scene_id, w.row, w.col): i for i, w in enumerate(plan.windows)}
    boxes, scores, labels, chip_index = gather_scene_detections(chip_results, index_of)
    merged = merge_detections(boxes, scores, labels, chip_index, windows, method=spec.merge.method,
                              iou_threshold=spec.merge.iou_threshold, seam_margin=spec.merge.seam_margin)
    # Boxes may reach into the padding of edge chips: clip to the scene, drop what is left empty.
    boxes, keep = clip_boxes_to_scene(merged.boxes, plan.info.width, plan.info.height)
    boxes, scores, labels = boxes[keep], np.asarray(merged.scores)[keep], np.asarray(merged.labels)[keep]
    crs = plan.info.crs_wkt if spec.output.crs else None
    corners = boxes_to_polygons(boxes, plan.info.transform, crs, spec.output.crs)
    # A reprojection can fold a quad; NaN corners make the table write a null geometry.
    corners[~valid_polygons(corners)] = np.nan
    return build_detection_table(corners, boxes, scores, labels, class_names, run_id=run_id,
                                 job_name=spec.name, scene_id=plan.scene_id, scene_path=plan.path,
                                 model_id=model_id, job_hash=job_hash, acquired_at=acquired_at)


def empty_scene_rows(job_name: str, scene_id: str, scene_path: str, class_names: list[str], run_id: str,
                     model_id: str, job_hash: str):
    """The (zero) rows of a scene that produced nothing: what a failed scene commits."""
    from pipeline.table.schema import build_detection_table

    return build_detection_table(np.zeros((0, 4, 2)), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64),
                                 class_names, run_id=run_id, job_name=job_name, scene_id=scene_id,
                                 scene_path=scene_path, model_id=model_id, job_hash=job_hash)
