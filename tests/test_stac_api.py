"""inputs.stac from a STAC API: a real stac-fastapi server on 127.0.0.1 (tests/stac_server.py),
assets served as COGs by an S3-compatible server over HTTP range reads (moto, tests/conftest.py),
the CLI run twice as two nights, and the named errors for bad input."""
from __future__ import annotations

import datetime as dt
import functools
import http.server
import json
import re
import shlex
import threading
from pathlib import Path

import pystac
import pytest
import rasterio
import rasterio.shutil
import shapely
import torch
import yaml
from click.testing import CliRunner
from rasterio.warp import transform_bounds
from shapely.geometry import box, shape
from stac_server import StacApiServer

from pipeline.cli import main
from pipeline.config.spec import StacSpec, load_job
from pipeline.errors import ConfigError, InputError
from pipeline.io.stac import select_stac
from pipeline.run.runbook import REPORT_KEY
from pipeline.table.state import committed_scenes
from pipeline.tools.synth import synthesize
from retinanet import build_model, save_checkpoint

UTC = dt.timezone.utc
README = Path(__file__).resolve().parents[1] / "README.md"
BUCKET = "stac-api-assets"
COLLECTION = "sentinel-2-l2a"  # the README recipe's collection
NIGHT_1 = 7  # items published before the first night; one more arrives before the second
CLOUDY = 5  # this item's eo:cloud_cover (80) fails the recipe's filter (<= 20)
BLOB = "https://pcstore.blob.core.windows.net/s2/scene.tif"


def when(i: int) -> dt.datetime:
    return dt.datetime(2026, 1, 1 + i, 10, 30, tzinfo=UTC)


def lonlat_bounds(path: Path) -> list[float]:
    with rasterio.open(path) as src:
        return list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))


def item_dict(item_id: str, collection: str, bounds: list[float], time: dt.datetime, href: str,
              cloud: float) -> dict:
    geometry = shapely.geometry.mapping(box(*bounds))
    item = pystac.Item(id=item_id, geometry=geometry, bbox=bounds, datetime=time, collection=collection,
                       properties={"eo:cloud_cover": cloud})
    item.add_asset("visual", pystac.Asset(href=href, media_type=pystac.MediaType.COG, roles=["visual"]))
    item.add_asset("thumbnail", pystac.Asset(href=href.replace(".tif", ".png"), roles=["thumbnail"]))
    out = item.to_dict(include_self_link=False)
    out["links"] = []
    return out


@pytest.fixture(scope="module")
def world(module_tmp, s3_server):
    """8 synthetic scenes as COGs in a bucket; their items (7 tonight, 1 tomorrow), plus an item
    of another collection and one far outside the scenes' box; the API serving tonight's."""
    root = module_tmp("stac_api")
    scenes = synthesize(root / "scenes", scenes=NIGHT_1 + 1, size=256, seed=4)
    s3_server.create_bucket(Bucket=BUCKET)
    base = f"{s3_server.meta.endpoint_url}/{BUCKET}"
    hrefs, bounds = [], []
    for scene in scenes:
        cog = root / "cogs" / scene.name
        cog.parent.mkdir(exist_ok=True)
        rasterio.shutil.copy(scene, cog, driver="COG", blocksize=128)
        s3_server.upload_file(str(cog), BUCKET, f"s2/{scene.name}", ExtraArgs={"ACL": "public-read"})  # plain HTTP
        hrefs.append(f"{base}/s2/{scene.name}")
        bounds.append(lonlat_bounds(scene))
    items = [item_dict(f"S2-{i}", COLLECTION, bounds[i], when(i), hrefs[i], 80.0 if i == CLOUDY else 5.0 + i)
             for i in range(NIGHT_1 + 1)]
    far = [b + 1.0 if k % 2 == 0 else b for k, b in enumerate(bounds[0])]  # one degree east
    extra = [item_dict("S2-far", COLLECTION, far, when(2), hrefs[0], 1.0),
             item_dict("L8-0", "landsat-c2-l2", bounds[0], when(2), hrefs[0], 1.0),
             item_dict("PC-0", "pc-like", bounds[0], when(0), BLOB, 1.0)]  # an asset in Azure blob storage
    server = StacApiServer(root, items[:NIGHT_1] + extra)
    area = [min(b[0] for b in bounds), min(b[1] for b in bounds), max(b[2] for b in bounds),
            max(b[3] for b in bounds)]
    yield {"root": root, "server": server, "items": items, "extra": extra, "area": area, "bounds": bounds}
    server.stop()


def expected_ids(items: list[dict], collection: str, area: list[float], start: dt.datetime,
                 max_cloud: float) -> list[str]:
    """The oracle: the recipe's filters applied to the item dicts with plain Python and shapely,
    in time order."""
    chosen = [i for i in items if i["collection"] == collection
              and shape(i["geometry"]).intersects(box(*area))
              and dt.datetime.fromisoformat(i["properties"]["datetime"]) >= start
              and i["properties"]["eo:cloud_cover"] <= max_cloud]
    return [i["id"] for i in sorted(chosen, key=lambda i: i["properties"]["datetime"])]


def readme_recipe() -> tuple[dict, list[list[str]]]:
    """The YAML job and the `pipeline` commands of README's 'Nightly from a STAC API' recipe."""
    text = README.read_text()
    section = text[text.index("### Nightly from a STAC API"):]
    job = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    shell = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in shell.splitlines() if line.startswith("pipeline ")]
    return job, commands


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_model(num_classes=1, backbone="resnet18", head_width=16, head_depth=1,
                                      image_mean=(120.0,) * 3, image_std=(60.0,) * 3), ["thing"])
    return path


def report_of(table: Path) -> dict:
    reports = sorted((table / "_reports").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())


@pytest.mark.slow
def test_two_nights_through_the_cli_the_readme_recipe(world, tmp_path, ray_session):
    server, items, area = world["server"], world["items"], world["area"]
    job, commands = readme_recipe()
    stac = job["inputs"]["stac"]
    # The recipe as written, pointed at the local API and scenes; page_size 3 makes the API page.
    assert stac["collections"] == [COLLECTION] and stac["since_last_success"] is True
    stac.update(source=server.url, bbox=area, page_size=3)
    job["model"]["checkpoint"] = str(tiny_checkpoint(tmp_path / "model.pt"))
    table = tmp_path / "detections"
    here = {"nightly-s2.yaml": str(tmp_path / "nightly-s2.yaml"), job["output"]["table"]: str(table)}
    job["output"]["table"] = str(table)
    job["tiling"] = {"chip_size": 256, "overlap": 0}
    job["compute"] = {"actors": 1}
    (tmp_path / "nightly-s2.yaml").write_text(yaml.safe_dump(job))
    validate, run, query = ([here.get(word, word) for word in command[1:]] for command in commands)
    assert (validate[0], run[0], query[0]) == ("validate", "run", "query")
    start = dt.datetime.fromisoformat(stac["datetime"].split("/")[0]).replace(tzinfo=UTC)
    max_cloud = stac["filter"]["args"][1]

    tonight = expected_ids(items[:NIGHT_1] + world["extra"], COLLECTION, area, start, max_cloud)
    assert f"S2-{CLOUDY}" not in tonight and "S2-far" not in tonight and len(tonight) == NIGHT_1 - 1
    checked = CliRunner().invoke(main, validate)  # every scene's header over HTTP range reads
    assert checked.exit_code == 0, checked.output
    before = len(server.searches())
    first = CliRunner().invoke(main, run)
    assert first.exit_code == 0, first.output
    report = report_of(table)
    assert sorted(report["scenes_ok"]) == sorted(tonight)  # scene ids are item ids
    assert report[REPORT_KEY] == when(NIGHT_1 - 1).isoformat()
    pages = server.searches()[before:]
    assert len(pages) >= 2 and all(body["collections"] == [COLLECTION] for _, body in pages)  # paged

    server.publish(items + world["extra"])  # a new item arrives during the day
    before = len(server.searches())
    second = CliRunner().invoke(main, run)
    assert second.exit_code == 0, second.output
    report = report_of(table)
    assert report["scenes_ok"] == [f"S2-{NIGHT_1}"]  # only the new item is processed
    # The high-water mark reached the API: tonight's search started at last night's newest item.
    _, body = server.searches()[before]
    assert body["datetime"].startswith(when(NIGHT_1 - 1).strftime("%Y-%m-%dT%H:%M:%S"))
    assert report["scenes_skipped_done"] == [f"S2-{NIGHT_1 - 1}"]  # the inclusive bound's item, already done
    assert report[REPORT_KEY] == when(NIGHT_1).isoformat()

    answered = CliRunner().invoke(main, query)
    assert answered.exit_code == 0, answered.output
    # The table holds the two nights' scenes, each once, under its item id and its asset's URL.
    committed = committed_scenes(table)
    assert sorted(scene for _, scene in committed) == sorted(tonight + [f"S2-{NIGHT_1}"])
    hrefs = {i["id"]: i["assets"]["visual"]["href"] for i in items}
    assert all(m["scene_path"] == hrefs[scene] for (_, scene), m in committed.items())


def spec(source: str, **fields) -> StacSpec:
    return StacSpec(source=source, **fields)


def test_search_filters_pages_and_caps(world):
    server, items, area = world["server"], world["items"], world["area"]
    server.publish(items[:NIGHT_1] + world["extra"])
    everything = expected_ids(items[:NIGHT_1] + world["extra"], COLLECTION, area, when(0), 100.0)
    before = len(server.searches())
    sel = select_stac(spec(server.url, collections=[COLLECTION], bbox=area, page_size=2))
    assert sel.item_ids == everything and len(server.searches()) - before >= 3
    assert sel.paths == [i["assets"]["visual"]["href"] for i in items[:NIGHT_1]]
    assert sel.acquired_at == [when(i) for i in range(NIGHT_1)]  # each item's datetime, through choose()
    # A geometry instead of a box: scene 0's footprint only.
    geometry = shapely.geometry.mapping(box(*world["bounds"][0]).buffer(-1e-5))
    assert select_stac(spec(server.url, collections=[COLLECTION], intersects=geometry)).item_ids == ["S2-0"]
    # CQL2-JSON, time (inclusive) and max_items.
    cql = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 8]}
    assert select_stac(spec(server.url, collections=[COLLECTION], filter=cql, bbox=area)).item_ids == \
        ["S2-0", "S2-1", "S2-2", "S2-3"]  # eo:cloud_cover 5 + i <= 8
    assert select_stac(spec(server.url, collections=[COLLECTION], bbox=area,
                            datetime=f"{when(2).isoformat()}/{when(4).isoformat()}")).item_ids == \
        ["S2-2", "S2-3", "S2-4"]
    capped = select_stac(spec(server.url, collections=[COLLECTION], page_size=2, max_items=3)).item_ids
    assert len(capped) == 3 and set(capped) <= {i["id"] for i in items + world["extra"]}
    assert select_stac(spec(server.url, collections=["landsat-c2-l2"])).item_ids == ["L8-0"]
    # since: an inclusive lower bound, sent to the API.
    since = select_stac(spec(server.url, collections=[COLLECTION], bbox=area), since=when(4))
    assert since.item_ids == ["S2-4", "S2-5", "S2-6"]


def test_intersects_from_a_geojson_file_in_the_job(world, tmp_path, monkeypatch):
    feature = {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(
        box(*world["bounds"][1]).buffer(-1e-5))}
    (tmp_path / "aoi.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "aoi", "model": {"checkpoint": "m.pt"}, "output": {"table": "out"},
        "inputs": {"stac": {"source": world["server"].url, "collections": [COLLECTION],
                            "intersects": "aoi.geojson"}}}))
    job = load_job(tmp_path / "job.yaml")  # the file is read against the job's folder, at load time
    assert shape(job.inputs.stac.intersects).equals(shape(feature["geometry"]))
    assert select_stac(job.inputs.stac).item_ids == ["S2-1"]
    # --set takes the file against the current directory, as other paths.
    (tmp_path / "here").mkdir()
    (tmp_path / "aoi.geojson").rename(tmp_path / "here" / "aoi.geojson")
    monkeypatch.chdir(tmp_path / "here")
    job = load_job(tmp_path / "job.yaml", ["inputs.stac.intersects=aoi.geojson"])
    assert shape(job.inputs.stac.intersects).equals(shape(feature["geometry"]))


@pytest.mark.parametrize("stac, expected", [
    ({"collections": ["x"], "bbox": [0, 0, 1, 1], "intersects": {"type": "Point", "coordinates": [0, 0]}},
     "inputs.stac: bbox and intersects exclude each other"),
    ({"intersects": "missing.geojson"}, "inputs.stac.intersects: cannot read"),
    ({"intersects": {"type": "Point", "coordinates": [500000, 4000000]}}, "inputs.stac.intersects: longitudes"),
    ({"max_items": 0}, "inputs.stac.max_items: input should be greater than or equal to 1"),
    ({"page_size": 0}, "inputs.stac.page_size: input should be greater than or equal to 1"),
    ({"sign": "aws"}, "inputs.stac.sign: input should be 'planetary-computer'"),
    ({"filter": "eo:cloud_cover < 10"}, "inputs.stac.filter: must be a mapping"),  # CQL2-JSON, not text
    ({"collections": []}, "inputs.stac.collections: list should have at least 1 item"),
    ({"max_items": 10, "since_last_success": True}, "inputs.stac: max_items and since_last_success exclude"),
])
def test_bad_api_fields_name_the_field(tmp_path, stac, expected):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "bad", "model": {"checkpoint": "m.pt"}, "output": {"table": "out"},
        "inputs": {"stac": {"source": "https://example.org/stac", **stac}}}))
    with pytest.raises(ConfigError) as err:
        load_job(tmp_path / "job.yaml")
    assert expected in str(err.value)


def test_api_source_needs_collections(world):
    with pytest.raises(ConfigError, match=r"inputs.stac.collections: required for a STAC API source .*" +
                       re.escape(world["server"].url)):
        select_stac(spec(world["server"].url))


def test_a_refused_cql2_filter_gives_the_servers_message(world):
    bad = {"op": "frob", "args": [{"property": "eo:cloud_cover"}, 8]}
    with pytest.raises(InputError) as err:
        select_stac(spec(world["server"].url, collections=[COLLECTION], filter=bad))
    assert world["server"].url in str(err.value) and "frob" in str(err.value)


def test_filter_needs_an_api(tmp_path):
    item = pystac.Item("a", None, None, dt.datetime(2026, 1, 1, tzinfo=UTC), {})
    item.add_asset("visual", pystac.Asset(href="/data/a.tif"))
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": [item.to_dict()]}))
    with pytest.raises(ConfigError, match="inputs.stac.filter: needs a STAC API"):
        select_stac(spec(str(tmp_path / "items.json"), filter={"op": "=", "args": [{"property": "x"}, 1]}))


def test_a_static_catalog_narrowed_by_collections_and_intersects(world, tmp_path):
    """The same fields on a static ItemCollection: applied to its items here (no API to ask)."""
    features = world["items"][:3] + world["extra"][:2]  # S2-0..2, S2-far, L8-0 (over scene 0)
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    source = str(tmp_path / "items.json")
    assert select_stac(spec(source, collections=[COLLECTION])).item_ids == ["S2-0", "S2-1", "S2-2", "S2-far"]
    assert select_stac(spec(source, collections=["landsat-c2-l2"])).item_ids == ["L8-0"]
    over_0 = shapely.geometry.mapping(box(*world["bounds"][0]).buffer(-1e-5))
    assert select_stac(spec(source, intersects=over_0)).item_ids == ["S2-0", "L8-0"]  # by time, then id


class Landing(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_an_api_without_item_search_is_named(tmp_path):
    landing = {"type": "Catalog", "id": "core-only", "stac_version": "1.0.0", "description": "no search",
               "conformsTo": ["https://api.stacspec.org/v1.0.0/core"], "links": []}
    (tmp_path / "index.json").write_text(json.dumps(landing))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Landing, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.json"
    try:
        with pytest.raises(InputError, match=re.escape(url) + ".*does not conform to STAC API - Item Search"):
            select_stac(spec(url, collections=["x"]))
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_api_exits_2_naming_url_and_cause_and_commits_nothing(tmp_path, ray_session):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "down", "model": {"checkpoint": "model.pt"}, "output": {"table": "out/detections"},
        "inputs": {"stac": {"source": url, "collections": [COLLECTION], "since_last_success": True}}}))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert url in result.output and "refused" in result.output.lower()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- signing


@pytest.fixture()
def token_service(monkeypatch):
    """Planetary Computer's SAS-token endpoint, played by a local server (PC_SDK_SAS_URL)."""
    import planetary_computer.settings

    class Tokens(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"msft:expiry": "2100-01-01T00:00:00Z", "token": "st=2026&se=2100&sp=rl&sig=abc"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tokens)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PC_SDK_SAS_URL", f"http://127.0.0.1:{server.server_address[1]}/token")
    planetary_computer.settings.Settings.get.cache_clear()
    yield
    planetary_computer.settings.Settings.get.cache_clear()
    server.shutdown()
    server.server_close()


def test_sign_planetary_computer_signs_asset_hrefs_keeps_item_ids(world, token_service):
    server = world["server"]
    assert select_stac(spec(server.url, collections=["pc-like"])).paths == [BLOB]
    signed = select_stac(spec(server.url, collections=["pc-like"], sign="planetary-computer"))
    assert signed.item_ids == ["PC-0"] and signed.paths == [BLOB + "?st=2026&se=2100&sp=rl&sig=abc"]


def test_sign_without_the_extra_names_it(world, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "planetary_computer", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"inputs.stac.sign: planetary-computer needs .*\[pc\]"):
        select_stac(spec(world["server"].url, collections=[COLLECTION], sign="planetary-computer"))
