"""`pipeline render`: quicklook from overviews, boxes in class colours where detections are."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.enums import Resampling

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.geo.georef import box_corners
from pipeline.render import PALETTE, display_shape, render_quicklook, stretch
from pipeline.table import schema
from pipeline.table import transactions as T
from pipeline.tools.synth import synthesize

CLASSES = ["vehicle", "building", "tank"]
# Pixel boxes in a 512 px scene; rendered at 256 px every coordinate halves:
# (100, 120, 200, 180) -> (50, 60, 100, 90); (300, 260, 420, 400) -> (150, 130, 210, 200).
BOXES = np.array([[100, 120, 200, 180], [300, 260, 420, 400]], np.float64)
LABELS = [0, 2]
DISPLAY = [(50, 60, 100, 90), (150, 130, 210, 200)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("scenes"), 1, 512, seed=3)[0]


def commit(root, scene, run_id="r1", boxes=BOXES, labels=LABELS):
    run = T.RunInfo(run_id, "sat", "h", "m", None)
    rows = schema.build_detection_table(box_corners(boxes), boxes, [0.9] * len(boxes), labels, CLASSES,
                                   run_id=run_id, job_name="sat", scene_id=scene.stem, scene_path=str(scene),
                                   model_id="m", job_hash="h")
    T.commit_scene(root, run, scene.stem, {"k": run_id}, rows)


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
    assert png.shape[1] == 256 and png.shape[0] > 256  # legend strip under the picture

    for box, label in zip(DISPLAY, LABELS):
        for x, y in edge_pixels(box):
            assert tuple(png[y, x]) == PALETTE[label], (box, x, y)
        # The inside of the box is picture, not outline.
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        assert tuple(png[cy, cx]) != PALETTE[label]

    # Against the same scene rendered without detections, pixels differ only on the outlines
    # (2 px wide, drawn inward from the box edge).
    bare = np.asarray(Image.open(render_quicklook(root, str(scene), tmp_path / "bare.png", run_id="none",
                                                  max_size=256)["path"]).convert("RGB"))
    changed = (png[:256] != bare[:256]).any(axis=2)
    outline = np.zeros((256, 256), bool)
    for x0, y0, x1, y1 in DISPLAY:
        outline[y0:y1 + 1, x0:x1 + 1] = True
        outline[y0 + 2:y1 - 1, x0 + 2:x1 - 1] = False
    assert changed.any() and not (changed & ~outline).any()
    # And every outline pixel carries a class colour.
    colours = {PALETTE[label] for label in LABELS}
    assert all(tuple(p) in colours for p in png[:256][outline])


def test_detections_of_other_scenes_and_runs_are_not_drawn(tmp_path, scene):
    root = tmp_path / "table"
    commit(root, scene, run_id="r1")
    other = T.RunInfo("r1", "sat", "h", "m", None)
    rows = schema.build_detection_table(box_corners(BOXES), BOXES, [0.9, 0.9], [1, 1], CLASSES, run_id="r1",
                                   job_name="sat", scene_id="another", scene_path="/x/another.tif",
                                   model_id="m", job_hash="h")
    T.commit_scene(root, other, "another", {"k": 0}, rows)
    png = np.asarray(Image.open(render_quicklook(root, str(scene), tmp_path / "q.png", max_size=256)["path"]))
    assert not (png[:256] == PALETTE[1]).all(axis=2).any()  # class 1 only exists in the other scene
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
    assert png[10, 10, 0] < png[10, 120, 0]  # left darker: the overview was read


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
    result = CliRunner().invoke(main, ["render", str(root), str(scene), "--out", str(out), "--max-size", "256"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    missing = CliRunner().invoke(main, ["render", str(tmp_path / "none"), str(scene), "--out", str(out)])
    assert missing.exit_code == 2 and "no detection table" in missing.output  # missing input
