"""Geometry you can trust: merged boxes are clipped to the scene before georeferencing,
zero-area boxes are dropped, and every geometry written is a valid polygon (issue 12)."""
from __future__ import annotations

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from real_data import REAL_DATA

from pipeline.geo import georef


def test_clip_boxes_to_scene_by_hand():
    boxes = np.array([
        [10, 20, 30, 40],        # inside: unchanged
        [-5, -7, 30, 40],        # past left and top
        [90, 40, 130, 70],       # past right and bottom
        [-10, -10, 200, 200],    # past every edge: the whole scene
        [50, 20, 50, 40],        # zero width
        [10, 30, 20, 25],        # negative height
        [120, 10, 150, 20],      # wholly right of the scene: zero width after clipping
        [10, 65, 20, 90],        # wholly in the bottom padding
        [np.nan, 1, 5, 5],       # non-finite
        [1, 1, np.inf, 5],       # non-finite
    ], dtype=np.float32)
    clipped, keep = georef.clip_boxes_to_scene(boxes, 100, 60)
    assert clipped.shape == (len(boxes), 4)
    np.testing.assert_array_equal(keep, [True, True, True, True, False, False, False, False, False, False])
    np.testing.assert_array_equal(clipped[keep], [[10, 20, 30, 40], [0, 0, 30, 40], [90, 40, 100, 60],
                                                  [0, 0, 100, 60]])


def test_clip_boxes_to_scene_empty_and_input_untouched():
    clipped, keep = georef.clip_boxes_to_scene(np.zeros((0, 4)), 10, 10)
    assert clipped.shape == (0, 4) and keep.shape == (0,) and keep.dtype == bool
    boxes = np.array([[-1.0, -1.0, 20.0, 20.0]])
    georef.clip_boxes_to_scene(boxes, 10, 10)
    np.testing.assert_array_equal(boxes, [[-1, -1, 20, 20]])


def test_valid_polygons_flags_folded_and_non_finite_quads():
    square = [[0, 0], [1, 0], [1, 1], [0, 1]]
    bowtie = [[0, 0], [1, 1], [1, 0], [0, 1]]       # a quad folded by a reprojection
    flat = [[0, 0], [1, 0], [1, 0], [0, 0]]         # collapsed to a line
    off_disk = [[0, 0], [np.nan, 0], [1, 1], [0, 1]]
    corners = np.array([square, bowtie, flat, off_disk], dtype=np.float64)
    np.testing.assert_array_equal(georef.valid_polygons(corners), [True, False, False, False])


WORLD = REAL_DATA / "world.rgb.tif"


@pytest.mark.skipif(not WORLD.exists(), reason=f"real test raster not found at {WORLD}")
def test_finalize_scene_keeps_geometry_inside_a_scene_smaller_than_a_chip(tmp_path):
    """world.rgb.tif is 512x256 EPSG:4326; a 512-px chip is padded below row 256."""
    from pipeline.chips.planning import ScenePlan
    from pipeline.chips.tiling import chip_id, plan_chips
    from pipeline.config.spec import JobSpec
    from pipeline.infer.finalize import finalize_scene
    from pipeline.infer.predictor import encode_detections
    from pipeline.io.raster import read_scene_info

    info = read_scene_info(WORLD)
    chips = plan_chips(WORLD, 512, 64, 0.0)
    assert (info.width, info.height) == (512, 256) and len(chips.windows) == 1
    plan = ScenePlan(info.scene_id, str(WORLD), info, chips.windows, chips.n_skipped)
    spec = JobSpec.model_validate({
        "name": "geometry",
        "inputs": {"paths": [str(WORLD)], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 512, "overlap": 64, "min_valid_fraction": 0.0},
        "model": {"checkpoint": str(tmp_path / "model.pt")},
        "output": {"table": str(tmp_path / "table"), "crs": "EPSG:4326"},
    })
    # Chip pixels; the score tells the boxes apart after the merge.
    boxes = np.array([
        [10, 10, 100, 80],       # 0.9 inside
        [200, 200, 260, 400],    # 0.8 into the bottom padding
        [480, 50, 600, 120],     # 0.7 past the right edge
        [-20, -10, 30, 40],      # 0.6 past the top-left corner
        [100, 300, 150, 400],    # 0.5 wholly in the padding -> dropped
        [50, 50, 50, 90],        # 0.4 zero width -> dropped
    ], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    window = chips.windows[0]
    results = [(chip_id(plan.scene_id, window.row, window.col),
                encode_detections(boxes, scores, np.zeros(len(boxes))))]

    table = finalize_scene(spec, plan, results, ["thing"], run_id="r1", model_id="m", job_hash="h")

    np.testing.assert_allclose(sorted(table["score"].to_pylist()), [0.6, 0.7, 0.8, 0.9], rtol=1e-6)
    px = np.stack([table[f"px_{k}"].to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")], 1)
    assert (px[:, [0, 2]] >= 0).all() and (px[:, [0, 2]] <= 512).all()
    assert (px[:, [1, 3]] >= 0).all() and (px[:, [1, 3]] <= 256).all()
    assert (px[:, 2] > px[:, 0]).all() and (px[:, 3] > px[:, 1]).all()

    # Outside oracles: rasterio's bounds of the file, shapely's validity of the WKB.
    with rasterio.open(WORLD) as src:
        bounds = src.bounds
    geoms = shapely.from_wkb(table["geometry"].to_pylist())
    assert not shapely.is_missing(geoms).any()
    assert shapely.is_valid(geoms).all(), shapely.is_valid_reason(geoms)
    coords = shapely.get_coordinates(geoms)
    eps = 1e-9
    assert coords[:, 1].min() >= bounds.bottom - eps and coords[:, 1].max() <= bounds.top + eps
    assert coords[:, 0].min() >= bounds.left - eps and coords[:, 0].max() <= bounds.right + eps

    # And as another reader sees the file.
    path = tmp_path / "scene.parquet"
    pq.write_table(table, path)
    row = duckdb.sql(f"""SELECT min(bbox.xmin), min(bbox.ymin), max(bbox.xmax), max(bbox.ymax),
                                min(px_xmin), min(px_ymin), max(px_xmax), max(px_ymax), count(*)
                         FROM read_parquet('{path}')""").fetchall()[0]
    xmin, ymin, xmax, ymax, pxmin, pymin, pxmax, pymax, n = row
    assert n == 4
    assert bounds.left - eps <= xmin and xmax <= bounds.right + eps
    assert bounds.bottom - eps <= ymin and ymax <= bounds.top + eps
    assert (pxmin, pymin, pxmax, pymax) == (0, 0, 512, 256)
