"""Deterministic synthetic scenes with ground truth, for demos, tests and benchmarks.

Each scene is a tiled (256 x 256), ZSTD-compressed GeoTIFF in EPSG:32633 (UTM 33N) at
0.5 m pixels, with internal overviews, showing objects of three classes on a textured
background:

=========  ==============================  ===========================================
class      shape, size (pixels)            look (RGB; NIR band in 4-band mode)
=========  ==============================  ===========================================
vehicle    rectangle, 12-24 x 6-12         saturated red, dark in NIR
building   rectangle, 40-90 x 40-90        light grey roof with a dark 2-px outline
tank       disc, 20-40 diameter            bright blue-white, medium NIR
=========  ==============================  ===========================================

About a third of the objects are centred on a multiple of 448 pixels in x or y: the
chip seams of a 512-pixel grid with 64 pixels of overlap, so merging across chips is
exercised. Objects never overlap each other, the scene edge or a nodata region.

Ground truth is written next to the scenes:

- ``truth.json``: COCO (images.file_name = scene file name, categories 1..3 in the
  order of SYNTH_CLASSES, bbox = [x, y, w, h] in pixel edge coordinates);
- ``truth.geojson``: one polygon per object in the scene CRS (legacy ``crs`` member
  set), properties ``scene_id``, ``label``, ``image``, ``id``.

Generation goes window by window (256 rows x 2048 columns), so memory is bounded by
one window whatever the scene size, and the same ``seed`` gives the same bytes.

Inspection images (:func:`synthesize_inspection`, ``pipeline synth --kind inspection``) are
the other kind: plain 8-bit RGB PNGs of brushed metal with three kinds of defect, without
any georeferencing (a factory camera's frames), and ``truth.json`` (COCO) only:

=========  ==============================  ===========================================
class      shape, size (pixels)            look
=========  ==============================  ===========================================
scratch    line, 40-120 x 3-6              dark grey
dent       disc, 16-40 diameter            darker than the metal
stain      rectangle, 20-60 x 20-60        rust brown
=========  ==============================  ===========================================

About a third of the defects sit on the chip seams of ``jobs/inspection.yaml`` (chips of
512 pixels overlapping by 96). Each image is drawn whole, in memory (3 bytes a pixel).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from pipeline.geo.georef import pixel_boxes_to_map
from pipeline.io.raster import bounded_block_cache

SYNTH_CLASSES = ("vehicle", "building", "tank")
SYNTH_CRS = "EPSG:32633"
PIXEL_SIZE = 0.5          # metres
BLOCK = 256               # internal tile side and generation strip height
WINDOW_COLS = 2048        # generation window width: memory independent of scene size
SEAM_STRIDE = 448         # chip 512 - overlap 64
SEAM_PROBABILITY = 0.35
OBJECT_SPACING = 128      # about one object per OBJECT_SPACING^2 pixels
NODATA = 0
UINT16_SCALE = 40.0       # uint16 mode: uint8-like radiance x 40 (up to ~10 000)

# Appearance per class in (R, G, B, NIR), uint8-like units.
_BACKGROUND = np.array([92.0, 108.0, 70.0, 150.0])
_FILL = {
    "vehicle": np.array([205.0, 35.0, 40.0, 50.0]),
    "building": np.array([190.0, 188.0, 180.0, 95.0]),
    "tank": np.array([215.0, 228.0, 250.0, 120.0]),
}
_BUILDING_OUTLINE = np.array([60.0, 58.0, 55.0, 40.0])
_CLASS_SIZE = {"vehicle": ((12, 24), (6, 12)), "building": ((40, 90), (40, 90)),
               "tank": ((20, 40), None)}
_CLASS_P = (0.5, 0.25, 0.25)

# Inspection images: defects on brushed metal, in (R, G, B).
INSPECTION_CLASSES = ("scratch", "dent", "stain")
INSPECTION_SEAM_STRIDE = 416   # jobs/inspection.yaml: chip 512 - overlap 96
_METAL = np.array([150.0, 153.0, 158.0])
_DEFECT_FILL = {"scratch": np.array([62.0, 60.0, 58.0]), "dent": np.array([95.0, 98.0, 104.0]),
                "stain": np.array([150.0, 98.0, 52.0])}
_DEFECT_SIZE = {"scratch": ((40, 120), (3, 6)), "dent": ((16, 40), None), "stain": ((20, 60), (20, 60))}
_DEFECT_P = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class ObjectKinds:
    """A class catalogue: names in label order, each class's size ((longer side min, max),
    (shorter side min, max), or None for a disc) and how often it is drawn."""

    names: tuple[str, ...]
    sizes: dict[str, tuple[tuple[int, int], Optional[tuple[int, int]]]]
    probabilities: tuple[float, ...]


SATELLITE_KINDS = ObjectKinds(SYNTH_CLASSES, _CLASS_SIZE, _CLASS_P)
INSPECTION_KINDS = ObjectKinds(INSPECTION_CLASSES, _DEFECT_SIZE, _DEFECT_P)


@dataclass(frozen=True)
class SynthObject:
    """One object: class index into its catalogue's names, its box in pixel edges, the class name."""

    label: int
    x0: int
    y0: int
    x1: int
    y1: int
    name: str


def scene_transform(index: int, size: int) -> tuple[float, float, float, float, float, float]:
    """Affine of scene ``index``: scenes sit side by side, 500 m apart, in UTM 33N."""
    x0 = 500_000.0 + index * (size * PIXEL_SIZE + 500.0)
    return (PIXEL_SIZE, 0.0, x0, 0.0, -PIXEL_SIZE, 5_400_000.0)


def nodata_boxes_intersect(boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, 4) XYXY -> (N,) bool: the box touches a nodata region (see nodata_mask)."""
    x0, y0, x1, y1 = np.asarray(boxes, dtype=np.float64).T
    corner = x0 + y0 < 0.3 * size                       # half-plane x + y < T
    block = (x1 > 0.85 * size) & (y1 > 0.6 * size)      # rectangle at the bottom right
    return corner | block


def nodata_mask(cols: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Nodata pixels; cols (1, W), rows (H, 1) pixel indexes -> (H, W) bool.

    A triangle in the upper-left corner and a rectangle at the lower right, drawn one
    pixel inside the regions of :func:`nodata_boxes_intersect`, so a box that test
    clears never contains a nodata pixel.
    """
    corner = (cols + 1) + (rows + 1) < 0.3 * size
    block = (cols + 1 > 0.85 * size) & (rows + 1 > 0.6 * size)
    return corner | block


def place_objects(size: int, rng: np.random.Generator, nodata_regions: bool,
                  kinds: ObjectKinds = SATELLITE_KINDS, seam_stride: int = SEAM_STRIDE) -> list[SynthObject]:
    """Non-overlapping objects of ``kinds`` for a ``size`` x ``size`` scene, ~1 per
    OBJECT_SPACING^2 px, a share of them centred on multiples of ``seam_stride``.

    Uses an occupancy grid of 4-px cells (memory size^2 / 16 bytes) to reject overlaps.
    """
    cell = 4
    grid = np.zeros((-(-size // cell),) * 2, dtype=bool)
    target = max(3, (size * size) // (OBJECT_SPACING * OBJECT_SPACING))
    seams = np.arange(seam_stride, size - 8, seam_stride)
    objects: list[SynthObject] = []
    for _ in range(target * 4):
        if len(objects) >= target:
            break
        label = int(rng.choice(len(kinds.names), p=kinds.probabilities))
        w, h = _object_size(kinds.sizes[kinds.names[label]], rng)
        if w + 4 >= size or h + 4 >= size:
            continue
        x0 = int(rng.integers(2, size - w - 2))
        y0 = int(rng.integers(2, size - h - 2))
        if seams.size and rng.random() < SEAM_PROBABILITY:
            seam = int(rng.choice(seams)) + int(rng.integers(-3, 4))
            if rng.random() < 0.5:
                x0 = min(max(2, seam - w // 2), size - w - 2)
            else:
                y0 = min(max(2, seam - h // 2), size - h - 2)
        box = (x0, y0, x0 + w, y0 + h)
        if nodata_regions and nodata_boxes_intersect(np.array([box]), size)[0]:
            continue
        # Occupancy with a 1-cell margin so objects never touch.
        gx0, gy0 = max(0, x0 // cell - 1), max(0, y0 // cell - 1)
        gx1, gy1 = -(-(x0 + w) // cell) + 1, -(-(y0 + h) // cell) + 1
        if grid[gy0:gy1, gx0:gx1].any():
            continue
        grid[gy0:gy1, gx0:gx1] = True
        objects.append(SynthObject(label, *box, kinds.names[label]))
    return objects


def _object_size(ranges: tuple[tuple[int, int], Optional[tuple[int, int]]],
                 rng: np.random.Generator) -> tuple[int, int]:
    long_range, short_range = ranges
    side = int(rng.integers(long_range[0], long_range[1] + 1))
    if short_range is None:                           # disc: square bounding box
        return side, side
    other = int(rng.integers(short_range[0], short_range[1] + 1))
    return (side, other) if rng.random() < 0.5 else (other, side)


def object_boxes(objects: list[SynthObject]) -> np.ndarray:
    """(N, 4) int64 XYXY boxes of the objects."""
    return np.array([[o.x0, o.y0, o.x1, o.y1] for o in objects], dtype=np.int64).reshape(-1, 4)


def objects_in_window(boxes: np.ndarray, row0: int, col0: int, height: int, width: int
                      ) -> np.ndarray:
    """Indexes of the boxes (N, 4) that intersect a window."""
    return np.flatnonzero((boxes[:, 3] > row0) & (boxes[:, 1] < row0 + height)
                          & (boxes[:, 2] > col0) & (boxes[:, 0] < col0 + width))


def render_window(row0: int, col0: int, height: int, width: int, size: int,
                  objects: list[SynthObject], boxes: np.ndarray, bands: int,
                  rng: np.random.Generator, nodata_regions: bool) -> np.ndarray:
    """Pixels of one scene window as (bands, height, width) float32, uint8 units.

    Background: three low-frequency waves (functions of the scene coordinates, so
    windows join seamlessly) plus fine noise; objects painted on top, each clipped to
    the window; nodata regions set to NODATA last. ``boxes`` is
    :func:`object_boxes` of ``objects`` (computed once per scene).
    """
    rows = np.arange(row0, row0 + height, dtype=np.float32)[:, None]
    cols = np.arange(col0, col0 + width, dtype=np.float32)[None, :]
    texture = (9.0 * np.sin(cols / 37.0 + rows / 53.0)
               + 7.0 * np.sin(cols / 131.0 - rows / 97.0)
               + 5.0 * np.sin((cols + 2 * rows) / 19.0))
    shade = texture + rng.normal(0.0, 3.0, size=(height, width)).astype(np.float32)
    gain = np.array([1.0, 1.0, 0.8, 1.5][:bands], dtype=np.float32)[:, None, None]
    out = _BACKGROUND[:bands, None, None].astype(np.float32) + shade[None] * gain
    for i in objects_in_window(boxes, row0, col0, height, width):
        _paint(out, objects[i], row0, col0, bands, shade)
    np.clip(out, 1.0, 255.0, out=out)                         # 0 is reserved for nodata
    if nodata_regions:
        out[:, nodata_mask(cols, rows, size)] = NODATA
    return out


def _paint(out: np.ndarray, obj: SynthObject, row0: int, col0: int, bands: int,
           shade: np.ndarray) -> None:
    """Paint one object into a window ``out`` (bands, H, W) whose origin is (row0, col0)."""
    h, w = out.shape[1:]
    r0, r1 = max(obj.y0, row0), min(obj.y1, row0 + h)
    c0, c1 = max(obj.x0, col0), min(obj.x1, col0 + w)
    sl = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
    region = out[(slice(None),) + sl]
    fill = _FILL[obj.name][:bands, None, None].astype(np.float32) + 0.3 * shade[sl][None]
    rr = np.arange(r0, r1)[:, None]
    cc = np.arange(c0, c1)[None, :]
    if obj.name == "tank":
        region[:] = np.where(_disc(obj, rr, cc)[None], fill, region)
        return
    region[:] = fill
    if obj.name == "building":
        edge = (rr < obj.y0 + 2) | (rr >= obj.y1 - 2) | (cc < obj.x0 + 2) | (cc >= obj.x1 - 2)
        region[:] = np.where(edge[None], _BUILDING_OUTLINE[:bands, None, None], region)


def _disc(obj: SynthObject, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """Pixels (rows rr (H, 1), cols cc (1, W)) whose centres lie in the disc inscribed in the
    object's square box -> (H, W) bool."""
    radius = (obj.x1 - obj.x0) / 2.0
    cy, cx = (obj.y0 + obj.y1) / 2.0, (obj.x0 + obj.x1) / 2.0
    return (cc + 0.5 - cx) ** 2 + (rr + 0.5 - cy) ** 2 <= radius ** 2


def overview_factors(size: int) -> list[int]:
    """2, 4, 8, ... while the overview stays at least one block wide."""
    factors, f = [], 2
    while size // f >= BLOCK:
        factors.append(f)
        f *= 2
    return factors or [2]


def write_scene(path: Path, index: int, size: int, seed: int, objects: list[SynthObject],
                bands: int, dtype: str, nodata_regions: bool) -> None:
    """Write one scene window by window, then build internal overviews."""
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=dtype,
                   crs=SYNTH_CRS, transform=rasterio.Affine(*scene_transform(index, size)),
                   tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                   compress="zstd", zstd_level=1,  # level 1: generation speed over size
                   predictor=2, interleave="pixel", photometric="RGB", BIGTIFF="IF_SAFER")
    if nodata_regions:
        profile["nodata"] = NODATA
    scale = UINT16_SCALE if dtype == "uint16" else 1.0
    boxes = object_boxes(objects)
    # A small block cache bounds memory: GDAL otherwise keeps dirty blocks up to 5% of RAM.
    with bounded_block_cache(64), rasterio.open(path, "w", **profile) as dst:
        for strip, row0 in enumerate(range(0, size, BLOCK)):
            height = min(BLOCK, size - row0)
            for part, col0 in enumerate(range(0, size, WINDOW_COLS)):
                width = min(WINDOW_COLS, size - col0)
                rng = np.random.default_rng([seed, index, strip, part])  # deterministic
                pixels = render_window(row0, col0, height, width, size, objects, boxes,
                                       bands, rng, nodata_regions)
                dst.write(np.rint(pixels * scale).astype(dtype),
                          window=Window(col0, row0, width, height))
        dst.build_overviews(overview_factors(size), Resampling.average)
        dst.update_tags(ns="rio_overview", resampling="average")


def synthesize(out_dir: str | Path, scenes: int, size: int, seed: int, bands: int = 3,
               dtype: str = "uint8", nodata_regions: bool = False) -> list[Path]:
    """Write ``scenes`` synthetic scenes of ``size`` x ``size`` pixels plus ground truth.

    Args:
        out_dir: created if missing; files ``synth_000.tif`` ..., ``truth.json``,
            ``truth.geojson``.
        bands: 3 (RGB) or 4 (RGB + NIR).
        dtype: ``"uint8"`` or ``"uint16"`` (values x 40).
        nodata_regions: add nodata (0) regions and set nodata=0 in the files.

    Returns:
        Paths of the scenes, in order.
    """
    if scenes < 1 or size < 64:
        raise ValueError(f"need scenes >= 1 and size >= 64, got scenes={scenes} size={size}")
    if bands not in (3, 4):
        raise ValueError(f"bands must be 3 or 4, got {bands}")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype must be uint8 or uint16, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    truth: list[tuple[Path, list[SynthObject]]] = []
    for index in range(scenes):
        rng = np.random.default_rng([seed, index, 1 << 20])
        objects = place_objects(size, rng, nodata_regions)
        path = out_dir / f"synth_{index:03d}.tif"
        write_scene(path, index, size, seed, objects, bands, dtype, nodata_regions)
        paths.append(path)
        truth.append((path, objects))
    write_truth(out_dir, truth, size)
    return paths


def write_coco_truth(out_dir: Path, truth: list[tuple[Path, list[SynthObject]]], size: int,
                     classes: tuple[str, ...]) -> None:
    """Write truth.json (COCO: image ids 1.., category ids 1.. in ``classes`` order, annotation
    ids 1.. in image then object order, bbox [x, y, w, h] in pixel edges)."""
    images: list[dict] = []
    annotations: list[dict] = []
    for index, (path, objects) in enumerate(truth):
        images.append({"id": index + 1, "file_name": path.name, "width": size, "height": size})
        for obj in objects:
            w, h = obj.x1 - obj.x0, obj.y1 - obj.y0
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": obj.label + 1,
                                "bbox": [obj.x0, obj.y0, w, h], "area": w * h, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(classes)]}
    (out_dir / "truth.json").write_text(json.dumps(coco))


def write_truth(out_dir: Path, truth: list[tuple[Path, list[SynthObject]]], size: int) -> None:
    """Write truth.json (COCO) and truth.geojson (scene CRS) for the scenes."""
    write_coco_truth(out_dir, truth, size, SYNTH_CLASSES)
    features = []
    ann_id = 1  # the COCO annotation ids, in the same order
    for index, (path, objects) in enumerate(truth):
        boxes = np.array([[o.x0, o.y0, o.x1, o.y1] for o in objects], dtype=np.float64)
        corners = pixel_boxes_to_map(boxes.reshape(-1, 4), scene_transform(index, size))
        for obj, ring in zip(objects, corners):
            closed = ring.tolist() + [ring[0].tolist()]
            features.append({"type": "Feature",
                             "geometry": {"type": "Polygon", "coordinates": [closed]},
                             "properties": {"id": ann_id, "scene_id": path.stem,
                                            "label": obj.name, "image": path.name}})
            ann_id += 1
    geojson = {"type": "FeatureCollection",
               "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
               "features": features}
    (out_dir / "truth.geojson").write_text(json.dumps(geojson))


def render_inspection(size: int, objects: list[SynthObject], rng: np.random.Generator) -> np.ndarray:
    """Pixels of one inspection image as (3, size, size) uint8: brushed metal (each row its
    own shade, lit brighter in the middle, fine grain) with the defects painted on it, each
    keeping a little of the grain under it."""
    rows = np.arange(size, dtype=np.float32)[:, None]
    cols = np.arange(size, dtype=np.float32)[None, :]
    streaks = rng.normal(0.0, 5.0, size=(size, 1)).astype(np.float32)
    light = 12.0 * np.sin(np.pi * (cols + 0.5) / size) - 6.0
    shade = streaks + light + rng.normal(0.0, 2.0, size=(size, size)).astype(np.float32)
    out = _METAL[:, None, None].astype(np.float32) + shade[None]
    for obj in objects:
        box = (slice(None), slice(obj.y0, obj.y1), slice(obj.x0, obj.x1))
        fill = _DEFECT_FILL[obj.name][:, None, None].astype(np.float32) + 0.3 * shade[box[1:]][None]
        if obj.name == "dent":
            inside = _disc(obj, rows[obj.y0:obj.y1], cols[:, obj.x0:obj.x1])
            out[box] = np.where(inside[None], fill, out[box])
        else:
            out[box] = fill
    return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def synthesize_inspection(out_dir: str | Path, images: int, size: int, seed: int) -> list[Path]:
    """Write ``images`` inspection images ``part_000.png`` ... (8-bit RGB PNG, ``size`` x
    ``size``, no georeferencing) and their ``truth.json`` (COCO, classes INSPECTION_CLASSES).

    The same ``seed`` gives the same bytes. Returns the image paths, in order.
    """
    if images < 1 or size < 64:
        raise ValueError(f"need scenes >= 1 and size >= 64, got scenes={images} size={size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth: list[tuple[Path, list[SynthObject]]] = []
    for index in range(images):
        objects = place_objects(size, np.random.default_rng([seed, index, 1 << 20]), nodata_regions=False,
                                kinds=INSPECTION_KINDS, seam_stride=INSPECTION_SEAM_STRIDE)
        pixels = render_inspection(size, objects, np.random.default_rng([seed, index]))
        path = out_dir / f"part_{index:03d}.png"
        with warnings.catch_warnings():  # a camera frame has no map; saying so is the point
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path, "w", driver="PNG", width=size, height=size, count=3, dtype="uint8") as dst:
                dst.write(pixels)
        truth.append((path, objects))
    write_coco_truth(out_dir, truth, size, INSPECTION_CLASSES)
    return [path for path, _ in truth]
