"""Any reader, same rows: DuckDB, pyarrow, GeoPandas and Polars on the table folder return
exactly `pipeline query`'s rows after reruns, supersedes, concurrent writers and crashes."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
from readers import assert_every_reader_agrees, duckdb_rows, pipeline_rows
from test_table import rows, run_info

from pipeline.table import commit as table_commit
from pipeline.table import state as table_state
from pipeline.table.commit import commit_scene
from pipeline.table.maintenance import recover, vacuum
from pipeline.table.state import (
    MANIFESTS,
    SNAPSHOTS,
    STAGING,
    committed_files,
    committed_scenes,
    read_committed,
    write_snapshot,
)


def test_reruns_and_dates_leave_one_version_per_scene(tmp_path):
    run = run_info()
    for scene, n in (("a", 10), ("b", 7)):
        commit_scene(tmp_path, run, scene, "k", rows(run, scene, n, seed=n, date="2024-05-01"))
    assert len(assert_every_reader_agrees(tmp_path)) == 17
    # The next night re-runs scene a (another partition) and b twice: only the newest stays on disk.
    again = run_info(run_id="r2")
    commit_scene(tmp_path, again, "a", "k", rows(again, "a", 4, seed=1, date="2024-05-02"))
    commit_scene(tmp_path, again, "b", "k", rows(again, "b", 3, seed=2, date="2024-05-02"))
    commit_scene(tmp_path, again, "b", "k", rows(again, "b", 5, seed=3, date="2024-05-02"))
    found = assert_every_reader_agrees(tmp_path)
    assert len(found) == 9 and {r[-1] for r in found} == {"2024-05-02"}
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 2  # superseded files are gone
    for path in committed_files(tmp_path):  # no column clashes with the date= folders
        assert "date" not in pq.read_schema(path).names


def _publish_then_die(root: str) -> None:
    """Child process: commit scene a again, die after publishing, before the move."""
    table_commit.move_into_place = lambda *a, **k: os._exit(17)
    run = run_info(run_id="r9")
    commit_scene(root, run, "a", "k9", rows(run, "a", 3, seed=9, date="2024-05-03"))


def test_a_crash_after_publishing_is_finished_by_recover(tmp_path):
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1, date="2024-05-01"))
    child = mp.get_context("spawn").Process(target=_publish_then_die, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    # Published: our readers see the new rows (from staging); plain readers still the old.
    assert len(pipeline_rows(tmp_path)) == 3 and len(duckdb_rows(tmp_path)) == 10
    planned = vacuum(tmp_path, grace_s=0, dry_run=True)
    assert len(planned["superseded"]) == 1 and planned["staging"] == []  # the staged commit is live: kept
    done = recover(tmp_path)
    assert len(done["moved"]) == 1 and len(done["removed"]) == 1
    assert len(assert_every_reader_agrees(tmp_path)) == 3
    vacuum(tmp_path, grace_s=0)
    assert list((tmp_path / STAGING).iterdir()) == []
    assert len(assert_every_reader_agrees(tmp_path)) == 3


def test_vacuum_removes_orphans_of_older_versions_and_keeps_young_ones(tmp_path):
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1, date="2024-05-01"))
    orphan = tmp_path / "date=2024-05-01" / "left-by-a-crash.parquet"
    orphan.write_bytes((tmp_path / committed_files(tmp_path)[0]).read_bytes())
    assert len(duckdb_rows(tmp_path)) == 20  # an older version moved files before publishing
    assert vacuum(tmp_path, grace_s=3600)["orphans"] == []  # young: may be a commit in flight
    assert vacuum(tmp_path, grace_s=0, dry_run=True)["orphans"] == [str(orphan.relative_to(tmp_path))]
    assert orphan.exists()
    vacuum(tmp_path, grace_s=0)
    assert len(assert_every_reader_agrees(tmp_path)) == 10


def test_vacuum_cli_dry_run_lists_and_removes_nothing(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1))
    (tmp_path / STAGING / "r0-dead").mkdir(parents=True)
    (tmp_path / STAGING / "r0-dead" / "x.parquet.tmp").write_bytes(b"never published")
    result = CliRunner().invoke(main, ["vacuum", str(tmp_path), "--grace", "0", "--dry-run"])
    assert result.exit_code == 0 and "would remove staging: _staging/r0-dead/x.parquet.tmp" in result.output
    assert (tmp_path / STAGING / "r0-dead").exists()
    result = CliRunner().invoke(main, ["vacuum", str(tmp_path), "--grace", "0"])
    assert result.exit_code == 0 and "removed 0 superseded, 0 orphans, 1 staging" in result.output
    assert not (tmp_path / STAGING / "r0-dead").exists()


def test_snapshots_keep_the_manifest_folder_small_and_the_state_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(table_commit, "SNAPSHOT_EVERY", 5)
    monkeypatch.setattr(table_state, "SNAPSHOT_GRACE_S", 0.0)
    for night in range(8):  # three scenes re-run every night: history grows, the state does not
        run = run_info(run_id=f"n{night}")
        for scene in "abc":
            commit_scene(tmp_path, run, scene, night, rows(run, scene, 2 + night, seed=night))
    manifests = list((tmp_path / MANIFESTS).glob("*.json"))
    assert len(manifests) < 2 * table_commit.SNAPSHOT_EVERY  # not the 24 ever published
    assert list((tmp_path / SNAPSHOTS).glob("*.json"))
    current = committed_scenes(tmp_path)
    assert {k: m["scene_key"] for k, m in current.items()} == {("sat", s): 7 for s in "abc"}
    assert len(assert_every_reader_agrees(tmp_path)) == 3 * 9
    # A scene committed after the latest snapshot still supersedes the snapshot's entry.
    late = run_info(run_id="late")
    commit_scene(tmp_path, late, "a", "late", rows(late, "a", 1, seed=1))
    assert committed_scenes(tmp_path)[("sat", "a")]["scene_key"] == "late"
    assert len(assert_every_reader_agrees(tmp_path)) == 2 * 9 + 1


def test_a_burst_of_commits_drains_the_manifest_folder(tmp_path, monkeypatch):
    """Thousands of commits within the grace period write a snapshot every SNAPSHOT_EVERY
    commits, each younger than the grace: manifests still leave the folder once their own
    grace has passed (before, the grace ran from the latest snapshot's age, which a burst
    keeps young, so the folder and each commit's listing grew with the burst)."""
    monkeypatch.setattr(table_commit, "SNAPSHOT_EVERY", 5)
    run = run_info(run_id="burst")
    for i in range(10):  # two snapshots fold these ten
        commit_scene(tmp_path, run, f"s{i}", i, rows(run, f"s{i}", 1, seed=i))
    time.sleep(1.2)
    for i in range(10, 15):  # a third snapshot, moments old
        commit_scene(tmp_path, run, f"s{i}", i, rows(run, f"s{i}", 1, seed=i))
    assert len(list((tmp_path / MANIFESTS).glob("*.json"))) == 15  # the default grace: all kept
    write_snapshot(tmp_path, grace_s=1.0)
    left = list((tmp_path / MANIFESTS).glob("*.json"))
    assert len(left) == 5, sorted(p.name for p in left)  # the ten folded over a second ago are gone
    assert len(list((tmp_path / SNAPSHOTS).glob("*.json"))) < 4  # superseded over a second ago
    assert {k[1]: m["scene_key"] for k, m in committed_scenes(tmp_path).items()} == {f"s{i}": i for i in range(15)}
    assert len(assert_every_reader_agrees(tmp_path)) == 15


def test_files_of_older_tables_with_a_date_column_still_query(tmp_path):
    """Tables written before the date left the files: `pipeline query` reads them as before."""
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 4, seed=1, date="2024-05-01"))
    [path] = committed_files(tmp_path)
    old = pq.read_table(path)
    old = old.append_column("date", pa.array(["2024-05-01"] * old.num_rows))
    pq.write_table(old, path)  # as an older version wrote it (the manifest's byte count is fixed below)
    manifest = next((tmp_path / MANIFESTS).glob("*.json"))
    data = json.loads(manifest.read_text())
    data["files"][0]["bytes"] = os.path.getsize(path)
    manifest.write_text(json.dumps(data))
    result = pipeline_rows(tmp_path)
    assert len(result) == 4 and {r[-1] for r in result} == {"2024-05-01"}
    assert read_committed(tmp_path).num_rows == 4


def test_a_snapshot_never_folds_a_superseded_manifest_whose_files_remain(tmp_path, monkeypatch):
    """A writer between its move and its settle (or crashed there) while a snapshot is written."""
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1))
    with monkeypatch.context() as m:
        m.setattr(table_commit, "settle_scene", lambda *a, **k: [])
        again = run_info(run_id="r2")
        commit_scene(tmp_path, again, "a", "k2", rows(again, "a", 4, seed=2))
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 2  # not settled yet
    write_snapshot(tmp_path, grace_s=0)
    recover(tmp_path)  # what the next run does first
    assert len(assert_every_reader_agrees(tmp_path)) == 4
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 1
