"""Pixel boxes -> map polygons through box corners; reprojection; CRS round trips."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.transform
import rasterio.warp
from pyproj import CRS
from real_data import real, requires_real_data

from pipeline.geo.georef import (
    apply_affine,
    box_corners,
    boxes_to_polygons,
    chip_to_scene_boxes,
    corners_to_shapely,
    crs_to_projjson,
    finite_boxes,
    invert_affine,
    map_to_pixel,
    pixel_boxes_to_map,
    polygon_bounds,
    reproject_points,
    ring_signed_area,
)

RNG = np.random.default_rng(0)


def random_boxes(n: int, width: int, height: int) -> np.ndarray:
    x0 = RNG.integers(0, width - 20, n)
    y0 = RNG.integers(0, height - 20, n)
    return np.stack([x0, y0, x0 + RNG.integers(1, 20, n), y0 + RNG.integers(1, 20, n)], 1
                    ).astype(np.float64)


def test_chip_to_scene_boxes_by_hand():
    boxes = np.array([[1, 2, 3, 4], [0, 0, 512, 512]], dtype=np.float32)
    np.testing.assert_array_equal(chip_to_scene_boxes(boxes, 448, 896),
                                  [[449, 898, 451, 900], [448, 896, 960, 1408]])
    assert chip_to_scene_boxes(np.zeros((0, 4)), 5, 5).shape == (0, 4)


def test_box_corners_order():
    np.testing.assert_array_equal(box_corners(np.array([[10, 20, 30, 40]])),
                                  [[[10, 40], [30, 40], [30, 20], [10, 20]]])


def test_golden_pixel_box_on_a_north_up_grid():
    # 0.5 m pixels, origin (500000, 5400000): box (10, 20, 30, 40) -> x 500005..500015,
    # y 5400000 - 20*0.5 = 5399990 down to 5400000 - 40*0.5 = 5399980.
    transform = (0.5, 0.0, 500000.0, 0.0, -0.5, 5400000.0)
    corners = pixel_boxes_to_map(np.array([[10, 20, 30, 40]]), transform)
    np.testing.assert_allclose(polygon_bounds(corners), [[500005, 5399980, 500015, 5399990]])
    assert ring_signed_area(corners)[0] == pytest.approx(20 * 0.5 * 20 * 0.5)  # CCW


@requires_real_data
def test_corners_match_rasterio_upper_left_offsets_not_centres():
    with rasterio.open(real("RGB.byte.tif")) as ds:
        t = ds.transform
        boxes = random_boxes(200, ds.width, ds.height)
    corners = pixel_boxes_to_map(boxes, tuple(t)[:6])
    # rasterio.transform.xy(row, col, offset="ul") is the upper-left corner of a pixel:
    # xmin/ymin edges of our boxes; the xmax/ymax edges are the ul corner of pixel (xmax, ymax).
    ul_x, ul_y = rasterio.transform.xy(t, boxes[:, 1], boxes[:, 0], offset="ul")
    lr_x, lr_y = rasterio.transform.xy(t, boxes[:, 3], boxes[:, 2], offset="ul")
    bounds = polygon_bounds(corners)
    np.testing.assert_allclose(bounds[:, 0], ul_x)
    np.testing.assert_allclose(bounds[:, 3], ul_y)
    np.testing.assert_allclose(bounds[:, 2], lr_x)
    np.testing.assert_allclose(bounds[:, 1], lr_y)
    # The pixel-centre convention would be half a pixel (150 m here) off.
    cx, _ = rasterio.transform.xy(t, boxes[:, 1], boxes[:, 0], offset="center")
    np.testing.assert_allclose(np.asarray(cx) - bounds[:, 0], t.a / 2)
    # Area of every polygon = pixel area x box area.
    areas = corners_to_shapely(corners)
    pixel_area = abs(t.a * t.e)
    np.testing.assert_allclose([p.area for p in areas],
                               (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * pixel_area)
    assert all(p.is_valid for p in areas)


@requires_real_data
def test_rotated_transform_gives_the_rotated_polygon():
    with rasterio.open(real("rotated.tif")) as ds:
        t = ds.transform
    boxes = np.array([[0, 0, 10, 15], [2, 3, 5, 9]], dtype=np.float64)
    corners = pixel_boxes_to_map(boxes, tuple(t)[:6])
    for box, ring in zip(boxes, corners):
        cols = [box[0], box[2], box[2], box[0]]
        rows = [box[1], box[1], box[3], box[3]]
        xs, ys = rasterio.transform.xy(t, rows, cols, offset="ul")
        expected = {(round(x, 9), round(y, 9)) for x, y in zip(xs, ys)}
        assert {(round(x, 9), round(y, 9)) for x, y in ring} == expected
    areas = [p.area for p in corners_to_shapely(corners)]
    det = abs(t.a * t.e - t.b * t.d)
    np.testing.assert_allclose(areas, [10 * 15 * det, 3 * 6 * det])
    assert (ring_signed_area(corners) > 0).all()


def test_affine_inverse_round_trip():
    transform = (0.3, 0.1, 1000.0, -0.05, -0.3, 2000.0)
    points = RNG.uniform(0, 500, (50, 2))
    np.testing.assert_allclose(map_to_pixel(apply_affine(points, transform), transform), points,
                               atol=1e-9)
    with pytest.raises(Exception, match="singular"):
        invert_affine((0, 0, 1, 0, 0, 1))


@requires_real_data
def test_reprojection_matches_rasterio_warp():
    with rasterio.open(real("RGB.byte.tif")) as ds:
        crs, t = ds.crs, ds.transform
    boxes = random_boxes(50, 791, 718)
    polygons = boxes_to_polygons(boxes, tuple(t)[:6], crs.to_wkt())  # default EPSG:4326
    in_map = pixel_boxes_to_map(boxes, tuple(t)[:6])
    lon, lat = rasterio.warp.transform(crs, "EPSG:4326", in_map[..., 0].ravel(), in_map[..., 1].ravel())
    expected = {tuple(np.round(p, 9)) for p in np.stack([lon, lat], 1)}
    assert {tuple(np.round(p, 9)) for p in polygons.reshape(-1, 2)} == expected
    assert (ring_signed_area(polygons) > 0).all()  # still counter-clockwise in lon/lat
    assert ((polygons[..., 1] > 0) & (polygons[..., 1] < 90)).all()


@requires_real_data
def test_geographic_scene_round_trip():
    with rasterio.open(real("world.rgb.tif")) as ds:
        crs, t = ds.crs.to_wkt(), tuple(ds.transform)[:6]
    boxes = random_boxes(50, 512, 256)
    in_4326 = boxes_to_polygons(boxes, t, crs, "EPSG:4326")
    np.testing.assert_allclose(in_4326, pixel_boxes_to_map(boxes, t))  # same CRS: identity
    mercator = reproject_points(in_4326, "EPSG:4326", "EPSG:3857")
    back = reproject_points(mercator, "EPSG:3857", crs)
    np.testing.assert_allclose(back, in_4326, atol=1e-9)
    np.testing.assert_allclose(polygon_bounds(map_to_pixel(back, t)), boxes, atol=1e-6)


@requires_real_data
def test_crs_without_epsg_code_round_trips():
    with rasterio.open(real("goes.tif")) as ds:
        wkt, t = ds.crs.to_wkt(), tuple(ds.transform)[:6]
    assert CRS.from_wkt(wkt).to_epsg() is None  # precondition: no EPSG code
    projjson = crs_to_projjson(wkt)
    assert CRS.from_json_dict(projjson) == CRS.from_wkt(wkt)
    # Boxes around the sub-satellite point (scene centre) survive geos -> 4326 -> geos,
    # also when the way back uses the PROJJSON written to the output metadata.
    boxes = np.array([[250, 250, 260, 262], [200, 300, 230, 320]], dtype=np.float64)
    lonlat = boxes_to_polygons(boxes, t, wkt, "EPSG:4326")
    assert finite_boxes(lonlat).all()
    back = reproject_points(lonlat, "EPSG:4326", CRS.from_json_dict(projjson).to_wkt())
    np.testing.assert_allclose(polygon_bounds(map_to_pixel(back, t)), boxes, atol=1e-6)
    # The scene corner is off the Earth's disk: reported as NaN, not a wrong number.
    off_disk = boxes_to_polygons(np.array([[0, 0, 5, 5]]), t, wkt, "EPSG:4326")
    assert not finite_boxes(off_disk).any()


def test_non_georeferenced_scene_stays_in_pixels():
    boxes = np.array([[1, 2, 3, 4]], dtype=np.float64)
    out = boxes_to_polygons(boxes, (1, 0, 0, 0, 1, 0), None)
    np.testing.assert_array_equal(polygon_bounds(out), boxes)
    assert ring_signed_area(out)[0] > 0


def test_crs_to_projjson_epsg():
    data = crs_to_projjson("EPSG:32633")
    assert data["id"] == {"authority": "EPSG", "code": 32633}
