"""Opening scenes: path mapping, SceneInfo from headers, typed errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from real_data import real, requires_real_data

from pipeline.errors import GeoreferenceError, InputError
from pipeline.io.objstore import gdal_path
from pipeline.io.raster import IDENTITY, is_rotated, read_scene_info, scene_id_for


@pytest.mark.parametrize("given,expected", [
    ("/data/a.tif", "/data/a.tif"),
    ("relative/b.tif", "relative/b.tif"),
    ("s3://bucket/key/c.tif", "/vsis3/bucket/key/c.tif"),
    ("gs://bucket/d.tif", "/vsigs/bucket/d.tif"),
    ("https://host.org/x/e.tif", "/vsicurl/https://host.org/x/e.tif"),
    ("http://host.org/f.tif", "/vsicurl/http://host.org/f.tif"),
    ("/vsis3/bucket/g.tif", "/vsis3/bucket/g.tif"),
])
def test_gdal_path(given, expected):
    assert gdal_path(given) == expected


@pytest.mark.parametrize("given,expected", [
    ("/data/tile_07.tif", "tile_07"),
    ("s3://bucket/x/tile_08.tif", "tile_08"),
    ("https://h.org/p/tile_09.tif?X-Amz-Signature=abc", "tile_09"),
    ("RGB.byte.tif", "RGB.byte"),
])
def test_scene_id_is_the_file_stem(given, expected):
    assert scene_id_for(given) == expected


@requires_real_data
def test_scene_info_matches_rasterio_header():
    path = real("RGB.byte.tif")
    info = read_scene_info(path)
    with rasterio.open(path) as ds:
        assert (info.width, info.height, info.count) == (ds.width, ds.height, ds.count) == (791, 718, 3)
        assert info.transform == tuple(ds.transform)[:6]
        assert CRS.from_wkt(info.crs_wkt) == ds.crs
        assert info.block_shape == ds.block_shapes[0]
    assert info.scene_id == "RGB.byte" and info.path == str(path)
    assert info.dtype == "uint8" and info.nodata == 0.0 and info.georeferenced
    assert info.colorinterp == ("red", "green", "blue") and info.data_bands == [1, 2, 3]
    with pytest.raises(AttributeError):
        info.width = 3  # frozen


@requires_real_data
def test_plain_png_stays_in_pixels():
    info = read_scene_info(real("2019_YELL_2_541000_4977000_image_crop.png"))
    assert info.crs_wkt is None and info.transform == IDENTITY and not info.georeferenced
    assert (info.width, info.height, info.count) == (1249, 1035, 3)


@requires_real_data
def test_geotransform_without_crs_is_ignored():
    # float_nan.tif carries (100, 0, 0, 0, 100, 0) but no CRS: outputs stay in pixels.
    info = read_scene_info(real("float_nan.tif"))
    assert info.crs_wkt is None and info.transform == IDENTITY
    assert info.dtype == "float32" and np.isnan(info.nodata)


@requires_real_data
def test_rotated_scene_is_refused_with_a_clear_error():
    path = real("rotated.tif")
    with pytest.raises(GeoreferenceError, match=r"rotated\.tif: rotated/sheared geotransform"):
        read_scene_info(path)
    # Opting in keeps the scene; with no CRS it lives in its pixel frame.
    assert read_scene_info(path, allow_rotated=True).transform == IDENTITY


def test_rotated_scene_with_crs_keeps_its_transform_when_allowed(tmp_path):
    transform = rasterio.Affine.rotation(30) @ rasterio.Affine.scale(2, -2)
    transform = rasterio.Affine.translation(500000, 5000000) @ transform
    path = tmp_path / "rot.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as ds:
        ds.write(np.ones((1, 4, 4), np.uint8))
    assert is_rotated(transform)
    with pytest.raises(GeoreferenceError, match="rot.tif"):
        read_scene_info(path)
    np.testing.assert_allclose(read_scene_info(path, allow_rotated=True).transform,
                               tuple(transform)[:6])


def test_gcp_only_scene_is_refused(tmp_path):
    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(0, 0, 500000, 5000000), GroundControlPoint(0, 4, 500000, 4999996),
            GroundControlPoint(4, 0, 500004, 5000000)]
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                       gcps=gcps, crs="EPSG:32633") as ds:
        ds.write(np.ones((1, 4, 4), np.uint8))
    with rasterio.open(path) as ds:
        assert ds.crs is None and len(ds.gcps[0]) == 3  # precondition of the test
    with pytest.raises(GeoreferenceError, match=r"gcps\.tif: georeferenced only by GCPs"):
        read_scene_info(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        read_scene_info(tmp_path / "nope.tif")


def test_directory_is_not_a_raster(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_scene_info(tmp_path)


def test_text_file_is_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("hello, not a TIFF")
    with pytest.raises(InputError, match=r"notes\.tif: cannot be opened as a raster \(.+\)"):
        read_scene_info(path)


@requires_real_data
def test_truncated_tiff_is_an_input_error(tmp_path):
    path = tmp_path / "cut.tif"
    path.write_bytes(real("RGB.byte.tif").read_bytes()[:300])
    with pytest.raises(InputError, match=r"cut\.tif"):
        read_scene_info(path)


def test_unreachable_url_is_an_input_error_naming_it():
    url = "http://127.0.0.1:9/scenes/none.tif"  # discard port: connection refused at once
    with rasterio.Env(GDAL_HTTP_MAX_RETRY=0, GDAL_HTTP_TIMEOUT=5):
        with pytest.raises(InputError, match=r"http://127\.0\.0\.1:9/scenes/none\.tif"):
            read_scene_info(url)
