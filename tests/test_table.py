"""Detection table: GeoParquet 1.1 rows, manifest commits, crash and concurrency safety."""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely

from pipeline.errors import CommitError
from pipeline.geo.georef import box_corners
from pipeline.table import commit as table_commit
from pipeline.table import schema
from pipeline.table.commit import RunInfo, commit_scene, new_run_id
from pipeline.table.maintenance import vacuum, write_run_report
from pipeline.table.state import (
    MANIFESTS,
    STAGED_SUFFIX,
    STAGING,
    all_manifests,
    committed_files,
    committed_scenes,
    is_current,
    read_committed,
)
from retinanet.files import TMP_PREFIX

CLASSES = ["car", "ship", "plane"]
WHEN = dt.datetime(2024, 5, 1, 2, 30, tzinfo=dt.timezone.utc)


def run_info(run_id="r1", job="sat", crs="EPSG:32633", model="m1", jhash="h1") -> RunInfo:
    return RunInfo(run_id=run_id, job_name=job, job_hash=jhash, model_id=model, crs=crs)


def rows(run: RunInfo, scene: str, n: int, seed: int = 0, date: str | None = None, offset=(500000.0, 4000000.0)):
    """n random detections of one scene; map boxes are pixel boxes x 0.5 m + offset."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, (n, 2))
    px = np.concatenate([xy, xy + rng.uniform(5, 50, (n, 2))], axis=1)
    # Map y grows upwards: pixel row r -> northing offset - 0.5 r.
    corners = box_corners(px) * [0.5, -0.5] + offset
    return schema.build_detection_table(
        corners, px, rng.uniform(0.3, 1, n), rng.integers(0, 3, n), CLASSES,
        run_id=run.run_id, job_name=run.job_name, scene_id=scene, scene_path=f"/data/{scene}.tif",
        model_id=run.model_id, job_hash=run.job_hash, processed_at=WHEN, date=date,
    )


def visible(root) -> list[tuple]:
    """Committed rows as sorted tuples (content comparison, order-free)."""
    t = read_committed(root, columns=["scene_id", "run_id", "label", "score",
                                        "px_xmin", "px_ymin", "px_xmax", "px_ymax"])
    return sorted(zip(*[c.to_pylist() for c in t.columns]))


# ---------------------------------------------------------------- rows and GeoParquet


def test_schema_columns():
    s = schema.detection_schema()
    assert s.names == [
        "geometry", "bbox", "run_id", "job_name", "scene_id", "scene_path", "label", "label_id", "score",
        "px_xmin", "px_ymin", "px_xmax", "px_ymax", "model_id", "job_hash", "processed_at", "acquired_at", "date",
    ]
    assert s.field("geometry").type == pa.binary()
    assert [f.name for f in s.field("bbox").type] == ["xmin", "ymin", "xmax", "ymax"]
    assert s.field("score").type == pa.float32() and s.field("label_id").type == pa.int32()
    assert s.field("processed_at").type == pa.timestamp("us", tz="UTC")
    # Added after the first tables were written: nullable, so files without it read as null.
    assert s.field("acquired_at").type == pa.timestamp("us", tz="UTC") and s.field("acquired_at").nullable
    assert schema.file_schema().names == [n for n in s.names if n != "date"]


def test_acquired_at_is_written_in_utc_and_must_be_aware():
    run = run_info()
    local = dt.datetime(2026, 1, 3, 11, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    t = schema.build_detection_table(box_corners(np.array([[0.0, 0, 4, 4]])), [[0, 0, 4, 4]], [0.5], [0], CLASSES,
                                     run_id=run.run_id, job_name="j", scene_id="s", scene_path=None,
                                     model_id="m", job_hash="h", acquired_at=local)
    assert t["acquired_at"].to_pylist() == [dt.datetime(2026, 1, 3, 9, 0, tzinfo=dt.timezone.utc)]
    assert rows(run, "s", 2)["acquired_at"].null_count == 2  # unknown by default
    with pytest.raises(ValueError, match="acquired_at must be timezone-aware"):
        schema.build_detection_table(np.zeros((0, 4, 2)), np.zeros((0, 4)), [], [], CLASSES, run_id="r",
                                     job_name="j", scene_id="s", scene_path=None, model_id="m", job_hash="h",
                                     acquired_at=dt.datetime(2026, 1, 3))


def test_wkb_decodes_to_the_boxes_counterclockwise():
    px = np.array([[0, 0, 10, 20], [5, 5, 6, 7]], np.float64)
    corners = box_corners(px)
    corners[1] = corners[1][::-1]  # clockwise input must come out counterclockwise
    t = schema.build_detection_table(corners, px, [0.9, 0.4], [2, 0], CLASSES, run_id="r", job_name="j", scene_id="s",
                                scene_path=None, model_id="m", job_hash="h", processed_at=WHEN)
    geoms = shapely.from_wkb(t["geometry"].to_pylist())
    assert geoms[0].equals(shapely.box(0, 0, 10, 20)) and geoms[1].equals(shapely.box(5, 5, 6, 7))
    assert all(shapely.is_ccw(g.exterior) for g in geoms)
    assert t["bbox"].to_pylist() == [{"xmin": 0, "ymin": 0, "xmax": 10, "ymax": 20},
                                     {"xmin": 5, "ymin": 5, "xmax": 6, "ymax": 7}]
    assert t["label"].to_pylist() == ["plane", "car"] and t["label_id"].to_pylist() == [2, 0]
    assert t["date"].to_pylist() == ["2024-05-01"] * 2  # processed_at's UTC date


def test_unprojectable_polygon_gets_null_geometry():
    corners = box_corners(np.array([[0, 0, 1, 1], [2, 2, 3, 3]]))
    corners[1, 2] = np.nan
    t = schema.build_detection_table(corners, np.zeros((2, 4)), [0.5, 0.5], [0, 0], CLASSES, run_id="r", job_name="j",
                                scene_id="s", scene_path=None, model_id="m", job_hash="h")
    assert t["geometry"].null_count == 1 and t["geometry"][1].as_py() is None
    assert t["bbox"][1].as_py() is None and t["bbox"][0].as_py()["xmax"] == 1


def test_build_rejects_inconsistent_inputs():
    kw = dict(run_id="r", job_name="j", scene_id="s", scene_path=None, model_id="m", job_hash="h")
    with pytest.raises(ValueError, match="differ in length"):
        schema.build_detection_table(box_corners(np.zeros((2, 4))), np.zeros((2, 4)), [1.0], [0, 0], CLASSES, **kw)
    with pytest.raises(ValueError, match="class names"):
        schema.build_detection_table(box_corners(np.zeros((1, 4))), np.zeros((1, 4)), [1.0], [3], CLASSES, **kw)
    with pytest.raises(ValueError, match="polygons must be"):
        schema.build_detection_table(np.zeros((1, 3, 2)), np.zeros((1, 4)), [1.0], [0], CLASSES, **kw)


def test_committed_file_is_geoparquet_1_1(tmp_path):
    run = run_info(crs="EPSG:32633")
    t = rows(run, "s1", 50)
    commit_scene(tmp_path, run, "s1", {"sha256": "x"}, t)
    (path,) = committed_files(tmp_path)
    assert Path(path).parent.name == "date=2024-05-01"
    back = pq.read_table(path)
    assert back.num_rows == 50
    geo = json.loads(pq.read_metadata(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert col["crs"]["type"] == "ProjectedCRS"  # PROJJSON, not a string
    assert pyproj.CRS.from_json_dict(col["crs"]) == pyproj.CRS("EPSG:32633")
    assert col["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    bounds = shapely.total_bounds(shapely.from_wkb(back["geometry"].to_pylist()))
    np.testing.assert_allclose(col["bbox"], bounds)
    # The per-row covering equals each decoded polygon's bounds.
    np.testing.assert_allclose(
        [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in back["bbox"].to_pylist()],
        shapely.bounds(shapely.from_wkb(back["geometry"].to_pylist())),
    )


def test_pixel_outputs_have_null_crs(tmp_path):
    run = run_info(crs=None)
    commit_scene(tmp_path, run, "img", "k", rows(run, "img", 3, offset=(0, 0)))
    geo = json.loads(pq.read_metadata(committed_files(tmp_path)[0]).metadata[b"geo"])
    assert "crs" in geo["columns"]["geometry"] and geo["columns"]["geometry"]["crs"] is None


def test_duckdb_reads_the_committed_files(tmp_path):
    run = run_info()
    commit_scene(tmp_path, run, "s1", "k1", rows(run, "s1", 40, seed=1))
    commit_scene(tmp_path, run, "s2", "k2", rows(run, "s2", 25, seed=2, date="2024-05-02"))
    files = committed_files(tmp_path)
    got = duckdb.sql(
        "select scene_id, count(*), strftime(min(date), '%Y-%m-%d') "
        f"from read_parquet({files!r}, hive_partitioning=true) "
        "group by scene_id order by scene_id"
    ).fetchall()
    assert got == [("s1", 40, "2024-05-01"), ("s2", 25, "2024-05-02")]
    total = duckdb.sql(f"select sum(score)::double from read_parquet({files!r})").fetchall()[0][0]
    scores = read_committed(tmp_path, columns=["score"])["score"].to_numpy()
    assert total == pytest.approx(float(np.sum(scores)), rel=1e-6)


def test_read_committed_columns_filters_and_empty(tmp_path):
    assert read_committed(tmp_path / "none").num_rows == 0
    assert read_committed(tmp_path / "none").schema.names == schema.detection_schema().names
    run = run_info()
    commit_scene(tmp_path, run, "s1", "k", rows(run, "s1", 30, date="2024-05-01"))
    commit_scene(tmp_path, run, "s2", "k", rows(run, "s2", 20, date="2024-05-02"))
    t = read_committed(tmp_path, columns=["scene_id", "date"], filters=ds.field("date") == "2024-05-02")
    assert t.num_rows == 20 and set(t["scene_id"].to_pylist()) == {"s2"} and t.column_names == ["scene_id", "date"]
    full = read_committed(tmp_path)
    geo_crs = json.loads(full.schema.metadata[b"geo"])["columns"]["geometry"]["crs"]
    assert pyproj.CRS.from_json_dict(geo_crs) == pyproj.CRS("EPSG:32633")


def test_scene_spanning_two_dates_writes_two_partitions(tmp_path):
    run = run_info()
    t = pa.concat_tables([rows(run, "s1", 4, date="2024-05-01"), rows(run, "s1", 6, date="2024-05-02")])
    m = commit_scene(tmp_path, run, "s1", "k", t)
    assert sorted((f["path"].split("/")[0], f["rows"]) for f in m["files"]) == [
        ("date=2024-05-01", 4), ("date=2024-05-02", 6)]
    assert m["rows"] == 10 and read_committed(tmp_path).num_rows == 10


def test_empty_scene_is_recorded_without_files(tmp_path):
    run = run_info()
    m = commit_scene(tmp_path, run, "blank", {"sha256": "e"}, rows(run, "blank", 0))
    assert m["files"] == [] and m["rows"] == 0
    assert committed_scenes(tmp_path)[("sat", "blank")]["scene_key"] == {"sha256": "e"}
    assert committed_files(tmp_path) == []


# ---------------------------------------------------------------- commit protocol


def test_rerun_replaces_its_rows_exactly(tmp_path):
    r1 = run_info("r1")
    commit_scene(tmp_path, r1, "a", "ka", rows(r1, "a", 30, seed=1))
    commit_scene(tmp_path, r1, "b", "kb", rows(r1, "b", 20, seed=2))
    other_job = run_info("o1", job="other")
    commit_scene(tmp_path, other_job, "a", "ka", rows(other_job, "a", 7, seed=3))
    before_b = [r for r in visible(tmp_path) if r[0] == "b"]

    # Same run again for scene a with different output: exactly the new rows remain.
    new_a = rows(r1, "a", 12, seed=9)
    commit_scene(tmp_path, r1, "a", "ka", new_a)
    now = visible(tmp_path)
    assert len(now) == 12 + 20 + 7
    assert [r for r in now if r[0] == "b"] == before_b
    assert sum(1 for r in now if r[1] == "o1") == 7  # the other job's scene a is untouched
    # A new run with identical content: no duplicates.
    r2 = run_info("r2")
    commit_scene(tmp_path, r2, "a", "ka", rows(r2, "a", 12, seed=9))
    assert len(visible(tmp_path)) == 39
    entry = committed_scenes(tmp_path)[("sat", "a")]
    assert entry["run_id"] == "r2" and entry["rows"] == 12
    assert is_current(entry, "ka", "m1", "h1") and not is_current(entry, "ka", "m2", "h1")
    assert not is_current(None, "ka", "m1", "h1")
    assert len(all_manifests(tmp_path)) == 5  # superseded manifests stay, unseen


def test_failure_before_manifest_leaves_previous_state(tmp_path, monkeypatch):
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1))
    before, files_before = visible(tmp_path), committed_files(tmp_path)

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(table_commit, "publish_manifest", boom)
    with pytest.raises(CommitError, match="nothing published"):
        commit_scene(tmp_path, run, "a", "k", rows(run, "a", 99, seed=2))
    assert visible(tmp_path) == before and committed_files(tmp_path) == files_before
    assert sorted(str(p) for p in tmp_path.glob("date=*/*.parquet")) == files_before  # moved files taken back
    assert list((tmp_path / STAGING).iterdir()) == []


def _commit_then_die(root: str) -> None:
    """Child process: stage a scene's files, then die before the manifest."""
    table_commit.publish_manifest = lambda *a, **k: os._exit(17)
    run = run_info()
    commit_scene(root, run, "a", "k2", rows(run, "a", 99, seed=2))


def test_hard_crash_between_staging_and_manifest_is_invisible(tmp_path):
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 10, seed=1))
    before = visible(tmp_path)
    child = mp.get_context("spawn").Process(target=_commit_then_die, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    assert len(list(tmp_path.glob("**/*.parquet"))) == 1  # the staged file is on disk, but no glob reaches it
    assert len(list((tmp_path / STAGING).glob(f"*/*{STAGED_SUFFIX}"))) == 1
    assert visible(tmp_path) == before
    assert committed_scenes(tmp_path)[("sat", "a")]["scene_key"] == "k"

    assert vacuum(tmp_path, grace_s=3600) == {"superseded": [], "orphans": [], "staging": []}  # too fresh
    assert vacuum(tmp_path, grace_s=0, dry_run=True)["staging"]  # listed, not removed
    assert len(list((tmp_path / STAGING).iterdir())) == 1
    removed = vacuum(tmp_path, grace_s=0)
    assert [r.split("/")[0] for r in removed["staging"]] == [STAGING] and not removed["orphans"]
    assert list((tmp_path / STAGING).iterdir()) == [] and visible(tmp_path) == before
    commit_scene(tmp_path, run, "a", "k2", rows(run, "a", 99, seed=2))  # the rerun completes
    assert len(visible(tmp_path)) == 99


def _writer(root: str, name: str, barrier) -> None:
    run = run_info(run_id=name)
    barrier.wait()
    for k in range(8):
        commit_scene(root, run, f"{name}-{k}", k, rows(run, f"{name}-{k}", 20 + k, seed=k))
        # Both writers also commit the same scene, interleaved with their own.
        commit_scene(root, run, "shared", name, rows(run, "shared", 5, seed=k))


def run_two_writers(root: str) -> None:
    """Two processes commit into ``root`` at once (see _writer) and both succeed."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(root, name, barrier)) for name in ("w1", "w2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_concurrent_writers_both_commit(tmp_path):
    from readers import assert_every_reader_agrees

    run_two_writers(str(tmp_path))
    assert len(assert_every_reader_agrees(tmp_path)) == 2 * sum(20 + k for k in range(8)) + 5
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 17  # the shared scene's loser is gone

    scenes = committed_scenes(tmp_path)
    assert len(scenes) == 17  # 8 per writer + the shared one
    assert len(all_manifests(tmp_path)) == 32  # every manifest parses
    t = read_committed(tmp_path)
    per_writer = sum(20 + k for k in range(8))
    assert t.num_rows == 2 * per_writer + 5
    shared = t.filter(pa.compute.equal(t["scene_id"], "shared"))
    assert shared.num_rows == 5 and len(set(shared["run_id"].to_pylist())) == 1  # one version, never a mix
    for path in committed_files(tmp_path):
        assert pq.read_metadata(path).num_rows > 0  # every listed file is a whole Parquet file
    assert list((tmp_path / STAGING).iterdir()) == []
    assert not [n for n in os.listdir(tmp_path / MANIFESTS) if n.startswith(TMP_PREFIX)]


def test_later_commit_wins_even_if_the_clock_steps_back(tmp_path, monkeypatch):
    run = run_info()
    commit_scene(tmp_path, run, "a", "old", rows(run, "a", 3))
    monkeypatch.setattr(time, "time_ns", lambda: 1)  # clock jumped to 1970
    commit_scene(tmp_path, run, "a", "new", rows(run, "a", 4, seed=5))
    assert committed_scenes(tmp_path)[("sat", "a")]["scene_key"] == "new"
    assert read_committed(tmp_path).num_rows == 4


# ---------------------------------------------------------------- refusals and damage


def test_commit_refuses_bad_input(tmp_path):
    run = run_info()
    good = rows(run, "a", 3)
    with pytest.raises(CommitError, match="run_id"):
        commit_scene(tmp_path, run_info("../x"), "a", "k", good)
    with pytest.raises(CommitError, match="column scene_id"):
        commit_scene(tmp_path, run, "b", "k", good)
    with pytest.raises(CommitError, match="detection schema"):
        commit_scene(tmp_path, run, "a", "k", good.drop_columns(["bbox"]))
    with pytest.raises(CommitError, match="JSON"):
        commit_scene(tmp_path, run, "a", object(), good)
    commit_scene(tmp_path, run, "a", "k", good)
    other_crs = run_info(crs="EPSG:4326")
    with pytest.raises(CommitError, match="table holds crs 'EPSG:32633'"):
        commit_scene(tmp_path, other_crs, "a", "k", rows(other_crs, "a", 3))
    assert read_committed(tmp_path).num_rows == 3


def test_damaged_table_is_loud(tmp_path):
    run = run_info()
    commit_scene(tmp_path, run, "a", "k", rows(run, "a", 3))
    (path,) = committed_files(tmp_path)
    os.unlink(path)
    with pytest.raises(CommitError, match="missing"):
        read_committed(tmp_path)
    bad = tmp_path / MANIFESTS / "00000000000000000001-x-y.json"
    bad.write_text("{not json")
    with pytest.raises(CommitError, match="unreadable manifest"):
        committed_scenes(tmp_path)


def test_run_report_written_atomically(tmp_path):
    p = write_run_report(tmp_path, "r1", {"scenes_ok": ["a"], "wall_seconds": 1.5, "when": WHEN})
    assert p == tmp_path / "_reports" / "r1.json"
    assert json.loads(p.read_text())["scenes_ok"] == ["a"]
    write_run_report(tmp_path, "r1", {"scenes_ok": ["a", "b"]})
    assert json.loads(p.read_text()) == {"scenes_ok": ["a", "b"]}
    assert os.listdir(tmp_path / "_reports") == ["r1.json"]


def test_new_run_id_is_safe_and_sortable():
    a = new_run_id(WHEN)
    assert a.startswith("20240501T023000Z-") and table_commit._SAFE_ID.match(a)
    assert a != new_run_id(WHEN)
