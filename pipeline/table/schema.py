"""The detection table's rows: GeoParquet 1.1 columns, file metadata and the builder.

Pure: nothing here touches a file. :mod:`pipeline.table.commit` writes these rows and
:mod:`pipeline.table.state` reads them; every reader of the table (DuckDB, pyarrow, GeoPandas) sees this schema
without the ``date`` column, which comes from the hive folder instead.

Columns are only ever added, nullable, at the end of the file columns (``acquired_at``
came after schema version 1's first tables): files written before stay in the table as
they are, and :func:`current_file_rows` reads them as the current columns with nulls.
The table's ``schema_version`` stays 1, so every table stays readable by this code.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import CommitError
from pipeline.geo.georef import crs_to_projjson, orient_ccw

GEOPARQUET_VERSION = "1.1.0"
SCHEMA_VERSION = 1
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def detection_schema() -> pa.Schema:
    """Columns of the detection table (without file metadata; see :func:`geo_metadata`).

    geometry: WKB box polygon in the output CRS (null where it could not be projected);
    bbox: its GeoParquet 1.1 covering; px_*: the box in scene pixels (x right, y down);
    label_id: class index of the model; processed_at: commit-side timestamp (UTC);
    acquired_at: when the scene was imaged (UTC; the STAC item's time or the raster's
    acquisition tag), null when unknown and in files written before the column existed;
    date: YYYY-MM-DD, the processing day, also the hive partition directory.
    """
    bbox = pa.struct([(name, pa.float64()) for name in BBOX_FIELDS])
    return pa.schema(
        [
            pa.field("geometry", pa.binary()),
            pa.field("bbox", bbox),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("job_name", pa.string(), nullable=False),
            pa.field("scene_id", pa.string(), nullable=False),
            pa.field("scene_path", pa.string()),
            pa.field("label", pa.string()),
            pa.field("label_id", pa.int32(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("px_xmin", pa.float32(), nullable=False),
            pa.field("px_ymin", pa.float32(), nullable=False),
            pa.field("px_xmax", pa.float32(), nullable=False),
            pa.field("px_ymax", pa.float32(), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("job_hash", pa.string(), nullable=False),
            pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("acquired_at", pa.timestamp("us", tz="UTC")),
            pa.field("date", pa.string(), nullable=False),
        ]
    )


def geo_metadata(crs: Optional[str], bbox: Optional[Sequence[float]] = None) -> dict:
    """The GeoParquet 1.1 ``geo`` file metadata for the detection table.

    crs: output CRS string, or None for pixel coordinates, written as ``"crs": null``
    (the spec's "unknown/undefined CRS"; omitting the key would instead mean OGC:CRS84).
    bbox: [xmin, ymin, xmax, ymax] of the file's geometries, when known.
    """
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": crs_to_projjson(crs) if crs is not None else None,
        "orientation": "counterclockwise",
        "edges": "planar",
        "covering": {"bbox": {name: ["bbox", name] for name in BBOX_FIELDS}},
    }
    if bbox is not None:
        column["bbox"] = [float(v) for v in bbox]
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def _closed_ccw_rings(polygons: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners or (N, 5, 2) closed rings -> (N, 5, 2) closed, counterclockwise
    in the coordinate plane (positive shoelace area), as the ``orientation`` key says."""
    p = np.asarray(polygons, np.float64)
    if p.ndim != 3 or p.shape[2] != 2 or p.shape[1] not in (4, 5):
        raise ValueError(f"polygons must be (N, 4, 2) corners or (N, 5, 2) rings, got shape {p.shape}")
    corners = orient_ccw(p[:, :4])
    return np.concatenate([corners, corners[:, :1]], axis=1)


def _wkb_polygons(rings: np.ndarray, valid: np.ndarray) -> pa.Array:
    """WKB of each (5, 2) ring, vectorised with shapely 2; null where not valid."""
    import shapely

    wkb = np.full(len(rings), None, dtype=object)
    if valid.any():
        wkb[valid] = shapely.to_wkb(shapely.polygons(rings[valid]), output_dimension=2)
    return pa.array(wkb.tolist(), pa.binary())


def _broadcast(value: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=object)
    if arr.ndim == 0:
        return np.full(n, value, dtype=object)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} values for {n} detections")
    return arr


def build_detection_table(
    polygons: np.ndarray,
    px_boxes: np.ndarray,
    scores: np.ndarray,
    label_ids: np.ndarray,
    class_names: Sequence[str],
    *,
    run_id: str,
    job_name: str,
    scene_id: str,
    scene_path: Optional[str],
    model_id: str,
    job_hash: str,
    processed_at: Optional[dt.datetime] = None,
    date: Optional[str] = None,
    acquired_at: Optional[dt.datetime] = None,
) -> pa.Table:
    """Rows of one scene's detections as a table with :func:`detection_schema`.

    polygons: (N, 4, 2) corners or (N, 5, 2) closed rings in the output CRS, x/y order
    (easting/longitude first, as GeoParquet requires); rows with a non-finite coordinate
    get a null geometry and bbox. px_boxes: (N, 4) XYXY scene px. scores: (N,).
    label_ids: (N,) int indexing ``class_names``. processed_at: aware datetime
    (default now, UTC); date: partition "YYYY-MM-DD" (default processed_at's UTC date);
    acquired_at: aware datetime the scene was imaged, or None (unknown).
    """
    poly = np.asarray(polygons, np.float64)
    rings = _closed_ccw_rings(poly if poly.size else np.zeros((0, 4, 2)))
    n = len(rings)
    px = np.asarray(px_boxes, np.float32).reshape(-1, 4)
    score = np.asarray(scores, np.float32).reshape(-1)
    ids = np.asarray(label_ids, np.int64).reshape(-1)
    if not (len(px) == len(score) == len(ids) == n):
        raise ValueError("polygons, px_boxes, scores, label_ids differ in length: "
                         f"{n}, {len(px)}, {len(score)}, {len(ids)}")
    if n and (ids.min() < 0 or ids.max() >= len(class_names)):
        raise ValueError(f"label_ids must index the {len(class_names)} class names, got {ids.min()}..{ids.max()}")
    when = (processed_at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    day = date or when.date().isoformat()
    dt.date.fromisoformat(day)  # raises ValueError on a malformed partition value
    if acquired_at is not None and acquired_at.utcoffset() is None:
        raise ValueError(f"acquired_at must be timezone-aware, got {acquired_at!r}")

    valid = np.isfinite(rings).all(axis=(1, 2))
    lo = np.where(valid[:, None], rings.min(axis=1), np.nan)
    hi = np.where(valid[:, None], rings.max(axis=1), np.nan)
    mask = pa.array(~valid) if n else None
    bbox = pa.StructArray.from_arrays(
        [pa.array(lo[:, 0]), pa.array(lo[:, 1]), pa.array(hi[:, 0]), pa.array(hi[:, 1])],
        names=list(BBOX_FIELDS),
        mask=mask,
    ) if n else pa.array([], detection_schema().field("bbox").type)
    names = np.asarray(list(class_names), dtype=object)
    columns = {
        "geometry": _wkb_polygons(rings, valid),
        "bbox": bbox,
        "run_id": _broadcast(run_id, n, "run_id"),
        "job_name": _broadcast(job_name, n, "job_name"),
        "scene_id": _broadcast(scene_id, n, "scene_id"),
        "scene_path": _broadcast(scene_path, n, "scene_path"),
        "label": names[ids] if n else np.array([], dtype=object),
        "label_id": ids.astype(np.int32),
        "score": score,
        "px_xmin": px[:, 0],
        "px_ymin": px[:, 1],
        "px_xmax": px[:, 2],
        "px_ymax": px[:, 3],
        "model_id": _broadcast(model_id, n, "model_id"),
        "job_hash": _broadcast(job_hash, n, "job_hash"),
        "processed_at": pa.array([when] * n, pa.timestamp("us", tz="UTC")),
        "acquired_at": pa.array([acquired_at] * n, pa.timestamp("us", tz="UTC")),
        "date": _broadcast(day, n, "date"),
    }
    schema = detection_schema()
    arrays = [c if isinstance(c, pa.Array) else pa.array(c.tolist() if c.dtype == object else c, schema.field(k).type)
              for k, c in columns.items()]
    return pa.Table.from_arrays(arrays, schema=schema)


def file_schema() -> pa.Schema:
    """The columns a data file holds: :func:`detection_schema` without ``date`` (the folder's)."""
    schema = detection_schema()
    return schema.remove(schema.get_field_index("date"))


def current_file_rows(rows: pa.Table) -> pa.Table:
    """A data file's rows, written under any earlier version of the schema, as
    :func:`file_schema`'s columns in order: a column added since (``acquired_at``) is
    null, a ``date`` column (files written before the folder held it) is dropped, and
    the file's metadata goes. Raises ValueError naming a column that cannot be read."""
    want = file_schema()
    columns = []
    for field in want:
        if field.name in rows.column_names:
            columns.append(rows[field.name].cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(rows.num_rows, field.type))
        else:
            raise ValueError(f"the file has no column {field.name!r} (it is required)")
    return pa.Table.from_arrays(columns, schema=want)


def _geometry_bbox(table: pa.Table) -> Optional[list[float]]:
    bbox = table["bbox"]
    if bbox.null_count == len(bbox):
        return None
    flat = pc.struct_field
    return [pc.min(flat(bbox, "xmin")).as_py(), pc.min(flat(bbox, "ymin")).as_py(),
            pc.max(flat(bbox, "xmax")).as_py(), pc.max(flat(bbox, "ymax")).as_py()]


def geoparquet_bytes(part: pa.Table, crs: Optional[str], name: str) -> bytes:
    """One GeoParquet file (``name`` for errors) of file rows with its ``geo`` metadata; its
    footer's row count is checked against the rows handed in (CommitError)."""
    meta = {b"geo": json.dumps(geo_metadata(crs, _geometry_bbox(part))).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(part.replace_schema_metadata(meta), sink, compression="zstd")
    data = sink.getvalue()
    counted = pq.read_metadata(pa.BufferReader(data)).num_rows
    if counted != part.num_rows:
        raise CommitError(f"{name}: wrote {part.num_rows} rows but the file holds {counted}")
    return data.to_pybytes()
