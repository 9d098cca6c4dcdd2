"""The detection table as every reader a user has sees it: the rows each returns.

Each function reads the table folder the way its tool's documentation says, with no
help from the pipeline, and returns sorted (job_name, scene_id, label, px_xmin, px_ymin,
score) tuples (box and score rounded to 3 decimals) plus the date partition.
"""
from __future__ import annotations

from pathlib import Path

COLUMNS = ["job_name", "scene_id", "label", "px_xmin", "px_ymin", "score"]


def _rows(columns: dict) -> list[tuple]:
    dates = [str(d) for d in columns["date"]]
    values = [columns[c] for c in COLUMNS]
    return sorted(zip(*values[:3], *([round(float(v), 3) for v in col] for col in values[3:]), dates))


def duckdb_rows(table: Path) -> list[tuple]:
    import duckdb

    rel = duckdb.sql(f"SELECT {', '.join(COLUMNS)}, date "
                     f"FROM read_parquet('{table}/**/*.parquet', hive_partitioning = true)")
    found = rel.fetchall()
    return _rows(dict(zip(rel.columns, zip(*found)))) if found else []


def pyarrow_rows(table: Path) -> list[tuple]:
    import pyarrow.dataset as ds

    return _rows(ds.dataset(str(table), format="parquet", partitioning="hive").to_table(
        columns=COLUMNS + ["date"]).to_pydict())


def geopandas_rows(table: Path) -> list[tuple]:
    import geopandas

    frame = geopandas.read_parquet(str(table))
    assert frame.geometry.is_valid.all() or frame.geometry.isna().any()
    return _rows({c: frame[c].tolist() for c in COLUMNS + ["date"]})


def polars_rows(table: Path) -> list[tuple]:
    import polars as pl

    frame = pl.scan_parquet(f"{table}/**/*.parquet", hive_partitioning=True).select(COLUMNS + ["date"]).collect()
    return _rows(frame.to_dict(as_series=False))


def pipeline_rows(table: Path) -> list[tuple]:
    from pipeline.query import run_query

    return _rows(run_query(table, f"SELECT {', '.join(COLUMNS)}, date FROM detections").to_pydict())


def assert_every_reader_agrees(table: Path) -> list[tuple]:
    """Every reader returns exactly `pipeline query`'s rows; returns them."""
    expected = pipeline_rows(table)
    for reader in (duckdb_rows, pyarrow_rows, geopandas_rows, polars_rows):
        got = reader(table)
        assert got == expected, (reader.__name__, len(got), len(expected))
    return expected
