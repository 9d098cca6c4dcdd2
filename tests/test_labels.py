"""Label readers on real files and synthetic truth; chip labels; bad boxes named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
from pyogrio import raw as ogr
from real_data import real, requires_real_data

from pipeline.chips.tiling import ChipWindow
from pipeline.errors import InputError
from pipeline.geo.georef import reproject_points
from pipeline.io.labels import (
    by_scene,
    chip_labels,
    read_coco,
    read_csv,
    read_labels,
    read_vector,
    read_voc,
)
from pipeline.io.raster import read_scene_info
from pipeline.tools.synth import SYNTH_CLASSES, synthesize

# ------------------------------------------------------------------ real files


@requires_real_data
def test_osbs_csv():
    (ann,) = read_csv(real("OSBS_029.csv"))
    assert ann.image == "OSBS_029.tif" and ann.scene_id == "OSBS_029"
    assert len(ann) == 61 and ann.boxes.shape == (61, 4) and ann.boxes.dtype == np.float32
    np.testing.assert_array_equal(ann.boxes[0], [203, 67, 227, 90])
    assert set(ann.labels) == {"Tree"}
    assert ann.boxes.min() >= 0 and ann.boxes.max() <= 400


@requires_real_data
def test_csv_columns_are_matched_by_name():
    # The SJER truth file orders its columns xmin,xmax,ymin,ymax.
    (ann,) = read_csv(real("2018_SJER_3_252000_4107000_image_477_truth.csv"))
    assert len(ann) == 7
    np.testing.assert_array_equal(ann.boxes[0], [1, 103, 82, 235])
    assert ann.labels[0] == "0"


@requires_real_data
def test_yell_voc_xml():
    (ann,) = read_voc(real("2019_YELL_2_541000_4977000_image_crop.xml"))
    assert ann.image == "2019_YELL_2_541000_4977000_image_crop.png"
    assert len(ann) == 279 and set(ann.labels) == {"Tree"}
    # First object: <xmin>1012 <ymin>161 <xmax>1041 <ymax>196, 1-based inclusive.
    np.testing.assert_array_equal(ann.boxes[0], [1011, 160, 1041, 196])
    (zero_based,) = read_voc(real("2019_YELL_2_541000_4977000_image_crop.xml"), one_based=False)
    np.testing.assert_array_equal(zero_based.boxes[0], [1012, 161, 1041, 196])
    assert ann.boxes[:, [0, 1]].min() >= 0
    assert ann.boxes[:, 2].max() <= 1249 and ann.boxes[:, 3].max() <= 1035


@requires_real_data
def test_australia_shapefile_onto_its_raster():
    tif, shp = real("australia.tif"), real("australia.shp")
    (ann,) = read_vector(shp, tif)
    meta, _, wkb, _ = ogr.read(shp)
    (geom,) = shapely.from_wkb(wkb)
    with rasterio.open(tif) as ds:
        inverse = ~ds.transform  # oracle: the affine library's own inverse
        width, height = ds.width, ds.height
    x0, y0, x1, y1 = geom.bounds
    c0, r0 = inverse @ (x0, y1)  # upper-left corner of the bounds
    c1, r1 = inverse @ (x1, y0)  # lower-right corner
    assert ann.image == "australia.tif" and ann.labels == ["Tree"]
    np.testing.assert_allclose(ann.boxes[0], [c0, r0, c1, r1], atol=1e-3)
    assert 0 <= ann.boxes[0, 0] < ann.boxes[0, 2] <= width
    assert 0 <= ann.boxes[0, 1] < ann.boxes[0, 3] <= height


@requires_real_data
def test_vector_labels_need_a_georeferenced_scene():
    with pytest.raises(InputError, match="has no CRS"):
        read_vector(real("australia.shp"), real("2019_YELL_2_541000_4977000_image_crop.png"))
    with pytest.raises(InputError, match=r"australia\.shp: no attribute 'species'"):
        read_vector(real("australia.shp"), real("australia.tif"), label_field="species")


# ---------------------------------------------------------- synthetic round trip


@pytest.fixture(scope="module")
def synth_dir(module_tmp):
    out = module_tmp("synth_labels")
    synthesize(out, scenes=2, size=1024, seed=11)
    return out


def test_coco_reader_on_synth_truth(synth_dir):
    anns = read_coco(synth_dir / "truth.json")
    assert [a.image for a in anns] == ["synth_000.tif", "synth_001.tif"]
    coco = json.loads((synth_dir / "truth.json").read_text())
    first = coco["annotations"][0]
    x, y, w, h = first["bbox"]
    np.testing.assert_array_equal(anns[0].boxes[0], [x, y, x + w, y + h])
    assert sum(len(a) for a in anns) == len(coco["annotations"])
    assert set(anns[0].labels) <= set(SYNTH_CLASSES)
    assert set(by_scene(anns)) == {"synth_000", "synth_001"}


def test_geojson_truth_maps_back_onto_the_coco_boxes(synth_dir):
    coco = read_coco(synth_dir / "truth.json")
    scene = read_scene_info(synth_dir / "synth_001.tif")
    (ann,) = read_vector(synth_dir / "truth.geojson", scene, scene_field="scene_id")
    np.testing.assert_allclose(ann.boxes, coco[1].boxes, atol=1e-6)
    assert ann.labels == coco[1].labels


@pytest.mark.parametrize("driver,suffix", [("GPKG", ".gpkg"), ("ESRI Shapefile", ".shp")])
def test_vector_in_another_crs_is_reprojected(synth_dir, tmp_path, driver, suffix):
    # Write the truth of scene 0 in EPSG:4326 and read it back onto the UTM scene.
    scene = read_scene_info(synth_dir / "synth_000.tif")
    (truth,) = read_vector(synth_dir / "truth.geojson", scene, scene_field="scene_id")
    meta, _, wkb, fields = ogr.read(synth_dir / "truth.geojson", where="scene_id = 'synth_000'")
    rings = np.array([np.asarray(g.exterior.coords) for g in shapely.from_wkb(wkb)])
    lonlat = reproject_points(rings, scene.crs_wkt, "EPSG:4326")
    path = tmp_path / f"truth{suffix}"
    names = list(meta["fields"])
    ogr.write(path, shapely.to_wkb(shapely.polygons(lonlat)), [fields[names.index("label")]],
              ["label"], driver=driver, crs="EPSG:4326", geometry_type="Polygon")
    (ann,) = read_labels(path, scene)
    assert ann.labels == truth.labels
    # A box's bounds in lon/lat enclose its slightly rotated image: < 0.5 px larger.
    np.testing.assert_allclose(ann.boxes, truth.boxes, atol=0.5)


# ------------------------------------------------------------------- bad input


def test_degenerate_csv_box_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image_path,xmin,ymin,xmax,ymax,label\n"
                    "a.tif,1,1,5,5,Tree\n"
                    "a.tif,9,1,5,5,Tree\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 3: box .* zero or negative"):
        read_csv(path)


def test_nan_csv_box_names_file_and_line(tmp_path):
    path = tmp_path / "nan.csv"
    path.write_text("image_path,xmin,ymin,xmax,ymax,label\na.tif,nan,1,5,5,Tree\n")
    with pytest.raises(InputError, match=r"nan\.csv: line 2: box .* not finite"):
        read_csv(path)


def test_csv_errors(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("image,x0,y0,x1,y1,label\n")
    with pytest.raises(InputError, match=r"cols\.csv: missing CSV columns"):
        read_csv(path)
    path.write_text("image_path,xmin,ymin,xmax,ymax,label\na.tif,one,1,5,5,Tree\n")
    with pytest.raises(InputError, match=r"line 2: xmin='one' is not a number"):
        read_csv(path)
    with pytest.raises(InputError, match="file not found"):
        read_csv(tmp_path / "missing.csv")


def test_csv_empty_image_marker(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("image_path,xmin,ymin,xmax,ymax,label\n"
                    "empty.tif,0,0,0,0,Tree\nfull.tif,1,2,3,4,Tree\n")
    empty, full = read_csv(path)
    assert empty.image == "empty.tif" and len(empty) == 0 and empty.boxes.shape == (0, 4)
    assert len(full) == 1


def test_degenerate_coco_box(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.tif"}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5]}]}))
    with pytest.raises(InputError, match=r"bad\.json: annotation 0 \(id 7\): box"):
        read_coco(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_coco(path)


def test_degenerate_voc_box(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text("<annotation><filename>a.png</filename><object><name>car</name>"
                    "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>4</xmax><ymax>9</ymax></bndbox>"
                    "</object></annotation>")
    with pytest.raises(InputError, match=r"bad\.xml: object 0: box"):
        read_voc(path)


# ------------------------------------------------------------------ chip labels


def test_chip_labels_by_hand():
    window = ChipWindow(row=0, col=1, col_off=100, row_off=100, width=200, height=200)
    boxes = np.array([
        [150, 150, 170, 190],   # inside -> shifted to (50, 50, 70, 90)
        [90, 150, 110, 160],    # half inside (x 100..110 of 90..110) -> kept, clipped
        [92, 150, 108, 160],    # 8 of 16 px inside -> kept at 0.5
        [80, 150, 105, 160],    # 5 of 25 px inside (20%) -> dropped
        [400, 400, 410, 410],   # outside -> dropped
        [290, 290, 310, 310],   # a quarter inside -> dropped
    ], dtype=np.float64)
    labels = ["a", "b", "c", "d", "e", "f"]
    out, kept = chip_labels(boxes, labels, window)
    assert kept == ["a", "b", "c"]
    np.testing.assert_array_equal(out, [[50, 50, 70, 90], [0, 50, 10, 60], [0, 50, 8, 60]])
    out, kept = chip_labels(boxes, labels, window.as_tuple(), min_inside_fraction=0.2)
    assert kept == ["a", "b", "c", "d", "f"]
    out, kept = chip_labels(boxes, labels, window, min_inside_fraction=1.0)
    assert kept == ["a"]
    with pytest.raises(ValueError):
        chip_labels(boxes, labels, window, min_inside_fraction=0)


def test_chip_labels_against_per_box_oracle():
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-50, 600, 500)
    y0 = rng.uniform(-50, 600, 500)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 80, 500), y0 + rng.uniform(1, 80, 500)], 1)
    window = (64, 32, 448, 512)
    out, kept = chip_labels(boxes, list(range(500)), window, 0.5)
    expected = []
    for i, (a, b, c, d) in enumerate(boxes):
        iw = max(0.0, min(c, 512) - max(a, 64))
        ih = max(0.0, min(d, 544) - max(b, 32))
        if iw * ih >= 0.5 * (c - a) * (d - b):
            expected.append(i)
    assert kept == expected
    assert (out[:, [0, 2]] >= 0).all() and (out[:, [0, 2]] <= 448).all()
    assert (out[:, [1, 3]] >= 0).all() and (out[:, [1, 3]] <= 512).all()


def test_vector_feature_without_label_is_named(synth_dir, tmp_path):
    scene = read_scene_info(synth_dir / "synth_000.tif")
    path = tmp_path / "unlabelled.gpkg"
    box = shapely.box(500010, 5399900, 500020, 5399910)
    ogr.write(path, shapely.to_wkb(np.array([box, box])), [np.array(["tank", None], dtype=object)],
              ["label"], driver="GPKG", crs="EPSG:32633", geometry_type="Polygon")
    with pytest.raises(InputError, match=r"unlabelled\.gpkg: feature 1: attribute 'label' is empty"):
        read_vector(path, scene)
