"""`pipeline query`: the detections view over committed files only, the scenes view, and the output formats."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.geo.georef import box_corners
from pipeline.query import QueryError, query_text, run_query, table_columns
from pipeline.table import schema
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.state import MANIFESTS, STAGING, committed_scenes

CLASSES = ["vehicle", "building", "tank"]


def scene_rows(run: RunInfo, scene: str, px: list, labels: list, scores: list, date: str) -> "pa.Table":
    """Rows with map box = pixel box x (1, -1) + (1000, 5000): a 1 m grid, y up."""
    boxes = np.asarray(px, np.float64).reshape(-1, 4)
    corners = box_corners(boxes) * [1.0, -1.0] + [1000.0, 5000.0]
    return schema.build_detection_table(
        corners, boxes, scores, labels, CLASSES, run_id=run.run_id, job_name=run.job_name, scene_id=scene,
        scene_path=f"/scenes/{scene}.tif", model_id=run.model_id, job_hash=run.job_hash,
        processed_at=dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc), date=date)


@pytest.fixture()
def table(tmp_path) -> Path:
    """Two nights, two scenes, three classes (counts worked out in the tests below)."""
    root = tmp_path / "table"
    run = RunInfo("r1", "sat", "h", "m", "EPSG:32633")
    # night 1, scene a: vehicle x2, building x1
    commit_scene(root, run, "a", {"k": 1}, scene_rows(
        run, "a", [[0, 0, 10, 10], [20, 20, 30, 30], [100, 100, 200, 200]], [0, 0, 1], [0.9, 0.5, 0.7], "2026-01-01"))
    # night 2, scene b: vehicle x1, tank x1
    commit_scene(root, run, "b", {"k": 2}, scene_rows(
        run, "b", [[500, 500, 520, 520], [600, 600, 640, 640]], [0, 2], [0.8, 0.95], "2026-01-02"))
    return root


def test_counts_per_label_per_night(table):
    result = run_query(table, "SELECT date, label, count(*) AS n FROM detections GROUP BY ALL ORDER BY date, label")
    got = [(str(r["date"]), r["label"], r["n"]) for r in result.to_pylist()]
    assert got == [("2026-01-01", "building", 1), ("2026-01-01", "vehicle", 2),
                   ("2026-01-02", "tank", 1), ("2026-01-02", "vehicle", 1)]


def test_bbox_covering_columns_filter_in_map_coordinates(table):
    # Map x = px x + 1000, map y = 5000 - px y. The window x 1000..1050, y 4950..5000 holds
    # the boxes of pixels (0..10) and (20..30) of scene a, nothing else.
    sql = ("SELECT scene_id, px_xmin FROM detections WHERE bbox.xmin >= 1000 AND bbox.xmax <= 1050 "
           "AND bbox.ymin >= 4950 AND bbox.ymax <= 5000 ORDER BY px_xmin")
    assert [(r["scene_id"], r["px_xmin"]) for r in run_query(table, sql).to_pylist()] == [("a", 0.0), ("a", 20.0)]


def test_only_committed_files_are_visible(table):
    before = run_query(table, "SELECT count(*) AS n FROM detections").to_pylist()[0]["n"]
    assert before == 5
    # A crashed commit: rows staged and even moved into a partition, but no manifest.
    run = RunInfo("crashed", "sat", "h", "m", "EPSG:32633")
    orphan = scene_rows(run, "c", [[0, 0, 5, 5]] * 7, [0] * 7, [0.9] * 7, "2026-01-01")
    (table / STAGING / "crashed-x").mkdir(parents=True)
    pq.write_table(orphan, table / STAGING / "crashed-x" / "c.parquet")
    pq.write_table(orphan, table / "date=2026-01-01" / "crashed-c-orphan.parquet")
    assert run_query(table, "SELECT count(*) AS n FROM detections").to_pylist()[0]["n"] == 5
    # A new commit of scene a supersedes its old rows: 3 old rows out, 1 new row in.
    run2 = RunInfo("r2", "sat", "h", "m", "EPSG:32633")
    commit_scene(table, run2, "a", {"k": 3}, scene_rows(run2, "a", [[1, 1, 2, 2]], [2], [0.6], "2026-01-03"))
    result = run_query(table, "SELECT scene_id, run_id, count(*) AS n FROM detections GROUP BY ALL ORDER BY scene_id")
    assert result.to_pylist() == [{"scene_id": "a", "run_id": "r2", "n": 1}, {"scene_id": "b", "run_id": "r1", "n": 2}]


def test_top_scores_per_scene(table):
    sql = ("SELECT scene_id, label, score FROM detections "
           "QUALIFY row_number() OVER (PARTITION BY scene_id ORDER BY score DESC) = 1 ORDER BY scene_id")
    got = [(r["scene_id"], r["label"], round(r["score"], 4)) for r in run_query(table, sql).to_pylist()]
    assert got == [("a", "vehicle", 0.9), ("b", "tank", 0.95)]


def test_empty_table_has_the_same_columns_and_types(tmp_path, table):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_query(empty, "SELECT count(*) AS n FROM detections").to_pylist() == [{"n": 0}]
    full_cols = [(n, t.split("(")[0]) for n, t in table_columns(table)]  # GEOMETRY('<crs>') -> GEOMETRY
    empty_cols = [(n, t.split("(")[0]) for n, t in table_columns(empty)]
    assert empty_cols == full_cols
    assert dict(empty_cols)["date"] == "DATE" and dict(empty_cols)["bbox"] == "STRUCT"
    # Columns of the empty view are usable in expressions.
    assert run_query(empty, "SELECT bbox.xmin, date FROM detections WHERE date > '2020-01-01'").num_rows == 0


def test_missing_table_and_bad_sql_are_named(tmp_path, table):
    with pytest.raises(InputError, match="no detection table"):
        run_query(tmp_path / "nope", "SELECT 1")
    with pytest.raises(QueryError, match="query failed.*no_such_column"):
        run_query(table, "SELECT no_such_column FROM detections")
    with pytest.raises(QueryError, match="empty"):
        run_query(table, "  ")


def test_formats(table):
    sql = "SELECT scene_id, label, score, bbox, date FROM detections ORDER BY score DESC LIMIT 2"
    text = query_text(table, sql, "table").splitlines()
    assert text[0].split() == ["scene_id", "label", "score", "bbox", "date"]
    assert set(text[1]) <= {"-", " "} and text[-1] == "(2 rows)"
    assert text[2].split()[:3] == ["b", "tank", "0.95"]  # float32 shown as its shortest decimal
    # Aligned: every column starts at the same offset on each line.
    start = text[0].index("label")
    assert text[2][start:].startswith("tank") and text[3][start:].startswith("vehicle")

    rows = list(csv.DictReader(io.StringIO(query_text(table, sql, "csv"))))
    assert [r["scene_id"] for r in rows] == ["b", "a"] and rows[0]["score"] == "0.95"
    assert json.loads(rows[0]["bbox"]) == {"xmin": 1600.0, "ymin": 4360.0, "xmax": 1640.0, "ymax": 4400.0}

    data = json.loads(query_text(table, sql, "json"))
    assert data[0] == {"scene_id": "b", "label": "tank", "score": 0.95, "date": "2026-01-02",
                       "bbox": {"xmin": 1600.0, "ymin": 4360.0, "xmax": 1640.0, "ymax": 4400.0}}
    geometry = json.loads(query_text(table, "SELECT geometry FROM detections WHERE label = 'tank'", "json"))
    assert geometry[0]["geometry"].startswith("POLYGON ((1600 4360")


def test_cli_query(table):
    runner = CliRunner()
    ok = runner.invoke(main, ["query", str(table), "SELECT count(*) AS n FROM detections", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output) == [{"n": 5}]
    bad = runner.invoke(main, ["query", str(table), "SELECT nope FROM detections"])
    # a named error (not 0, not 3: an internal error's code)
    assert bad.exit_code not in (0, 3) and "error:" in bad.output and "nope" in bad.output


def test_examples_in_the_operations_doc_run(table):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    examples = re.findall(r'pipeline query out/detections "(.*?)"', doc, flags=re.S)
    results = [run_query(table, sql) for sql in examples]  # every example runs

    def answer(marker: str):
        (found,) = [r for sql, r in zip(examples, results) if marker in sql]
        return found

    counts, inside, top = answer("AS detections"), answer("bbox.xmin >= 12.45"), answer("QUALIFY")
    assert counts.column_names == ["date", "label", "detections"] and sum(counts["detections"].to_pylist()) == 5
    assert inside.column_names[:3] == ["scene_id", "label", "score"]  # lon/lat box: no rows in this UTM table
    assert top.column_names[:2] == ["scene_id", "label"] and top.num_rows == 5  # at most 3 per scene: 3 + 2


# ---------------------------------------------------------------- the scenes view


def set_manifest_fields(root: Path, manifest: dict, drop=(), **fields) -> None:
    """Change fields of a published manifest file (plain JSON): ``drop`` removes them, as a
    writer older than scene statuses would have written it."""
    path = root / MANIFESTS / manifest["manifest"]
    raw = {k: v for k, v in {**json.loads(path.read_text()), **fields}.items() if k not in drop}
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))


@pytest.fixture()
def outcomes(table) -> Path:
    """The two complete scenes of ``table`` plus a partial
    scene c (1 row, 3 missing chips) and a failed scene d (no rows, no files)."""
    run = RunInfo("r3", "sat", "h", "m2", "EPSG:32633")
    commit_scene(table, run, "c", {"k": 4}, scene_rows(run, "c", [[0, 0, 4, 4]], [1], [0.4], "2026-01-03"),
                   scene_path="/scenes/c.tif", status="partial", missing_chips=[
                       {"chip_id": "c-0-512", "status": "error", "reason": "read error"},
                       {"chip_id": "c-512-0", "status": "error", "reason": "timeout"},
                       {"chip_id": "c-512-512", "status": "error", "reason": "read error"}])
    commit_scene(table, run, "d", {"k": 5}, scene_rows(run, "d", [], [], [], "2026-01-03"),
                   scene_path="/scenes/d.tif", status="failed", reason="unreadable scene: bad TIFF header")
    return table


def committed_at(root: Path, scene_id: str) -> dt.datetime:
    return dt.datetime.fromisoformat(committed_scenes(root)[("sat", scene_id)]["committed_at"])


SCENE_COLUMNS = [("job_name", "VARCHAR"), ("scene_id", "VARCHAR"), ("scene_path", "VARCHAR"), ("status", "VARCHAR"),
                 ("rows", "BIGINT"), ("missing_chips", "BIGINT"), ("reason", "VARCHAR"), ("run_id", "VARCHAR"),
                 ("model_id", "VARCHAR"), ("committed_at", "TIMESTAMP WITH TIME ZONE")]


def test_scenes_view_one_row_per_current_manifest(outcomes):
    result = run_query(outcomes, "SELECT * FROM scenes ORDER BY scene_id")
    assert result.column_names == [n for n, _ in SCENE_COLUMNS]
    rows = result.to_pylist()
    assert [r.pop("committed_at") for r in rows] == [committed_at(outcomes, s) for s in "abcd"]
    assert rows == [
        {"job_name": "sat", "scene_id": "a", "scene_path": "/scenes/a.tif", "status": "complete", "rows": 3,
         "missing_chips": 0, "reason": None, "run_id": "r1", "model_id": "m"},
        {"job_name": "sat", "scene_id": "b", "scene_path": "/scenes/b.tif", "status": "complete", "rows": 2,
         "missing_chips": 0, "reason": None, "run_id": "r1", "model_id": "m"},
        {"job_name": "sat", "scene_id": "c", "scene_path": "/scenes/c.tif", "status": "partial", "rows": 1,
         "missing_chips": 3, "reason": "read error; timeout", "run_id": "r3", "model_id": "m2"},
        {"job_name": "sat", "scene_id": "d", "scene_path": "/scenes/d.tif", "status": "failed", "rows": 0,
         "missing_chips": 0, "reason": "unreadable scene: bad TIFF header", "run_id": "r3", "model_id": "m2"},
    ]
    counts = run_query(outcomes, "SELECT status, count(*) AS n FROM scenes GROUP BY ALL ORDER BY status")
    assert counts.to_pylist() == [{"status": "complete", "n": 2}, {"status": "failed", "n": 1},
                                  {"status": "partial", "n": 1}]


def test_old_manifests_without_status_are_complete(table):
    for m in committed_scenes(table).values():  # as written before scene statuses existed
        set_manifest_fields(table, m, drop=("status", "missing_chips", "reason"))
        raw = json.loads((table / MANIFESTS / m["manifest"]).read_text())
        assert not {"status", "missing_chips", "reason"} & raw.keys()
    result = run_query(table, "SELECT scene_id, status, missing_chips, reason FROM scenes ORDER BY scene_id")
    assert result.to_pylist() == [{"scene_id": "a", "status": "complete", "missing_chips": 0, "reason": None},
                                  {"scene_id": "b", "status": "complete", "missing_chips": 0, "reason": None}]


def test_scenes_view_follows_the_supersede_rule(outcomes):
    # Scene d is rerun and succeeds: its failed manifest is superseded.
    run = RunInfo("r4", "sat", "h", "m2", "EPSG:32633")
    commit_scene(outcomes, run, "d", {"k": 5}, scene_rows(run, "d", [[0, 0, 4, 4]], [0], [0.7], "2026-01-04"))
    result = run_query(outcomes, "SELECT run_id, status, rows, reason FROM scenes WHERE scene_id = 'd'")
    assert result.to_pylist() == [{"run_id": "r4", "status": "complete", "rows": 1, "reason": None}]
    assert run_query(outcomes, "SELECT count(*) AS n FROM scenes").to_pylist() == [{"n": 4}]


def test_empty_table_has_an_empty_scenes_view_with_the_same_types(tmp_path, outcomes):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_query(empty, "SELECT count(*) AS n FROM scenes").to_pylist() == [{"n": 0}]
    assert table_columns(empty, "scenes") == SCENE_COLUMNS == table_columns(outcomes, "scenes")
    # Usable in expressions and joins although empty.
    sql = ("SELECT s.status, count(d.score) AS n FROM scenes s LEFT JOIN detections d USING (job_name, scene_id) "
           "WHERE s.committed_at > TIMESTAMPTZ '2020-01-01 00:00:00+00' AND s.missing_chips >= 0 GROUP BY ALL")
    assert run_query(empty, sql).num_rows == 0


def test_join_detections_to_scenes(outcomes):
    # Rows per scene outcome: failed scenes have none, so a LEFT JOIN from scenes keeps them.
    sql = ("SELECT s.status, count(DISTINCT s.scene_id) AS scenes, count(d.score) AS detections "
           "FROM scenes s LEFT JOIN detections d USING (job_name, scene_id) GROUP BY ALL ORDER BY s.status")
    assert run_query(outcomes, sql).to_pylist() == [
        {"status": "complete", "scenes": 2, "detections": 5},
        {"status": "failed", "scenes": 1, "detections": 0},
        {"status": "partial", "scenes": 1, "detections": 1}]
    # Detections of incomplete scenes, with the reason next to each row.
    sql = ("SELECT d.scene_id, d.label, s.missing_chips, s.reason FROM detections d "
           "JOIN scenes s USING (job_name, scene_id) WHERE s.status <> 'complete'")
    assert run_query(outcomes, sql).to_pylist() == [
        {"scene_id": "c", "label": "building", "missing_chips": 3, "reason": "read error; timeout"}]


def test_scenes_as_json_and_from_the_cli(outcomes):
    sql = ("SELECT scene_id, status, rows, missing_chips, reason, committed_at FROM scenes "
           "WHERE status <> 'complete' ORDER BY scene_id")
    data = json.loads(query_text(outcomes, sql, "json"))
    assert [dt.datetime.fromisoformat(r.pop("committed_at")) for r in data] == [committed_at(outcomes, s) for s in "cd"]
    assert data == [
        {"scene_id": "c", "status": "partial", "rows": 1, "missing_chips": 3, "reason": "read error; timeout"},
        {"scene_id": "d", "status": "failed", "rows": 0, "missing_chips": 0,
         "reason": "unreadable scene: bad TIFF header"}]
    ok = CliRunner().invoke(main, ["query", str(outcomes), "SELECT status, count(*) AS n FROM scenes GROUP BY ALL "
                                   "ORDER BY status", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output) == [{"status": "complete", "n": 2}, {"status": "failed", "n": 1},
                                     {"status": "partial", "n": 1}]


def test_damaged_committed_at_is_named(table):
    manifest = committed_scenes(table)[("sat", "a")]
    set_manifest_fields(table, manifest, committed_at="yesterday")
    with pytest.raises(QueryError, match=f"{manifest['manifest']}: bad committed_at 'yesterday'"):
        run_query(table, "SELECT count(*) FROM scenes")
