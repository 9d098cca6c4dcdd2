"""The table's log: commits are ordered by the store (a sequence claimed by an exclusive
create), not by clocks; a writer crashed between any two steps is finished by a rerun.
Locally and on S3 (moto), every reader (ours, DuckDB, pyarrow, GeoPandas) agrees."""
from __future__ import annotations

import time
import uuid

import pytest
from readers import COLUMNS, _rows, duckdb_rows, geopandas_rows, pyarrow_rows
from test_table import rows, run_info

from pipeline.table import commit as table_commit
from pipeline.table import state as table_state
from pipeline.table.store import LocalStore, ObjectStore, open_store

BUCKET = "table-log"
HOUR_NS = 3600 * 10**9


@pytest.fixture(params=["local", "s3"])
def table_root(request, tmp_path) -> str:
    """A fresh table root: a folder, or a prefix of a moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "table")
    client = request.getfixturevalue("s3_server")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def plain_rows(root: str) -> dict[str, list[tuple]]:
    """The rows each plain reader finds listing the table (no help from the pipeline)."""
    if not root.startswith("s3://"):
        return {"duckdb": duckdb_rows(root), "pyarrow": pyarrow_rows(root), "geopandas": geopandas_rows(root)}
    import duckdb
    import geopandas
    import pyarrow.dataset as ds

    from pipeline.io.objstore import arrow_filesystem

    filesystem, base = arrow_filesystem(root)
    dataset = ds.dataset(base, format="parquet", partitioning="hive", filesystem=filesystem)
    # No httpfs extension here (no downloads): DuckDB scans the S3 dataset pyarrow lists.
    rel = duckdb.sql(f"SELECT {', '.join(COLUMNS)}, date FROM dataset")
    found = rel.fetchall()
    frame = geopandas.read_parquet(base, filesystem=filesystem)
    return {
        "duckdb": _rows(dict(zip(rel.columns, zip(*found)))) if found else [],
        "pyarrow": _rows(dataset.to_table(columns=COLUMNS + ["date"]).to_pydict()),
        "geopandas": _rows({c: frame[c].tolist() for c in COLUMNS + ["date"]}),
    }


def our_rows(root: str) -> list[tuple]:
    return _rows(table_state.read_committed(root, columns=COLUMNS + ["date"]).to_pydict())


def every_reader(root: str) -> list[tuple]:
    """The rows every reader returns, checked equal; returns them."""
    ours = our_rows(root)
    for reader, found in plain_rows(root).items():
        assert found == ours, (reader, len(found), len(ours))
    return ours


def before_first_publish(monkeypatch, action) -> None:
    """Run ``action`` once, just before the next exclusive create of a manifest: a writer
    that already looked at the table (and chose its place in the order) is overtaken."""
    pending = [action]
    for cls in (LocalStore, ObjectStore):
        def create(self, key, data, original=cls.create):
            if key.startswith("_manifests/") and pending:
                pending.pop()()
            return original(self, key, data)
        monkeypatch.setattr(cls, "create", create)


def test_a_later_commit_wins_with_its_clock_an_hour_behind(table_root, monkeypatch):
    first = run_info(run_id="r0")
    table_commit.commit_scene(table_root, first, "a", "k0", rows(first, "a", 5, seed=0))
    # Writer 1's clock is an hour behind; writer 2's is right.
    behind = {"now": True}
    real_ns, real_s = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - HOUR_NS * behind["now"])
    monkeypatch.setattr(time, "time", lambda: real_s() - 3600.0 * behind["now"])
    second = run_info(run_id="w2")

    def writer_2_commits() -> None:
        behind["now"] = False
        try:
            table_commit.commit_scene(table_root, second, "a", "k2", rows(second, "a", 7, seed=2))
        finally:
            behind["now"] = True

    before_first_publish(monkeypatch, writer_2_commits)
    late = run_info(run_id="w1")
    table_commit.commit_scene(table_root, late, "a", "k1", rows(late, "a", 3, seed=1))
    monkeypatch.undo()
    # Writer 1 published last: its rows are the scene's, for every reader.
    assert table_state.committed_scenes(table_root)[("sat", "a")]["run_id"] == "w1"
    assert set(table_state.read_committed(table_root, columns=["run_id"])["run_id"].to_pylist()) == {"w1"}
    assert len(every_reader(table_root)) == 3
    assert len([k for k in open_store(table_root).keys() if k.startswith("date=")]) == 1
