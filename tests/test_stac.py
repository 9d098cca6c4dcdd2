"""STAC input: a small local catalog over synthetic scenes, filtered by time and space."""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import http.server
import json
import os
import threading
import urllib.request
from pathlib import Path

import pystac
import pytest
import rasterio
from rasterio.warp import transform_bounds

from pipeline.config.spec import check_runnable, load_job
from pipeline.config.stac_filters import parse_interval
from pipeline.errors import ConfigError, InputError
from pipeline.io.stac import select_scenes, select_stac, stac_scene_paths
from pipeline.run.runbook import REPORT_KEY, last_success_datetime, stac_since
from pipeline.tools.synth import synthesize

UTC = dt.timezone.utc
# Scene i's acquisition time; scene 3 carries an interval (start/end_datetime) instead.
TIMES = {0: dt.datetime(2026, 1, 1, tzinfo=UTC), 1: dt.datetime(2026, 1, 5, tzinfo=UTC),
         2: dt.datetime(2026, 1, 10, tzinfo=UTC)}
SPAN_3 = (dt.datetime(2026, 1, 19, tzinfo=UTC), dt.datetime(2026, 1, 21, tzinfo=UTC))


def lonlat_bounds(path: Path) -> list[float]:
    """The scene's footprint in EPSG:4326 from its own georeferencing."""
    with rasterio.open(path) as src:
        return list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))


def footprint(b: list[float]) -> dict:
    x0, y0, x1, y1 = b
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def make_item(i: int, scene: Path) -> pystac.Item:
    b = lonlat_bounds(scene)
    props = {}
    when = TIMES.get(i)
    if when is None:
        props = {"start_datetime": SPAN_3[0].isoformat(), "end_datetime": SPAN_3[1].isoformat()}
    item = pystac.Item(id=f"item-{i}", geometry=footprint(b), bbox=b, datetime=when, properties=props)
    item.add_asset("visual", pystac.Asset(href=str(scene), media_type=pystac.MediaType.COG, roles=["visual"]))
    return item


@pytest.fixture(scope="module")
def scenes(module_tmp) -> list[Path]:
    return synthesize(module_tmp("stac") / "scenes", scenes=4, size=256, seed=1)


@pytest.fixture(scope="module")
def catalog(scenes) -> Path:
    """catalog.json -> collection -> 4 items with relative asset hrefs, plus an item
    without the 'visual' asset (a thumbnail only)."""
    root = scenes[0].parent.parent / "catalog"
    cat = pystac.Catalog(id="nightly", description="synthetic scenes")
    bounds = [lonlat_bounds(s) for s in scenes]
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(b[0] for b in bounds), min(b[1] for b in bounds),
                               max(b[2] for b in bounds), max(b[3] for b in bounds)]]),
        pystac.TemporalExtent([[TIMES[0], SPAN_3[1]]]))
    col = pystac.Collection(id="synth", description="synthetic", extent=extent)
    cat.add_child(col)
    for i, scene in enumerate(scenes):
        col.add_item(make_item(i, scene))
    odd = pystac.Item(id="thumb-only", geometry=footprint(bounds[0]), bbox=bounds[0], datetime=TIMES[1],
                      properties={})
    odd.add_asset("thumbnail", pystac.Asset(href=str(scenes[0])))
    col.add_item(odd)
    cat.normalize_hrefs(str(root))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    item_json = json.loads((root / "synth" / "item-0" / "item-0.json").read_text())
    assert not item_json["assets"]["visual"]["href"].startswith("/")  # really relative
    return root / "catalog.json"


def names(paths: list[str]) -> list[str]:
    return [Path(p).stem for p in paths]


def test_every_item_with_the_asset_absolute_and_ordered_by_time(catalog, scenes):
    sel = select_scenes(str(catalog), "visual")
    assert sel.paths == [str(s) for s in scenes]  # absolute, existing, in time order
    assert all(Path(p).is_file() for p in sel.paths)
    assert sel.item_ids == ["item-0", "item-1", "item-2", "item-3"]
    assert sel.skipped == [{"item": "thumb-only", "reason": "no asset 'visual' (has: thumbnail)"}]
    assert sel.newest == SPAN_3[1].isoformat()  # an interval item counts by its end


@pytest.mark.parametrize("window, expected", [
    ("2026-01-05/2026-01-10", ["synth_001", "synth_002"]),            # both ends inclusive
    ("2026-01-05T00:00:01Z/2026-01-10", ["synth_002"]),
    ("2026-01-10/..", ["synth_002", "synth_003"]),
    ("../2026-01-01", ["synth_000"]),
    ("/2026-01-04T23:59:59+00:00", ["synth_000"]),
    ("2026-01-20", ["synth_003"]),                                   # instant inside 19..21
    ("2026-01-21T01:00:00+02:00/..", ["synth_003"]),                 # = 2026-01-20T23:00Z
    ("2026-01-11/2026-01-18", []),
])
def test_datetime_filter(catalog, window, expected):
    assert names(stac_scene_paths(str(catalog), "visual", datetime_range=window)) == expected


def test_bbox_filter_uses_the_footprints(catalog, scenes):
    b0, b2 = lonlat_bounds(scenes[0]), lonlat_bounds(scenes[2])
    # A box inside scene 0's footprint only (scenes are ~0.008 degrees apart).
    inner = [b0[0] + 1e-4, b0[1] + 1e-4, b0[2] - 1e-4, b0[3] - 1e-4]
    assert names(stac_scene_paths(str(catalog), "visual", bbox=inner)) == ["synth_000"]
    # From the middle of scene 0 to the middle of scene 2: scenes 0, 1 and 2.
    across = [(b0[0] + b0[2]) / 2, b0[1], (b2[0] + b2[2]) / 2, b0[3]]
    assert names(stac_scene_paths(str(catalog), "visual", bbox=across)) == ["synth_000", "synth_001", "synth_002"]
    # The gap between scene 0 and scene 1 touches nothing.
    b1 = lonlat_bounds(scenes[1])
    gap = [b0[2] + 1e-4, b0[1], b1[0] - 1e-4, b0[3]]
    assert stac_scene_paths(str(catalog), "visual", bbox=gap) == []
    assert names(stac_scene_paths(str(catalog), "visual", datetime_range="2026-01-02/..", bbox=across)) == \
        ["synth_001", "synth_002"]


def test_since_is_an_inclusive_lower_bound(catalog):
    assert names(stac_scene_paths(str(catalog), "visual", since="2026-01-05")) == [
        "synth_001", "synth_002", "synth_003"]
    # since earlier than the range start changes nothing; later raises it.
    assert names(stac_scene_paths(str(catalog), "visual", datetime_range="2026-01-09/..",
                                  since=dt.datetime(2026, 1, 2, tzinfo=UTC))) == ["synth_002", "synth_003"]


def write_report(table: Path, run_id: str, job: str, code: int, newest) -> None:
    (table / "_reports").mkdir(parents=True, exist_ok=True)
    (table / "_reports" / f"{run_id}.json").write_text(
        json.dumps({"run_id": run_id, "job_name": job, "exit_code": code, REPORT_KEY: newest}))


def test_since_last_success_reads_the_run_reports(catalog, tmp_path):
    from pipeline.config.spec import JobSpec, StacSpec
    from pipeline.io.inputs import job_inputs

    table = tmp_path / "table"
    spec = StacSpec(source=str(catalog), since_last_success=True)
    assert last_success_datetime(table, "nightly") is None
    assert len(select_stac(spec, last_success_datetime(table, "nightly")).paths) == 4  # no successful run yet
    write_report(table, "r1", "nightly", 0, "2026-01-05T00:00:00+00:00")
    write_report(table, "r2", "nightly", 1, "2026-01-20T00:00:00+00:00")  # failed: does not count
    write_report(table, "r3", "other-job", 0, "2026-01-21T00:00:00+00:00")  # another job's
    write_report(table, "r4", "nightly", 0, None)  # a successful run that selected nothing
    assert last_success_datetime(table, "nightly") == dt.datetime(2026, 1, 5, tzinfo=UTC)
    assert names(select_stac(spec, last_success_datetime(table, "nightly")).paths) == [
        "synth_001", "synth_002", "synth_003"]
    write_report(table, "r5", "nightly", 0, "2026-01-10T00:00:00Z")
    assert names(select_stac(spec, last_success_datetime(table, "nightly")).paths) == ["synth_002", "synth_003"]
    # A job's inputs: the reports are consulted with the flag only.
    job = JobSpec.model_validate({"name": "nightly", "model": {"checkpoint": "m.pt"}, "output": {"table": str(table)},
                                  "inputs": {"stac": {"source": str(catalog), "since_last_success": True}}})
    assert names(job_inputs(job, stac_since(job))[0].locations) == ["synth_002", "synth_003"]
    job.inputs.stac.since_last_success = False
    assert len(job_inputs(job, stac_since(job))[0].locations) == 4
    (table / "_reports" / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json"):
        last_success_datetime(table, "nightly")


def test_item_collection_and_single_item_resolve_relative_hrefs(scenes, tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    items = []
    for i, scene in enumerate(scenes[:2]):
        item = make_item(i, scene).to_dict(include_self_link=False)
        item["assets"]["visual"]["href"] = os.path.relpath(scene, folder)  # relative to items.json
        items.append(item)
    (folder / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    got = stac_scene_paths(str(folder / "items.json"), "visual")
    assert got == [str(scenes[0]), str(scenes[1])]
    (folder / "one.json").write_text(json.dumps(items[1]))
    assert stac_scene_paths(str(folder / "one.json"), "visual") == [str(scenes[1])]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_catalog_over_http(catalog):
    # Serve the folder holding catalog/ and scenes/: asset URLs must point at real files.
    handler = functools.partial(QuietHandler, directory=str(catalog.parent.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        got = stac_scene_paths(base + "catalog/catalog.json", "visual", datetime_range="2026-01-05/2026-01-10")
        assert got == [base + "scenes/synth_001.tif", base + "scenes/synth_002.tif"]
        assert all(urllib.request.urlopen(url, timeout=5).status == 200 for url in got)
    finally:
        server.shutdown()
        server.server_close()


def test_errors_name_the_problem(catalog, scenes, tmp_path):
    with pytest.raises(InputError, match="none has asset 'image'.*has: visual"):
        stac_scene_paths(str(catalog), "image")
    with pytest.raises(InputError, match="STAC source not found"):
        stac_scene_paths(str(tmp_path / "nope.json"), "visual")
    (tmp_path / "bad.json").write_text('{"type": "Feature"}')
    with pytest.raises(InputError, match="bad.json"):
        stac_scene_paths(str(tmp_path / "bad.json"), "visual")
    with pytest.raises(ConfigError, match="start 2026-02-01 is after end 2026-01-01"):
        stac_scene_paths(str(catalog), "visual", datetime_range="2026-02-01/2026-01-01")


def test_items_whose_assets_share_a_file_name_are_distinct_scenes(scenes, tmp_path):
    """Sentinel-2 layout: every item folder holds the same file name; item ids tell them apart."""
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / scenes[0].name).write_bytes(scenes[0].read_bytes())
    a, b = make_item(0, scenes[0]).to_dict(), make_item(1, twin / scenes[0].name).to_dict()
    (tmp_path / "dup.json").write_text(json.dumps({"type": "FeatureCollection", "features": [a, b]}))
    sel = select_scenes(str(tmp_path / "dup.json"), "visual")
    assert sel.item_ids == ["item-0", "item-1"]
    assert sel.paths == [str(scenes[0]), str(twin / scenes[0].name)]


def test_parse_interval():
    start, end = parse_interval("2026-01-01/..")
    assert start == dt.datetime(2026, 1, 1, tzinfo=UTC) and end is None
    assert parse_interval("2026-01-01T12:00:00") == (dt.datetime(2026, 1, 1, 12, tzinfo=UTC),) * 2  # naive = UTC
    for bad in ("../..", "2026-13-01", "a/b/c", "yesterday"):
        with pytest.raises(ValueError):
            parse_interval(bad)


# ---------------------------------------------------------------- the job section

BASE = """name: nightly
model: {checkpoint: m.pt}
output: {table: out}
"""


def job(tmp_path: Path, inputs: str) -> Path:
    path = tmp_path / "jobs" / "job.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(BASE + inputs)
    return path


def test_stac_section_loads_with_defaults_and_resolved_source(tmp_path):
    spec = load_job(job(tmp_path, "inputs: {stac: {source: ../cat/catalog.json, datetime: 2026-01-01}}\n"))
    stac = spec.inputs.stac
    assert stac.source == str(tmp_path / "cat" / "catalog.json")  # against the job file's folder
    assert stac.asset == "visual" and stac.datetime == "2026-01-01" and stac.bbox is None
    assert stac.since_last_success is False and spec.inputs.paths is None
    full = load_job(job(tmp_path, "inputs:\n  stac: {source: 'https://x.org/c.json', asset: image,\n"
                                  "         datetime: '2026-01-01/..', bbox: [12, 41.5, 13, 42],\n"
                                  "         since_last_success: true}\n"))
    assert full.inputs.stac.bbox == [12.0, 41.5, 13.0, 42.0] and full.inputs.stac.source == "https://x.org/c.json"


def test_stac_override_resolves_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = job(tmp_path, "inputs: {paths: [a.tif]}\n")
    spec = load_job(path, ["inputs.paths=null", "inputs.stac={source: here/catalog.json, datetime: 2026-01-01/..}"])
    assert spec.inputs.stac.source == str(tmp_path / "here" / "catalog.json")


@pytest.mark.parametrize("inputs, expected", [
    ("inputs: {bands: [1, 2, 3]}\n", "inputs: give inputs.paths (files, globs, URLs) or inputs.stac"),
    ("inputs: {paths: [a.tif], stac: {source: c.json}}\n", "inputs: inputs.paths and inputs.stac exclude each other"),
    ("inputs: {stac: {asset: visual}}\n", "inputs.stac.source: required key is missing"),
    ("inputs: {stac: {source: c.json, datetime: 'soon/..'}}\n", "inputs.stac.datetime: not an ISO 8601"),
    ("inputs: {stac: {source: c.json, bbox: [0, 0, 1]}}\n", "inputs.stac.bbox: must be [minx, miny, maxx, maxy]"),
    ("inputs: {stac: {source: c.json, bbox: [500000, 0, 500100, 10]}}\n", "inputs.stac.bbox: longitudes"),
    ("inputs: {stac: {source: c.json, since_last_success: 'yes'}}\n", "inputs.stac.since_last_success"),
    ("inputs: {stac: {source: c.json, colection: x}}\n", "inputs.stac.colection: unknown key"),
])
def test_bad_stac_sections_name_the_field(tmp_path, inputs, expected):
    path = job(tmp_path, inputs)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert expected in str(err.value) and str(err.value).startswith(str(path))


def test_check_runnable_wants_a_local_source_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "m.pt").write_bytes(b"x")
    spec = load_job(job(tmp_path, "inputs: {stac: {source: missing.json}}\n"))
    with pytest.raises(ConfigError, match="inputs.stac.source: file not found"):
        check_runnable(spec)
    (tmp_path / "jobs" / "missing.json").write_text("{}")
    check_runnable(spec)


def test_the_run_report_carries_the_field_the_next_stac_run_reads():
    from pipeline.run.runbook import RunReport

    assert REPORT_KEY in {f.name for f in dataclasses.fields(RunReport)}
