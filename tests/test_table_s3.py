"""The detection table in an S3-compatible object store (moto on 127.0.0.1): the same
commit protocol with conditional manifest writes, through `pipeline run`, query, vacuum."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
import yaml
from click.testing import CliRunner
from pyproj import CRS
from test_table import rows, run_info, run_two_writers
from workspaces import tiny_checkpoint

from pipeline.cli import main
from pipeline.table import commit as table_commit
from pipeline.table.commit import commit_scene
from pipeline.table.maintenance import compact, vacuum
from pipeline.table.state import MANIFESTS, STAGING, committed_scenes, read_committed
from pipeline.table.store import open_store

BUCKET = "detections-bucket"


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.create_bucket(Bucket=BUCKET)
    return s3_server


def table_url(name: str) -> str:
    return f"s3://{BUCKET}/tables/{name}"


def data_keys(url: str) -> list[str]:
    return [e.key for e in open_store(url).list() if e.key.startswith("date=")]


def plain_rows(url: str) -> int:
    """What a plain reader listing the prefix sees: every *.parquet under date=."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(url)
    return sum(pq.read_metadata(pa.BufferReader(store.read(k))).num_rows for k in data_keys(url))


def test_manifests_are_created_with_a_conditional_write(bucket):
    store = open_store(table_url("conditional"))
    store.create("_manifests/x.json", b"first")
    with pytest.raises(FileExistsError):
        store.create("_manifests/x.json", b"second")
    assert store.read("_manifests/x.json") == b"first"


def test_commit_rerun_and_supersede(bucket):
    url = table_url("commits")
    run = run_info()
    commit_scene(url, run, "a", "k", rows(run, "a", 10, seed=1, date="2024-05-01"))
    commit_scene(url, run, "b", "k", rows(run, "b", 7, seed=2, date="2024-05-01"))
    again = run_info(run_id="r2")
    commit_scene(url, again, "a", "k2", rows(again, "a", 4, seed=3, date="2024-05-02"))
    assert read_committed(url).num_rows == 11 == plain_rows(url)
    assert len(data_keys(url)) == 2 and not [e for e in open_store(url).list(STAGING)]
    assert committed_scenes(url)[("sat", "a")]["scene_key"] == "k2"


def _publish_then_die(url: str) -> None:
    table_commit.move_into_place = lambda *a, **k: os._exit(17)
    run = run_info(run_id="r9")
    commit_scene(url, run, "a", "k9", rows(run, "a", 3, seed=9))


@pytest.mark.slow  # the local twin (tests/test_table*.py, test_compact.py) is in the fast tier
def test_a_writer_killed_mid_commit_is_recovered(bucket):
    url = table_url("killed")
    run = run_info()
    commit_scene(url, run, "a", "k", rows(run, "a", 10, seed=1))
    child = mp.get_context("spawn").Process(target=_publish_then_die, args=(url,))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    assert read_committed(url).num_rows == 3 and plain_rows(url) == 10  # published; not yet moved
    vacuum(url, grace_s=0)
    assert read_committed(url).num_rows == 3 == plain_rows(url)
    assert not open_store(url).list(STAGING)


@pytest.mark.slow  # the local twin (tests/test_table*.py, test_compact.py) is in the fast tier
def test_compact_rerun_and_a_killed_writer_in_s3(bucket):
    url = table_url("compacted")
    run = run_info()
    for i, scene in enumerate("abcd"):
        commit_scene(url, run, scene, "k", rows(run, scene, 5 + i, seed=i))
    (summary,) = compact(url)
    assert (summary["files_before"], summary["files_after"], summary["rows"]) == (4, 1, 26)
    assert len(data_keys(url)) == 1 and plain_rows(url) == 26 == read_committed(url).num_rows
    again = run_info(run_id="r2")
    commit_scene(url, again, "b", "k2", rows(again, "b", 2, seed=8))  # rewrites the compacted file without b
    assert plain_rows(url) == 26 - 6 + 2 == read_committed(url).num_rows and len(data_keys(url)) == 2
    child = mp.get_context("spawn").Process(target=_publish_then_die, args=(url,))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    assert read_committed(url).num_rows == 22 - 5 + 3  # scene a's new rows, from staging
    vacuum(url, grace_s=0)
    assert plain_rows(url) == 20 == read_committed(url).num_rows
    assert [s["compacted"] for s in compact(url)] == [True] and len(data_keys(url)) == 1
    assert plain_rows(url) == 20 == read_committed(url).num_rows


@pytest.mark.slow  # the local twin (tests/test_table*.py, test_compact.py) is in the fast tier
def test_two_concurrent_writers(bucket):
    url = table_url("concurrent")
    run_two_writers(url)
    names = [e.key for e in open_store(url).list(MANIFESTS)]
    assert len(names) == len(set(names)) == 32  # every commit published under its own name
    current = committed_scenes(url)
    assert len(current) == 17 and read_committed(url).num_rows == plain_rows(url)


def test_pipeline_run_rerun_force_query_vacuum_into_s3(bucket, tmp_path, ray_session):

    from pipeline.tools.synth import synthesize

    synthesize(tmp_path / "scenes", scenes=2, size=300, seed=4)
    tiny_checkpoint(tmp_path / "model.pt")
    bucket.upload_file(str(tmp_path / "model.pt"), BUCKET, "models/model.pt")
    url = table_url("nightly")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "s3-nightly",
        "inputs": {"paths": [str(tmp_path / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 32},
        "model": {"checkpoint": f"s3://{BUCKET}/models/model.pt", "precision": "fp32"},
        "compute": {"actors": 1, "gpus_per_actor": 0, "max_retries": 0},
        "output": {"table": url},
    }))
    cli = CliRunner()

    def run(*extra) -> dict:
        result = cli.invoke(main, ["run", str(job), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{"):])

    first = run()
    assert first["scenes_ok"] == 2 and first["report_path"].startswith(url)
    n = read_committed(url).num_rows
    assert n > 0 and plain_rows(url) == n
    assert run()["scenes_skipped_done"] == 2
    assert run("--force")["scenes_ok"] == 2
    assert plain_rows(url) == n == read_committed(url).num_rows and len(data_keys(url)) == 2
    query = cli.invoke(main, ["query", url, "SELECT count(*) AS n, min(date) IS NOT NULL AS dated FROM detections",
                              "--format", "json"])
    assert query.exit_code == 0 and json.loads(query.output) == [{"n": n, "dated": True}], query.output
    scenes = cli.invoke(main, ["query", url, "SELECT status, count(*) AS n FROM scenes GROUP BY ALL", "--format",
                               "json"])
    assert json.loads(scenes.output) == [{"status": "complete", "n": 2}]
    out = tmp_path / "detections.gpkg"
    written = cli.invoke(main, ["query", url, "SELECT * EXCLUDE (bbox) FROM detections", "-o", str(out)])
    assert written.exit_code == 0 and f"{n} rows" in written.output, written.output
    geo = json.loads(pq.read_schema(pa.BufferReader(open_store(url).read(data_keys(url)[0]))).metadata[b"geo"])
    info = pyogrio.read_info(out)  # the file's CRS is the one the table's GeoParquet metadata names
    assert info["features"] == n and CRS.from_user_input(info["crs"]) == CRS.from_json_dict(
        geo["columns"]["geometry"]["crs"])
    vacuum = cli.invoke(main, ["vacuum", url, "--grace", "0"])
    assert vacuum.exit_code == 0 and "2 superseded" in vacuum.output, vacuum.output  # the first run's manifests
    assert read_committed(url).num_rows == n
    compact = cli.invoke(main, ["compact", url])
    assert compact.exit_code == 0 and "rewrote 2 files -> 1" in compact.output, compact.output
    assert plain_rows(url) == n and len(data_keys(url)) == 1
    assert run()["scenes_skipped_done"] == 2  # compaction changes no scene's identity
    assert run("--force")["scenes_ok"] == 2
    assert plain_rows(url) == n == read_committed(url).num_rows
    query = cli.invoke(main, ["query", url, "SELECT count(*) AS n FROM detections", "--format", "json"])
    assert json.loads(query.output) == [{"n": n}], query.output
    # eval and render read the same committed rows from the store
    evaluated = cli.invoke(main, ["eval", url, "--truth", str(tmp_path / "scenes" / "truth.json"),
                                  "-o", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert len(json.loads((tmp_path / "eval" / "eval.json").read_text())["scenes"]) == 2
    scene = sorted((tmp_path / "scenes").glob("*.tif"))[0]
    drawn = cli.invoke(main, ["render", url, str(scene), "-o", str(tmp_path / "quicklook.png")])
    assert drawn.exit_code == 0 and (tmp_path / "quicklook.png").stat().st_size > 0, drawn.output
