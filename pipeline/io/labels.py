"""Label readers (COCO JSON, Pascal VOC XML, CSV, vector files) and chip labels.

Every reader returns ``list[Annotations]``: one entry per image, boxes as (N, 4)
float32 XYXY in that image's pixel EDGE coordinates (see :mod:`pipeline.geo.georef`),
labels as strings. Bad boxes (NaN, infinite, xmax <= xmin or ymax <= ymin) raise
InputError naming the file and the row/object, never silently dropped.

Coordinate conventions of the formats:

- COCO: ``bbox = [x, y, w, h]`` in pixel edges -> (x, y, x + w, y + h).
- CSV (DeepForest / keras-retinanet): ``image_path,xmin,ymin,xmax,ymax,label`` in
  pixel edges; columns are matched by header name, so any column order works. A row
  whose four coordinates are all 0 marks an image without objects (DeepForest's
  convention) and yields no box.
- Pascal VOC: 1-based inclusive pixel indices (VOC devkit) -> (xmin - 1, ymin - 1,
  xmax, ymax); pass ``one_based=False`` for files written 0-based.
- Vector files (GeoJSON, shapefile, GeoPackage, anything OGR reads): geometries in
  map coordinates are reprojected to the scene CRS, then their bounding box goes
  through the inverse scene transform. Features entirely outside the scene are
  dropped; the others are kept whole (chip_labels clips them).
"""
from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import shapely

from pipeline.errors import InputError
from pipeline.geo.georef import box_corners, map_to_pixel, reproject_points
from pipeline.io.inputs import label_image_id
from pipeline.io.raster import SceneInfo, read_scene_info

CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")


@dataclass(frozen=True, eq=False)
class Annotations:
    """Ground-truth boxes of one image.

    Attributes:
        image: image file name/path as written in the label file.
        boxes: (N, 4) float32 XYXY, pixel edge coordinates of that image.
        labels: N class names.
        source: the label file they were read from (for error messages).
    """

    image: str
    boxes: np.ndarray = field(repr=False)
    labels: list[str]
    source: str = ""

    @property
    def scene_id(self) -> str:
        """The image's id as the label file names it (its path without suffix), matched to
        scene ids by :func:`pipeline.io.inputs.match_label_images`."""
        return label_image_id(self.image)

    def __len__(self) -> int:
        return len(self.labels)


def validate_boxes(boxes: np.ndarray, source: str | Path, rows: Sequence[str]) -> np.ndarray:
    """Check (N, 4) XYXY boxes; raise InputError naming ``source`` and the bad row.

    ``rows`` names each box's origin (e.g. ``"row 7"``, ``"object 3"``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.asarray(np.isfinite(boxes).all(axis=1))
    positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    bad = np.flatnonzero(~(finite & positive))
    if bad.size:
        i = int(bad[0])
        why = "is not finite" if not finite[i] else "has zero or negative width/height"
        raise InputError(f"{source}: {rows[i]}: box {boxes[i].tolist()} (xmin, ymin, xmax, ymax) "
                         f"{why}" + (f"; {bad.size - 1} more bad boxes" if bad.size > 1 else ""))
    return boxes.astype(np.float32)


def _annotations(image: str, boxes: list, labels: list[str], rows: list[str],
                 source: Path | str) -> Annotations:
    array = validate_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 4), source, rows)
    return Annotations(image=image, boxes=array, labels=list(labels), source=str(source))


def _number(text: str | None, source: Path | str, where: str, name: str) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{source}: {where}: {name}={text!r} is not a number") from None


# --------------------------------------------------------------------------- COCO


def read_coco(path: str | Path, document: Optional[dict] = None) -> list[Annotations]:
    """COCO detection JSON -> one Annotations per image (images without boxes included).

    Labels are category names. ``iscrowd`` annotations are kept as ordinary boxes.
    ``document``: the file already parsed (:func:`load_coco`), so a caller that also reads
    its categories or image sizes parses a large truth file once.
    """
    path = Path(path)
    data = load_coco(path) if document is None else document
    try:
        categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
        images = {img["id"]: str(img["file_name"]) for img in data["images"]}
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not COCO detection JSON (missing {err})") from None
    per_image: dict = {image_id: ([], [], []) for image_id in images}
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"annotation {i} (id {ann.get('id')})"
        if ann.get("image_id") not in per_image:
            raise InputError(f"{path}: {where}: image_id {ann.get('image_id')} is not in images")
        if ann.get("category_id") not in categories:
            raise InputError(f"{path}: {where}: category_id {ann.get('category_id')} "
                             "is not in categories")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InputError(f"{path}: {where}: bbox {bbox!r} is not [x, y, w, h]")
        x, y, w, h = (_number(v, path, where, "bbox") for v in bbox)
        boxes, labels, rows = per_image[ann["image_id"]]
        boxes.append([x, y, x + w, y + h])
        labels.append(categories[ann["category_id"]])
        rows.append(where)
    return [_annotations(images[k], per_image[k][0], per_image[k][1], per_image[k][2], path) for k in images]


def load_coco(path: str | Path) -> dict:
    """A COCO JSON file parsed; InputError naming the file when it is missing or not JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


# ---------------------------------------------------------------------------- VOC


def read_voc(path: str | Path, one_based: bool = True) -> list[Annotations]:
    """Pascal VOC XML (one image per file) -> ``[Annotations]``.

    Args:
        one_based: the VOC devkit writes 1-based inclusive pixel indices; the box in
            edge coordinates is then (xmin - 1, ymin - 1, xmax, ymax).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except ET.ParseError as err:
        raise InputError(f"{path}: not valid XML ({err})") from None
    image = root.findtext("filename") or root.findtext("path") or path.stem
    shift = 1.0 if one_based else 0.0
    boxes, labels, rows = [], [], []
    for i, obj in enumerate(root.iter("object")):
        where = f"object {i}"
        name = obj.findtext("name")
        bnd = obj.find("bndbox")
        if name is None or bnd is None:
            raise InputError(f"{path}: {where}: missing <name> or <bndbox>")
        x0, y0, x1, y1 = (_number(bnd.findtext(tag), path, where, tag)
                          for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - shift, y0 - shift, x1, y1])
        labels.append(name.strip())
        rows.append(where)
    return [_annotations(image.strip(), boxes, labels, rows, path)]


# ---------------------------------------------------------------------------- CSV


def read_csv(path: str | Path) -> list[Annotations]:
    """CSV ``image_path,xmin,ymin,xmax,ymax,label`` -> one Annotations per image.

    Images keep the order of their first row. Line numbers in errors are 1-based file
    lines (the header is line 1).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing CSV columns {missing}; expected header "
                                 f"{','.join(CSV_COLUMNS)}")
            per_image: dict[str, tuple[list, list, list]] = {}
            for line, row in enumerate(reader, start=2):
                where = f"line {line}"
                image = (row["image_path"] or "").strip()
                if not image:
                    raise InputError(f"{path}: {where}: empty image_path")
                coords = [_number(row[c], path, where, c) for c in ("xmin", "ymin", "xmax", "ymax")]
                boxes, labels, rows = per_image.setdefault(image, ([], [], []))
                if all(v == 0 for v in coords):
                    continue  # DeepForest marks an image without objects with 0,0,0,0
                boxes.append(coords)
                labels.append((row["label"] or "").strip())
                rows.append(where)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None
    return [_annotations(image, b, lab, r, path) for image, (b, lab, r) in per_image.items()]


# ------------------------------------------------------------------------- vector


def read_vector(path: str | Path, scene: SceneInfo | str | Path, label_field: str = "label",
                scene_field: str | None = None) -> list[Annotations]:
    """Vector labels in map coordinates -> ``[Annotations]`` for one scene.

    Any geometry type works: its bounding box is taken after reprojection to the scene
    CRS (corner by corner; exact for north-up scenes and same-CRS labels).

    Args:
        path: GeoJSON, shapefile, GeoPackage, ... (read with pyogrio / OGR).
        scene: the scene (SceneInfo or raster path) whose pixel grid the boxes go to.
        label_field: attribute holding the class name.
        scene_field: optional attribute holding the scene id; only matching features
            are used (multi-scene files such as ``truth.geojson`` of ``pipeline synth``).

    Raises:
        InputError: unreadable file, missing field, bad geometry (names the feature).
        GeoreferenceError: the scene has no CRS or the label CRS is unknown.
    """
    path = Path(path)
    info = scene if isinstance(scene, SceneInfo) else read_scene_info(scene)
    if info.crs_wkt is None:
        raise InputError(f"{path}: vector labels need a georeferenced scene, "
                         f"but {info.path} has no CRS")
    meta, wkb, fields = _read_ogr(path)
    names = list(meta["fields"])
    for wanted in (label_field, scene_field):
        if wanted is not None and wanted not in names:
            raise InputError(f"{path}: no attribute {wanted!r} (attributes: {names})")
    labels = np.asarray(fields[names.index(label_field)], dtype=object)
    geoms = shapely.from_wkb(wkb)
    keep = np.ones(len(geoms), dtype=bool)
    if scene_field is not None:
        scene_ids = np.asarray(fields[names.index(scene_field)], dtype=object).astype(str)
        keep &= scene_ids == info.scene_id
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    bad = np.flatnonzero(missing & keep)
    if bad.size:
        raise InputError(f"{path}: feature {int(bad[0])}: empty or missing geometry")
    unlabelled = np.flatnonzero(_missing_values(labels) & keep)
    if unlabelled.size:
        raise InputError(f"{path}: feature {int(unlabelled[0])}: attribute {label_field!r} "
                         "is empty")
    index = np.flatnonzero(keep)
    bounds = shapely.bounds(geoms[index])  # (M, 4) xmin, ymin, xmax, ymax in label CRS
    label_crs = meta.get("crs")
    if label_crs is None:
        raise InputError(f"{path}: has no CRS; cannot place it on {info.path}")
    boxes = _map_bounds_to_pixels(bounds, label_crs, info.crs_wkt, info.transform)
    rows = [f"feature {int(i)}" for i in index]
    inside = ((boxes[:, 2] > 0) & (boxes[:, 0] < info.width)
              & (boxes[:, 3] > 0) & (boxes[:, 1] < info.height))
    validate_boxes(boxes, path, rows)  # degenerate geometries (points, lines) fail here
    kept = np.flatnonzero(inside)
    return [_annotations(Path(info.path).name, boxes[kept].tolist(),
                         [str(labels[index[i]]) for i in kept], [rows[i] for i in kept], path)]


def _missing_values(values: np.ndarray) -> np.ndarray:
    """(N,) bool: None, NaN or empty string in an object array of attribute values."""
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) or v == ""
                     for v in values], dtype=bool)


def _read_ogr(path: Path):
    """(meta, wkb geometries, field arrays) of a vector file via pyogrio."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        from pyogrio import raw
        from pyogrio.errors import DataLayerError, DataSourceError
    except ImportError as err:  # pragma: no cover - dependency declared in pyproject
        raise InputError(f"{path}: reading vector files needs pyogrio ({err})") from err
    try:
        meta, _, wkb, fields = raw.read(path)
    except (DataSourceError, DataLayerError) as err:
        raise InputError(f"{path}: cannot be read as a vector file ({err})") from None
    return meta, wkb, fields


def _map_bounds_to_pixels(bounds: np.ndarray, label_crs: str, scene_crs: str, transform) -> np.ndarray:
    """(M, 4) map bounds in ``label_crs`` -> (M, 4) XYXY pixel boxes of a scene in
    ``scene_crs`` with geotransform ``transform``: the pixel box around the reprojected
    corners (a box's corners, not its two extremes, since a reprojection can rotate it)."""
    corners = reproject_points(box_corners(bounds), label_crs, scene_crs)
    pixels = map_to_pixel(corners, transform)  # (M, 4, 2) col, row
    return np.concatenate([pixels.min(axis=1), pixels.max(axis=1)], axis=1)


# ------------------------------------------------------------------------ dispatch


def read_labels(path: str | Path, scene: SceneInfo | str | Path | None = None,
                **options) -> list[Annotations]:
    """Read a label file by extension: .json (COCO), .xml (VOC), .csv, or a vector file.

    ``scene`` is required for vector files (and ignored otherwise); ``options`` go to
    the reader (``one_based``, ``label_field``, ``scene_field``).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return read_coco(path)
    if suffix == ".xml":
        return read_voc(path, **options)
    if suffix == ".csv":
        return read_csv(path)
    if scene is None:
        raise InputError(f"{path}: vector labels need the scene they belong to")
    return read_vector(path, scene, **options)


def by_scene(annotations: Iterable[Annotations]) -> dict[str, Annotations]:
    """Index annotations by scene id; raises InputError on two images with one id."""
    out: dict[str, Annotations] = {}
    for ann in annotations:
        if ann.scene_id in out:
            raise InputError(f"{ann.source}: images {out[ann.scene_id].image!r} and "
                             f"{ann.image!r} map to the same scene id {ann.scene_id!r}")
        out[ann.scene_id] = ann
    return out


# --------------------------------------------------------------------- chip labels


def chip_labels(boxes: np.ndarray, labels: Sequence, window, min_inside_fraction: float = 0.5
                ) -> tuple[np.ndarray, list]:
    """Boxes of a scene that belong to one chip, in chip pixels.

    A box is kept when at least ``min_inside_fraction`` of its area lies inside the
    window; it is then clipped to the window and shifted to chip coordinates. Boxes
    cut by a chip edge below that fraction are dropped (the neighbouring chip, which
    overlaps, sees them whole when the overlap is wide enough).

    Args:
        boxes: (N, 4) XYXY scene pixels.
        labels: N labels (any type; returned as a list).
        window: (col_off, row_off, width, height) or an object with those attributes
            (e.g. :class:`pipeline.chips.tiling.ChipWindow`).
        min_inside_fraction: in (0, 1].

    Returns:
        ((M, 4) float32 XYXY chip pixels, M labels).
    """
    if not 0 < min_inside_fraction <= 1:
        raise ValueError(f"min_inside_fraction must be in (0, 1], got {min_inside_fraction}")
    col_off, row_off, width, height = _window_tuple(window)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.empty_like(boxes)
    clipped[:, [0, 2]] = np.clip(boxes[:, [0, 2]], col_off, col_off + width)
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], row_off, row_off + height)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (area > 0) & (inside >= min_inside_fraction * area)
    out = clipped[keep] - np.array([col_off, row_off, col_off, row_off], dtype=np.float64)
    labels = list(labels)
    return out.astype(np.float32), [labels[i] for i in np.flatnonzero(keep)]


def _window_tuple(window) -> tuple[float, float, float, float]:
    if hasattr(window, "col_off"):
        return (window.col_off, window.row_off, window.width, window.height)
    col_off, row_off, width, height = window
    if math.isnan(width) or width <= 0 or height <= 0:
        raise ValueError(f"window {window} has no area")
    return (col_off, row_off, width, height)
