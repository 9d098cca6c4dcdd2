"""`pipeline query`: SQL over the committed rows of a detection table, with DuckDB.

The rows are the view ``detections``, defined over exactly
:func:`pipeline.table.state.committed_parts`: the files of the current manifests (read from
``_staging`` where a crash interrupted a published commit before its move); files of
runs that crashed before publishing and of superseded manifests are not part of it.
``date`` is each file's partition, a DATE (the files hold no date column). Local files
are read by DuckDB's Parquet reader; the files of a table in an object store through a
pyarrow dataset on pyarrow's S3/GCS filesystem, into which DuckDB pushes the query's
columns and filters (only the footers, columns and row groups needed are fetched).
``geometry`` is the WKB box as a GEOMETRY with the table's CRS (DuckDB reads the
GeoParquet metadata, or the GeoArrow type we give the dataset), and DuckDB's spatial
extension is loaded from the ``duckdb-extension-spatial`` package (:func:`connect`), so
``ST_*`` functions take it as it is; ``bbox`` is the GeoParquet covering struct, so
``bbox.xmin`` ... filter boxes too. An empty table gives an empty view with the same
columns and types. With an AOI file, the table ``aoi`` holds its polygons in the
table's CRS (:func:`read_aoi`).

The view ``scenes`` has one row per current scene manifest
(:func:`pipeline.table.state.committed_scenes`), so SQL can count scene outcomes or join them
to ``detections`` on ``(job_name, scene_id)``: job_name, scene_id, scene_path,
``status`` ('complete', 'partial' or 'failed'; manifests of older versions have no
status and count as 'complete'), ``rows``, ``missing_chips`` (how many chips of the
scene were never predicted), ``reason`` (why a failed scene failed; for a partial scene
the distinct reasons of its missing chips joined with '; '; NULL for complete scenes),
run_id, model_id and ``committed_at`` (TIMESTAMPTZ). Failed scenes have no rows, so
they appear only here. A table without manifests gives an empty view of these columns.

Output (:func:`format_result`): an aligned text table for people, CSV or JSON (an
array of row objects) for programs; or a file (:func:`write_result`): GeoPackage,
FlatGeobuf, GeoJSON, GeoParquet or CSV, geometry and CRS kept.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, PipelineError
from pipeline.table.store import LocalStore

VIEW = "detections"
SCENES_VIEW = "scenes"
AOI_VIEW = "aoi"
# Columns of the ``scenes`` view; fixed here so an empty table gets the same types.
SCENES_SCHEMA = pa.schema([
    ("job_name", pa.string()),
    ("scene_id", pa.string()),
    ("scene_path", pa.string()),
    ("status", pa.string()),
    ("rows", pa.int64()),
    ("missing_chips", pa.int64()),
    ("reason", pa.string()),
    ("run_id", pa.string()),
    ("model_id", pa.string()),
    ("committed_at", pa.timestamp("us", tz="UTC")),
])
FORMATS = ("table", "csv", "json")
Format = Literal["table", "csv", "json"]
# The aligned table cuts cells longer than this (CSV and JSON never cut).
MAX_CELL = 60


class QueryError(PipelineError):
    """The SQL could not be run against the table (syntax, unknown column, ...)."""


def _sql_string(text: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


FILES_VIEW = "_committed_files"
# The columns added to the table's files after its first version, typed, with no row.
ADDED_COLUMNS_SQL = "(SELECT CAST(NULL AS TIMESTAMPTZ) AS acquired_at WHERE false)"


def empty_view_sql(placeholder: str) -> str:
    """``CREATE VIEW detections`` over an empty placeholder file with the table's schema:
    its own ``date`` column, cast to DATE so the view has the same types as a full table's."""
    source = f"read_parquet([{_sql_string(placeholder)}], hive_partitioning = false)"
    return f"CREATE VIEW {VIEW} AS SELECT * REPLACE (CAST(date AS DATE) AS date) FROM {source}"


def _committed_at(text: Any) -> dt.datetime | None:
    """A manifest's ``committed_at`` (ISO 8601) as an aware UTC datetime; naive means UTC."""
    if not text:
        return None
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _scene_reason(manifest: dict, status: str, missing: list) -> str | None:
    """Why a scene is not complete: the failure's reason, or a partial scene's chip reasons."""
    if status == "failed":
        return manifest.get("reason")
    if status == "partial":
        reasons = sorted({c.get("reason") for c in missing if c.get("reason")})
        return "; ".join(reasons) or manifest.get("reason")
    return None


def scenes_table(scenes: dict[tuple[str, str], dict]) -> pa.Table:
    """The rows of the ``scenes`` view from :func:`pipeline.table.state.committed_scenes`."""
    from pipeline.table.state import scene_status

    rows = []
    for (job_name, scene_id), m in sorted(scenes.items()):
        status = scene_status(m)
        missing = m.get("missing_chips") or []
        try:
            committed_at = _committed_at(m.get("committed_at"))
        except (TypeError, ValueError):  # a damaged manifest: name it, no traceback
            raise QueryError(f"manifest {m.get('manifest')}: bad committed_at {m.get('committed_at')!r}") from None
        rows.append({
            "job_name": job_name, "scene_id": scene_id, "scene_path": m.get("scene_path"),
            "status": status, "rows": m.get("rows"), "missing_chips": len(missing),
            "reason": _scene_reason(m, status, missing), "run_id": m.get("run_id"),
            "model_id": m.get("model_id"), "committed_at": committed_at,
        })
    return pa.Table.from_pylist(rows, schema=SCENES_SCHEMA)


def spatial_extension() -> str:
    """The file of DuckDB's spatial extension shipped by the ``duckdb-extension-spatial``
    package for this DuckDB version (loaded from it: nothing is downloaded, nothing is
    written under ``~/.duckdb``)."""
    import importlib.resources

    import duckdb

    try:
        root = importlib.resources.files("duckdb_extension_spatial")
    except ModuleNotFoundError:
        raise QueryError("DuckDB's spatial functions need the package duckdb-extension-spatial "
                         f"(pip install 'duckdb-extension-spatial=={duckdb.__version__}')") from None
    path = root / "extensions" / f"v{duckdb.__version__}" / "spatial.duckdb_extension"
    if not path.is_file():
        found = sorted(p.name for p in (root / "extensions").iterdir()) if (root / "extensions").is_dir() else []
        raise QueryError(f"{path}: no spatial extension for DuckDB {duckdb.__version__} (the package ships "
                         f"{', '.join(found) or 'none'}); install duckdb-extension-spatial=={duckdb.__version__}")
    return str(path)


def connect() -> Any:
    """An in-memory DuckDB connection with the spatial functions (``ST_*``) loaded from the
    packaged file. Extension auto-install is off: a query never reaches the network."""
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    try:
        con.execute(f"LOAD {_sql_string(spatial_extension())}")
    except duckdb.Error as err:
        con.close()
        raise QueryError(f"DuckDB could not load its spatial extension: {err}") from None
    return con


def _geoarrow_field(name: str, crs: str | None) -> pa.Field:
    """A WKB column DuckDB reads as GEOMETRY (with the CRS, when known): GeoArrow's extension metadata."""
    from pipeline.geo.georef import crs_to_projjson

    meta = {"crs": crs_to_projjson(crs)} if crs is not None else {}
    return pa.field(name, pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb",
                                                 b"ARROW:extension:metadata": json.dumps(meta).encode()})


def read_aoi(path: os.PathLike | str, crs: str | None) -> pa.Table:
    """A user's polygons (any vector file GDAL reads: GeoJSON, GeoPackage, shapefile, ...) as
    the rows of the table ``aoi``: its attributes and ``geometry`` reprojected to ``crs``
    (the detection table's). InputError for a file that cannot be read, has no CRS, or a
    table without one (pixel coordinates)."""
    import pyogrio
    import shapely

    from pipeline.geo.georef import reproject_points
    from pipeline.io.objstore import local_file

    try:
        meta, table = pyogrio.read_arrow(local_file(str(path)))  # s3:// / gs:// (one-file formats): fetched once
    except InputError:
        raise
    except Exception as err:  # pyogrio's DataSourceError, GDAL errors: name the file
        raise InputError(f"{path}: cannot read the AOI file: {err}") from None
    if not meta.get("crs"):
        raise InputError(f"{path}: the AOI file has no CRS; set one (e.g. a .prj beside a shapefile, or "
                         "ogr2ogr -a_srs EPSG:4326) so its polygons can be placed on the table's")
    if crs is None:
        raise InputError(f"{path}: the table has no CRS (pixel coordinates, or nothing committed yet): "
                         "an AOI cannot be placed")
    geometry_name = meta.get("geometry_name") or "wkb_geometry"
    shapes = shapely.from_wkb(table[geometry_name].to_numpy(zero_copy_only=False))
    moved = shapely.transform(shapes, lambda xy: reproject_points(xy, meta["crs"], crs))
    attributes = table.drop_columns([geometry_name])
    if "geometry" in attributes.column_names:  # an attribute of that name would hide the shapes
        attributes = attributes.rename_columns(["geometry_attribute" if n == "geometry" else n
                                                for n in attributes.column_names])
    return attributes.append_column(_geoarrow_field("geometry", crs), pa.array(shapely.to_wkb(moved), pa.binary()))


def _committed_dataset(store: Any, parts: list, schema: pa.Schema) -> Any:
    """A pyarrow dataset over exactly these object-store files (each file's date from its
    partition), read with ranged requests: DuckDB pushes projections and filters into it."""
    import pyarrow.dataset as ds

    from pipeline.io.objstore import arrow_filesystem

    filesystem, base = arrow_filesystem(store.url)
    return ds.FileSystemDataset.from_paths(
        [f"{base}/{p.key}" for p in parts], schema=schema, format=ds.ParquetFileFormat(), filesystem=filesystem,
        partitions=[ds.field("date") == pa.scalar(dt.date.fromisoformat(p.day), pa.date32()) for p in parts])


def _not_hidden(hidden: tuple[tuple[str, str], ...]) -> str:
    """A WHERE clause leaving out the rows of these (job_name, scene_id) pairs."""
    if not hidden:
        return ""
    pairs = " OR ".join(f"(job_name = {_sql_string(j)} AND scene_id = {_sql_string(s)})" for j, s in hidden)
    return f" WHERE NOT ({pairs})"


def _detections_view(con: Any, store: Any, visible: list, crs: str | None) -> None:
    """``CREATE VIEW detections`` over the visible parts: local files through DuckDB's own
    Parquet reader, object-store files through a pyarrow dataset each (no file is loaded
    whole). Rows of a compacted file that a later commit superseded (a commit not settled
    yet) are left out by scene."""
    from pipeline.table.schema import detection_schema

    names = [n for n in detection_schema().names if n != "date"]
    groups: dict[tuple, list] = {}
    for part in visible:
        groups.setdefault(part.hidden, []).append(part)
    selects = []
    for i, (hidden, group) in enumerate(sorted(groups.items())):
        if isinstance(store, LocalStore):
            dates = pa.table({"filename": [str(store.path(p.key)) for p in group],
                              "date": pa.array([dt.date.fromisoformat(p.day) for p in group], pa.date32())})
            con.register(f"{FILES_VIEW}_{i}", dates)
            listed = "[" + ", ".join(_sql_string(f) for f in dates["filename"].to_pylist()) + "]"
            # Columns named, not d.*: files of tables written before the date left the files
            # still hold one, and it must not appear twice.
            columns = ", ".join(f"d.{name}" for name in names)
            # Files written before a column was added lack it: columns matched by name, and an
            # empty row set of the added columns types them where no file has them yet.
            source = (f"(SELECT * FROM read_parquet({listed}, hive_partitioning = false, filename = true, "
                      f"union_by_name = true) UNION ALL BY NAME {ADDED_COLUMNS_SQL})")
            selects.append(f"SELECT {columns}, f.date FROM {source} d "
                           f"JOIN {FILES_VIEW}_{i} f USING (filename){_not_hidden(hidden)}")
        else:
            schema = detection_schema()
            schema = schema.set(schema.get_field_index("date"), pa.field("date", pa.date32()))
            con.register(f"_parts_{i}", _committed_dataset(store, group, schema))
            # The WKB is made GEOMETRY above the scan, not in it: DuckDB would push a spatial
            # join's filter on a GEOMETRY column into the pyarrow scan, which cannot take it.
            columns = ", ".join(f"CAST(ST_GeomFromWKB({n}) AS {_geometry_sql_type(con, crs)}) AS {n}"
                                if n == "geometry" else n for n in names)
            selects.append(f"SELECT {columns}, date FROM _parts_{i}{_not_hidden(hidden)}")
    con.execute(f"CREATE VIEW {VIEW} AS " + " UNION ALL ".join(selects))


def _geometry_sql_type(con: Any, crs: str | None) -> str:
    """DuckDB's GEOMETRY type with this CRS, as DuckDB itself names it from GeoArrow metadata
    (so an object-store table's view has the type a local table's has)."""
    probe = pa.table([pa.array([], pa.binary())], schema=pa.schema([_geoarrow_field("geometry", crs)]))
    return str(con.from_arrow(probe).types[0])


@contextlib.contextmanager
def open_detections(table_root: os.PathLike | str, aoi: os.PathLike | str | None = None) -> Iterator[Any]:
    """An in-memory DuckDB connection (spatial functions loaded) with the views
    ``detections`` (committed rows only) and ``scenes`` (one row per current scene
    manifest), and with ``aoi`` the table ``aoi`` (:func:`read_aoi`).

    For a table without committed files, an empty Parquet file with the table's schema
    and ``geo`` metadata is written to a temporary directory for the life of the
    connection, so the view has the right columns and types.
    """
    from pipeline.table.state import committed_scenes, read_committed, require_table, table_crs, visible_parts

    store = require_table(table_root)
    root = str(table_root)
    scenes = scenes_table(committed_scenes(root))
    visible = visible_parts(root)
    crs = table_crs(root)
    aoi_rows = read_aoi(aoi, crs) if aoi is not None else None
    con = connect()
    try:
        # A registered Arrow table reads as a view and keeps its schema with no rows.
        con.register(SCENES_VIEW, scenes)
        if aoi_rows is not None:  # a DuckDB table, not an Arrow scan: a spatial join may push filters into it
            con.from_arrow(aoi_rows).create(AOI_VIEW)
        with tempfile.TemporaryDirectory(prefix="pipeline-query-") as tmp:
            if visible:
                _detections_view(con, store, visible, crs)
            else:
                placeholder = os.path.join(tmp, "empty.parquet")
                pq.write_table(read_committed(root), placeholder)
                con.execute(empty_view_sql(placeholder))
            yield con
    finally:
        con.close()


def run_query(table_root: os.PathLike | str, sql: str, aoi: os.PathLike | str | None = None) -> pa.Table:
    """Run ``sql`` against the views ``detections`` and ``scenes`` (and ``aoi``, given an
    AOI file); return the result.

    Statements that return nothing give an empty table. Raises QueryError naming the
    table for SQL DuckDB rejects, InputError for a missing table or unusable AOI file.
    """
    import duckdb

    if not sql.strip():
        raise QueryError("the SQL text is empty")
    with open_detections(table_root, aoi) as con:
        try:
            relation = con.sql(sql)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        except duckdb.Error as err:
            raise QueryError(f"{table_root}: query failed: {err}") from None


# ---------------------------------------------------------------- output


def _plain_float(value: float, arrow_type: pa.DataType) -> float:
    """float32 values as their shortest decimal (0.9, not 0.8999999761581421)."""
    if pa.types.is_float32(arrow_type):
        return float(str(np.float32(value)))
    return float(value)


def _plain_bytes(value: bytes) -> str:
    """Binary cells as WKT when they are WKB geometries, else as hex."""
    import shapely

    try:
        return shapely.from_wkb(value).wkt
    except Exception:  # not WKB: any binary column is shown losslessly as hex
        return value.hex()


def plain_value(value: Any, arrow_type: pa.DataType) -> Any:
    """One cell -> a JSON-compatible Python value (None, bool, int, float, str, dict, list)."""
    if value is None:
        return None
    if pa.types.is_struct(arrow_type):
        return {arrow_type.field(i).name: plain_value(value[arrow_type.field(i).name], arrow_type.field(i).type)
                for i in range(arrow_type.num_fields)}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return [plain_value(v, arrow_type.value_type) for v in value]
    if isinstance(arrow_type, pa.ExtensionType):
        return plain_value(value, arrow_type.storage_type)
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _plain_float(value, arrow_type)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _plain_bytes(bytes(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def plain_rows(result: pa.Table) -> list[dict[str, Any]]:
    """The result as a list of row dicts of plain values (see :func:`plain_value`)."""
    types = {f.name: f.type for f in result.schema}
    return [{k: plain_value(v, types[k]) for k, v in row.items()} for row in result.to_pylist()]


def _cell_text(value: Any) -> str:
    """Text of one plain value for CSV and the aligned table."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _numeric(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type)


def _clip(text: str, width: int = MAX_CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(result: pa.Table) -> str:
    """An aligned text table: header, rule, rows (numbers right-aligned), row count."""
    names = result.column_names
    rows = [[_clip(_cell_text(r[n])) for n in names] for r in plain_rows(result)]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    right = [_numeric(result.schema.field(n).type) for n in names]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(list(names)), "  ".join("-" * w for w in widths)] if names else []
    out += [line(r) for r in rows]
    out.append(f"({result.num_rows} row{'s' if result.num_rows != 1 else ''})")
    return "\n".join(out)


def format_csv(result: pa.Table) -> str:
    """CSV with a header; nested values as JSON text, NULL as an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(result.column_names)
    for row in plain_rows(result):
        writer.writerow([_cell_text(v) for v in row.values()])
    return buf.getvalue().rstrip("\n")


def format_json(result: pa.Table) -> str:
    """A JSON array of row objects (keys in column order)."""
    return json.dumps(plain_rows(result), indent=2, allow_nan=True)


def format_result(result: pa.Table, fmt: Format = "table") -> str:
    """Render a query result as ``table``, ``csv`` or ``json`` text."""
    if fmt == "table":
        return format_table(result)
    if fmt == "csv":
        return format_csv(result)
    if fmt == "json":
        return format_json(result)
    raise QueryError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def query_text(table_root: os.PathLike | str, sql: str, fmt: Format = "table",
               aoi: os.PathLike | str | None = None) -> str:
    """Run ``sql`` on the table's views and render the result (the CLI's work)."""
    return format_result(run_query(table_root, sql, aoi), fmt)


# ---------------------------------------------------------------- result files

# --out suffix -> GDAL driver (None: GeoParquet, written with pyarrow: this GDAL may lack the Parquet driver).
OUT_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON", ".parquet": None, ".csv": "CSV"}
OUT_SUFFIXES = tuple(OUT_DRIVERS)
GEOARROW_WKB = b"geoarrow.wkb"
# shapely's geometry type ids -> the names GDAL and GeoParquet use
OGC_TYPES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString", 6: "MultiPolygon",
             7: "GeometryCollection"}


def check_out_path(path: os.PathLike | str) -> str:
    """The GDAL driver of an ``--out`` file from its suffix ('' for GeoParquet); QueryError
    naming the suffixes we write for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUT_DRIVERS:
        raise QueryError(f"{path}: cannot write {suffix or 'a file without a suffix'}; "
                         f"--out writes {', '.join(OUT_SUFFIXES)}")
    return OUT_DRIVERS[suffix] or ""


def _geometry_columns(result: pa.Table) -> list[str]:
    """Columns DuckDB handed over as GEOMETRY (WKB with GeoArrow's extension name)."""
    return [f.name for f in result.schema if (f.metadata or {}).get(b"ARROW:extension:name") == GEOARROW_WKB]


def _column_crs(field: pa.Field, fallback: str | None) -> dict | None:
    """The CRS DuckDB's GEOMETRY type carries, else ``fallback`` (the table's), as PROJJSON; None if neither."""
    from pipeline.geo.georef import crs_to_projjson

    crs = json.loads((field.metadata or {}).get(b"ARROW:extension:metadata") or b"{}").get("crs") or fallback
    return crs if crs is None or isinstance(crs, dict) else crs_to_projjson(str(crs))


def _geometry_type(shapes: np.ndarray) -> str:
    """One OGC type name for the layer ('Unknown' for a mix or none)."""
    import shapely

    kinds = {shapely.get_type_id(g) for g in shapes if g is not None}
    return OGC_TYPES.get(kinds.pop(), "Unknown") if len(kinds) == 1 else "Unknown"


def _write_geoparquet(result: pa.Table, tmp: Path, geometry: str | None, crs: dict | None, kind: str) -> None:
    """GeoParquet 1.1: the WKB column plus the ``geo`` metadata naming its CRS and type."""
    meta = dict(result.schema.metadata or {})
    if geometry is not None:
        column = {"encoding": "WKB", "geometry_types": [] if kind == "Unknown" else [kind], "crs": crs}
        meta[b"geo"] = json.dumps({"version": "1.1.0", "primary_column": geometry,
                                   "columns": {geometry: column}}).encode()
        plain = [pa.field(f.name, f.type) if f.name == geometry else f for f in result.schema]
        result = result.cast(pa.schema(plain))  # GeoParquet's metadata speaks for the column
    pq.write_table(result.replace_schema_metadata(meta), tmp, compression="zstd")


def write_result(result: pa.Table, path: os.PathLike | str, crs: str | None) -> int:
    """Write a query result to ``path`` (format from the suffix, :data:`OUT_SUFFIXES`) with
    its geometry and CRS (the GEOMETRY column's own, else ``crs``: the table's). Written
    under a temporary name and renamed, so a failed write leaves no half file. Returns
    the rows written. A CSV holds the geometry as WKT (the format has no place for a CRS)."""
    import pyogrio
    import shapely

    from retinanet.files import write_atomically

    driver = check_out_path(path)
    geometries = _geometry_columns(result)
    if len(geometries) > 1:
        raise QueryError(f"{path}: the result has {len(geometries)} geometry columns ({', '.join(geometries)}); "
                         "a file keeps one: select one, or turn the others into text with ST_AsText")
    if driver == "FlatGeobuf" and not geometries:
        raise QueryError(f"{path}: a FlatGeobuf file needs a geometry column; select one, or write .csv/.gpkg")
    geometry = geometries[0] if geometries else None
    crs_json = _column_crs(result.schema.field(geometry), crs) if geometry else None
    shapes = shapely.from_wkb(result[geometry].to_numpy(zero_copy_only=False)) if geometry else np.array([])
    kind = _geometry_type(shapes)
    options: dict[str, str] = {}
    if driver == "CSV" and geometry is not None:
        options = {"GEOMETRY": "AS_WKT", "GEOMETRY_NAME": geometry}
    if driver == "FlatGeobuf" and shapely.is_missing(shapes).any():
        options = {"SPATIAL_INDEX": "NO"}  # FlatGeobuf's index cannot hold rows without geometry

    def write(tmp: Path) -> None:
        if not driver:
            _write_geoparquet(result, tmp, geometry, crs_json, kind)
            return
        pyogrio.write_arrow(result, tmp, driver=driver, layer=Path(path).stem, geometry_name=geometry,
                            geometry_type=kind if geometry else None,
                            crs=json.dumps(crs_json) if crs_json else None,  # GDAL takes PROJJSON text
                            layer_options=options or None)

    try:
        write_atomically(path, write)
    except QueryError:
        raise
    except Exception as err:  # GDAL/pyarrow: name the file and the cause
        raise QueryError(f"{path}: cannot write the result: {err}") from None
    return result.num_rows


def query_to_file(table_root: os.PathLike | str, sql: str, path: os.PathLike | str,
                  aoi: os.PathLike | str | None = None) -> int:
    """Run ``sql`` and write the result to ``path`` (:func:`write_result`); the suffix is
    checked before anything runs. Returns the rows written."""
    from pipeline.table.state import table_crs

    check_out_path(path)
    result = run_query(table_root, sql, aoi)
    return write_result(result, path, table_crs(str(table_root)))  # run_query checked the table


def table_columns(table_root: os.PathLike | str, view: str = VIEW) -> list[tuple[str, str]]:
    """(name, DuckDB type) of every column of a view (``detections`` or ``scenes``)."""
    with open_detections(table_root) as con:
        return [(row[0], row[1]) for row in con.sql(f"DESCRIBE {view}").fetchall()]

