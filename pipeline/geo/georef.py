"""Pixel boxes -> map polygons, reprojection, and CRS serialisation.

Conventions (see docs/imagery.md):

- Pixel coordinates are EDGE coordinates: pixel (col, row) covers [col, col+1) x
  [row, row+1); a box (xmin, ymin, xmax, ymax) = (10, 20, 30, 40) covers columns
  10..29 and rows 20..39.
- A box becomes a polygon by sending its four CORNERS through the scene's affine
  transform (x = a*col + b*row + c, y = d*col + e*row + f). Using pixel centres instead
  (rasterio's default ``offset="center"``) shifts every box by half a pixel.
- Corners are returned in the order (xmin, ymax), (xmax, ymax), (xmax, ymin),
  (xmin, ymin) of the pixel box, reordered if needed so that every polygon's exterior
  ring is counter-clockwise in the output coordinates (the GeoJSON/OGC convention).
- Reprojection sends the four corners only; the box edges are straight in the output
  CRS. Corners that cannot be projected (e.g. off the Earth's disk in a geostationary
  scene) come back as NaN; callers drop boxes with :func:`finite_boxes`.

Every function is vectorised over boxes and pure (no I/O).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import shapely
from affine import Affine, TransformNotInvertibleError
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from pipeline.errors import GeoreferenceError

DEFAULT_OUTPUT_CRS = "EPSG:4326"


def chip_to_scene_boxes(boxes: np.ndarray, col_off: float, row_off: float) -> np.ndarray:
    """Shift boxes from chip pixels to scene pixels.

    Args:
        boxes: (N, 4) XYXY in chip pixels.
        col_off, row_off: the chip window's offset in the scene (pixels).

    Returns:
        (N, 4) float64 XYXY in scene pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes + np.array([col_off, row_off, col_off, row_off], dtype=np.float64)


def clip_boxes_to_scene(boxes: np.ndarray, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip XYXY scene-pixel boxes to the scene ``[0, width] x [0, height]``.

    Boxes of edge chips and of scenes smaller than a chip can reach into the zero
    padding; clipped, they georeference inside the scene.

    Returns:
        (clipped (N, 4) float64, keep (N,) bool); keep is False where a box is
        non-finite or has zero/negative width or height after clipping.

    Example:
        >>> clipped, keep = clip_boxes_to_scene([[-5, 10, 30, 300], [40, 300, 50, 400]], 512, 256)
        >>> clipped[0].tolist(), keep.tolist()
        ([0.0, 10.0, 30.0, 256.0], [True, False])
    """
    # numpy rather than torchvision.ops.clip_boxes_to_image: the driver holds numpy, not tensors.
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.clip(boxes, 0.0, [width, height, width, height])
    keep = (np.isfinite(boxes).all(axis=1) & (clipped[:, 2] > clipped[:, 0])
            & (clipped[:, 3] > clipped[:, 1]))
    return clipped, keep


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY pixel boxes -> (N, 4, 2) pixel corners (col, row).

    Order: (xmin, ymax), (xmax, ymax), (xmax, ymin), (xmin, ymin), which is
    counter-clockwise on a north-up map (rows grow southwards).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = boxes.T
    return np.stack([np.stack([x0, y1], -1), np.stack([x1, y1], -1),
                     np.stack([x1, y0], -1), np.stack([x0, y0], -1)], axis=1)


def apply_affine(points: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """Apply an affine (a, b, c, d, e, f) to points (..., 2) of (col, row) -> (x, y)."""
    points = np.asarray(points, dtype=np.float64)
    # affine maps arrays of coordinates too (its stubs say scalars)
    x, y = Affine(*(float(v) for v in tuple(transform)[:6])) @ (points[..., 0], points[..., 1])  # type: ignore[operator]
    return np.stack([x, y], axis=-1)


def invert_affine(transform: Sequence[float]) -> tuple[float, float, float, float, float, float]:
    """Inverse affine: map (x, y) -> pixel (col, row).

    Raises GeoreferenceError when the transform is singular (zero pixel size).
    """
    try:
        inverse = ~Affine(*(float(v) for v in tuple(transform)[:6]))
    except TransformNotInvertibleError:
        raise GeoreferenceError(f"geotransform {tuple(transform)[:6]} is singular") from None
    return tuple(inverse)[:6]


def ring_signed_area(corners: np.ndarray) -> np.ndarray:
    """(N, K, 2) rings -> (N,) signed area (shoelace); > 0 means counter-clockwise."""
    x, y = corners[..., 0], corners[..., 1]
    return 0.5 * np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y, axis=-1)


def orient_ccw(corners: np.ndarray) -> np.ndarray:
    """Reverse rings that are clockwise so that every ring is counter-clockwise."""
    corners = np.array(corners, dtype=np.float64, copy=True)
    clockwise = ring_signed_area(corners) < 0
    corners[clockwise] = corners[clockwise, ::-1]
    return corners


@lru_cache(maxsize=64)
def _crs(crs: str) -> CRS:
    try:
        return CRS.from_user_input(crs)
    except CRSError as err:
        raise GeoreferenceError(f"unrecognised CRS {crs[:80]!r}: {err}") from err


@lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Transformer:
    # always_xy: (easting, northing) / (lon, lat) order whatever the CRS axis order says.
    return Transformer.from_crs(_crs(src), _crs(dst), always_xy=True)


def reproject_points(points: np.ndarray, src_crs: str, dst_crs: str) -> np.ndarray:
    """Reproject points (..., 2) of (x, y) from ``src_crs`` to ``dst_crs``.

    CRSs are anything pyproj accepts (WKT, ``"EPSG:32633"``, PROJ strings, PROJJSON).
    Geographic coordinates are (lon, lat) in degrees. Points that cannot be projected
    become NaN.
    """
    points = np.asarray(points, dtype=np.float64)
    if _crs(src_crs) == _crs(dst_crs):
        return points.copy()
    x, y = _transformer(src_crs, dst_crs).transform(points[..., 0], points[..., 1],
                                                     errcheck=False)
    out = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], -1)
    out[~np.isfinite(out)] = np.nan
    return out


def pixel_boxes_to_map(boxes: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """(N, 4) XYXY scene-pixel boxes -> (N, 4, 2) map-coordinate corners (CCW rings).

    Each corner goes through the full affine, so rotated/sheared transforms give the
    correct rotated quadrilateral.
    """
    return orient_ccw(apply_affine(box_corners(boxes), transform))


def boxes_to_polygons(boxes: np.ndarray, transform: Sequence[float], src_crs: str | None,
                      dst_crs: str | None = DEFAULT_OUTPUT_CRS) -> np.ndarray:
    """Scene-pixel boxes -> (N, 4, 2) corners in ``dst_crs``.

    Args:
        boxes: (N, 4) XYXY in scene pixels.
        transform: scene affine (a, b, c, d, e, f).
        src_crs: the scene CRS (WKT or any pyproj input); None for non-georeferenced
            scenes, whose output stays in pixels (``dst_crs`` is then ignored).
        dst_crs: output CRS; None keeps the scene CRS.

    Returns:
        (N, 4, 2) float64 corners, counter-clockwise, NaN where not projectable.
    """
    corners = pixel_boxes_to_map(boxes, transform)
    if src_crs is None or dst_crs is None:
        return corners
    return orient_ccw(reproject_points(corners, src_crs, dst_crs))


def finite_boxes(corners: np.ndarray) -> np.ndarray:
    """(N, 4, 2) -> (N,) bool: True where every corner is finite."""
    return np.isfinite(corners).all(axis=(1, 2))


def valid_polygons(corners: np.ndarray) -> np.ndarray:
    """(N, 4, 2) -> (N,) bool: True where the corners make a valid polygon (shapely).

    A clipped north-up box always does; a reprojection can still fold a quad into a
    bow tie or collapse it, and such rings must not be written as geometry.
    """
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2)
    ok = finite_boxes(corners)
    ok[ok] = shapely.is_valid(corners_to_shapely(corners[ok]))
    return ok


def corners_to_shapely(corners: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners -> (N,) array of shapely Polygons (rings closed here)."""
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2)
    rings = np.concatenate([corners, corners[:, :1]], axis=1)
    return shapely.polygons(rings)


def polygon_bounds(corners: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners -> (N, 4) XYXY bounds (xmin, ymin, xmax, ymax)."""
    corners = np.asarray(corners, dtype=np.float64)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def map_to_pixel(points: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """Map coordinates (..., 2) -> scene pixel edge coordinates (col, row)."""
    return apply_affine(points, invert_affine(transform))


def crs_to_projjson(crs: str) -> dict:
    """A CRS (WKT, ``"EPSG:n"``, PROJ string) as a PROJJSON dict (GeoParquet metadata).

    Works for CRSs without an EPSG code (e.g. a geostationary projection): the
    definition itself is serialised, not a code.
    """
    return _crs(str(crs)).to_json_dict()


def crs_to_wkt(crs: str) -> str:
    """Any pyproj CRS input -> WKT2 string."""
    return _crs(str(crs)).to_wkt()


def same_crs(a: str | None, b: str | None) -> bool:
    """True when both CRSs are None or describe the same CRS."""
    if a is None or b is None:
        return a is None and b is None
    return _crs(str(a)) == _crs(str(b))
