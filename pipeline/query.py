"""`pipeline query`: SQL over the committed rows of a detection table, with DuckDB.

The rows are the view ``detections``, defined over exactly
:func:`pipeline.table.transactions.committed_parts`: the files of the current manifests (read from
``_staging`` where a crash interrupted a published commit before its move); files of
runs that crashed before publishing and of superseded manifests are not part of it.
``date`` is each file's partition, a DATE (the files hold no date column). A table in an
object store is read into memory through the store's client;
``geometry`` is the WKB box (DuckDB 1.4+ reads it as GEOMETRY from the GeoParquet
metadata); ``bbox`` is the GeoParquet covering struct, so ``bbox.xmin`` ... filter
boxes without any spatial extension. An empty table gives an empty view with the same
columns and types.

The view ``scenes`` has one row per current scene manifest
(:func:`pipeline.table.transactions.committed_scenes`), so SQL can count scene outcomes or join them
to ``detections`` on ``(job_name, scene_id)``: job_name, scene_id, scene_path,
``status`` ('complete', 'partial' or 'failed'; manifests of older versions have no
status and count as 'complete'), ``rows``, ``missing_chips`` (how many chips of the
scene were never predicted), ``reason`` (why a failed scene failed; for a partial scene
the distinct reasons of its missing chips joined with '; '; NULL for complete scenes),
run_id, model_id and ``committed_at`` (TIMESTAMPTZ). Failed scenes have no rows, so
they appear only here. A table without manifests gives an empty view of these columns.

Output (:func:`format_result`): an aligned text table for people, CSV or JSON (an
array of row objects) for programs.
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
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, PipelineError
from pipeline.table.store import LocalStore, open_store

VIEW = "detections"
SCENES_VIEW = "scenes"
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


def _check_table_root(table_root: os.PathLike | str) -> str:
    """A table root must exist: a typo must not read as 'no rows'. An object-store table
    must hold its ``_table.json``."""
    from pipeline.table.transactions import TABLE_INFO

    store = open_store(table_root)
    if isinstance(store, LocalStore) and not store.exists():
        raise InputError(f"{table_root}: no detection table here (directory not found)")
    if not isinstance(store, LocalStore) and store.stat(TABLE_INFO) is None:
        raise InputError(f"{table_root}: no detection table here ({TABLE_INFO} not found)")
    return str(table_root)


def _sql_string(text: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


FILES_VIEW = "_committed_files"


def view_sql(files: list[str], dated: bool = True) -> str:
    """``CREATE VIEW detections`` over these Parquet files.

    dated=True: each file's ``date`` (a DATE) comes from the relation ``_committed_files``
    (filename, date), registered beside it: the files hold no date column, and the
    staged files of an interrupted commit are not under their ``date=`` folder yet.
    dated=False (the empty placeholder file): the file's own ``date`` column, cast to
    DATE so the view has the same types either way.
    """
    listed = "[" + ", ".join(_sql_string(f) for f in files) + "]"
    if dated:
        source = f"read_parquet({listed}, hive_partitioning = false, filename = true)"
        from pipeline.table.schema import detection_schema

        # Columns named, not d.*: files of tables written before the date left the files
        # still hold one, and it must not appear twice.
        columns = ", ".join(f"d.{name}" for name in detection_schema().names if name != "date")
        return (f"CREATE VIEW {VIEW} AS SELECT {columns}, f.date FROM {source} d "
                f"JOIN {FILES_VIEW} f USING (filename)")
    source = f"read_parquet({listed}, hive_partitioning = false)"
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
    """The rows of the ``scenes`` view from :func:`pipeline.table.transactions.committed_scenes`."""
    from pipeline.table.transactions import scene_status

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


@contextlib.contextmanager
def open_detections(table_root: os.PathLike | str) -> Iterator[Any]:
    """An in-memory DuckDB connection with the views ``detections`` (committed rows
    only) and ``scenes`` (one row per current scene manifest).

    For a table without committed files, an empty Parquet file with the table's schema
    and ``geo`` metadata is written to a temporary directory for the life of the
    connection, so the view has the right columns and types.
    """
    import duckdb

    from pipeline.table.transactions import committed_scenes, part_location, read_committed, visible_parts

    root = _check_table_root(table_root)
    scenes = scenes_table(committed_scenes(root))
    store = open_store(root)
    visible = visible_parts(root)
    parts = [(part_location(store, p.key), p.day) for p in visible]
    con = duckdb.connect(":memory:")
    try:
        # A registered Arrow table reads as a view and keeps its schema with no rows.
        con.register(SCENES_VIEW, scenes)
        with tempfile.TemporaryDirectory(prefix="pipeline-query-") as tmp:
            if parts and ("://" in parts[0][0] or any(p.hidden for p in visible)):
                # An object-store table: read through the store's client (DuckDB's own S3
                # reader would need its httpfs extension and a second set of credentials).
                # A compacted file with superseded rows (a commit not settled yet): filtered.
                con.register("_committed_rows", read_committed(root))
                con.execute(f"CREATE VIEW {VIEW} AS SELECT * REPLACE (CAST(date AS DATE) AS date) FROM _committed_rows")
            elif parts:
                dates = pa.table({"filename": [p for p, _ in parts],
                                  "date": pa.array([dt.date.fromisoformat(d) for _, d in parts], pa.date32())})
                con.register(FILES_VIEW, dates)
                con.execute(view_sql([p for p, _ in parts]))
            else:
                placeholder = os.path.join(tmp, "empty.parquet")
                pq.write_table(read_committed(root), placeholder)
                con.execute(view_sql([placeholder], dated=False))
            yield con
    finally:
        con.close()


def run_query(table_root: os.PathLike | str, sql: str) -> pa.Table:
    """Run ``sql`` against the views ``detections`` and ``scenes``; return the result.

    Statements that return nothing give an empty table. Raises QueryError naming the
    table for SQL DuckDB rejects, InputError for a missing table.
    """
    import duckdb

    if not sql.strip():
        raise QueryError("the SQL text is empty")
    with open_detections(table_root) as con:
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


def query_text(table_root: os.PathLike | str, sql: str, fmt: Format = "table") -> str:
    """Run ``sql`` on the table's views and render the result (the CLI's work)."""
    return format_result(run_query(table_root, sql), fmt)


def table_columns(table_root: os.PathLike | str, view: str = VIEW) -> list[tuple[str, str]]:
    """(name, DuckDB type) of every column of a view (``detections`` or ``scenes``)."""
    with open_detections(table_root) as con:
        return [(row[0], row[1]) for row in con.sql(f"DESCRIBE {view}").fetchall()]

