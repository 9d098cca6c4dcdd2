"""`pipeline render`: a quicklook PNG of one scene with its committed detections.

The picture is read decimated (``out_shape``), so GDAL serves it from the scene's
overviews instead of reading full-resolution pixels: a 40 000 px scene costs a few
megabytes. Pixel values are stretched between the 2nd and 98th percentile of the valid
pixels of each band, for display only (nothing is written back). Detections come from
the committed table (the rows of the scene committed with that path, optionally of one
run or job) and are drawn from their ``px_*`` columns as rectangle outlines,
coloured by class, with a legend strip under the image listing each class and its count.

Display coordinates: a box edge at scene pixel ``x`` is drawn at ``floor(x * sx)`` with
``sx = display_width / scene_width`` (likewise y), so a box at (100, 120, 200, 180) in a
512 px scene rendered at 256 px is drawn at (50, 60, 100, 90).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.io.inputs import is_remote, scene_id_for

# Distinct, saturated colours (RGB) for class ids 0, 1, 2, ...; repeats after 10 classes.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),    # magenta
    (0, 255, 255),    # cyan
    (255, 255, 0),    # yellow
    (255, 128, 0),    # orange
    (0, 255, 0),      # green
    (255, 0, 0),      # red
    (0, 96, 255),     # blue
    (255, 255, 255),  # white
    (160, 0, 255),    # violet
    (128, 255, 160),  # mint
)
LOW_PERCENTILE, HIGH_PERCENTILE = 2.0, 98.0
LEGEND_LINE = 16      # legend row height, px
LEGEND_PAD = 6        # legend margin, px


def class_colour(label_id: int) -> tuple[int, int, int]:
    """The outline colour of class ``label_id`` (PALETTE, cycling)."""
    return PALETTE[int(label_id) % len(PALETTE)]


def display_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(display_width, display_height): the scene scaled so its longer side is at most
    ``max_size`` (never enlarged), aspect ratio kept, each side at least 1 px."""
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def stretch(pixels: np.ndarray, valid: np.ndarray, low: float = LOW_PERCENTILE,
            high: float = HIGH_PERCENTILE) -> np.ndarray:
    """(B, H, W) any dtype -> (B, H, W) uint8, each band mapped linearly from its
    ``low``..``high`` percentile of the ``valid`` (H, W) pixels to 0..255 (clipped).
    Invalid pixels become 0. A flat band maps to 0."""
    out = np.zeros(pixels.shape, np.uint8)
    if not valid.any():
        return out
    for b, band in enumerate(pixels.astype(np.float64)):
        lo, hi = np.percentile(band[valid], [low, high])
        span = hi - lo if hi > lo else 1.0
        scaled = np.clip((band - lo) / span * 255.0, 0, 255)
        out[b] = np.where(valid, np.rint(scaled), 0).astype(np.uint8)
    return out


def display_bands(colorinterp: Sequence[str], count: int) -> list[int]:
    """1-based bands to show: the first three non-alpha bands (RGB), or the first one (grey)."""
    data = [i + 1 for i in range(count) if i >= len(colorinterp) or colorinterp[i] != "alpha"]
    if not data:
        raise InputError("the scene has no non-alpha band to show")
    return data[:3] if len(data) >= 3 else data[:1]


def read_quicklook(path: str, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a decimated RGB (or grey) picture of a scene, stretched for display.

    Returns ((H, W, 3) uint8, (scene_width, scene_height)). Reading with ``out_shape``
    smaller than the scene lets GDAL use the overviews.
    """
    from rasterio.enums import Resampling

    from pipeline.io.raster import open_raster

    with open_raster(path) as src:
        bands = display_bands([c.name for c in src.colorinterp], src.count)
        width, height = display_shape(src.width, src.height, max_size)
        data = src.read(bands, out_shape=(len(bands), height, width), masked=True,
                        resampling=Resampling.average)
        scene_size = (src.width, src.height)
    valid = np.asarray(~np.ma.getmaskarray(data).any(axis=0))
    rgb = stretch(np.ma.getdata(data), valid)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)), scene_size


@dataclass(frozen=True)
class SceneDetections:
    """Detections of one scene: (N, 4) px boxes XYXY, (N,) label ids, names, scores."""

    boxes: np.ndarray
    label_ids: np.ndarray
    labels: list[str]
    scores: np.ndarray


def scene_detections(table_root: os.PathLike | str, scene_id: str, run_id: Optional[str] = None,
                     job_name: Optional[str] = None) -> SceneDetections:
    """Committed detections of ``scene_id`` (optionally only ``run_id`` / ``job_name``)."""
    import pyarrow.dataset as ds

    from pipeline.table.transactions import read_committed

    if not Path(table_root).is_dir():
        raise InputError(f"{table_root}: no detection table here (directory not found)")
    where = ds.field("scene_id") == scene_id
    if run_id is not None:
        where = where & (ds.field("run_id") == run_id)
    if job_name is not None:
        where = where & (ds.field("job_name") == job_name)
    cols = ["px_xmin", "px_ymin", "px_xmax", "px_ymax", "label_id", "label", "score"]
    t = read_committed(table_root, columns=cols, filters=where)
    boxes = np.stack([t[c].to_numpy(zero_copy_only=False) for c in cols[:4]], axis=1) if t.num_rows \
        else np.zeros((0, 4), np.float32)
    return SceneDetections(boxes.astype(np.float64), t["label_id"].to_numpy(zero_copy_only=False).astype(np.int64),
                           [str(v) for v in t["label"].to_pylist()], t["score"].to_numpy(zero_copy_only=False))


def display_boxes(boxes: np.ndarray, scene_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) scene px XYXY -> (N, 4) int display px, clipped to the picture.

    scene_size: (width, height) of the scene; shape: (width, height) of the picture.
    """
    sx, sy = shape[0] / scene_size[0], shape[1] / scene_size[1]
    scaled = np.floor(np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy])
    limit = [shape[0] - 1, shape[1] - 1, shape[0] - 1, shape[1] - 1]
    return np.clip(scaled, 0, limit).astype(np.int64)


def legend_entries(dets: SceneDetections) -> list[tuple[int, str, int]]:
    """(label_id, label, count) per class present, by label id."""
    entries: dict[int, tuple[int, str, int]] = {}
    for lid, name in zip(dets.label_ids.tolist(), dets.labels):
        _, _, n = entries.get(lid, (lid, name, 0))
        entries[lid] = (lid, name, n + 1)
    return [entries[k] for k in sorted(entries)]


def compose(picture: np.ndarray, boxes: np.ndarray, label_ids: np.ndarray, scores: np.ndarray,
            legend: list[tuple[int, str, int]], line_width: int = 2):
    """Draw box outlines on ``picture`` (H, W, 3) and add a legend strip below it.

    Boxes are drawn lowest score first so the best ones are on top. Returns a PIL image
    of height H + legend height.
    """
    from PIL import Image, ImageDraw, ImageFont

    height, width = picture.shape[:2]
    rows = max(1, len(legend))
    canvas = Image.new("RGB", (width, height + 2 * LEGEND_PAD + rows * LEGEND_LINE), (24, 24, 24))
    canvas.paste(Image.fromarray(picture, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i in np.argsort(scores, kind="stable"):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=class_colour(label_ids[i]), width=line_width)
    font = ImageFont.load_default()
    top = height + LEGEND_PAD
    if not legend:
        draw.text((LEGEND_PAD, top), "no committed detections", fill=(200, 200, 200), font=font)
    for row, (lid, name, count) in enumerate(legend):
        y = top + row * LEGEND_LINE
        draw.rectangle([LEGEND_PAD, y + 2, LEGEND_PAD + 11, y + 13], fill=class_colour(lid))
        draw.text((LEGEND_PAD + 18, y + 1), f"{name} ({count})", fill=(230, 230, 230), font=font)
    return canvas


def render_quicklook(table_root: os.PathLike | str, scene_path: str, out: os.PathLike | str,
                     run_id: Optional[str] = None, max_size: int = 1024,
                     job_name: Optional[str] = None) -> dict:
    """Write a quicklook PNG of ``scene_path`` with the table's detections of that scene.

    Returns a summary: ``path`` (the PNG), ``scene_id``, ``detections`` (drawn),
    ``classes`` ({label: count}), ``scene_size`` and ``picture_size`` ((width, height)).
    Raises InputError for a missing scene or table.
    """
    scene_id = committed_scene_id(table_root, scene_path, job_name)
    dets = scene_detections(table_root, scene_id, run_id, job_name)
    picture, scene_size = read_quicklook(scene_path, max_size)
    shape = (picture.shape[1], picture.shape[0])
    legend = legend_entries(dets)
    image = compose(picture, display_boxes(dets.boxes, scene_size, shape), dets.label_ids, dets.scores, legend)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(out_path, format="PNG")
    except OSError as err:
        raise InputError(f"{out_path}: cannot write the quicklook: {err}") from None
    reports = link_in_run_reports(table_root, scene_id, out_path, job_name)
    return {"path": str(out_path), "scene_id": scene_id, "detections": int(len(dets.boxes)),
            "classes": {name: count for _, name, count in legend},
            "scene_size": list(scene_size), "picture_size": list(shape), "reports": reports}


def committed_scene_id(table_root: os.PathLike | str, scene_path: str, job_name: Optional[str] = None) -> str:
    """The scene id under which the table holds ``scene_path`` (ids depend on the job's input
    patterns, so the manifests are asked); the file stem when no committed scene has that path."""
    from pipeline.table.transactions import committed_scenes

    if not Path(table_root).is_dir():
        raise InputError(f"{table_root}: no detection table here (directory not found)")
    wanted = scene_path if is_remote(scene_path) else os.path.abspath(scene_path)
    ids = sorted({sid for (job, sid), entry in committed_scenes(table_root).items()
                  if entry.get("scene_path") == wanted and (job_name is None or job == job_name)})
    if len(ids) > 1:
        raise InputError(f"{scene_path}: committed under several scene ids {ids}; pick one job with --job")
    return ids[0] if ids else scene_id_for(scene_path)


def link_in_run_reports(table_root: os.PathLike | str, scene_id: str, png: os.PathLike | str,
                        job_name: Optional[str] = None) -> list[str]:
    """Record the quicklook under ``quicklooks[scene_id]`` in the run report of every run
    whose committed rows of this scene are current; returns the reports updated."""
    from pipeline.table.transactions import REPORTS, committed_scenes, write_run_report

    updated = []
    for (job, sid), entry in committed_scenes(table_root).items():
        if sid != scene_id or (job_name and job != job_name):
            continue
        path = Path(table_root) / REPORTS / f"{entry['run_id']}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        report.setdefault("quicklooks", {})[scene_id] = str(Path(png).resolve())
        updated.append(str(write_run_report(table_root, entry["run_id"], report)))
    return updated
