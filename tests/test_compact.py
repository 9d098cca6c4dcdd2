"""`pipeline compact`: a partition's small files become few large ones in one atomic commit,
and every reader (DuckDB, pyarrow, GeoPandas, Polars, `pipeline query`) keeps returning the
same rows, through reruns of compacted scenes, crashes and concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from readers import assert_every_reader_agrees, duckdb_rows, pipeline_rows
from test_table import _writer, rows, run_info

from pipeline.cli import main
from pipeline.errors import CommitError
from pipeline.table import commit as table_commit
from pipeline.table.commit import commit_scene
from pipeline.table.maintenance import compact, recover
from pipeline.table.state import COMPACTIONS, STAGING, TABLE_INFO, committed_scenes, read_committed

DAY, NEXT_DAY = "2024-05-01", "2024-05-02"


def nightly_table(root, scenes: str = "abcdef") -> None:
    run = run_info()
    for i, scene in enumerate(scenes):
        commit_scene(root, run, scene, f"k{i}", rows(run, scene, 5 + i, seed=i, date=DAY))
    for i, scene in enumerate("xyz"):
        commit_scene(root, run, scene, f"k{i}", rows(run, scene, 3 + i, seed=10 + i, date=NEXT_DAY))


def data_files(root, day: str) -> list[str]:
    return sorted(p.name for p in (root / f"date={day}").glob("*.parquet"))


def test_compact_leaves_one_file_per_partition_and_every_reader_the_same_rows(tmp_path):
    nightly_table(tmp_path)
    before = assert_every_reader_agrees(tmp_path)
    scenes_before = committed_scenes(tmp_path)
    assert len(data_files(tmp_path, DAY)) == 6 and len(data_files(tmp_path, NEXT_DAY)) == 3

    summaries = compact(tmp_path)
    assert [(s["date"], s["files_before"], s["files_after"], s["rows"]) for s in summaries] == [
        (DAY, 6, 1, sum(5 + i for i in range(6))), (NEXT_DAY, 3, 1, 3 + 4 + 5)]
    assert assert_every_reader_agrees(tmp_path) == before
    (only,) = data_files(tmp_path, DAY)
    assert only.startswith("compact-") and pq.read_metadata(tmp_path / f"date={DAY}" / only).num_rows == 45
    assert "geo" in {k.decode() for k in pq.read_schema(tmp_path / f"date={DAY}" / only).metadata}
    # What incremental runs and the scenes view read is untouched: nothing is processed again.
    assert committed_scenes(tmp_path) == scenes_before
    assert not list((tmp_path / STAGING).iterdir())
    # Nothing left to merge: a second compaction writes nothing.
    assert [s["compacted"] for s in compact(tmp_path)] == [False, False]


def test_a_compacted_scene_committed_again_is_replaced_for_every_reader(tmp_path):
    nightly_table(tmp_path)
    compact(tmp_path)
    again = run_info(run_id="r2")
    commit_scene(tmp_path, again, "c", "k2", rows(again, "c", 4, seed=99, date=DAY))
    found = assert_every_reader_agrees(tmp_path)
    scene_c = [r for r in found if r[1] == "c"]
    assert len(scene_c) == 4 and len(found) == 45 + 12 - 7 + 4
    # The compacted file was rewritten without c's old rows; c's new rows sit in their own file.
    files = data_files(tmp_path, DAY)
    assert len(files) == 2 and sum(f.startswith("compact-00000001-") for f in files) == 1
    compacted = pq.read_table(tmp_path / f"date={DAY}" / next(f for f in files if f.startswith("compact-")))
    assert "c" not in compacted["scene_id"].to_pylist() and compacted.num_rows == 45 - 7
    # A scene that moves to another partition leaves its compacted one too.
    commit_scene(tmp_path, again, "a", "k3", rows(again, "a", 2, seed=5, date=NEXT_DAY))
    assert len([r for r in assert_every_reader_agrees(tmp_path) if r[1] == "a"]) == 2
    compact(tmp_path)
    assert len(data_files(tmp_path, DAY)) == len(data_files(tmp_path, NEXT_DAY)) == 1
    assert len(assert_every_reader_agrees(tmp_path)) == 45 + 12 - 7 + 4 - 5 + 2


def test_cutting_a_scene_out_rewrites_only_the_file_that_holds_it(tmp_path):
    nightly_table(tmp_path)
    compact(tmp_path, days=[DAY], max_rows=12)  # 45 rows sorted by scene: 12 + 12 + 12 + 9
    before = data_files(tmp_path, DAY)
    assert len(before) == 4
    again = run_info(run_id="r2")
    commit_scene(tmp_path, again, "f", "k2", rows(again, "f", 3, seed=4, date=DAY))  # f: the last 10 rows
    after = data_files(tmp_path, DAY)
    assert len(set(before) & set(after)) == 2  # a-e's files untouched; the two holding f's rows rewritten
    assert len([r for r in assert_every_reader_agrees(tmp_path) if r[1] == "f"]) == 3


def test_our_readers_hide_superseded_compacted_rows_until_recover_rewrites_them(tmp_path, monkeypatch):
    nightly_table(tmp_path)
    compact(tmp_path)
    before = pipeline_rows(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk gone while rewriting the partition")

    monkeypatch.setattr(table_commit, "regroup", crash)
    again = run_info(run_id="r2")
    with pytest.raises(OSError, match="disk gone"):
        commit_scene(tmp_path, again, "b", "k2", rows(again, "b", 2, seed=7, date=DAY))
    monkeypatch.undo()
    # Published, not settled: our readers show b's new rows only; a plain glob sees both
    # versions of b until recover() rewrites the partition.
    ours = pipeline_rows(tmp_path)
    assert [r for r in ours if r[1] != "b"] == [r for r in before if r[1] != "b"]
    assert len([r for r in ours if r[1] == "b"]) == 2
    assert len(duckdb_rows(tmp_path)) == len(ours) + 6
    assert read_committed(tmp_path).num_rows == len(ours)
    recover(tmp_path)
    assert assert_every_reader_agrees(tmp_path) == ours


def _compactor(root: str, barrier, published, writers_done) -> None:
    barrier.wait()
    while not writers_done.is_set():
        if os.path.exists(os.path.join(root, TABLE_INFO)):
            published.value += sum(s["compacted"] for s in compact(root, min_files=2))


def test_compaction_beside_two_writers_loses_and_doubles_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, barrier)) for name in ("w1", "w2")]
    published, writers_done = ctx.Value("i", 0), ctx.Event()
    procs.append(ctx.Process(target=_compactor, args=(str(tmp_path), barrier, published, writers_done)))
    for p in procs:
        p.start()
    for p in procs[:2]:
        p.join(300)
    writers_done.set()
    procs[2].join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert published.value >= 1  # a generation was published while the writers committed
    recover(tmp_path)
    expected = 2 * sum(20 + k for k in range(8)) + 5
    assert len(assert_every_reader_agrees(tmp_path)) == expected
    compact(tmp_path)
    found = assert_every_reader_agrees(tmp_path)
    assert len(found) == expected and len([r for r in found if r[1] == "shared"]) == 5
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 1
    assert len(committed_scenes(tmp_path)) == 17


def test_compact_cli_dry_run_then_compact_then_vacuum(tmp_path):
    nightly_table(tmp_path)
    cli = CliRunner()
    dry = cli.invoke(main, ["compact", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"date={DAY}: would rewrite 6 files -> 1 (45 rows)" in dry.output
    assert len(data_files(tmp_path, DAY)) == 6  # nothing written
    one_day = cli.invoke(main, ["compact", str(tmp_path), "--date", NEXT_DAY, "--max-rows", "5"])
    assert one_day.exit_code == 0, one_day.output
    assert f"date={NEXT_DAY}: rewrote 3 files -> 3 (12 rows)" in one_day.output
    # The dry run takes the same decision as compacting: two full files and one small one
    # leave nothing to merge.
    again = cli.invoke(main, ["compact", str(tmp_path), "--date", NEXT_DAY, "--max-rows", "5", "--dry-run"])
    assert f"date={NEXT_DAY}: would leave 3 files -> 3 (12 rows)" in again.output, again.output
    assert len(data_files(tmp_path, DAY)) == 6
    done = cli.invoke(main, ["compact", str(tmp_path)])
    assert f"date={DAY}: rewrote 6 files -> 1 (45 rows)" in done.output, done.output
    run = run_info(run_id="r2")
    commit_scene(tmp_path, run, "z", "k9", rows(run, "z", 1, seed=3, date=NEXT_DAY))  # a third generation
    vacuum = cli.invoke(main, ["vacuum", str(tmp_path), "--grace", "0"])
    assert vacuum.exit_code == 0 and "orphans" in vacuum.output, vacuum.output
    assert len(list((tmp_path / COMPACTIONS / NEXT_DAY).glob("*.json"))) == 1  # older generations gone
    found = assert_every_reader_agrees(tmp_path)
    assert len(found) == 45 + 12 - 5 + 1
    query = cli.invoke(main, ["query", str(tmp_path), "SELECT count(*) AS n FROM detections", "--format", "json"])
    assert json.loads(query.output) == [{"n": len(found)}]
    missing = cli.invoke(main, ["compact", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no detection table" in missing.output


def test_a_compacted_file_removed_from_outside_is_named(tmp_path):
    nightly_table(tmp_path)
    compact(tmp_path)
    (only,) = data_files(tmp_path, DAY)
    os.remove(tmp_path / f"date={DAY}" / only)
    with pytest.raises(CommitError, match=f"date={DAY}/{only}: listed by _compactions/{DAY}/00000000.json"):
        read_committed(tmp_path)
