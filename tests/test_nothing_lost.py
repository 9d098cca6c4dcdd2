"""Nothing lost in real layouts (issue 12): each case ran with exit code 0 and lost or
mislabelled scenes before; here each gives the right result, checked with DuckDB, shapely
and rasterio rather than only through our own readers.

1. two scenes with one file name in different folders (Sentinel-2 item folders, STAC);
2. ``**`` globs and patterns that match nothing, validate and run agreeing;
3. scenes with unpredicted chips are partial or failed, never "done";
4. an overwritten object in S3 (a local moto server) is processed again;
5. geometry: no georeferencing into a CRS table, boxes in the padding of small scenes;
6. validate checks what run needs (bands vs model, the checkpoint, 16-bit vs 8-bit).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
import rasterio
import rasterio.warp
import shapely
import yaml
from click.testing import CliRunner
from readers import assert_every_reader_agrees
from real_data import real
from workspaces import tiny_checkpoint

from pipeline.cli import main
from pipeline.infer.predictor import FaultPlan
from pipeline.io.inputs import expand_patterns, glob_regex
from pipeline.tools.synth import synthesize

pytestmark = pytest.mark.timeout(300)

ITEMS = ("S2A_MSIL2A_20260101_T32TQM", "S2B_MSIL2A_20260104_T32TQM")


@pytest.fixture(scope="module")
def ws(module_tmp):
    """Two different synthetic images, the same two as a Sentinel-2 style tree of item
    folders that all hold TCI.tif, and an untrained tiny model that emits many boxes."""
    root = module_tmp("lost")
    synthesize(root / "src", scenes=2, size=300, seed=7)
    for item, name in zip(ITEMS, ("synth_000.tif", "synth_001.tif")):
        (root / "archive" / item).mkdir(parents=True)
        shutil.copy(root / "src" / name, root / "archive" / item / "TCI.tif")
    tiny_checkpoint(root / "model.pt")
    return root


def write_job(root: Path, name: str, paths=None, stac=None, table=None, **sections) -> Path:
    inputs = {"paths": paths} if stac is None else {"stac": stac}
    job = {
        "name": "nightly",
        "inputs": {**inputs, "bands": sections.pop("bands", [1, 2, 3])},
        "tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05},
        "model": {"checkpoint": sections.pop("checkpoint", str(root / "model.pt")), "score_threshold": 0.3,
                  "precision": "fp32"},
        "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "max_retries": 0},
        "output": {"table": str(root / (table or name)), "crs": sections.pop("crs", "EPSG:4326")},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def run_report(output: str) -> dict:
    return json.loads(output[output.index("{"):])


ROW_SQL = "SELECT scene_id, label, round(px_xmin, 3), round(px_ymin, 3), round(score, 3) FROM read_parquet({})"


def glob_rows(table: Path) -> list[tuple]:
    """Rows as a plain reader sees them: DuckDB over the table's files, hive partitions."""
    files = f"'{table}/date=*/*.parquet', hive_partitioning = true"
    return duckdb.sql(ROW_SQL.format(files) + " ORDER BY ALL").fetchall()


def committed_rows(table: Path) -> list[tuple]:
    """The same, over the files the current manifests list (a rerun leaves superseded files)."""
    from pipeline.table.state import committed_files

    return duckdb.sql(ROW_SQL.format(committed_files(table)) + " ORDER BY ALL").fetchall()


def scenes_view(table: Path) -> dict[str, tuple]:
    code, out = cli("query", table, "SELECT scene_id, status, missing_chips, reason FROM scenes", "--format", "json")
    assert code == 0, out
    return {r["scene_id"]: (r["status"], r["missing_chips"], r["reason"]) for r in json.loads(out)}


def by_scene(rows: list[tuple]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for r in rows:
        out.setdefault(r[0], []).append(r[1:])
    return out


@pytest.fixture(scope="module")
def src_rows(ws, ray_session):
    """Rows of the two images under their plain file names: the reference."""
    code, out = cli("run", write_job(ws, "src", paths=[str(ws / "src" / "*.tif")]))
    assert code == 0, out
    return by_scene(glob_rows(ws / "src"))


# ---------------------------------------------------------------- 1. one file name, two scenes


def test_item_folders_with_one_file_name_keep_every_scene(ws, src_rows):
    code, out = cli("run", write_job(ws, "tree", paths=[str(ws / "archive" / "*" / "TCI.tif")]))
    assert code == 0, out
    assert run_report(out)["scenes_ok"] == 2
    rows = by_scene(glob_rows(ws / "tree"))
    assert sorted(rows) == [f"{item}/TCI" for item in ITEMS]
    assert rows[f"{ITEMS[0]}/TCI"] == src_rows["synth_000"] and rows[f"{ITEMS[1]}/TCI"] == src_rows["synth_001"]
    code, out = cli("run", write_job(ws, "tree", paths=[str(ws / "archive" / "*" / "TCI.tif")]))
    assert code == 0 and run_report(out)["scenes_skipped_done"] == 2, out  # ids are stable: nothing redone


def test_two_plain_files_with_one_id_are_refused_before_anything_runs(ws, ray_session):
    a, b = ws / "archive" / ITEMS[0] / "TCI.tif", ws / "archive" / ITEMS[1] / "TCI.tif"
    job = write_job(ws, "twins", paths=[str(a), str(b)])
    for command in ("validate", "run"):
        code, out = cli(command, job)
        assert code == 2, out
        assert str(a) in out and str(b) in out and "'TCI'" in out
    assert not (ws / "twins").exists()  # nothing ran, nothing was written


def test_stac_items_whose_assets_share_a_file_name(ws, src_rows):
    import pystac

    catalog = pystac.Catalog(id="s2", description="item folders that all hold TCI.tif")
    for item_id in ITEMS:
        with rasterio.open(ws / "archive" / item_id / "TCI.tif") as src:
            bounds = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        item = pystac.Item(id=item_id, geometry=shapely.geometry.mapping(shapely.box(*bounds)), bbox=list(bounds),
                           datetime=pystac.utils.str_to_datetime("2026-01-01T10:00:00Z"), properties={})
        item.add_asset("visual", pystac.Asset(href=str(ws / "archive" / item_id / "TCI.tif")))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(ws / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.ABSOLUTE_PUBLISHED)
    code, out = cli("run", write_job(ws, "stac", stac={"source": str(ws / "stac" / "catalog.json")}))
    assert code == 0, out
    rows = by_scene(glob_rows(ws / "stac"))
    assert rows == {ITEMS[0]: src_rows["synth_000"], ITEMS[1]: src_rows["synth_001"]}


# ---------------------------------------------------------------- 2. one expander


def test_glob_regex_matches_what_glob_matches(tmp_path):
    """The object-store matcher against the standard library's glob on the same tree."""
    import glob

    for rel in ("x.tif", "a/y.tif", "a/b/z.tif", "a/b/c/w.TIF", "b1/v.tif", "b2/u.tiff", "c/.hidden/t.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    keys = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    for pattern in ("**/*.tif", "*.tif", "a/**/*.tif", "*/*.tif", "b?/*.tif*", "b[12]/*", "b[!1]/*", "**",
                    "a/**", "**/b/*.tif"):
        expected = sorted(str(Path(p).relative_to(tmp_path)) for p in glob.glob(str(tmp_path / pattern),
                                                                                recursive=True)
                          if Path(p).is_file())
        wanted = glob_regex(pattern)
        got = [k for k in keys if wanted.match(k) and "/." not in "/" + k]  # glob skips hidden names
        assert got == expected, pattern


def test_double_star_validate_and_run_agree(ws, ray_session):
    tree = ws / "nested"
    (tree / "deep" / "er").mkdir(parents=True)
    shutil.copy(ws / "src" / "synth_000.tif", tree / "top.tif")
    shutil.copy(ws / "src" / "synth_001.tif", tree / "deep" / "er" / "low.tif")
    nothing = str(ws / "no-such-folder" / "**" / "*.tif")
    job = write_job(ws, "globs", paths=[str(tree / "**" / "*.tif"), nothing])
    code, out = cli("validate", job)
    assert code == 0 and "2 scenes" in out and nothing in out and "matched nothing" in out, out
    code, out = cli("run", job)
    assert code == 0, out
    report = run_report(out)
    assert report["scenes_ok"] == 2 and report["inputs_unmatched"] == [nothing]
    assert sorted(by_scene(glob_rows(ws / "globs"))) == ["deep/er/low", "top"]
    # A job whose every pattern matches nothing is an error for both commands.
    job = write_job(ws, "empty", paths=[nothing])
    for command in ("validate", "run"):
        code, out = cli(command, job)
        assert code == 2 and nothing in out and "no scene found" in out, (command, out)


def test_a_directory_means_the_rasters_in_it(ws):
    found = expand_patterns([str(ws / "src")])
    assert [s.scene_id for s in found.scenes] == ["synth_000", "synth_001"]  # truth.json etc. left out


# ---------------------------------------------------------------- 3. complete scenes only


def test_damaged_tiles_make_a_partial_scene_that_the_next_run_retries(ws, ray_session):
    corrupt = real("corrupt.tif")
    job = write_job(ws, "partial", paths=[str(corrupt)])
    for attempt in range(2):
        code, out = cli("run", job)
        assert code == 1, out
        report = run_report(out)
        assert report["scenes_ok"] == 0 and report["scenes_skipped_done"] == 0, (attempt, out)
        [partial] = report["scenes_partial"]
        assert partial["scene_id"] == "corrupt" and partial["chips_missing"] >= 1 and partial["chips_predicted"] >= 1
    status, missing, reason = scenes_view(ws / "partial")["corrupt"]
    assert status == "partial" and missing == partial["chips_missing"] and reason
    assert len(assert_every_reader_agrees(ws / "partial")) > 0  # the retry replaced the first attempt's rows


def test_a_scene_that_cannot_feed_the_model_is_failed_not_ok(ws, ray_session):
    synthesize(ws / "nir", scenes=1, size=300, seed=8, bands=4)
    four_band = (ws / "nir" / "synth_000.tif").rename(ws / "nir" / "four_band.tif")
    job = write_job(ws, "nir", paths=[str(four_band), str(ws / "src" / "synth_000.tif")], bands=None)
    code, out = cli("run", job)
    assert code == 1, out
    report = run_report(out)
    assert report["scenes_ok"] == 1
    [failed] = report["scenes_failed"]
    assert failed["scene_id"] == "four_band" and "takes 3 channels" in failed["reason"]
    assert {s: v[0] for s, v in scenes_view(ws / "nir").items()} == {"four_band": "failed", "synth_000": "complete"}
    code, out = cli("run", job)
    report = run_report(out)
    assert code == 1 and report["scenes_skipped_done"] == 1 and len(report["scenes_failed"]) == 1, out


def test_scenes_planned_by_ray_tasks_fail_alone_and_lose_nothing(ws, src_rows, ray_session):
    """More scenes than the driver plans first (PLAN_BATCH): the others are planned by Ray
    tasks while the first are already predicted. A scene planned there that cannot feed
    the model fails alone and is recorded; every other scene's rows are its image's rows."""
    from pipeline.chips.planning import PLAN_BATCH
    from pipeline.config.spec import load_job
    from pipeline.run.graph import run_job

    folder = ws / "many"
    folder.mkdir()
    for i in range(PLAN_BATCH + 2):
        shutil.copy(ws / "src" / f"synth_00{i % 2}.tif", folder / f"a{i:02d}.tif")
    synthesize(ws / "many-nir", scenes=1, size=300, seed=8, bands=4)
    (ws / "many-nir" / "synth_000.tif").rename(folder / "z_four_band.tif")  # sorted last: a Ray task plans it
    report = run_job(load_job(write_job(ws, "many", paths=[str(folder / "*.tif")], bands=None)))
    assert report["exit_code"] == 1
    assert len(report["scenes_ok"]) == PLAN_BATCH + 2
    [failed] = report["scenes_failed"]
    assert failed["scene_id"] == "z_four_band" and "takes 3 channels" in failed["reason"]
    assert sum(report["nodes"]["plan"].values()) == PLAN_BATCH + 3  # every scene planned once
    rows = by_scene(glob_rows(ws / "many"))
    assert sorted(rows) == [f"a{i:02d}" for i in range(PLAN_BATCH + 2)]
    for i in range(PLAN_BATCH + 2):
        assert rows[f"a{i:02d}"] == src_rows[f"synth_00{i % 2}"], i
    assert scenes_view(ws / "many")["z_four_band"][0] == "failed"


def test_every_chip_failing_is_failed_and_a_transient_fault_converges(ws, src_rows, ray_session):
    from pipeline.config.spec import load_job
    from pipeline.run.graph import run_job

    spec = load_job(write_job(ws, "converge", paths=[str(ws / "src" / "*.tif")]))
    every_chip = [f"synth_001/r{r}c{c}" for r in range(2) for c in range(2)]
    report = run_job(spec, faults=FaultPlan(raise_always=["synth_000/r0c1"] + every_chip))
    assert report["exit_code"] == 1
    assert [p["scene_id"] for p in report["scenes_partial"]] == ["synth_000"]
    assert [f["scene_id"] for f in report["scenes_failed"]] == ["synth_001"]
    assert "no chip of 4 was predicted" in report["scenes_failed"][0]["reason"]
    assert {s: v[0] for s, v in scenes_view(ws / "converge").items()} == {"synth_000": "partial", "synth_001": "failed"}
    report = run_job(spec)  # no --force: exactly what is missing is done again
    assert report["exit_code"] == 0 and sorted(report["scenes_ok"]) == ["synth_000", "synth_001"]
    assert by_scene(committed_rows(ws / "converge")) == src_rows
    assert by_scene(glob_rows(ws / "converge")) == src_rows  # plain readers: superseded attempts are gone


def test_a_transient_error_never_wipes_complete_rows(ws, src_rows, monkeypatch, ray_session):
    from pipeline.config.spec import load_job
    from pipeline.errors import InputError
    from pipeline.run import graph as execution
    from pipeline.run.graph import run_job

    spec = load_job(write_job(ws, "transient", paths=[str(ws / "src" / "*.tif")]))
    assert run_job(spec)["exit_code"] == 0
    real_key = execution.scene_key

    def throttled(location):
        if location.endswith("synth_000.tif"):
            raise InputError(f"{location}: HEAD request failed: 503 Slow Down")
        return real_key(location)

    monkeypatch.setattr(execution, "scene_key", throttled)
    report = run_job(spec, force=True)
    assert report["exit_code"] == 1 and "rows committed earlier are kept" in report["scenes_failed"][0]["reason"]
    assert by_scene(committed_rows(ws / "transient")) == src_rows
    assert scenes_view(ws / "transient")["synth_000"][0] == "complete"


# ---------------------------------------------------------------- 4. remote content keys


def test_an_overwritten_object_is_processed_again(ws, src_rows, s3_server):
    s3_server.create_bucket(Bucket="nightly-scenes")
    for item, name in zip(("a", "b"), ("synth_000.tif", "synth_001.tif")):
        s3_server.upload_file(str(ws / "src" / name), "nightly-scenes", f"s2/{item}/TCI.tif")
    s3_server.upload_file(str(ws / "model.pt"), "nightly-scenes", "models/model.pt")
    job = write_job(ws, "s3", paths=["s3://nightly-scenes/s2/*/TCI.tif"],
                    checkpoint="s3://nightly-scenes/models/model.pt")
    code, out = cli("validate", job)
    assert code == 0 and "2 scenes" in out, out
    code, out = cli("run", job)
    assert code == 0 and run_report(out)["scenes_ok"] == 2, out
    assert by_scene(committed_rows(ws / "s3")) == {"a/TCI": src_rows["synth_000"], "b/TCI": src_rows["synth_001"]}
    code, out = cli("run", job)
    assert code == 0 and run_report(out)["scenes_skipped_done"] == 2, out
    # Overwrite a/TCI.tif with the other image: same URL, new content.
    s3_server.upload_file(str(ws / "src" / "synth_001.tif"), "nightly-scenes", "s2/a/TCI.tif")
    code, out = cli("run", job)
    report = run_report(out)
    assert code == 0 and report["scenes_ok"] == 1 and report["scenes_skipped_done"] == 1, out
    assert by_scene(committed_rows(ws / "s3")) == {"a/TCI": src_rows["synth_001"], "b/TCI": src_rows["synth_001"]}
    assert by_scene(glob_rows(ws / "s3")) == by_scene(committed_rows(ws / "s3"))


# ---------------------------------------------------------------- 5. geometry


def test_a_scene_without_georeferencing_never_enters_a_crs_table(ws, ray_session):
    png = real("2019_YELL_2_541000_4977000_image_crop.png")
    job = write_job(ws, "yell", paths=[str(png)])
    code, out = cli("validate", job)
    assert code == 2 and "no georeferencing" in out and png.name in out, out
    code, out = cli("run", job)
    assert code == 1 and "no georeferencing" in out, out
    assert not list((ws / "yell").glob("date=*/*.parquet"))  # no row of it anywhere
    assert scenes_view(ws / "yell")[png.stem][0] == "failed"
    code, out = cli("run", write_job(ws, "yell-px", paths=[str(png)], crs=None))
    assert code == 0, out
    meta = json.loads(duckdb.sql(
        f"SELECT decode(value) FROM parquet_kv_metadata('{ws}/yell-px/date=*/*.parquet') WHERE key = 'geo'"
    ).fetchall()[0][0])
    assert meta["columns"]["geometry"]["crs"] is None  # pixel table, said so in the file


def test_boxes_of_a_scene_smaller_than_a_chip_stay_inside_it(ws, ray_session):
    world = real("world.rgb.tif")
    job = write_job(ws, "world", paths=[str(world)])
    data = yaml.safe_load(job.read_text())
    data["tiling"]["chip_size"] = 288  # 256 rows: every chip has 32 rows of padding below the scene
    data["model"]["score_threshold"] = 0.05
    job.write_text(yaml.safe_dump(data))
    code, out = cli("run", job)
    assert code == 0, out
    files = f"{ws}/world/date=*/*.parquet"
    n, xmin, ymin, xmax, ymax, px_bottom = duckdb.sql(
        f"SELECT count(*), min(bbox.xmin), min(bbox.ymin), max(bbox.xmax), max(bbox.ymax), max(px_ymax) "
        f"FROM read_parquet('{files}')").fetchall()[0]
    with rasterio.open(world) as src:
        left, bottom, right, top = src.bounds
    assert n > 0 and px_bottom == 256  # boxes that reached into the padding end at the scene's edge
    assert left - 1e-9 <= xmin and xmax <= right + 1e-9 and bottom - 1e-9 <= ymin and ymax <= top + 1e-9
    wkb = [r[0] for r in duckdb.sql(f"SELECT geometry FROM read_parquet('{files}')").fetchall()]
    polygons = shapely.from_wkb(wkb)
    assert shapely.is_valid(polygons).all() and (shapely.area(polygons) > 0).all()


# ---------------------------------------------------------------- 6. validate checks what run needs


def test_validate_checks_bands_checkpoint_and_dtype(ws, ray_session):
    job = write_job(ws, "v-bands", paths=[str(ws / "src" / "*.tif")], bands=[1, 2])
    code, out = cli("validate", job)
    assert code == 2 and "synth_000.tif" in out and "takes 3 channels" in out, out
    (ws / "notes.pt").write_text("not a checkpoint")
    code, out = cli("validate", write_job(ws, "v-ckpt", paths=[str(ws / "src" / "*.tif")],
                                          checkpoint=str(ws / "notes.pt")))
    assert code == 2 and "model.checkpoint" in out and "notes.pt" in out, out
    synthesize(ws / "u16", scenes=1, size=300, seed=9, dtype="uint16")
    job = write_job(ws, "v-u16", paths=[str(ws / "u16" / "*.tif")])
    code, out = cli("validate", job)
    assert code == 0 and "uint16 scene" in out and "8-bit" in out, out
    code, out = cli("run", job)  # a warning, not a refusal: run says it too, and in the report
    assert code == 0 and "uint16 scene" in out and any("uint16 scene" in w for w in run_report(out)["warnings"])
