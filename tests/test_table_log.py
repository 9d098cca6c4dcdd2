"""The table's log: commits are ordered by the store (a sequence claimed by an exclusive
create), not by clocks; a writer crashed between any two steps is finished by a rerun.
Locally and on S3 (moto), every reader (ours, DuckDB, pyarrow, GeoPandas) agrees."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest
from readers import COLUMNS, _rows, duckdb_rows, geopandas_rows, pyarrow_rows
from test_table import rows, run_info

from pipeline.table import commit as table_commit
from pipeline.table import maintenance as table_maintenance
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

    overtaking = []

    def writer_2_commits() -> None:
        behind["now"] = False
        try:
            overtaking.append(table_commit.commit_scene(table_root, second, "a", "k2", rows(second, "a", 7, seed=2)))
        finally:
            behind["now"] = True

    before_first_publish(monkeypatch, writer_2_commits)
    late = run_info(run_id="w1")
    table_commit.commit_scene(table_root, late, "a", "k1", rows(late, "a", 3, seed=1))
    monkeypatch.undo()
    # Writer 1 published last: its rows are the scene's, for every reader.
    current = table_state.committed_scenes(table_root)[("sat", "a")]
    assert current["run_id"] == "w1" and current["sequence"] == overtaking[0]["sequence"] + 1  # its claim was retried
    assert set(table_state.read_committed(table_root, columns=["run_id"])["run_id"].to_pylist()) == {"w1"}
    assert len(every_reader(table_root)) == 3
    assert len([k for k in open_store(table_root).keys() if k.startswith("date=")]) == 1


def test_a_table_in_the_layout_before_the_log_keeps_working(table_root):
    """Tables written before the log: manifests named ``<commit time ns>-<run>-<tag>-<uuid>.json``
    (and, older still, without the tag), sequences in the 1.7e18s. The next commit's sequence
    is above all of them, so it supersedes; every reader agrees."""
    store = open_store(table_root)
    run = run_info(run_id="old")
    for scene, n in (("a", 6), ("b", 4)):
        table_commit.commit_scene(table_root, run, scene, "k", rows(run, scene, n, seed=n))
    base = 1_733_000_000_000_000_000  # a commit time in ns, as the clock-ordered code wrote
    for i, key in enumerate(sorted(k for k in store.keys(table_state.MANIFESTS) if k.endswith(".json"))):
        manifest = json.loads(store.read(key))
        manifest["sequence"] = base + i
        tag = f"-s{uuid.uuid4().hex[:10]}" if i == 0 else ""  # the second as written before tags existed
        store.write(f"{table_state.MANIFESTS}/{base + i:020d}-old{tag}-{uuid.uuid4().hex[:12]}.json",
                    json.dumps(manifest).encode())
        store.delete(key)
    forget_process_state()
    sequences = {k[1]: m["sequence"] for k, m in table_state.committed_scenes(table_root).items()}
    assert sequences == {"a": base, "b": base + 1}
    assert len(every_reader(table_root)) == 10
    again = run_info(run_id="new")
    table_commit.commit_scene(table_root, again, "a", "k2", rows(again, "a", 3, seed=9))
    current = table_state.committed_scenes(table_root)
    assert current[("sat", "a")]["sequence"] == base + 2
    assert current[("sat", "a")]["manifest"] == f"{base + 2:020d}.json"
    assert len(every_reader(table_root)) == 7
    assert len([k for k in store.keys() if k.startswith("date=")]) == 2  # a's old file settled away


def test_sequences_stay_above_what_snapshots_folded_and_let_go(table_root, monkeypatch):
    """Once a snapshot folded the log and its manifests were removed, the next claim is
    still above them: the snapshot records the highest sequence it folded."""
    monkeypatch.setattr(table_commit, "SNAPSHOT_EVERY", 1)
    run = run_info()
    for scene in "abc":
        table_commit.commit_scene(table_root, run, scene, "k", rows(run, scene, 2, seed=1))
    table_maintenance.vacuum(table_root, grace_s=0)  # folds the last one and lets every manifest go
    store = open_store(table_root)
    assert [k for k in store.keys(table_state.MANIFESTS) if k.endswith(".json")] == []
    again = run_info(run_id="r2")
    table_commit.commit_scene(table_root, again, "a", "k2", rows(again, "a", 1, seed=2))
    sequences = {k[1]: m["sequence"] for k, m in table_state.committed_scenes(table_root).items()}
    assert sequences == {"a": 4, "b": 2, "c": 3}
    assert len(every_reader(table_root)) == 1 + 2 + 2


# ---------------------------------------------------------------- a crash between any two steps


class Crash(BaseException):
    """The writer's process dies here (BaseException: no handler of ours may catch it)."""


MUTATING = ("write", "create", "move", "delete", "delete_prefix")
OTHERS = ("read", "stat", "list", "keys")


def copy_then_delete(store: ObjectStore, src: str, dst: str) -> None:
    """An object store's move in its two requests (what obstore's rename does on S3), so a
    writer can die between them: the copy made, the staged object still there."""
    import obstore

    with store._request(src):
        obstore.copy(store.store, store._key(src), store._key(dst))
    store.delete(src)  # a step of its own


def die_at(monkeypatch, step: Optional[int], steps: list) -> None:
    """Count the writer's store calls that change the table (``steps`` gets (call, key) of
    each; an object store's move is two: the copy, then the delete); at call number
    ``step`` the writer dies: that call and every later store call of this process raise
    Crash, as if it had been killed (no cleanup of its own reaches the store)."""
    dead = [False]
    for cls in (LocalStore, ObjectStore):
        for method in MUTATING + OTHERS:
            original = copy_then_delete if (cls, method) == (ObjectStore, "move") else getattr(cls, method)

            def call(self, *args, _original=original, _method=method, **kwargs):
                if not dead[0] and _method in MUTATING:
                    if len(steps) == step:
                        dead[0] = True
                    steps.append((_method, args[0] if args else ""))
                if dead[0]:
                    raise Crash(f"killed before {_method} {args[0] if args else ''}")
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(cls, method, call)


def forget_process_state() -> None:
    """A new process: nothing parsed before is remembered."""
    table_state._parsed_manifests.clear()
    table_state._parsed_snapshot.clear()
    table_state._parsed_generations.clear()


DAY, OTHER_DAY = "2024-05-01", "2024-05-02"


def night_one(root: str) -> None:
    """Scenes a and b of one day compacted into one file, c of another day on its own."""
    run = run_info(run_id="r1")
    for scene, n, day in (("a", 8, DAY), ("b", 6, DAY), ("c", 5, OTHER_DAY)):
        table_commit.commit_scene(root, run, scene, "k1", rows(run, scene, n, seed=n, date=day))
    table_maintenance.compact(root)


RERUN = run_info(run_id="r2")


def commit_again(root: str) -> None:
    """The commit that crashes: scene a again, its old rows inside the compacted file."""
    table_commit.commit_scene(root, RERUN, "a", "k2", rows(RERUN, "a", 3, seed=42, date=DAY))


def rerun(root: str) -> None:
    """What `pipeline run` does next: recover, then commit the scene unless it is done."""
    table_maintenance.recover(root)
    entry = table_state.committed_scenes(root).get(("sat", "a"))
    if not table_state.is_current(entry, "k2", RERUN.model_id, RERUN.job_hash):
        commit_again(root)


def fresh_root(root: str, case: str) -> str:
    return f"{root}-{case}" if root.startswith("s3://") else str(Path(root) / case)


# S3's run is the slowest test without Ray (13 crash points on moto): make test runs it, the fast tier
# keeps the local one.
@pytest.mark.parametrize("table_root", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_a_writer_crashed_between_any_two_steps_is_finished_by_a_rerun(table_root, monkeypatch):
    # Every step of the protocol on the way: a snapshot after each commit, folded manifests
    # removed at once, and the compacted partition rewritten without the scene's old rows.
    monkeypatch.setattr(table_commit, "SNAPSHOT_EVERY", 1)
    monkeypatch.setattr(table_state, "SNAPSHOT_GRACE_S", 0.0)
    clean = fresh_root(table_root, "clean")
    night_one(clean)
    steps: list = []
    with monkeypatch.context() as patch:
        die_at(patch, None, steps)
        commit_again(clean)
    expected = every_reader(clean)
    assert len(expected) == 3 + 6 + 5
    assert {call for call, _ in steps} >= {"write", "create", "move", "delete"}
    assert any(key.startswith("_compactions/") for _, key in steps) and any(
        key.startswith("_snapshots/") for _, key in steps)
    for step, (call, key) in enumerate(steps):
        root = fresh_root(table_root, f"crash-{step}")
        night_one(root)
        with monkeypatch.context() as patch:
            die_at(patch, step, [])
            with pytest.raises(Crash):
                commit_again(root)
        forget_process_state()
        rerun(root)
        assert every_reader(root) == expected, f"crashed before step {step}: {call} {key}"
        assert table_state.committed_scenes(root)[("sat", "a")]["scene_key"] == "k2"
