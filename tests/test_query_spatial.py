"""`pipeline query` with DuckDB's spatial functions (no download), a user's AOI polygons,
and result files people open (GeoPackage, FlatGeobuf, GeoJSON, GeoParquet, CSV), checked
against shapely/GeoPandas/pyogrio as the oracles."""
from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from click.testing import CliRunner
from pyproj import CRS

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.geo.georef import box_corners
from pipeline.query import OUT_SUFFIXES, QueryError, query_to_file, run_query, table_columns
from pipeline.table import schema
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.state import committed_files

CLASSES = ["vehicle", "building"]
CRS_TABLE = "EPSG:32633"
ORIGIN = (500_000.0, 4_500_000.0)  # UTM 33N, near 40.65 N 15 E
README = Path(__file__).resolve().parents[1] / "README.md"


def scene_rows(run: RunInfo, scene: str, rng: np.random.Generator, n: int, date: str):
    """n random boxes 2..30 m wide in a 2 km square at ORIGIN (1 m pixels, y up)."""
    xy = rng.uniform(0, 2000, (n, 2))
    wh = rng.uniform(2, 30, (n, 2))
    px = np.concatenate([xy, xy + wh], axis=1)
    corners = box_corners(px) * [1.0, -1.0] + [ORIGIN[0], ORIGIN[1] + 2000]
    return schema.build_detection_table(
        corners, px, rng.uniform(0.3, 1.0, n), rng.integers(0, 2, n), CLASSES, run_id=run.run_id,
        job_name=run.job_name, scene_id=scene, scene_path=f"/scenes/{scene}.tif", model_id=run.model_id,
        job_hash=run.job_hash, processed_at=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), date=date)


@pytest.fixture(scope="module")
def table(module_tmp) -> Path:
    root = module_tmp("spatial") / "table"
    run = RunInfo("r1", "sat", "h", "m", CRS_TABLE)
    rng = np.random.default_rng(31)
    for scene, date in (("a", "2026-01-01"), ("b", "2026-01-02"), ("c", "2026-01-02")):
        commit_scene(root, run, scene, {"k": scene}, scene_rows(run, scene, rng, 150, date))
    return root


def table_frame(root: Path) -> gpd.GeoDataFrame:
    """The oracle's copy: every committed file read by GeoPandas (its CRS from the GeoParquet metadata)."""
    frames = [gpd.read_parquet(path) for path in committed_files(root)]
    return gpd.GeoDataFrame(gpd.pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def table_crs(root: Path) -> CRS:
    """The table's CRS as its GeoParquet metadata says (not our own reader)."""
    meta = pq.read_schema(committed_files(root)[0]).metadata[b"geo"]
    return CRS.from_json_dict(json.loads(meta)["columns"]["geometry"]["crs"])


def rounded(values) -> list[float]:
    """float32 cells as Python floats rounded to 3 decimals (as the rows from DuckDB are)."""
    return [round(float(v), 3) for v in values]


def aoi_polygons() -> gpd.GeoDataFrame:
    """Two irregular polygons over parts of the table, in lon/lat (EPSG:4326)."""
    x0, y0 = ORIGIN
    west = [(100, 200), (900, 150), (700, 1100), (250, 800)]
    east = [(1200, 1200), (1900, 1300), (1500, 1900)]
    in_utm = [shapely.Polygon([(x0 + x, y0 + y) for x, y in ring]) for ring in (west, east)]
    utm = gpd.GeoDataFrame({"name": ["west", "east"]}, geometry=in_utm, crs=CRS_TABLE)
    return utm.to_crs("EPSG:4326")


def test_st_functions_work_without_a_download(table, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh user: nothing installed under ~/.duckdb
    x0, y0 = ORIGIN
    window = shapely.box(x0 + 300, y0 + 300, x0 + 1100, y0 + 900)
    sql = ("SELECT scene_id, px_xmin, px_ymin FROM detections "
           f"WHERE ST_Intersects(geometry, ST_GeomFromText('{window.wkt}')) ORDER BY ALL")
    got = [(r["scene_id"], round(r["px_xmin"], 3), round(r["px_ymin"], 3)) for r in run_query(table, sql).to_pylist()]
    frame = table_frame(table)
    hit = frame[frame.intersects(window)]
    expected = sorted(zip(hit.scene_id, rounded(hit.px_xmin), rounded(hit.px_ymin)))
    assert 0 < len(got) < len(frame) and got == expected
    area = run_query(table, "SELECT sum(ST_Area(geometry)) AS a FROM detections").to_pylist()[0]["a"]
    assert area == pytest.approx(frame.area.sum())
    assert not (tmp_path / ".duckdb").exists()


def test_geometry_is_a_geometry_column(table):
    assert dict(table_columns(table))["geometry"] == "GEOMETRY('EPSG:32633')"
    sql = "SELECT ST_GeometryType(geometry) AS t, count(*) AS n FROM detections GROUP BY ALL"
    assert run_query(table, sql).to_pylist() == [{"t": "POLYGON", "n": 450}]


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".shp"])
def test_detections_inside_aoi_polygons(table, tmp_path, suffix):
    aoi = aoi_polygons()
    path = tmp_path / f"aoi{suffix}"
    aoi.to_file(path)
    sql = ("SELECT a.name, d.scene_id, d.px_xmin, d.px_ymin FROM detections d "
           "JOIN aoi a ON ST_Within(d.geometry, a.geometry) ORDER BY ALL")
    got = [(r["name"], r["scene_id"], round(r["px_xmin"], 3), round(r["px_ymin"], 3))
           for r in run_query(table, sql, aoi=path).to_pylist()]
    frame = table_frame(table)
    joined = gpd.sjoin(frame, aoi.to_crs(frame.crs), predicate="within")
    expected = sorted(zip(joined.name, joined.scene_id, rounded(joined.px_xmin), rounded(joined.px_ymin)))
    assert len(expected) > 20 and got == expected
    assert {n for n, *_ in got} == {"west", "east"}


def test_an_aoi_without_crs_is_named(table, tmp_path):
    path = tmp_path / "nocrs.shp"
    gpd.GeoDataFrame({"name": ["x"]}, geometry=[shapely.box(0, 0, 1, 1)]).to_file(path)  # no .prj
    with pytest.raises(InputError, match=r"nocrs\.shp.*no CRS"):
        run_query(table, "SELECT count(*) FROM aoi", aoi=path)
    with pytest.raises(InputError, match=r"missing\.gpkg"):
        run_query(table, "SELECT count(*) FROM aoi", aoi=tmp_path / "missing.gpkg")


# ---------------------------------------------------------------- files people open

INSIDE = ("SELECT d.* EXCLUDE (bbox), a.name AS aoi FROM detections d JOIN aoi a "
          "ON ST_Within(d.geometry, a.geometry) ORDER BY d.scene_id, d.px_xmin")


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson", ".parquet", ".csv"])
def test_out_files_open_with_geometry_and_crs(table, tmp_path, suffix):
    aoi = tmp_path / "aoi.gpkg"
    aoi_polygons().to_file(aoi)
    out = tmp_path / f"inside{suffix}"
    written = query_to_file(table, INSIDE, out, aoi=aoi)
    expected = run_query(table, INSIDE, aoi=aoi)
    assert written == expected.num_rows > 20
    crs = table_crs(table)
    if suffix == ".parquet":
        frame = gpd.read_parquet(out)
    elif suffix == ".csv":
        frame = gpd.read_file(out, GEOM_POSSIBLE_NAMES="geometry", KEEP_GEOM_COLUMNS="NO")
        frame["px_xmin"] = frame["px_xmin"].astype(float)  # CSV cells are text
    else:
        frame = gpd.read_file(out)
        info = pyogrio.read_info(out)
        assert info["features"] == written and info["geometry_type"] in ("Polygon", "MultiPolygon", "Unknown")
        assert CRS.from_user_input(info["crs"]) == crs
    assert len(frame) == written and set(frame.geom_type) == {"Polygon"}
    frame = frame.sort_values(["scene_id", "px_xmin"], ignore_index=True)  # FlatGeobuf's index orders by place
    if suffix != ".csv":  # a CSV has no place for a CRS: geometry as WKT only
        assert frame.crs == crs
    oracle = gpd.GeoSeries.from_wkb(expected["geometry"].to_pylist(), crs=crs)
    assert frame.geometry.geom_equals_exact(oracle, tolerance=1e-6).all()
    assert list(frame["scene_id"]) == expected["scene_id"].to_pylist()
    assert list(frame["aoi"]) == expected["aoi"].to_pylist()
    np.testing.assert_allclose(frame["score"].astype(float), expected["score"].to_numpy(), rtol=1e-6)


def test_out_keeps_the_bbox_and_dates_in_geoparquet(table, tmp_path):
    out = tmp_path / "all.parquet"
    assert query_to_file(table, "SELECT * FROM detections", out) == 450
    frame = gpd.read_parquet(out)
    assert frame.crs == table_crs(table) and len(frame) == 450
    assert sorted(frame["date"].astype(str).unique()) == ["2026-01-01", "2026-01-02"]
    np.testing.assert_allclose(frame.bounds["minx"], [b["xmin"] for b in frame["bbox"]])


def test_out_without_geometry_writes_a_plain_table(table, tmp_path):
    out = tmp_path / "counts.csv"
    assert query_to_file(table, "SELECT scene_id, count(*) AS n FROM detections GROUP BY ALL ORDER BY 1", out) == 3
    frame = pyogrio.read_dataframe(out)
    assert list(frame["scene_id"]) == ["a", "b", "c"] and list(frame["n"].astype(int)) == [150, 150, 150]


def test_an_unknown_out_suffix_is_named_before_running(table, tmp_path):
    out = tmp_path / "result.xlsx"
    with pytest.raises(QueryError, match=r"result\.xlsx.*" + re.escape(", ".join(OUT_SUFFIXES))):
        query_to_file(table, "SELECT no_such_column FROM detections", out)  # the SQL is never run
    assert not out.exists()
    bad = CliRunner().invoke(main, ["query", str(table), "SELECT 1", "-o", str(out)])
    assert bad.exit_code != 0 and ".gpkg" in bad.output and "Traceback" not in bad.output


def test_cli_out_and_aoi(table, tmp_path):
    aoi = tmp_path / "aoi.geojson"
    aoi_polygons().to_file(aoi)
    out = tmp_path / "inside.gpkg"
    ok = CliRunner().invoke(main, ["query", str(table), INSIDE, "--aoi", str(aoi), "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    n = run_query(table, INSIDE, aoi=aoi).num_rows
    assert str(out) in ok.output and f"{n} rows" in ok.output
    assert pyogrio.read_info(out)["features"] == n


def test_readme_qgis_recipe_runs(table, tmp_path, monkeypatch):
    """The README's "Take the answers to QGIS" commands, run as written (table and AOI paths swapped in)."""
    section = README.read_text().split("### Take the answers to QGIS", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert commands and all(c[:2] == ["pipeline", "query"] for c in commands)
    monkeypatch.chdir(tmp_path)
    aoi_polygons().to_file(tmp_path / "fields.geojson")
    for command in commands:
        args = [str(table) if a == "out/detections" else a for a in command[1:]]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (command, result.output)
        out = args[args.index("-o") + 1]
        frame = gpd.read_file(tmp_path / out)
        assert len(frame) > 0 and frame.crs == table_crs(table)
