"""Acquisition time: from STAC items or raster tags into the table's ``acquired_at`` column."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
from readers import COLUMNS, duckdb_rows, geopandas_rows, pipeline_rows, pyarrow_rows
from real_data import real
from test_table import rows, run_info
from workspaces import tiny_checkpoint

from pipeline.config.spec import JobSpec
from pipeline.io.inputs import job_inputs
from pipeline.io.raster import acquisition_time, read_scene_info
from pipeline.io.stac import choose
from pipeline.query import run_query
from pipeline.render import render_quicklook
from pipeline.render import scene_detections as render_scene_detections
from pipeline.run.graph import run_job
from pipeline.table import commit as table_commit
from pipeline.table import schema
from pipeline.table.commit import commit_scene
from pipeline.table.maintenance import compact
from pipeline.table.state import committed_files, read_committed
from pipeline.tools.synth import synthesize

UTC = dt.timezone.utc


def _item(item_id: str, when, props: dict | None = None) -> pystac.Item:
    """An item with one asset; ``when=None`` without props: an item that carries no time at all
    (pystac refuses to build one, a catalog read from JSON can hold one)."""
    placeholder = when or (None if props else dt.datetime(2000, 1, 1, tzinfo=UTC))
    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=placeholder, properties=props or {})
    item.datetime = when
    item.add_asset("visual", pystac.Asset(href=f"/data/{item_id}.tif"))
    return item


def test_stac_selection_carries_each_items_acquisition_time():
    # datetime wins; an interval item gives its start; an item without any time gives None.
    items = [
        _item("b-instant", dt.datetime(2026, 1, 3, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
        _item("a-span", None, {"start_datetime": "2026-01-02T00:00:00Z", "end_datetime": "2026-01-04T00:00:00Z"}),
        _item("c-untimed", None),
    ]
    sel = choose(items, "/cat.json", "visual", (None, None), None)
    got = dict(zip(sel.item_ids, sel.acquired_at))
    assert len(sel.acquired_at) == len(sel.paths) == 3
    assert got["b-instant"] == dt.datetime(2026, 1, 3, 8, 30, tzinfo=UTC)  # 10:30+02:00 in UTC
    assert got["b-instant"].utcoffset() == dt.timedelta(0)
    assert got["a-span"] == dt.datetime(2026, 1, 2, tzinfo=UTC)
    assert got["c-untimed"] is None


# ---------------------------------------------------------------- a table of old and new files

# The file columns as schema version 1 first wrote them (before acquired_at), spelled out.
OLD_FILE_COLUMNS = ["geometry", "bbox", "run_id", "job_name", "scene_id", "scene_path", "label", "label_id",
                    "score", "px_xmin", "px_ymin", "px_xmax", "px_ymax", "model_id", "job_hash", "processed_at"]
ACQUIRED = dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC)


def old_schema() -> pa.Schema:
    """The detection schema as it was before acquired_at: the same fields, that column left out."""
    fields = [schema.detection_schema().field(name) for name in OLD_FILE_COLUMNS + ["date"]]
    return pa.schema(fields)


def commit_old_style(root, monkeypatch, run_id: str, scene: str, n: int, seed: int) -> None:
    """Commit as the code before acquired_at did: its rows, checked against its schema."""
    run = run_info(run_id=run_id)
    old = rows(run, scene, n, seed=seed, date="2026-01-04").select(OLD_FILE_COLUMNS + ["date"])
    assert old.schema.equals(old_schema())
    with monkeypatch.context() as patch:
        patch.setattr(table_commit, "detection_schema", old_schema)
        commit_scene(root, run, scene, {"k": scene}, old)


def commit_new_style(root, run_id: str, scene: str, n: int, seed: int, acquired_at=ACQUIRED) -> None:
    run = run_info(run_id=run_id)
    base = rows(run, scene, n, seed=seed, date="2026-01-04")
    new = base.set_column(base.schema.get_field_index("acquired_at"), "acquired_at",
                          pa.array([acquired_at] * n, pa.timestamp("us", tz="UTC")))
    commit_scene(root, run, scene, {"k": scene}, new)


@pytest.fixture(params=["old_file_first", "new_file_first"])
def mixed_table(request, tmp_path, monkeypatch):
    """One date partition holding a file without acquired_at (scene 'old', 4 rows) and one
    with it (scene 'new', 3 rows); file names start with the run id, so the run ids decide
    which file a reader that looks at the first file only sees."""
    root = tmp_path / "table"
    old_run, new_run = ("r0", "r1") if request.param == "old_file_first" else ("r1", "r0")
    commit_old_style(root, monkeypatch, old_run, "old", 4, seed=1)
    commit_new_style(root, new_run, "new", 3, seed=2)
    files = sorted(committed_files(root))
    first = pq.read_schema(files[0]).names
    assert ("acquired_at" in first) == (request.param == "new_file_first")  # the files really differ
    return root


def acquired_by_scene(table: pa.Table) -> dict[str, set]:
    out: dict[str, set] = {}
    for scene, when in zip(table["scene_id"].to_pylist(), table["acquired_at"].to_pylist()):
        out.setdefault(scene, set()).add(when)
    return out


def test_our_reader_reads_old_files_as_null(mixed_table):
    got = read_committed(mixed_table)
    assert got.schema.remove_metadata().equals(schema.detection_schema())
    assert acquired_by_scene(got) == {"old": {None}, "new": {ACQUIRED}}


def test_pipeline_query_unions_old_and_new_files_by_name(mixed_table):
    got = run_query(mixed_table, "SELECT scene_id, acquired_at FROM detections ORDER BY scene_id")
    assert acquired_by_scene(got) == {"old": {None}, "new": {ACQUIRED}}
    on_the_3rd = run_query(mixed_table, "SELECT count(*) AS n FROM detections "
                                        "WHERE CAST(acquired_at AT TIME ZONE 'UTC' AS DATE) = DATE '2026-01-03'")
    assert on_the_3rd["n"].to_pylist() == [3]


def test_pipeline_query_on_a_table_of_old_files_only(tmp_path, monkeypatch):
    commit_old_style(tmp_path, monkeypatch, "r0", "old", 4, seed=1)
    got = run_query(tmp_path, "SELECT scene_id, acquired_at FROM detections")
    assert got.num_rows == 4 and got["acquired_at"].null_count == 4


def test_plain_readers_read_every_row_of_a_mixed_table(mixed_table):
    # DuckDB, pyarrow and GeoPandas read the folder as they always do and agree with `pipeline query`.
    expected = pipeline_rows(mixed_table)
    assert len(expected) == 7
    for reader in (duckdb_rows, pyarrow_rows, geopandas_rows):
        assert reader(mixed_table) == expected, reader.__name__
    # polars refuses a column the first file lacks unless told what to do with it (docs/operations.md).
    import polars as pl

    frame = pl.scan_parquet(f"{mixed_table}/**/*.parquet", hive_partitioning=True, missing_columns="insert",
                            extra_columns="ignore").select(COLUMNS + ["date"]).collect()
    assert len(frame) == 7


def test_plain_readers_see_acquired_at_as_the_docs_say(mixed_table):
    """The recipes of docs/operations.md ("Tables with files from before acquired_at")."""
    import duckdb
    import geopandas

    rel = duckdb.sql(f"SELECT scene_id, acquired_at FROM read_parquet('{mixed_table}/**/*.parquet', "
                     "hive_partitioning = true, union_by_name = true)")
    assert acquired_by_scene(rel.arrow().read_all() if hasattr(rel.arrow(), "read_all") else rel.arrow()) == \
        {"old": {None}, "new": {ACQUIRED}}

    newest = max(Path(mixed_table).glob("date=*/*.parquet"), key=lambda p: "acquired_at" in pq.read_schema(p).names)
    full = pq.read_schema(newest).append(pa.field("date", pa.string()))
    table = ds.dataset(str(mixed_table), format="parquet", partitioning="hive", schema=full).to_table()
    assert acquired_by_scene(table) == {"old": {None}, "new": {ACQUIRED}}

    frame = geopandas.read_parquet(str(mixed_table), schema=full)
    assert frame.crs is not None and frame.geometry.notna().all()
    by_scene = frame.groupby("scene_id")["acquired_at"]
    assert by_scene.apply(lambda s: s.isna().all()).to_dict() == {"new": False, "old": True}
    assert set(frame.loc[frame.scene_id == "new", "acquired_at"]) == {pd.Timestamp(ACQUIRED)}

    # File by file, then concatenated: the old file's rows get NaT.
    frames = [geopandas.read_parquet(p) for p in sorted(Path(mixed_table).glob("date=*/*.parquet"))]
    joined = pd.concat(frames, ignore_index=True)
    assert len(joined) == 7 and joined["acquired_at"].isna().sum() == 4


def test_compaction_rewrites_old_files_with_the_column(mixed_table):
    compact(mixed_table, min_files=2)
    [path] = committed_files(mixed_table)
    assert pq.read_schema(path).names == schema.file_schema().names
    assert acquired_by_scene(pq.read_table(path)) == {"old": {None}, "new": {ACQUIRED}}


# ---------------------------------------------------------------- raster tags


@pytest.mark.parametrize("tags, expected, warned", [
    ({"TIFFTAG_DATETIME": "2026:01:03 09:15:00"}, dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC), None),
    # An acquisition tag says more than the file's own date-time: it wins.
    ({"TIFFTAG_DATETIME": "2026:02:01 00:00:00", "ACQUISITIONDATETIME": "2026-01-03T09:15:00Z"},
     dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC), None),
    ({"ACQUISITION_DATE": "2026-01-03"}, dt.datetime(2026, 1, 3, tzinfo=UTC), None),
    ({"acquisition_datetime": "2026-01-03T10:15:00+01:00"}, dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC), None),
    ({"AREA_OR_POINT": "Area"}, None, None),
    ({}, None, None),
    # Strict: nothing is guessed from a malformed value, and the first tag found decides.
    ({"TIFFTAG_DATETIME": "2026:13:03 09:15:00"}, None, "TIFFTAG_DATETIME"),
    ({"TIFFTAG_DATETIME": "0000:00:00 00:00:00"}, None, "TIFFTAG_DATETIME"),
    ({"TIFFTAG_DATETIME": "2026-01-03 09:15"}, None, "TIFFTAG_DATETIME"),
    ({"ACQUISITIONDATETIME": "yesterday", "TIFFTAG_DATETIME": "2026:01:03 09:15:00"}, None, "ACQUISITIONDATETIME"),
])
def test_acquisition_time_from_tags(tags, expected, warned):
    when, warning = acquisition_time(tags, "scene_7 (/data/scene_7.tif)")
    assert when == expected
    if warned is None:
        assert warning is None
    else:
        assert warning is not None and warned in warning and "scene_7" in warning and repr(tags[warned]) in warning


def test_scene_info_reads_the_real_rasters_tag():
    # all-nodata.tif holds TIFFTAG_DATETIME '2022:01:17 10:43:43' (rasterio reads it back below).
    path = real("all-nodata.tif")
    with rasterio.open(path) as src:
        assert src.tags()["TIFFTAG_DATETIME"] == "2022:01:17 10:43:43"
    info = read_scene_info(path)
    assert info.acquired_at == dt.datetime(2022, 1, 17, 10, 43, 43, tzinfo=UTC)
    assert info.acquired_at_warning is None
    assert read_scene_info(real("RGB.byte.tif")).acquired_at is None  # no such tag


def tagged_copy(src: Path, dst: Path, **tags) -> Path:
    """A copy of ``src`` with GDAL metadata ``tags`` (TIFFTAG_* become real TIFF tags)."""
    shutil.copy(src, dst)
    with rasterio.open(dst, "r+") as ds_:
        ds_.update_tags(**tags)
    with rasterio.open(dst) as check:
        assert all(check.tags()[k] == v for k, v in tags.items())
    return dst


# ---------------------------------------------------------------- through `pipeline run`


@pytest.fixture(scope="module")
def run_workspace(module_tmp):
    """Two 256 px synthetic scenes: one tagged with a TIFF date-time, one with a value that
    is no date-time; the tiny model; a STAC catalog whose one item is the second scene."""
    root = module_tmp("acquired")
    made = synthesize(root / "made", scenes=2, size=256, seed=5)
    (root / "scenes").mkdir()
    tagged_copy(made[0], root / "scenes" / "tagged.tif", TIFFTAG_DATETIME="2026:01:03 09:15:00")
    tagged_copy(made[1], root / "scenes" / "garbled.tif", TIFFTAG_DATETIME="not a time")
    tiny_checkpoint(root / "model.pt")
    item = pystac.Item(id="item-garbled", geometry=None, bbox=None,
                       datetime=dt.datetime(2026, 1, 2, 23, 0, tzinfo=UTC), properties={})
    item.add_asset("visual", pystac.Asset(href=str(root / "scenes" / "garbled.tif")))
    (root / "items.json").write_text(json.dumps(pystac.ItemCollection([item]).to_dict()))
    return root


def run_spec(root: Path, table: str, inputs: dict) -> JobSpec:
    return JobSpec.model_validate({
        "name": "acquired", "inputs": {**inputs, "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 0, "min_valid_fraction": 0.05},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": 4,
                  "precision": "fp32"},
        "compute": {"actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1, "max_retries": 1},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    })


def test_a_run_takes_the_rasters_tag_and_reports_one_that_does_not_parse(run_workspace, ray_session):
    spec = run_spec(run_workspace, "from-tags", {"paths": [str(run_workspace / "scenes" / "*.tif")]})
    report = run_job(spec, log=lambda m: None)
    assert report["exit_code"] == 0 and sorted(report["scenes_ok"]) == ["garbled", "tagged"], report
    got = read_committed(run_workspace / "from-tags")
    assert got.num_rows == report["detections"] > 0
    assert set(got["scene_id"].to_pylist()) == {"garbled", "tagged"}  # both scenes have rows to check
    assert acquired_by_scene(got) == {"tagged": {dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC)}, "garbled": {None}}
    [warning] = [w for w in report["warnings"] if "acquired_at" in w]
    assert "garbled" in warning and "TIFFTAG_DATETIME" in warning and "'not a time'" in warning
    # The run report records the job's score threshold, so a quicklook's title can name it.
    assert report["score_threshold"] == 0.3
    title = render_quicklook(run_workspace / "from-tags", str(run_workspace / "scenes" / "tagged.tif"),
                             run_workspace / "tagged.png")["title"]
    assert title.endswith("| score >= 0.3") and f"run {report['run_id']}" in title


def test_a_stac_run_takes_the_items_time(run_workspace, ray_session):
    spec = run_spec(run_workspace, "from-stac", {"stac": {"source": str(run_workspace / "items.json")}})
    inputs, _ = job_inputs(spec)
    assert [(s.scene_id, s.acquired_at) for s in inputs.scenes] == \
        [("item-garbled", dt.datetime(2026, 1, 2, 23, 0, tzinfo=UTC))]
    report = run_job(spec, log=lambda m: None)
    assert report["exit_code"] == 0 and report["detections"] > 0, report
    got = read_committed(run_workspace / "from-stac")
    # The item's time, not the file's tag (which does not parse and is then not even looked at).
    assert acquired_by_scene(got) == {"item-garbled": {dt.datetime(2026, 1, 2, 23, 0, tzinfo=UTC)}}
    assert not [w for w in report["warnings"] if "acquired_at" in w]
    on_the_2nd = run_query(run_workspace / "from-stac", "SELECT count(*) AS n FROM detections "
                           "WHERE CAST(acquired_at AT TIME ZONE 'UTC' AS DATE) = DATE '2026-01-02'")
    assert on_the_2nd["n"].to_pylist() == [got.num_rows]


@pytest.mark.slow  # predicts a whole scene
def test_predict_scene_carries_the_rasters_acquisition_time(run_workspace):
    from pipeline.run.predict import predict_scene

    frame = predict_scene(str(run_workspace / "scenes" / "tagged.tif"), str(run_workspace / "model.pt"),
                          progress=False, **{"tiling.chip_size": 256, "tiling.overlap": 0,
                                             "model.score_threshold": 0.3})
    assert len(frame) > 0
    assert set(frame["acquired_at"]) == {pd.Timestamp(dt.datetime(2026, 1, 3, 9, 15, tzinfo=UTC))}
    with pytest.warns(UserWarning, match="garbled.*TIFFTAG_DATETIME.*'not a time'"):
        garbled = predict_scene(str(run_workspace / "scenes" / "garbled.tif"), str(run_workspace / "model.pt"),
                                progress=False, **{"tiling.chip_size": 256, "tiling.overlap": 0})
    assert garbled["acquired_at"].isna().all()


def test_eval_and_render_read_a_mixed_table(mixed_table, tmp_path):
    """Our other readers on a table of old and new files: eval scores every row (truth = the
    committed boxes: every detection a hit), render draws both scenes' rows."""
    from pipeline.eval.evaluate import evaluate_table

    rows_ = read_committed(mixed_table)
    lines = ["image_path,xmin,ymin,xmax,ymax,label"]
    for scene, label, *box in zip(*(rows_[c].to_pylist() for c in ["scene_id", "label", "px_xmin", "px_ymin",
                                                                     "px_xmax", "px_ymax"])):
        lines.append(f"{scene}.tif,{','.join(f'{v:.6f}' for v in box)},{label}")
    (tmp_path / "truth.csv").write_text("\n".join(lines) + "\n")
    metrics = evaluate_table(mixed_table, [tmp_path / "truth.csv"])
    assert sorted(metrics["scenes"]) == ["new", "old"] and metrics["AP50"] == pytest.approx(1.0)
    # render reads a scene's rows through this (the rows' scene files are not on this machine).
    assert [len(render_scene_detections(mixed_table, scene).boxes) for scene in ("old", "new")] == [4, 3]


def test_an_object_store_table_of_old_and_new_files(s3_server, monkeypatch):
    s3_server.create_bucket(Bucket="acquired-bucket")
    url = "s3://acquired-bucket/tables/mixed"
    commit_old_style(url, monkeypatch, "r0", "old", 4, seed=1)
    commit_new_style(url, "r1", "new", 3, seed=2)
    assert acquired_by_scene(read_committed(url)) == {"old": {None}, "new": {ACQUIRED}}
    got = run_query(url, "SELECT scene_id, acquired_at FROM detections")
    assert acquired_by_scene(got) == {"old": {None}, "new": {ACQUIRED}}
