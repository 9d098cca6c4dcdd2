"""`pipeline render`: quicklook from overviews, boxes in class colours where detections are."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from click.testing import CliRunner
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.geo.georef import box_corners
from pipeline.render import (
    FALSE_ALARM,
    HIT,
    LEGEND_LINE,
    LEGEND_PAD,
    MISS,
    PALETTE,
    SHADE,
    TITLE_HEIGHT,
    display_shape,
    read_quicklook,
    render_quicklook,
    stretch,
    title_lines,
)
from pipeline.table import schema
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.maintenance import write_run_report
from pipeline.tools.synth import synthesize

CLASSES = ["vehicle", "building", "tank"]
# Pixel boxes in a 512 px scene; rendered at 256 px every coordinate halves:
# (100, 120, 200, 180) -> (50, 60, 100, 90); (300, 260, 420, 400) -> (150, 130, 210, 200).
BOXES = np.array([[100, 120, 200, 180], [300, 260, 420, 400]], np.float64)
LABELS = [0, 2]
DISPLAY = [(50, 60, 100, 90), (150, 130, 210, 200)]


@pytest.fixture(scope="module")
def scene(module_tmp):
    return synthesize(module_tmp("scenes"), 1, 512, seed=3)[0]


def commit(root, scene, run_id="r1", boxes=BOXES, labels=LABELS):
    run = RunInfo(run_id, "sat", "h", "m", None)
    rows = schema.build_detection_table(box_corners(boxes), boxes, [0.9] * len(boxes), labels, CLASSES,
                                   run_id=run_id, job_name="sat", scene_id=scene.stem, scene_path=str(scene),
                                   model_id="m", job_hash="h")
    commit_scene(root, run, scene.stem, {"k": run_id}, rows)


def edge_pixels(box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """(x, y) points on the outer line of a display box: the middle of each side and the corners."""
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    return [(xm, y0), (xm, y1), (x0, ym), (x1, ym), (x0, y0), (x1, y1)]


def test_boxes_drawn_in_class_colour_where_detections_are(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene)
    summary = render_quicklook(root, str(scene), tmp_path / "q.png", max_size=256)
    assert summary["detections"] == 2 and summary["classes"] == {"vehicle": 1, "tank": 1}
    assert summary["picture_size"] == [256, 256] and summary["scene_size"] == [512, 512]
    png = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    assert png.shape[:2] == (256, 256)  # title and legend lie over the picture: it covers the scene only

    for box, label in zip(DISPLAY, LABELS):
        for x, y in edge_pixels(box):
            assert tuple(png[y, x]) == PALETTE[label], (box, x, y)
        # The inside of the box is picture, not outline.
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        assert tuple(png[cy, cx]) != PALETTE[label]

    # Against the same scene rendered without detections, pixels between the title strip and
    # the legend differ only on the outlines (2 px wide, drawn inward from the box edge).
    bare = np.asarray(Image.open(render_quicklook(root, str(scene), tmp_path / "bare.png", run_id="none",
                                                  max_size=256)["path"]).convert("RGB"))
    legend_top = 256 - 2 * LEGEND_PAD - 2 * LEGEND_LINE  # two classes
    band = slice(TITLE_HEIGHT, legend_top)
    changed = (png[band] != bare[band]).any(axis=2)
    outline = np.zeros((256, 256), bool)
    for x0, y0, x1, y1 in DISPLAY:
        outline[y0:y1 + 1, x0:x1 + 1] = True
        outline[y0 + 2:y1 - 1, x0 + 2:x1 - 1] = False
    assert changed.any() and not (changed & ~outline[band]).any()
    # And every outline pixel carries a class colour.
    colours = {PALETTE[label] for label in LABELS}
    assert all(tuple(p) in colours for p in png[outline])


def test_detections_of_other_scenes_and_runs_are_not_drawn(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene, run_id="r1")
    other = RunInfo("r1", "sat", "h", "m", None)
    rows = schema.build_detection_table(box_corners(BOXES), BOXES, [0.9, 0.9], [1, 1], CLASSES, run_id="r1",
                                   job_name="sat", scene_id="another", scene_path="/x/another.tif",
                                   model_id="m", job_hash="h")
    commit_scene(root, other, "another", {"k": 0}, rows)
    png = np.asarray(Image.open(render_quicklook(root, str(scene), tmp_path / "q.png", max_size=256)["path"]))
    assert not (png == PALETTE[1]).all(axis=2).any()  # class 1 only exists in the other scene
    summary = render_quicklook(root, str(scene), tmp_path / "r9.png", run_id="r9", max_size=256)
    assert summary["detections"] == 0 and summary["classes"] == {}


def test_picture_comes_from_the_overviews(tmp_path):
    # Overviews built from a left-dark / right-bright picture, then the full-resolution
    # pixels are inverted without rebuilding them: a decimated read shows the overview.
    path = tmp_path / "ov.tif"
    left_dark = np.zeros((1, 256, 256), np.uint8)
    left_dark[:, :, :128], left_dark[:, :, 128:] = 20, 220
    profile = dict(driver="GTiff", width=256, height=256, count=1, dtype="uint8", tiled=True,
                   blockxsize=128, blockysize=128)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(left_dark)
        dst.build_overviews([2], Resampling.average)
    with rasterio.open(path, "r+") as dst:
        dst.write(255 - left_dark)
    with rasterio.open(path) as src:
        assert src.read(1)[0, 0] == 235  # full resolution really is inverted
    root = tmp_path / "table"
    root.mkdir()
    png = np.asarray(Image.open(render_quicklook(root, str(path), tmp_path / "q.png", max_size=128)["path"]))
    assert png.shape[1] == 128
    assert png[60, 10, 0] < png[60, 120, 0]  # left darker: the overview was read (below the title strip)


def test_stretch_and_shape():
    # Values 0..99 in one band: p2 = 1.98, p98 = 97.02, so 50 -> (50 - 1.98) / 95.04 * 255 = 128.8 -> 129.
    band = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    out = stretch(band, np.ones((10, 10), bool))
    assert out[0, 5, 0] == 129 and out[0, 0, 0] == 0 and out[0, 9, 9] == 255
    invalid = np.ones((10, 10), bool)
    invalid[0, 0] = False
    assert stretch(band, invalid)[0, 0, 0] == 0
    assert display_shape(4000, 1000, 1024) == (1024, 256)
    assert display_shape(300, 200, 1024) == (300, 200)  # never enlarged


def test_missing_scene_is_named(tmp_path):
    root = tmp_path / "table"
    root.mkdir()
    with pytest.raises(InputError, match="nope.tif"):
        render_quicklook(root, str(tmp_path / "nope.tif"), tmp_path / "q.png")


def test_cli_render(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene)
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["render", str(root), str(scene), "-o", str(out), "--max-size", "256"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    missing = CliRunner().invoke(main, ["render", str(tmp_path / "none"), str(scene), "-o", str(out)])
    assert missing.exit_code == 2 and "no detection table" in missing.output  # missing input


# ---------------------------------------------------------------- maps


def written_and_read_back(path: Path):
    """(crs, transform, bounds, tags) as rasterio reads the file back."""
    with rasterio.open(path) as src:
        return src.crs, src.transform, src.bounds, src.tags()


@pytest.mark.parametrize("name", ["q.tif", "q.png"])
def test_the_quicklook_lies_where_the_scene_does(tmp_path, scene, name):
    root = tmp_path / "table"
    commit(root, scene)
    summary = render_quicklook(root, str(scene), tmp_path / name, max_size=256)
    with rasterio.open(scene) as src:
        crs, transform, bounds = src.crs, src.transform, src.bounds
    got_crs, got_transform, got_bounds, tags = written_and_read_back(tmp_path / name)
    assert got_crs == crs
    # 512 px scene at 256 px: each quicklook pixel covers 2 x 2 scene pixels, same origin.
    assert got_transform.almost_equals(transform @ Affine.scale(2.0))
    assert np.allclose(tuple(got_bounds), tuple(bounds))
    assert tags["TIFFTAG_IMAGEDESCRIPTION"] == summary["title"]
    if name.endswith(".png"):
        # A world file holds A, D, B, E and the centre of the top-left pixel.
        a, d, b, e, c, f = (float(v) for v in (tmp_path / "q.pgw").read_text().split())
        assert (a, d, b, e) == pytest.approx((transform.a * 2, 0.0, 0.0, transform.e * 2))
        assert (c, f) == pytest.approx((transform.c + transform.a, transform.f + transform.e))
        assert CRS.from_wkt((tmp_path / "q.prj").read_text()) == crs
        assert (tmp_path / "q.png.aux.xml").is_file()
        assert sorted(Path(p).name for p in summary["files"]) == ["q.pgw", "q.png", "q.png.aux.xml", "q.prj"]


def test_a_scene_without_georeferencing_keeps_a_plain_png(tmp_path):
    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:, 48:] = 200
    Image.fromarray(picture).save(tmp_path / "inspection.png")
    root = tmp_path / "table"
    root.mkdir()
    summary = render_quicklook(root, str(tmp_path / "inspection.png"), tmp_path / "out" / "q.png")
    assert not summary["georeferenced"] and summary["files"] == [str(tmp_path / "out" / "q.png")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.png"]
    assert Image.open(tmp_path / "out" / "q.png").size == (96, 64)


def test_title_names_scene_run_model_and_threshold(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene, run_id="night-7")
    assert render_quicklook(root, str(scene), tmp_path / "a.png", max_size=256)["title"] == \
        f"{scene.stem} | run night-7 | model m | score threshold not recorded"
    write_run_report(root, "night-7", {"run_id": "night-7", "score_threshold": 0.3})
    title = render_quicklook(root, str(scene), tmp_path / "b.png", max_size=256)["title"]
    assert title == f"{scene.stem} | run night-7 | model m | score >= 0.3"
    # The title strip: the picture darkened (SHADE) under light text, the same in either format.
    png = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    tif = np.asarray(Image.open(render_quicklook(root, str(scene), tmp_path / "c.tif", max_size=256)["path"])
                     .convert("RGB")).astype(int)
    assert (png[:TITLE_HEIGHT] == tif[:TITLE_HEIGHT]).all()
    picture = read_quicklook(str(scene), 256).picture.astype(int)
    far_right = (slice(0, TITLE_HEIGHT), slice(240, 256))  # past the end of the text
    assert np.abs(png[far_right] - (picture[far_right] * (1 - SHADE)).astype(int)).max() <= 1


@pytest.mark.parametrize("width, expected", [
    (39, ["scene | run r1 | model m | score >= 0.3"]),
    (38, ["scene | run r1 | model m", "score >= 0.3"]),
    (24, ["scene | run r1 | model m", "score >= 0.3"]),
    (14, ["scene | run r1", "model m", "score >= 0.3"]),
    (10, ["scene", "run r1", "model m", "score >= 0.3"]),  # a part wider than a line keeps its own
])
def test_title_lines_pack_parts_in_order(width, expected):
    # measured in characters: "scene | run r1" is 14, "scene | run r1 | model m" 24, the whole title 39
    assert title_lines("scene | run r1 | model m | score >= 0.3", width, len) == expected


def test_a_title_wider_than_the_picture_wraps_inside_it(tmp_path, scene):
    from PIL import ImageDraw, ImageFont

    root = tmp_path / "table"
    commit(root, scene, run_id="a-rather-long-run-id-of-the-night-20261207T010203Z")
    summary = render_quicklook(root, str(scene), tmp_path / "n.png", max_size=128)
    font, draw = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = title_lines(summary["title"], 128 - 2 * LEGEND_PAD, lambda t: draw.textlength(t, font=font))
    assert len(lines) >= 3 and " | ".join(lines) == summary["title"]
    png = np.asarray(Image.open(tmp_path / "n.png").convert("RGB")).astype(int)
    picture = read_quicklook(str(scene), 128).picture.astype(int)
    strip = slice(0, TITLE_HEIGHT * len(lines))
    shaded = (picture[strip] * (1 - SHADE)).astype(int)
    assert (np.abs(png[strip] - shaded) > 1).any(axis=2).any(axis=1).reshape(len(lines), -1).any(axis=1).all()


# ---------------------------------------------------------------- against ground truth

# Truth in scene pixels (512 px scene, drawn at 256):
#  vehicle (104, 120, 200, 180): IoU with detection 0 (100, 120, 200, 180) = 96*60 / (100*60) = 0.96 -> hit;
#  tank (300, 80, 420, 140): no tank detection overlaps it -> miss, drawn at (150, 40, 210, 70) (below
#  the title, which takes two lines at 256 px with the truth part);
#  vehicle (300, 260, 420, 400): the tank detection 1 lies exactly on it, but classes differ ->
#  a miss, and detection 1 a false alarm.
TRUTH = [("vehicle", (104, 120, 200, 180)), ("tank", (300, 80, 420, 140)), ("vehicle", (300, 260, 420, 400))]


def truth_csv(path: Path, scene: Path, truth=TRUTH) -> Path:
    lines = ["image_path,xmin,ymin,xmax,ymax,label"]
    lines += [f"{scene.name},{x0},{y0},{x1},{y1},{label}" for label, (x0, y0, x1, y1) in truth]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_truth_draws_hits_false_alarms_and_misses_apart(tmp_path, scene):
    from torchvision.ops import box_iou

    root = tmp_path / "table"
    commit(root, scene)
    truth = truth_csv(tmp_path / "truth.csv", scene)
    # The oracle's IoUs behind the comments above.
    iou = box_iou(torch.tensor(BOXES, dtype=torch.float64), torch.tensor([b for _, b in TRUTH], dtype=torch.float64))
    assert float(iou[0, 0]) == pytest.approx(0.96) and float(iou[1, 2]) == 1.0 and float(iou[1, 1]) == 0.0

    summary = render_quicklook(root, str(scene), tmp_path / "q.png", max_size=256, truth=truth)
    assert summary["truth"] == {"tank": {"hits": 0, "false_alarms": 1, "misses": 1},
                                "vehicle": {"hits": 1, "false_alarms": 0, "misses": 1}}
    png = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    # The hit: drawn at (50, 60, 100, 90); its left side is the detection's alone (truth starts at x 52).
    assert all(tuple(png[y, 50]) == HIT for y in range(62, 89))
    for x, y in edge_pixels((150, 40, 210, 70)):
        assert tuple(png[y, x]) == MISS, (x, y)
    # The vehicle miss and the tank false alarm share their outline: misses are drawn on top.
    for x, y in edge_pixels(DISPLAY[1]):
        assert tuple(png[y, x]) == MISS, (x, y)

    # A false alarm alone: the truth file holds only the first vehicle.
    lone = truth_csv(tmp_path / "lone.csv", scene, TRUTH[:1])
    summary = render_quicklook(root, str(scene), tmp_path / "lone.png", max_size=256, truth=lone)
    assert summary["truth"] == {"tank": {"hits": 0, "false_alarms": 1, "misses": 0},
                                "vehicle": {"hits": 1, "false_alarms": 0, "misses": 0}}
    png = np.asarray(Image.open(tmp_path / "lone.png").convert("RGB"))
    for x, y in edge_pixels(DISPLAY[1]):
        assert tuple(png[y, x]) == FALSE_ALARM, (x, y)


def test_cli_render_with_truth(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene)
    truth = truth_csv(tmp_path / "truth.csv", scene)
    out = tmp_path / "q.tif"
    result = CliRunner().invoke(main, ["render", str(root), str(scene), "-o", str(out), "--truth", str(truth),
                                       "--max-size", "256"])
    assert result.exit_code == 0, result.output
    assert "1 hit, 1 false alarm, 2 misses" in result.output
    assert written_and_read_back(out)[0] is not None


# ---------------------------------------------------------------- object-store tables

BUCKET = "render-bucket"


def test_render_reads_an_object_store_table(s3_server, tmp_path, scene):
    s3_server.create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/tables/t1"
    commit(url, scene)
    summary = render_quicklook(url, str(scene), tmp_path / "q.png", max_size=256)
    assert summary["detections"] == 2 and summary["classes"] == {"vehicle": 1, "tank": 1}
    png = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    for box, label in zip(DISPLAY, LABELS):
        assert all(tuple(png[y, x]) == PALETTE[label] for x, y in edge_pixels(box))
    result = CliRunner().invoke(main, ["render", url, str(scene), "-o", str(tmp_path / "cli.png"),
                                       "--max-size", "256"])
    assert result.exit_code == 0 and "2 detections" in result.output, result.output
    # a mistyped prefix is no table, not a picture with no detections
    typo = CliRunner().invoke(main, ["render", f"s3://{BUCKET}/tables/t2", str(scene), "-o", str(tmp_path / "t.png")])
    assert typo.exit_code == 2 and "tables/t2: no detection table here" in typo.output, typo.output


@pytest.mark.parametrize("truth_name", ["truth.json", "truth.geojson"])
def test_truth_in_coco_and_vector_files(tmp_path, scene, truth_name):
    # The synthetic scene's own COCO boxes committed as detections: against its COCO file or
    # its GeoJSON (map coordinates, placed through the scene's transform) every one is a hit.
    coco = json.loads((scene.parent / "truth.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    xywh = np.array([a["bbox"] for a in coco["annotations"]], np.float64)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    labels = [CLASSES.index(names[a["category_id"]]) for a in coco["annotations"]]
    root = tmp_path / "table"
    commit(root, scene, boxes=boxes, labels=labels)
    summary = render_quicklook(root, str(scene), tmp_path / "q.png", max_size=256, truth=scene.parent / truth_name)
    per_class = {name: {"hits": labels.count(CLASSES.index(name)), "false_alarms": 0, "misses": 0}
                 for name in sorted({names[a["category_id"]] for a in coco["annotations"]})}
    assert summary["truth"] == per_class and sum(c["hits"] for c in per_class.values()) == len(boxes) > 0
