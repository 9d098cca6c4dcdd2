"""Object storage through a local S3-compatible server (moto, 127.0.0.1): listing with the
one expander, object metadata, cached downloads, and GDAL reads that see overwrites."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.errors import InputError
from pipeline.io.inputs import expand_patterns, scene_key
from pipeline.io.objstore import head, list_objects, local_file
from pipeline.io.raster import open_raster

BUCKET = "objstore-tests"


def write_tif(path, value: int) -> None:
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": from_origin(500000, 4000000, 1, 1)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((1, 32, 32), value, np.uint8))


@pytest.fixture(scope="module")
def bucket(s3_server, module_tmp):
    s3_server.create_bucket(Bucket=BUCKET)
    tif = module_tmp("objstore") / "one.tif"
    write_tif(tif, 1)
    for key in ("top.tif", "s2/a/TCI.tif", "s2/b/TCI.tif", "s2/b/B04.tif", "s2/b/deep/TCI.tif", "notes.txt"):
        s3_server.upload_file(str(tif), BUCKET, key)
    return s3_server


def test_listing_globs_and_prefixes_with_scene_ids(bucket):
    assert list_objects(f"s3://{BUCKET}/s2/b/") == [f"s3://{BUCKET}/s2/b/{k}" for k in ("B04.tif", "TCI.tif",
                                                                                        "deep/TCI.tif")]
    found = expand_patterns([f"s3://{BUCKET}/s2/*/TCI.tif", f"s3://{BUCKET}/**/deep/*.tif", f"s3://{BUCKET}/",
                             f"s3://{BUCKET}/nothing/*.tif", f"s3://{BUCKET}/missing.tif"])
    assert [(s.scene_id, s.location.rsplit(BUCKET + "/", 1)[1]) for s in found.scenes] == [
        ("a/TCI", "s2/a/TCI.tif"), ("b/TCI", "s2/b/TCI.tif"), ("s2/b/deep/TCI", "s2/b/deep/TCI.tif"),
        ("top", "top.tif")]
    assert found.unmatched == [f"s3://{BUCKET}/nothing/*.tif", f"s3://{BUCKET}/missing.tif"]


def test_keys_change_when_an_object_is_overwritten_and_gdal_sees_the_new_bytes(bucket, tmp_path):
    url = f"s3://{BUCKET}/overwritten.tif"
    for value in (1, 2):
        write_tif(tmp_path / f"v{value}.tif", value)
    bucket.upload_file(str(tmp_path / "v1.tif"), BUCKET, "overwritten.tif")
    first = scene_key(url)
    assert first == head(url) and first["etag"] and first["size"] == (tmp_path / "v1.tif").stat().st_size
    with open_raster(url) as ds:
        assert ds.read(1).mean() == 1
    bucket.upload_file(str(tmp_path / "v2.tif"), BUCKET, "overwritten.tif")
    assert scene_key(url)["etag"] != first["etag"]
    with open_raster(url) as ds:  # GDAL's process-wide /vsicurl cache must not serve the old tiles
        assert ds.read(1).mean() == 2


def test_local_file_downloads_once_per_content(bucket, tmp_path):
    url = f"s3://{BUCKET}/model.bin"
    bucket.put_object(Bucket=BUCKET, Key="model.bin", Body=b"weights v1")
    path = local_file(url)
    assert open(path, "rb").read() == b"weights v1" and local_file(url) == path
    bucket.put_object(Bucket=BUCKET, Key="model.bin", Body=b"weights v2")
    assert open(local_file(url), "rb").read() == b"weights v2"
    assert local_file(str(tmp_path)) == str(tmp_path)  # local paths as they are
    with pytest.raises(InputError, match="model-missing.bin: object not found"):
        local_file(f"s3://{BUCKET}/model-missing.bin")
