"""Open scenes with rasterio and describe them without reading pixels.

A scene is one raster file: a GeoTIFF/COG, or a plain PNG/JPEG/TIFF without
georeferencing (inspection imagery). Paths may be local or remote; remote URLs are
mapped onto GDAL's virtual file systems so that only the bytes of the windows we read
travel over the network:

    s3://bucket/key        -> /vsis3/bucket/key
    gs://bucket/key        -> /vsigs/bucket/key
    https://host/path      -> /vsicurl/https://host/path   (http:// likewise)

Georeferencing rules (see docs/imagery.md):

- Scene ids come from :mod:`pipeline.io.inputs` (the path relative to its input pattern's
  folder, without suffix); a bare path's id is its file stem.
- A raster without a CRS is not georeferenced: its geotransform, if any, is ignored and
  the scene lives in its own pixel frame (identity transform, ``crs_wkt=None``), so
  every output stays in pixels.
- Rotated or sheared geotransforms are refused with :class:`GeoreferenceError` unless
  ``allow_rotated=True``: every consumer downstream (vector labels -> pixel boxes,
  axis-aligned map boxes in the output table) assumes north-up, and a silently wrong
  box is worse than a refused scene. Warp such scenes to north-up with ``gdalwarp``.
- Rasters georeferenced only by GCPs or RPCs are refused for the same reason.

Acquisition time (:func:`acquisition_time`): from the raster's GDAL metadata (rasterio's
``tags()``), the first of :data:`ACQUISITION_TAGS` present, parsed strictly; a value
without a zone is UTC. A value that does not parse leaves it unknown with a warning.
"""
from __future__ import annotations

import datetime as dt
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import rasterio
from affine import Affine
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from pipeline.config.locations import is_remote
from pipeline.errors import GeoreferenceError, InputError
from pipeline.io.inputs import scene_id_for
from pipeline.io.objstore import gdal_options, gdal_path

IDENTITY: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SceneInfo:
    """What the pipeline needs to know about a scene, read from its header only.

    Attributes:
        scene_id: the scene's id (see :mod:`pipeline.io.inputs`); unique within a job.
        path: the path as given by the user (before any /vsi mapping).
        width, height: raster size in pixels.
        count: number of bands.
        dtype: numpy dtype name of band 1 (``"uint8"``, ``"uint16"``, ...).
        crs_wkt: the CRS as WKT2, or None for non-georeferenced rasters.
        transform: affine (a, b, c, d, e, f) mapping pixel-edge coordinates
            (col, row) to map coordinates: x = a*col + b*row + c, y = d*col + e*row + f.
            Identity when ``crs_wkt`` is None.
        nodata: nodata value of band 1, or None (NaN stays NaN).
        block_shape: (rows, cols) of the file's internal blocks of band 1.
        colorinterp: colour interpretation per band (``"red"``, ``"alpha"``, ...).
        overviews: decimation factors of band 1's overviews, e.g. (2, 4, 8).
        acquired_at: when the scene was imaged, from its tags (:func:`acquisition_time`),
            aware UTC; None when no tag says it or its value did not parse.
        acquired_at_warning: why a tag's value was not taken (names scene, tag and value).
    """

    scene_id: str
    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    block_shape: tuple[int, int]
    colorinterp: tuple[str, ...] = ()
    overviews: tuple[int, ...] = ()
    acquired_at: Optional[dt.datetime] = None
    acquired_at_warning: Optional[str] = None

    @property
    def affine(self) -> Affine:
        """The transform as an ``affine.Affine``."""
        return Affine(*self.transform)

    @property
    def georeferenced(self) -> bool:
        """True when outputs are in map coordinates (the scene has a CRS)."""
        return self.crs_wkt is not None

    @property
    def data_bands(self) -> list[int]:
        """1-based indexes of all bands that are not alpha: the default band selection."""
        return [i + 1 for i in range(self.count)
                if i >= len(self.colorinterp) or self.colorinterp[i] != "alpha"]


@contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.io.DatasetReader]:
    """Open a raster for reading; failures become InputError naming the file.

    Missing local files are reported without asking GDAL so the message is plain.
    Rasterio's NotGeoreferencedWarning is silenced: a missing CRS is a supported case,
    recorded as ``crs_wkt=None`` in :class:`SceneInfo`.
    """
    if not is_remote(str(path)) and not Path(path).exists():
        raise InputError(f"{path}: file not found")
    if not is_remote(str(path)) and Path(path).is_dir():
        raise InputError(f"{path}: is a directory, expected a raster file")
    try:
        with warnings.catch_warnings(), rasterio.Env(**gdal_options(str(path))):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(gdal_path(path))
    except RasterioError as err:
        raise InputError(f"{path}: cannot be opened as a raster ({error_reason(err)})") from err
    try:
        yield dataset
    finally:
        dataset.close()


@contextmanager
def bounded_block_cache(megabytes: int) -> Iterator[None]:
    """Run a block with GDAL's block cache capped at ``megabytes``, then put it back.

    For passes that touch each block once (decimated mask reads, sampling, writing):
    a big cache only costs memory there. rasterio.Env alone does not always restore
    GDAL_CACHEMAX when a dataset was opened outside it, so the old value is restored
    explicitly and later chip reads get their full cache again.
    """
    previous = get_gdal_config("GDAL_CACHEMAX")
    try:
        with rasterio.Env(GDAL_CACHEMAX=megabytes):
            yield
    finally:
        if previous is not None:
            set_gdal_config("GDAL_CACHEMAX", previous)


def error_reason(err: BaseException) -> str:
    """Most specific message of a rasterio error (GDAL's own is often the cause)."""
    cause = err.__cause__ or err.__context__
    text = str(err)
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def is_rotated(transform: tuple[float, ...] | Affine, tolerance: float = 1e-12) -> bool:
    """True when the affine has rotation/shear terms (b or d non-zero), i.e. not north-up."""
    a, b, _, d, e, _ = tuple(transform)[:6]
    scale = max(abs(a), abs(e), 1e-300)
    return abs(b) > tolerance * scale or abs(d) > tolerance * scale


def scene_info_from_dataset(dataset: rasterio.io.DatasetReader, path: str | Path,
                            allow_rotated: bool = False, scene_id: str | None = None) -> SceneInfo:
    """Build a SceneInfo from an open dataset; see :func:`read_scene_info`."""
    with warnings.catch_warnings():  # a missing CRS is a supported case (see open_raster)
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        a, b, c, d, e, f = (float(v) for v in tuple(dataset.transform)[:6])
    transform = (a, b, c, d, e, f)
    if is_rotated(transform) and not allow_rotated:
        raise GeoreferenceError(
            f"{path}: rotated/sheared geotransform {transform} is not supported; "
            "warp the scene to north-up (gdalwarp) first")
    crs_wkt = dataset.crs.to_wkt() if dataset.crs else None
    if crs_wkt is None and _has_gcps_or_rpcs(dataset):
        raise GeoreferenceError(
            f"{path}: georeferenced only by GCPs/RPCs; warp it to a geotransform "
            "(gdalwarp) first")
    if crs_wkt is None:
        transform = IDENTITY  # no CRS: the pixel frame is the only honest frame
    if dataset.count < 1:
        raise InputError(f"{path}: raster has no bands")
    nodata = dataset.nodata
    rows, cols = dataset.block_shapes[0]
    scene_id = scene_id if scene_id is not None else scene_id_for(str(path))
    acquired_at, acquired_at_warning = acquisition_time(dataset.tags(), f"scene {scene_id} ({path})")
    return SceneInfo(
        scene_id=scene_id,
        path=str(path),
        width=int(dataset.width),
        height=int(dataset.height),
        count=int(dataset.count),
        dtype=str(dataset.dtypes[0]),
        crs_wkt=crs_wkt,
        transform=transform,
        nodata=None if nodata is None else float(nodata),
        block_shape=(int(rows), int(cols)),
        colorinterp=tuple(ci.name for ci in dataset.colorinterp),
        overviews=tuple(int(v) for v in dataset.overviews(1)),
        acquired_at=acquired_at,
        acquired_at_warning=acquired_at_warning,
    )


# GDAL metadata items (default domain) that say when a scene was imaged, most specific first:
# acquisition tags as vendors write them, then the TIFF DateTime tag (TIFF 6.0: the image's
# date-time, "YYYY:MM:DD HH:MM:SS"; for imagery straight from the sensor, its capture).
ACQUISITION_TAGS = ("ACQUISITIONDATETIME", "ACQUISITION_DATETIME", "ACQUISITION_DATE", "ACQUISITIONDATE",
                    "TIFFTAG_DATETIME")
TIFF_DATETIME_FORMAT = "%Y:%m:%d %H:%M:%S"


def parse_acquisition(value: str, tiff_only: bool = False) -> dt.datetime:
    """A tag's date-time -> aware UTC datetime; no zone means UTC.

    Accepted: the TIFF form ``YYYY:MM:DD HH:MM:SS``, and unless ``tiff_only`` ISO 8601 dates
    and date-times (``2026-01-03``, ``2026-01-03T09:15:00Z``, ``...+01:00``). Raises ValueError.
    """
    text = value.strip()
    try:
        when = dt.datetime.strptime(text, TIFF_DATETIME_FORMAT)
    except ValueError:
        if tiff_only or not (len(text) >= 10 and text[4] == "-" and text[7] == "-"):  # not ISO's basic form (20260103)
            raise ValueError(f"not a date-time: {value!r}") from None
        when = dt.datetime.fromisoformat(text.replace("z", "Z"))
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def acquisition_time(tags: Mapping[str, str], scene: str) -> tuple[Optional[dt.datetime], Optional[str]]:
    """(acquired_at, warning) from a raster's GDAL metadata ``tags`` (names matched without
    regard to case). The first tag of :data:`ACQUISITION_TAGS` present decides: its value
    parsed by :func:`parse_acquisition`, or (None, a warning naming ``scene``, the tag and
    the value) when it does not parse. (None, None) when no such tag is present.
    TIFFTAG_DATETIME takes the TIFF form only (the TIFF 6.0 specification's)."""
    by_name = {str(k).upper(): (str(k), str(v)) for k, v in tags.items()}
    for name in ACQUISITION_TAGS:
        if name in by_name:
            tag, value = by_name[name]
            try:
                return parse_acquisition(value, tiff_only=name == "TIFFTAG_DATETIME"), None
            except ValueError:
                expected = "'YYYY:MM:DD HH:MM:SS'" + ("" if name == "TIFFTAG_DATETIME" else " or ISO 8601")
                return None, f"{scene}: tag {tag} value {value!r} is not a date-time (expected {expected}); " \
                             "acquired_at left null"
    return None, None


def _has_gcps_or_rpcs(dataset: rasterio.io.DatasetReader) -> bool:
    gcps, _ = dataset.gcps
    return bool(gcps) or dataset.rpcs is not None


def read_scene_info(path: str | Path, allow_rotated: bool = False, scene_id: str | None = None) -> SceneInfo:
    """Describe a scene from its header (no pixel reads). ``scene_id``: default the file stem.

    Raises:
        InputError: missing, unreadable or not a raster (message names the file).
        GeoreferenceError: rotated/sheared geotransform (unless ``allow_rotated``),
            or georeferencing by GCPs/RPCs only.
    """
    with open_raster(path) as dataset:
        return scene_info_from_dataset(dataset, path, allow_rotated=allow_rotated, scene_id=scene_id)
