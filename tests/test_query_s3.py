"""`pipeline query` on a table in an S3-compatible store (moto on 127.0.0.1): the committed
files read in place (the same answers as the same table in a folder), spatial SQL and
`--out` files, an http:// endpoint without AWS_ALLOW_HTTP, and store failures as named
errors."""
from __future__ import annotations

import os
import subprocess
import sys

import geopandas as gpd
import pyogrio
import pytest
import shapely
from click.testing import CliRunner
from moto_server import free_port, start_moto, stop
from test_table import rows, run_info

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.io.objstore import ObjectStoreError
from pipeline.query import query_to_file, run_query
from pipeline.table.commit import commit_scene
from pipeline.table.maintenance import compact
from pipeline.table.state import committed_files, read_committed
from pipeline.table.store import open_store

BUCKET = "query-bucket"
QUESTIONS = [
    "SELECT date, label, count(*) AS n, round(sum(score), 4) AS s FROM detections GROUP BY ALL ORDER BY ALL",
    "SELECT scene_id, count(*) AS n FROM detections WHERE scene_id = 'b' GROUP BY ALL",
    "SELECT count(*) AS n FROM detections WHERE date = DATE '2024-05-02' AND score > 0.5",
    "SELECT count(*) AS n FROM detections WHERE ST_Intersects(geometry, "
    "ST_GeomFromText('POLYGON((500100 3999700, 500400 3999700, 500400 3999900, 500100 3999900, 500100 3999700))'))",
    "SELECT d.scene_id, s.status, count(*) AS n FROM detections d JOIN scenes s USING (job_name, scene_id) "
    "GROUP BY ALL ORDER BY ALL",
]


def commit_nights(root: str) -> None:
    """Three scenes over two nights, scene a committed again (its first rows superseded),
    then compacted, then scene b committed again over the compacted file."""
    run = run_info()
    for scene, n, day in (("a", 40, "2024-05-01"), ("b", 30, "2024-05-01"), ("c", 25, "2024-05-02")):
        commit_scene(root, run, scene, "k", rows(run, scene, n, seed=n, date=day))
    again = run_info(run_id="r2")
    commit_scene(root, again, "a", "k2", rows(again, "a", 12, seed=7, date="2024-05-02"))
    compact(root)
    commit_scene(root, again, "b", "k2", rows(again, "b", 9, seed=8, date="2024-05-01"))


@pytest.fixture(scope="module")
def tables(s3_server, module_tmp) -> tuple[str, str]:
    """(s3 URL, local folder) holding the same commits."""
    s3_server.create_bucket(Bucket=BUCKET)
    url, local = f"s3://{BUCKET}/tables/nights", str(module_tmp("local") / "nights")
    for root in (url, local):
        commit_nights(root)
    return url, local


def test_s3_table_answers_as_the_same_table_in_a_folder(tables):
    url, local = tables
    assert read_committed(url).num_rows == 25 + 12 + 9 == read_committed(local).num_rows
    for sql in QUESTIONS:
        got, expected = run_query(url, sql), run_query(local, sql)
        assert got.num_rows > 0 and got.to_pylist() == expected.to_pylist(), sql
    types = run_query(url, "SELECT column_name, column_type FROM (DESCRIBE detections)").to_pylist()
    assert {r["column_name"]: r["column_type"] for r in types}["geometry"] == "GEOMETRY('EPSG:32633')"


def test_query_out_from_an_s3_table(tables, tmp_path):
    url, local = tables
    out = tmp_path / "b.gpkg"
    sql = "SELECT * EXCLUDE (bbox) FROM detections WHERE scene_id = 'b'"
    assert query_to_file(url, sql, out) == 9
    frame, oracle = gpd.read_file(out), gpd.read_parquet(committed_files(local)[0])
    assert len(frame) == 9 and frame.crs == oracle.crs and frame.crs.to_epsg() == 32633
    assert set(frame["run_id"]) == {"r2"} and pyogrio.read_info(out)["geometry_type"] == "Polygon"
    cli = CliRunner().invoke(main, ["query", url, sql, "-o", str(tmp_path / "b.fgb")])
    assert cli.exit_code == 0 and "9 rows" in cli.output, cli.output
    assert len(gpd.read_file(tmp_path / "b.fgb")) == 9


def test_an_aoi_file_in_the_store(tables, s3_server, tmp_path):
    url, local = tables
    aoi = gpd.GeoDataFrame({"name": ["box"]}, geometry=[shapely.box(500100, 3999700, 500400, 3999900)],
                           crs="EPSG:32633").to_crs("EPSG:4326")
    aoi.to_file(tmp_path / "aoi.geojson")
    s3_server.upload_file(str(tmp_path / "aoi.geojson"), BUCKET, "aois/aoi.geojson")
    sql = ("SELECT a.name, count(*) AS n FROM detections d JOIN aoi a ON ST_Intersects(d.geometry, a.geometry) "
           "GROUP BY ALL")
    got = run_query(url, sql, aoi=f"s3://{BUCKET}/aois/aoi.geojson").to_pylist()
    assert got == run_query(local, sql, aoi=tmp_path / "aoi.geojson").to_pylist() and got[0]["n"] > 0
    with pytest.raises(InputError, match="aois/missing.geojson"):
        run_query(url, sql, aoi=f"s3://{BUCKET}/aois/missing.geojson")


def cli_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "AWS_ALLOW_HTTP"}
    return {**env, **changes}


def pipeline_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_http_endpoint_works_without_allow_http(tables, tmp_path):
    """AWS_ENDPOINT_URL=http://... is the only setting: obstore (manifests), pyarrow (the
    files) and GDAL (an --out file is local, the scene reads are in test_objstore) all use it."""
    url, _ = tables
    done = pipeline_cli("query", url, "SELECT count(*) AS n FROM detections", "--format", "csv", env=cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["n", "46"]
    # writes too: a commit into a new table, then read back
    fresh = f"s3://{BUCKET}/tables/over-http"
    commit = ("from pipeline.table.commit import commit_scene; from test_table import rows, run_info; r = run_info(); "
              f"commit_scene({fresh!r}, r, 'a', 'k', rows(r, 'a', 5))")
    done = subprocess.run([sys.executable, "-c", commit], env=cli_env(PYTHONPATH=os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_committed(fresh).num_rows == 5


def test_a_missing_bucket_is_named(s3_server):
    url = "s3://no-such-bucket-here/tables/t"
    run = run_info()
    with pytest.raises(ObjectStoreError, match="bucket s3://no-such-bucket-here does not exist"):
        commit_scene(url, run, "a", "k", rows(run, "a", 3))
    with pytest.raises(ObjectStoreError, match="bucket s3://no-such-bucket-here does not exist"):
        run_query(url, "SELECT count(*) FROM detections")
    compact = CliRunner().invoke(main, ["vacuum", url, "--grace", "0"])
    assert compact.exit_code not in (0, 3) and "no-such-bucket-here does not exist" in compact.output, compact.output
    assert "Traceback" not in compact.output


@pytest.fixture()
def strict_s3():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0); its endpoint."""
    port = free_port()
    proc = start_moto(port, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_refused_credentials_are_named(strict_s3):
    env = cli_env(AWS_ENDPOINT_URL=strict_s3, AWS_ACCESS_KEY_ID="nobody", AWS_SECRET_ACCESS_KEY="wrong")
    url = f"s3://{BUCKET}/tables/t"
    done = pipeline_cli("query", url, "SELECT count(*) FROM detections", env=env)
    assert done.returncode not in (0, 3) and "Traceback" not in done.stderr, done.stderr
    assert f"error: {url}/_table.json: object store request failed" in done.stderr and "403" in done.stderr
    commit = ("from pipeline.table.commit import commit_scene; from test_table import rows, run_info; r = run_info(); "
              f"commit_scene({url!r}, r, 'a', 'k', rows(r, 'a', 3))")
    done = subprocess.run([sys.executable, "-c", commit], env={**env, "PYTHONPATH": os.path.dirname(__file__)},
                          capture_output=True, text=True, timeout=120)
    assert "ObjectStoreError" in done.stderr and "InvalidAccessKeyId" in done.stderr, done.stderr


@pytest.mark.slow  # the object store client's retries take seconds before it gives up
def test_an_unreachable_endpoint_is_named(tables):
    url, _ = tables
    env = cli_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    done = pipeline_cli("query", url, "SELECT count(*) FROM detections", env=env)
    assert done.returncode not in (0, 3) and "Traceback" not in done.stderr, done.stderr
    assert f"error: {url}/_table.json: object store request failed" in done.stderr
    with pytest.raises(ObjectStoreError, match=f"{BUCKET}/elsewhere/x"):
        os.environ["AWS_ENDPOINT_URL"], saved = env["AWS_ENDPOINT_URL"], os.environ["AWS_ENDPOINT_URL"]
        try:
            from pipeline.io.objstore import store_for

            store_for.cache_clear()
            open_store(f"s3://{BUCKET}/elsewhere").read("x")
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            store_for.cache_clear()


def test_geometry_filters_agree_with_shapely(tables):
    url, _ = tables
    window = shapely.box(500100, 3999700, 500400, 3999900)
    frame = gpd.GeoDataFrame(read_committed(url).to_pandas().assign(
        geometry=lambda f: gpd.GeoSeries.from_wkb(f["geometry"])), geometry="geometry")
    sql = f"SELECT count(*) AS n FROM detections WHERE ST_Intersects(geometry, ST_GeomFromText('{window.wkt}'))"
    assert run_query(url, sql).to_pylist() == [{"n": int(frame.intersects(window).sum())}]
