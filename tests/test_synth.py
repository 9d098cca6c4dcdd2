"""Synthetic scenes: deterministic, georeferenced COG-like files, truthful ground truth."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from pycocotools.coco import COCO
from real_data import peak_rss_mb_snippet

from pipeline.cli import main
from pipeline.tools.synth import SEAM_STRIDE, SYNTH_CLASSES, synthesize

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def scenes(module_tmp):
    out = module_tmp("synth")
    return out, synthesize(out, scenes=2, size=2048, seed=7)


def test_same_seed_same_bytes(tmp_path):
    # Small scenes: determinism does not depend on the size, and 2048² ones cost seconds each.
    paths = synthesize(tmp_path / "a", scenes=2, size=512, seed=7)
    again = synthesize(tmp_path / "b", scenes=2, size=512, seed=7)
    assert [digest(p) for p in paths] == [digest(p) for p in again]
    assert digest(tmp_path / "a" / "truth.json") == digest(tmp_path / "b" / "truth.json")
    other = synthesize(tmp_path / "other", scenes=1, size=512, seed=8)
    assert digest(other[0]) != digest(paths[0])


def test_file_layout(scenes):
    _, paths = scenes
    assert [p.name for p in paths] == ["synth_000.tif", "synth_001.tif"]
    with rasterio.open(paths[1]) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.res == (0.5, 0.5)
        assert ds.block_shapes[0] == (256, 256) and ds.profile["tiled"]
        assert ds.profile["compress"].lower() in ("zstd", "deflate")
        assert ds.overviews(1) == [2, 4, 8]
        assert (ds.count, ds.dtypes[0], ds.nodata) == (3, "uint8", None)
    with rasterio.open(paths[0]) as a, rasterio.open(paths[1]) as b:
        assert b.bounds.left > a.bounds.right  # scenes do not overlap on the map


def test_coco_truth(scenes):
    out, paths = scenes
    coco = COCO(str(out / "truth.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SYNTH_CLASSES)
    assert coco.getCatIds() == [1, 2, 3]
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [p.name for p in paths]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 300  # ~256 per 2048^2 scene
    sizes = {name: [] for name in SYNTH_CLASSES}
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 2048 and y + h <= 2048
        sizes[SYNTH_CLASSES[ann["category_id"] - 1]].append((w, h))
    assert all(len(v) > 20 for v in sizes.values())
    vehicle, building, tank = (np.array(sizes[k]) for k in SYNTH_CLASSES)
    assert vehicle.max() <= 24 and vehicle.min() >= 6 and (vehicle.max(axis=1) >= 12).all()
    assert building.min() >= 40 and building.max() <= 90
    assert (tank[:, 0] == tank[:, 1]).all() and tank.min() >= 20 and tank.max() <= 40


def test_many_objects_straddle_chip_seams(scenes):
    out, _ = scenes
    coco = json.loads((out / "truth.json").read_text())
    crossing = 0
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        seams = np.arange(SEAM_STRIDE, 2048, SEAM_STRIDE)
        crossing += bool(((x < seams) & (seams < x + w)).any() or ((y < seams) & (seams < y + h)).any())
    assert crossing / len(coco["annotations"]) > 0.2


def test_objects_look_like_their_class(scenes):
    out, paths = scenes
    coco = json.loads((out / "truth.json").read_text())
    with rasterio.open(paths[0]) as ds:
        img = ds.read().astype(np.int32)
    for ann in coco["annotations"]:
        if ann["image_id"] != 1:
            continue
        x, y, w, h = ann["bbox"]
        r, g, b = img[:, y + h // 2, x + w // 2]
        name = SYNTH_CLASSES[ann["category_id"] - 1]
        if name == "vehicle":
            assert r > 150 and g < 90, (ann, r, g, b)
        elif name == "building":
            assert min(r, g, b) > 150 and img[:, y, x].max() < 100  # light roof, dark outline
        else:
            assert b > 200 and r > 170, (ann, r, g, b)
    background = img[:, :8, :8].reshape(3, -1).mean(axis=1)
    assert background[1] > background[0] and background[1] > background[2]  # greenish


def test_geojson_truth(scenes):
    out, _ = scenes
    coco = json.loads((out / "truth.json").read_text())
    geo = json.loads((out / "truth.geojson").read_text())
    assert "32633" in geo["crs"]["properties"]["name"]
    assert len(geo["features"]) == len(coco["annotations"])
    ann, feature = coco["annotations"][0], geo["features"][0]
    x, y, w, h = ann["bbox"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    # scene 0 origin (500000, 5400000), 0.5 m pixels; box corners, not centres
    np.testing.assert_allclose(ring.min(axis=0), [500000 + 0.5 * x, 5400000 - 0.5 * (y + h)])
    np.testing.assert_allclose(ring.max(axis=0), [500000 + 0.5 * (x + w), 5400000 - 0.5 * y])
    assert feature["properties"]["scene_id"] == "synth_000"
    assert feature["properties"]["label"] == SYNTH_CLASSES[ann["category_id"] - 1]


def test_nodata_regions_and_16_bit_four_bands(tmp_path):
    (path,) = synthesize(tmp_path, 1, 1024, seed=3, bands=4, dtype="uint16", nodata_regions=True)
    coco = json.loads((tmp_path / "truth.json").read_text())
    with rasterio.open(path) as ds:
        assert (ds.count, ds.dtypes[0], ds.nodata) == (4, "uint16", 0)
        data = ds.read()
        valid = ds.dataset_mask() > 0
    assert 0.1 < 1 - valid.mean() < 0.4
    assert data[:, valid].min() > 0 and data.max() > 255
    for ann in coco["annotations"]:  # no object touches a nodata pixel
        x, y, w, h = ann["bbox"]
        assert valid[y:y + h, x:x + w].all()


@pytest.mark.slow  # large scenes on purpose
def test_memory_is_bounded_for_large_scenes(tmp_path):
    # A 6144^2 RGB scene is 113 MB as uint8 and 450 MB as float32; the process baseline
    # (numpy, rasterio, a 64 MB GDAL cache) is ~140 MB. Generating window by window
    # stays under 200 MB; holding the scene would not.
    probe = peak_rss_mb_snippet() + textwrap.dedent("""
        import sys
        from pipeline.tools.synth import synthesize
        synthesize(sys.argv[1], 1, 6144, 0)
        print(peak_rss_mb())
    """)
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 200
    with rasterio.open(tmp_path / "synth_000.tif") as ds:
        assert ds.width == ds.height == 6144


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "s"), "--scenes", "1", "--size", "512",
                                  "--seed", "3", "--band-count", "4", "--dtype", "uint16",
                                  "--nodata-regions"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "synth_000.tif").exists() and (tmp_path / "s" / "truth.json").exists()
    bad = runner.invoke(main, ["synth", str(tmp_path / "t"), "--size", "10"])
    assert bad.exit_code == 2 and "size >= 64" in bad.output


# ------------------------------------------------------------------ inspection images


def test_inspection_images_are_plain_pngs_with_coco_truth(tmp_path):
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    from pipeline.tools.synth import INSPECTION_CLASSES, INSPECTION_SEAM_STRIDE, synthesize_inspection

    paths = synthesize_inspection(tmp_path, images=2, size=1024, seed=5)
    assert [p.name for p in paths] == ["part_000.png", "part_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part_000.png", "part_001.png", "truth.json"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(paths[0]) as ds:
            assert (ds.driver, ds.count, ds.dtypes[0], ds.width, ds.height) == ("PNG", 3, "uint8", 1024, 1024)
            assert ds.crs is None and ds.transform.is_identity  # no map: pixel coordinates only
            img = ds.read().astype(np.int32)
    coco = COCO(str(tmp_path / "truth.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(INSPECTION_CLASSES)
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [p.name for p in paths]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 60  # ~64 per 1024^2 image
    seams = np.arange(INSPECTION_SEAM_STRIDE, 1024, INSPECTION_SEAM_STRIDE)
    crossing = 0
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 1024 and y + h <= 1024
        crossing += bool(((x < seams) & (seams < x + w)).any() or ((y < seams) & (seams < y + h)).any())
    assert crossing / len(anns) > 0.2  # the inspection job's chip seams (512 - 96) are exercised
    # Each defect is visible against the brushed metal around it.
    background = np.median(img.reshape(3, -1), axis=1)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[1])):
        x, y, w, h = ann["bbox"]
        r, g, b = img[:, y + h // 2, x + w // 2]
        name = INSPECTION_CLASSES[ann["category_id"] - 1]
        if name == "scratch":
            assert min(w, h) <= 6 and max(w, h) >= 40 and max(r, g, b) < background.min() - 50, (ann, r, g, b)
        elif name == "dent":
            assert w == h and max(r, g, b) < background.min() - 25, (ann, r, g, b)
        else:
            assert r > g + 25 > b + 25, (ann, r, g, b)  # rust-brown stain
    again = synthesize_inspection(tmp_path / "again", images=2, size=1024, seed=5)
    assert [digest(p) for p in paths] == [digest(p) for p in again]


def test_cli_synth_kind_inspection(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "i"), "--kind", "inspection", "--scenes", "1",
                                  "--size", "256", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "i" / "part_000.png").is_file() and (tmp_path / "i" / "truth.json").is_file()
    bad = runner.invoke(main, ["synth", str(tmp_path / "j"), "--kind", "inspection", "--band-count", "4"])
    assert bad.exit_code == 2 and "--band-count" in bad.output, bad.output
    assert not (tmp_path / "j").exists()
