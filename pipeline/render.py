"""`pipeline render`: a quicklook of one scene with its committed detections, for people
and for maps.

The picture is read decimated (``out_shape``), so GDAL serves it from the scene's
overviews instead of reading full-resolution pixels: a 40 000 px scene costs a few
megabytes. Pixel values are stretched between the 2nd and 98th percentile of the valid
pixels of each band, for display only (nothing is written back). Detections come from
the committed table (local folder or ``s3://`` / ``gs://`` prefix: the rows of the scene
committed with that path, optionally of one run or job) and are drawn from their ``px_*``
columns as rectangle outlines, coloured by class. A title strip over the top of the picture
names the scene, run, model and score threshold; a legend over its bottom-left corner lists
each class and its count. Both lie over the picture, so the picture covers exactly the
scene and can be placed on a map.

With ground truth (``truth``: any file :func:`pipeline.io.labels.read_labels` reads), the
detections are matched to it per class at IoU >= 0.5 (:func:`pipeline.eval.metrics.match_detections`,
the VOC rule evaluation uses) and the colours say the outcome instead: hits, false alarms
(detections matching no truth box) and misses (truth boxes no detection matched).

Output by suffix of ``out``: ``.tif``/``.tiff`` a GeoTIFF; anything else a PNG, with a world
file (``.pgw``), the CRS in ``.png.aux.xml`` (GDAL, QGIS) and ``.prj`` (ESRI WKT) beside it.
Georeferencing: the scene's CRS and its transform scaled by scene size / picture size, so
the quicklook's bounds are the scene's. A scene without a CRS gives a plain picture.

Display coordinates: a box edge at scene pixel ``x`` is drawn at ``floor(x * sx)`` with
``sx = display_width / scene_width`` (likewise y), so a box at (100, 120, 200, 180) in a
512 px scene rendered at 256 px is drawn at (50, 60, 100, 90).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.config.locations import is_remote
from pipeline.errors import InputError
from pipeline.io.inputs import scene_id_for
from pipeline.table.store import open_store

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
TITLE_HEIGHT = 18     # the title strip over the top of the picture, px
SHADE = 0.6           # how dark the strips under text are (0: not at all, 1: black)
# Outcome colours with ground truth (RGB).
HIT, FALSE_ALARM, MISS = (0, 230, 0), (255, 40, 40), (255, 210, 0)
MATCH_IOU = 0.5
GEOTIFF_SUFFIXES = (".tif", ".tiff")


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


@dataclass(frozen=True)
class Quicklook:
    """A decimated picture of a scene and where it lies.

    picture: (H, W, 3) uint8; scene_size: (width, height) of the scene, px; crs_wkt: the
    scene's CRS (None: not georeferenced); transform: the scene's affine (a..f), pixel
    edges to map coordinates.
    """

    picture: np.ndarray
    scene_size: tuple[int, int]
    crs_wkt: Optional[str]
    transform: tuple[float, ...]

    @property
    def picture_size(self) -> tuple[int, int]:
        return self.picture.shape[1], self.picture.shape[0]

    def picture_transform(self) -> Any:
        """The scene's transform scaled to the picture: picture pixel (c, r) covers scene
        pixels (c * sx, r * sy) with sx = scene width / picture width, so both have one bounds."""
        from affine import Affine

        (w, h), (pw, ph) = self.scene_size, self.picture_size
        return Affine(*self.transform[:6]) @ Affine.scale(w / pw, h / ph)


def read_quicklook(path: str, max_size: int) -> Quicklook:
    """Read a decimated RGB (or grey) picture of a scene, stretched for display, with its
    georeferencing (:func:`pipeline.io.raster.scene_info_from_dataset`'s rules: no CRS, no
    georeferencing). Reading with ``out_shape`` smaller than the scene lets GDAL use the overviews.
    """
    from rasterio.enums import Resampling

    from pipeline.io.raster import open_raster, scene_info_from_dataset

    with open_raster(path) as src:
        info = scene_info_from_dataset(src, path, allow_rotated=True)
        bands = display_bands([c.name for c in src.colorinterp], src.count)
        width, height = display_shape(src.width, src.height, max_size)
        data = src.read(bands, out_shape=(len(bands), height, width), masked=True,
                        resampling=Resampling.average)
    valid = np.asarray(~np.ma.getmaskarray(data).any(axis=0))
    rgb = stretch(np.ma.getdata(data), valid)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    return Quicklook(np.ascontiguousarray(rgb.transpose(1, 2, 0)), (info.width, info.height), info.crs_wkt,
                     info.transform)


@dataclass(frozen=True)
class SceneDetections:
    """Detections of one scene: (N, 4) px boxes XYXY, (N,) label ids, names, scores, and the
    runs and models the rows come from."""

    boxes: np.ndarray
    label_ids: np.ndarray
    labels: list[str]
    scores: np.ndarray
    run_ids: tuple[str, ...] = ()
    model_ids: tuple[str, ...] = ()


def scene_detections(table_root: os.PathLike | str, scene_id: str, run_id: Optional[str] = None,
                     job_name: Optional[str] = None) -> SceneDetections:
    """Committed detections of ``scene_id`` (optionally only ``run_id`` / ``job_name``), from a
    local or object-store table."""
    import pyarrow.dataset as ds

    from pipeline.table.state import read_committed, require_table

    require_table(table_root)
    where = ds.field("scene_id") == scene_id
    if run_id is not None:
        where = where & (ds.field("run_id") == run_id)
    if job_name is not None:
        where = where & (ds.field("job_name") == job_name)
    cols = ["px_xmin", "px_ymin", "px_xmax", "px_ymax", "label_id", "label", "score", "run_id", "model_id"]
    t = read_committed(table_root, columns=cols, filters=where)
    boxes = np.stack([t[c].to_numpy(zero_copy_only=False) for c in cols[:4]], axis=1) if t.num_rows \
        else np.zeros((0, 4), np.float32)
    return SceneDetections(boxes.astype(np.float64), t["label_id"].to_numpy(zero_copy_only=False).astype(np.int64),
                           [str(v) for v in t["label"].to_pylist()], t["score"].to_numpy(zero_copy_only=False),
                           tuple(sorted(set(t["run_id"].to_pylist()))), tuple(sorted(set(t["model_id"].to_pylist()))))


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


@dataclass(frozen=True)
class TruthOutcome:
    """Detections against ground truth: ``matched`` (N,) per detection (False: a false
    alarm); ``truth_boxes`` (M, 4) scene px with ``truth_labels``; ``found`` (M,) per truth
    box (False: a miss)."""

    matched: np.ndarray
    truth_boxes: np.ndarray
    truth_labels: list[str]
    found: np.ndarray

    def counts(self, dets: SceneDetections) -> dict[str, dict[str, int]]:
        """{class: {"hits", "false_alarms", "misses"}} for every class of either side."""
        out: dict[str, dict[str, int]] = {}
        for name in sorted(set(dets.labels) | set(self.truth_labels)):
            det = np.array([label == name for label in dets.labels], bool)
            gt = np.array([label == name for label in self.truth_labels], bool)
            out[name] = {"hits": int((self.matched & det).sum()) if len(det) else 0,
                         "false_alarms": int((~self.matched & det).sum()) if len(det) else 0,
                         "misses": int((~self.found & gt).sum()) if len(gt) else 0}
        return out


def match_truth(dets: SceneDetections, truth_boxes: np.ndarray, truth_labels: Sequence[str],
                iou_threshold: float = MATCH_IOU) -> TruthOutcome:
    """Match detections to truth class by class (by label name) at ``iou_threshold``."""
    from pipeline.eval.metrics import match_detections

    truth_boxes = np.asarray(truth_boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(dets.labels, dtype=object)
    truth_names = np.asarray(list(truth_labels), dtype=object)
    matched = np.zeros(len(dets.boxes), bool)
    found = np.zeros(len(truth_boxes), bool)
    for name in set(dets.labels) & set(truth_labels):
        d, g = np.flatnonzero(labels == name), np.flatnonzero(truth_names == name)
        matched[d], found[g] = match_detections(dets.boxes[d], np.asarray(dets.scores)[d], truth_boxes[g],
                                                iou_threshold)
    return TruthOutcome(matched, truth_boxes, list(truth_labels), found)


def scene_truth(truth: os.PathLike | str, scene_id: str, scene_path: str) -> tuple[np.ndarray, list[str]]:
    """The ground-truth boxes (M, 4, scene px) and labels of one scene from a label file
    (:func:`pipeline.eval.evaluate.truth_by_scene`: images matched to the scene id; a
    vector file read on the scene's raster)."""
    from pipeline.eval.evaluate import truth_by_scene

    found, _ = truth_by_scene([truth], {scene_id: scene_path})
    if scene_id not in found:
        return np.zeros((0, 4)), []
    boxes, labels, _, _ = found[scene_id]
    return np.asarray(boxes, np.float64).reshape(-1, 4), list(labels)


def title_text(scene_id: str, dets: SceneDetections, run_id: Optional[str], threshold: Optional[float]) -> str:
    """``scene S | run R | model M | score >= T``: what the picture shows, from its rows."""
    runs = dets.run_ids or ((run_id,) if run_id else ())
    run = ", ".join(runs) if runs else "none committed"
    model = ", ".join(dets.model_ids) if dets.model_ids else "none"
    # ">=" in ASCII: PIL's default font has no glyph for the sign.
    score = f"score >= {threshold:g}" if threshold is not None else "score threshold not recorded"
    return f"{scene_id} | run {run} | model {model} | {score}"


def title_lines(title: str, width: float, measure: Callable[[str], float]) -> list[str]:
    """The title's `` | ``-separated parts packed in order into lines at most ``width`` wide
    (by ``measure``, the font's text length); a part wider than a line gets one of its own."""
    lines: list[str] = []
    for part in title.split(" | ") if title else []:
        joined = f"{lines[-1]} | {part}" if lines else part
        if lines and measure(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def _shade(picture: np.ndarray, top: int, left: int, bottom: int, right: int) -> None:
    """Darken a region of ``picture`` (H, W, 3) in place, so text over it reads on any scene."""
    region = picture[max(0, top):max(0, bottom), max(0, left):max(0, right)]
    region[...] = (region * (1.0 - SHADE)).astype(np.uint8)


def compose(picture: np.ndarray, boxes: np.ndarray, colours: Sequence[tuple[int, int, int]], scores: np.ndarray,
            legend: list[tuple[tuple[int, int, int], str]], title: str = "", line_width: int = 2):
    """Draw box outlines on a copy of ``picture`` (H, W, 3), the title over its top edge and
    the legend (colour, text) over its bottom-left corner; returns a PIL image of the
    picture's size (so it keeps the picture's georeferencing).

    Boxes are drawn lowest score first so the best ones are on top (``scores`` may hold
    ``inf`` for boxes that must be on top of all, such as misses).
    """
    from PIL import Image, ImageDraw, ImageFont

    height, width = picture.shape[:2]
    base = picture.copy()
    rows = max(1, len(legend))
    legend_top = height - 2 * LEGEND_PAD - rows * LEGEND_LINE
    canvas = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(canvas)
    for i in np.argsort(np.asarray(scores, np.float64), kind="stable"):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colours[i], width=line_width)
    font = ImageFont.load_default()
    shaded = np.asarray(canvas).copy()
    texts = [text for _, text in legend] or ["no committed detections"]
    legend_width = LEGEND_PAD * 2 + 18 + max(int(draw.textlength(t, font=font)) for t in texts)
    _shade(shaded, legend_top, 0, height, legend_width)
    # A picture narrower than the title (a small scene) takes it on several lines.
    lines = title_lines(title, width - 2 * LEGEND_PAD, lambda text: draw.textlength(text, font=font))
    if lines:
        _shade(shaded, 0, 0, TITLE_HEIGHT * len(lines), width)
    canvas = Image.fromarray(shaded, "RGB")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((LEGEND_PAD, 3 + row * TITLE_HEIGHT), line, fill=(240, 240, 240), font=font)
    top = legend_top + LEGEND_PAD
    if not legend:
        draw.text((LEGEND_PAD, top), texts[0], fill=(220, 220, 220), font=font)
    for row, (colour, text) in enumerate(legend):
        y = top + row * LEGEND_LINE
        draw.rectangle([LEGEND_PAD, y + 2, LEGEND_PAD + 11, y + 13], fill=colour)
        draw.text((LEGEND_PAD + 18, y + 1), text, fill=(235, 235, 235), font=font)
    return canvas


def write_quicklook(image, out: os.PathLike | str, look: Quicklook, title: str) -> list[str]:
    """Write the composed picture; returns the files written (picture first).

    ``.tif``/``.tiff``: a GeoTIFF (CRS and scaled transform when the scene has them); else a
    PNG, with ``.pgw`` world file, ``.png.aux.xml`` and ``.prj`` when the scene is
    georeferenced. The title goes into the file's metadata (TIFFTAG_IMAGEDESCRIPTION) too.
    """
    import rasterio
    from rasterio.crs import CRS

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    georef = look.crs_wkt is not None
    geotiff = out_path.suffix.lower() in GEOTIFF_SUFFIXES
    written = [str(out_path)]
    try:
        if not geotiff and not georef:
            image.save(out_path, format="PNG")
            return written
        profile: dict[str, Any] = {"driver": "GTiff" if geotiff else "PNG", "width": pixels.shape[2],
                                   "height": pixels.shape[1], "count": 3, "dtype": "uint8"}
        if georef:
            profile.update(crs=CRS.from_wkt(look.crs_wkt), transform=look.picture_transform())
        if geotiff:
            profile.update(compress="deflate", photometric="RGB")
        else:
            profile.update(WORLDFILE="YES")
        with rasterio.open(out_path, "w", **profile) as dst:
            dst.write(pixels)
            dst.update_tags(TIFFTAG_IMAGEDESCRIPTION=title)
        if not geotiff:
            # GDAL's PNG driver names the world file .wld; .pgw is the name for PNGs that GIS look for first.
            world = out_path.with_suffix(".pgw")
            os.replace(out_path.with_suffix(".wld"), world)
            prj = out_path.with_suffix(".prj")
            prj.write_text(CRS.from_wkt(look.crs_wkt).to_wkt(version="WKT1_ESRI"))
            written += [str(world), f"{out_path}.aux.xml", str(prj)]
    except (OSError, rasterio.errors.RasterioError) as err:
        raise InputError(f"{out_path}: cannot write the quicklook: {err}") from None
    return written


def render_quicklook(table_root: os.PathLike | str, scene_path: str, out: os.PathLike | str,
                     run_id: Optional[str] = None, max_size: int = 1024,
                     job_name: Optional[str] = None, truth: Optional[os.PathLike | str] = None) -> dict:
    """Write a quicklook of ``scene_path`` with the table's detections of that scene (and,
    with ``truth``, its hits, false alarms and misses); see the module doc for the files.

    Returns a summary: ``path`` (the picture), ``files`` (all written), ``scene_id``,
    ``detections`` (drawn), ``classes`` ({label: count}), ``scene_size`` and ``picture_size``
    ((width, height)), ``title``, ``georeferenced``, ``reports`` (run reports linking it),
    and with truth ``truth`` ({class: {hits, false_alarms, misses}}).
    Raises InputError for a missing scene or table, or an unreadable truth file.
    """
    from pipeline.eval.evaluate import runs_score_threshold

    scene_id = committed_scene_id(table_root, scene_path, job_name)
    dets = scene_detections(table_root, scene_id, run_id, job_name)
    look = read_quicklook(scene_path, max_size)
    shape = look.picture_size
    threshold = runs_score_threshold(str(table_root), list(dets.run_ids)) if dets.run_ids else None
    title = title_text(scene_id, dets, run_id, threshold)
    drawn = display_boxes(dets.boxes, look.scene_size, shape)
    classes = legend_entries(dets)
    summary: dict[str, Any] = {}
    if truth is None:
        colours = [class_colour(lid) for lid in dets.label_ids]
        legend = [(class_colour(lid), f"{name} ({count})") for lid, name, count in classes]
        image = compose(look.picture, drawn, colours, dets.scores, legend, title)
    else:
        truth_boxes, truth_labels = scene_truth(truth, scene_id, scene_path)
        outcome = match_truth(dets, truth_boxes, truth_labels)
        misses = ~outcome.found
        boxes = np.concatenate([drawn, display_boxes(outcome.truth_boxes[misses], look.scene_size, shape)])
        colours = [HIT if m else FALSE_ALARM for m in outcome.matched] + [MISS] * int(misses.sum())
        scores = np.concatenate([np.asarray(dets.scores, np.float64), np.full(int(misses.sum()), np.inf)])
        counts = outcome.counts(dets)
        total = {k: sum(c[k] for c in counts.values()) for k in ("hits", "false_alarms", "misses")}
        legend = [(HIT, f"hit ({total['hits']})"), (FALSE_ALARM, f"false alarm ({total['false_alarms']})"),
                  (MISS, f"miss ({total['misses']})")]
        image = compose(look.picture, boxes, colours, scores, legend, f"{title} | truth IoU >= {MATCH_IOU:g}")
        summary["truth"] = counts
    files = write_quicklook(image, out, look, title)
    reports = link_in_run_reports(table_root, scene_id, files[0], job_name)
    return {"path": files[0], "files": files, "scene_id": scene_id, "detections": int(len(dets.boxes)),
            "classes": {name: count for _, name, count in classes}, "scene_size": list(look.scene_size),
            "picture_size": list(shape), "title": title, "georeferenced": look.crs_wkt is not None,
            "reports": reports, **summary}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary_line(summary: dict) -> str:
    """One line for the console: the picture, its detections by class, and the truth's outcome."""
    classes = ", ".join(f"{k} {v}" for k, v in summary["classes"].items()) or "none"
    line = f"{summary['path']}: {summary['detections']} detections ({classes})"
    if "truth" in summary:
        total = {k: sum(c[k] for c in summary["truth"].values()) for k in ("hits", "false_alarms", "misses")}
        line += (f"; truth: {_count(total['hits'], 'hit', 'hits')}, "
                 f"{_count(total['false_alarms'], 'false alarm', 'false alarms')}, "
                 f"{_count(total['misses'], 'miss', 'misses')}")
    return line


def committed_scene_id(table_root: os.PathLike | str, scene_path: str, job_name: Optional[str] = None) -> str:
    """The scene id under which the table holds ``scene_path`` (ids depend on the job's input
    patterns, so the manifests are asked); the file stem when no committed scene has that path."""
    from pipeline.table.state import committed_scenes, require_table

    require_table(table_root)
    wanted = scene_path if is_remote(scene_path) else os.path.abspath(scene_path)
    ids = sorted({sid for (job, sid), entry in committed_scenes(table_root).items()
                  if entry.get("scene_path") == wanted and (job_name is None or job == job_name)})
    if len(ids) > 1:
        raise InputError(f"{scene_path}: committed under several scene ids {ids}; pick one job with --job")
    return ids[0] if ids else scene_id_for(scene_path)


def link_in_run_reports(table_root: os.PathLike | str, scene_id: str, picture: os.PathLike | str,
                        job_name: Optional[str] = None) -> list[str]:
    """Record the quicklook under ``quicklooks[scene_id]`` in the run report of every run
    whose committed rows of this scene are current; returns the reports updated."""
    from pipeline.table.maintenance import write_run_report
    from pipeline.table.state import REPORTS, committed_scenes

    store = open_store(table_root)
    updated = []
    for (job, sid), entry in committed_scenes(table_root).items():
        if sid != scene_id or (job_name and job != job_name):
            continue
        key = f"{REPORTS}/{entry['run_id']}.json"
        if store.stat(key) is None:
            continue
        report = json.loads(store.read(key))
        report.setdefault("quicklooks", {})[scene_id] = str(Path(picture).resolve())
        updated.append(str(write_run_report(table_root, entry["run_id"], report)))
    return updated
