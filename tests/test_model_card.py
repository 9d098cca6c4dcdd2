"""The model card: `pipeline import` and `pipeline train` write a STAC Item with the MLM
extension beside each checkpoint; pystac's MLM extension reads it; every card the tests
write passes the STAC 1.1 item schema (shipped inside pystac, offline) and stac-model, the
MLM extension's reference pydantic models; `pipeline validate` and `pipeline run` refuse
scenes whose band count or data type the card rules out, and a checkpoint without a card
runs as before.

Oracles from outside: torchvision's own RetinaNet (its transform's mean/std and resize
rule, its class count), pystac's MLM extension and its JSON-schema validator with the STAC
core schemas it ships, stac-model's MLModelProperties, hashlib, rasterio's reading of the
real rasters and of the training scenes, the metrics.csv that training writes, and torch's
own version string.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import shutil
import sys

import pystac
import pytest
import rasterio
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from pystac.errors import STACValidationError
from pystac.extensions.mlm import MLMExtension, ModelInput, ResizeType, ValueScaling, ValueScalingType
from pystac.validation import JsonSchemaSTACValidator
from real_data import real
from torchvision.models.detection import retinanet_resnet50_fpn

from pipeline.cli import main
from pipeline.io.model_card import (
    band_names,
    card_location,
    common_data_type,
    imported_data_type,
    read_model_card,
)

if sys.version_info >= (3, 11):  # stac-model requires it (the test extra's marker)
    from stac_model.schema import MLModelProperties

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
needs_stac_model = pytest.mark.skipif(sys.version_info < (3, 11), reason="stac-model requires Python >= 3.11")


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).eval()


@pytest.fixture(scope="module")
def imported(module_tmp, torchvision_model):
    """A torchvision state dict imported with `pipeline import` -> (checkpoint, card)."""
    folder = module_tmp("card_import")
    torch.save(torchvision_model.state_dict(), folder / "weights.pt")
    code, out = cli("import", folder / "weights.pt", "--out", folder / "models" / "retinanet.pt",
                    "--classes", "tree,oil tank")
    assert code == 0, out
    checkpoint = folder / "models" / "retinanet.pt"
    return checkpoint, folder / "models" / "retinanet.pt.stac-item.json"


def sha256_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def validate_card(card: dict) -> None:
    """A card's JSON against the STAC 1.1 item schema pystac ships (no download: pystac
    fetches only extension schemas) and its MLM fields against stac-model's MLModelProperties
    (raises pystac's STACValidationError or pydantic's ValidationError). stac-model 0.7.0
    models MLM v1.6.0, whose item fields keep v1.4.0's meaning for what the card writes; it
    does not model assets (the model asset's mlm:artifact_type is the published schema's)."""
    JsonSchemaSTACValidator().validate_core(card, pystac.STACObjectType.ITEM, card["stac_version"])
    MLModelProperties.model_validate(card["properties"])


# ------------------------------------------------------------------ the card `pipeline import` writes


@needs_stac_model
def test_import_writes_a_card_beside_the_checkpoint_that_validates(imported, torchvision_model):
    checkpoint, card_path = imported
    assert card_location(checkpoint) == str(card_path) and card_path.is_file()
    validate_card(json.loads(card_path.read_text()))
    item = pystac.Item.from_file(str(card_path))
    assert MLM_SCHEMA in item.stac_extensions  # what item.validate() checks against (online)
    mlm = MLMExtension.ext(item)
    assert mlm.architecture == "RetinaNet" and [str(t) for t in mlm.tasks] == ["object-detection"]
    assert mlm.framework == "PyTorch" and mlm.framework_version == torch.__version__
    # Input: torchvision's RGB, its ImageNet normalisation in 8-bit pixel units, its resize rule.
    model_input = item.properties["mlm:input"][0]
    assert model_input["bands"] == ["red", "green", "blue"]
    assert model_input["input"]["shape"] == [-1, 3, -1, -1] and model_input["input"]["data_type"] == "float32"
    transform = torchvision_model.transform
    assert [s["mean"] for s in model_input["value_scaling"]] == pytest.approx([m * 255 for m in transform.image_mean])
    assert [s["stddev"] for s in model_input["value_scaling"]] == pytest.approx([s * 255 for s in transform.image_std])
    assert {s["type"] for s in model_input["value_scaling"]} == {"z-score"}
    assert model_input["resize_type"] == "interpolation-linear"
    hyper = item.properties["mlm:hyperparameters"]
    assert (hyper["min_size"], hyper["max_size"]) == (transform.min_size[0], transform.max_size)
    assert hyper["score_threshold"] == torchvision_model.score_thresh
    assert hyper["nms_threshold"] == torchvision_model.nms_thresh
    assert hyper["detections_per_image"] == torchvision_model.detections_per_img
    assert hyper["backbone"] == "resnet50"
    # Output: the classes in the model's order.
    classes = item.properties["mlm:output"][0]["classification:classes"]
    assert [(c["value"], c["name"]) for c in classes] == [(0, "tree"), (1, "oil tank")]
    # Source: imported from a torchvision state dict; 8-bit scenes expected.
    assert item.properties["pipeline:source"]["kind"] == "imported"
    assert item.properties["pipeline:source"]["from"] == "torchvision"
    assert item.properties["pipeline:source"]["sha256"] == sha256_of(checkpoint.parent.parent / "weights.pt")
    assert mlm.pretrained is True
    asset = item.assets["model"]
    assert asset.href.endswith("/retinanet.pt") and "mlm:model" in asset.roles
    assert json.loads(card_path.read_text())["assets"]["model"]["href"] == "./retinanet.pt"  # relative on disk
    assert asset.extra_fields["mlm:artifact_type"] == "torch.save"
    assert asset.extra_fields["file:checksum"] == "1220" + sha256_of(checkpoint)
    assert asset.extra_fields["file:size"] == os.path.getsize(checkpoint)
    assert [(b["name"], b["data_type"]) for b in asset.extra_fields["raster:bands"]] == [
        ("red", "uint8"), ("green", "uint8"), ("blue", "uint8")]


def set_value_scaling_with_pystac(card: dict) -> None:
    """What pystac-ext-mlm 1.4.1's ModelInput.value_scaling setter writes: one object."""
    model_input = ModelInput(card["properties"]["mlm:input"][0])
    model_input.value_scaling = ValueScaling.create(ValueScalingType.Z_SCORE, mean=120.0, stddev=60.0)


def set_resize_type_with_pystac(card: dict) -> None:
    """pystac-ext-mlm 1.4.1's ResizeType.INTERPOLATION_LINEAR: "interpolate-linear"."""
    ModelInput(card["properties"]["mlm:input"][0]).resize_type = ResizeType.INTERPOLATION_LINEAR


def drop_class_name_and_description(card: dict) -> None:
    first_class = card["properties"]["mlm:output"][0]["classification:classes"][0]
    del first_class["name"], first_class["description"]


@needs_stac_model
def test_validation_is_real_a_broken_card_fails(imported):
    _, card_path = imported
    card = json.loads(card_path.read_text())
    validate_card(card)
    for breaking, error in (
            (lambda c: c["properties"].pop("mlm:architecture"), ValidationError),
            (lambda c: c["properties"]["mlm:input"][0]["value_scaling"][0].pop("stddev"), ValidationError),
            (lambda c: c["properties"]["mlm:input"][0]["input"]["dim_order"].pop(), ValidationError),
            (drop_class_name_and_description, ValidationError),
            (lambda c: c["assets"]["model"].pop("href"), STACValidationError),
            # why model_card_item sets these two fields itself: pystac-ext-mlm's setters write
            # what the MLM schema and stac-model refuse (a release that fixes them fails these
            # two cases: then set them through pystac)
            (set_value_scaling_with_pystac, ValidationError),
            (set_resize_type_with_pystac, ValidationError)):
        broken = copy.deepcopy(card)
        breaking(broken)
        assert broken != card
        with pytest.raises(error):
            validate_card(broken)


def test_a_moved_checkpoint_and_card_still_name_each_other(imported, tmp_path):
    checkpoint, card_path = imported
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(checkpoint, moved / checkpoint.name)
    shutil.copy(card_path, moved / card_path.name)
    item = pystac.Item.from_file(str(moved / card_path.name))
    assert item.assets["model"].get_absolute_href() == str(moved / checkpoint.name)
    assert read_model_card(str(moved / checkpoint.name), sha256_of(moved / checkpoint.name)) is not None


def test_card_helpers_golden_values():
    assert imported_data_type(255.0) == "uint8"
    assert imported_data_type(4095.0) == "uint16"  # 12-bit imagery in 16-bit files
    assert imported_data_type(65535.0) == "uint16"
    assert imported_data_type(1.0) is None and imported_data_type(70000.0) is None
    assert band_names(("blue", "green", "red", "alpha"), [3, 2, 1]) == ("red", "green", "blue")
    assert band_names(("gray",), [1]) == ("band1",)
    assert band_names(("red", "red"), [1, 2]) == ("band1", "band2")  # not distinct: numbered
    assert common_data_type(["uint16", "uint16"]) == "uint16"
    assert common_data_type(["uint8", "uint16"]) is None


# ------------------------------------------------------------------ scenes the card rules out


def job_file(folder, checkpoint, scene, run_name="card") -> str:
    job = {"name": run_name, "inputs": {"paths": [str(scene)]}, "tiling": {"chip_size": 256, "overlap": 0},
           "model": {"checkpoint": str(checkpoint), "precision": "fp32", "device": "cpu"},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "max_retries": 0},
           "output": {"table": str(folder / "table"), "crs": "EPSG:4326"}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_validate_refuses_a_one_band_scene_for_a_three_band_card(imported, tmp_path):
    checkpoint, card_path = imported
    scene = real("rgb1_fake_nir_epsg3857.tif")
    with rasterio.open(scene) as f:
        assert f.count == 1
    code, out = cli("validate", job_file(tmp_path, checkpoint, scene))
    assert code == 2, out
    assert "rgb1_fake_nir_epsg3857.tif: 1 band" in out
    assert "3 bands (red, green, blue)" in out and str(card_path) in out


def test_validate_refuses_a_uint16_scene_for_a_uint8_card(imported, tmp_path):
    checkpoint, card_path = imported
    scene = real("RGBA.uint16.tif")
    with rasterio.open(scene) as f:
        assert f.dtypes[0] == "uint16"
    code, out = cli("validate", job_file(tmp_path, checkpoint, scene))
    assert code == 2, out
    assert "RGBA.uint16.tif: uint16 pixels" in out and "allows uint8" in out and str(card_path) in out


def test_run_planning_refuses_the_scene_and_names_the_card(imported, tmp_path):
    """`pipeline run` plans its scenes with plan_scenes (on the driver and in Ray tasks): the
    refused scene comes back with its reason, the others are planned."""
    from pipeline.chips.planning import model_facts, plan_scenes
    from pipeline.config.spec import load_job
    from pipeline.io.inputs import expand_patterns

    checkpoint, card_path = imported
    spec = load_job(job_file(tmp_path, checkpoint, real("RGBA.uint16.tif")))
    scenes = expand_patterns([str(real("RGBA.uint16.tif")), str(real("OSBS_029.tif"))]).scenes
    refused, planned = plan_scenes(spec, scenes, model_facts(str(checkpoint)))
    assert refused["path"].endswith("RGBA.uint16.tif")
    assert "uint16 pixels" in refused["reason"] and str(card_path) in refused["reason"]
    assert planned.path.endswith("OSBS_029.tif") and planned.windows


def test_without_its_card_a_checkpoint_runs_as_before(imported, tmp_path):
    """Older checkpoints have no card; a card describing another file is not this one's."""
    checkpoint, card_path = imported
    bare = tmp_path / "bare.pt"
    shutil.copy(checkpoint, bare)
    one_band = real("rgb1_fake_nir_epsg3857.tif")
    code, out = cli("validate", job_file(tmp_path, bare, one_band))
    assert code == 0, out  # the single band is replicated, as before cards
    code, out = cli("validate", job_file(tmp_path, bare, real("RGBA.uint16.tif")))
    assert code == 0 and "uint16 scene" in out, out  # a warning, as before cards
    # A card left beside a different checkpoint (copied over it without its card) is ignored.
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    shutil.copy(card_path, card_location(other))
    with open(other, "ab") as f:
        f.write(b"\0")  # other bytes: the card's checksum no longer names this file
    assert read_model_card(str(other), sha256_of(other)) is None
    assert read_model_card(str(checkpoint), sha256_of(checkpoint)).band_names == ("red", "green", "blue")


# ------------------------------------------------------------------ the cards `pipeline train` writes


@pytest.fixture(scope="module")
def trained(module_tmp, ray_session):
    """The smallest real `pipeline train` (1 worker, resnet18 with 32-channel FPN and
    heads, 2 steps on 128-px chips of 3 synthetic scenes) that publishes its model."""
    from pipeline.config.spec import load_job
    from pipeline.tools.synth import synthesize
    from pipeline.train.driver import train

    folder = module_tmp("card_train")
    synthesize(folder / "data", scenes=3, size=256, seed=3)
    job = {"name": "carded", "inputs": {"paths": ["data/*.tif"]}, "model": {"checkpoint": "models/model.pt"},
           "output": {"table": "out"},
           "train": {"scenes": ["data/*.tif"], "labels": ["data/truth.json"],
                     "classes": ["vehicle", "building", "tank"], "val_split": {"by": "scene", "fraction": 0.34},
                     "backbone": "resnet18", "fpn_channels": 32,
                     "head_width": 32, "head_depth": 1, "chip_size": 128, "overlap": 0, "batch_size": 4, "workers": 1,
                     "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2, "output_dir": "runs", "seed": 5,
                     "publish": True}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        spec = load_job(folder / "job.yaml")
        summary = train(spec, log=lambda line: None)
    finally:
        os.chdir(cwd)
    return folder, spec, summary


@pytest.mark.slow
@needs_stac_model
def test_train_writes_a_card_beside_each_checkpoint(trained):
    folder, spec, summary = trained
    out = folder / "runs"
    published = folder / "models" / "model.pt"
    assert sorted(summary["model_cards"]) == sorted(card_location(p) for p in
                                                    (out / "best.pt", out / "last.pt", published.resolve()))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    best_row = max(rows, key=lambda r: (float(r["val_AP50"]), float(r["val_AP"])))
    with rasterio.open(folder / "data" / "synth_000.tif") as f:
        dtype, colours = f.dtypes[0], [c.name for c in f.colorinterp]
    for card in summary["model_cards"]:
        validate_card(json.loads(open(card).read()))
    for checkpoint in (out / "best.pt", published):
        item = pystac.Item.from_file(card_location(checkpoint))
        assert MLM_SCHEMA in item.stac_extensions
        props = item.properties
        assert props["pipeline:source"]["kind"] == "trained" and props["pipeline:source"]["job"] == spec.source
        # training's own validation figures for this checkpoint (metrics.csv's best row)
        assert props["pipeline:validation"]["AP50"] == pytest.approx(float(best_row["val_AP50"]))
        assert props["pipeline:validation"]["AP"] == pytest.approx(float(best_row["val_AP"]))
        assert props["mlm:input"][0]["bands"] == colours
        assert props["mlm:input"][0]["input"]["shape"] == [-1, 3, -1, -1]  # any chip size runs
        assert props["mlm:hyperparameters"]["chip_size"] == 128
        assert [s["mean"] for s in props["mlm:input"][0]["value_scaling"]] == pytest.approx(
            summary["band_stats"]["mean"])
        assert [c["name"] for c in props["mlm:output"][0]["classification:classes"]] == ["vehicle", "building",
                                                                                          "tank"]
        assert props["mlm:pretrained"] is False and props["mlm:pretrained_source"] is None  # from scratch
        asset = json.loads(open(card_location(checkpoint)).read())["assets"]["model"]
        assert asset["href"] == f"./{checkpoint.name}"
        assert asset["file:checksum"] == "1220" + sha256_of(checkpoint)
        assert {b["data_type"] for b in asset["raster:bands"]} == {dtype}


@pytest.mark.slow
def test_a_trained_card_refuses_scenes_of_another_data_type(trained, tmp_path):
    folder, _, _ = trained
    published = folder / "models" / "model.pt"
    code, out = cli("validate", job_file(tmp_path, published, real("RGBA.uint16.tif")))
    assert code == 2, out
    assert "RGBA.uint16.tif: uint16 pixels" in out and "allows uint8" in out
    assert card_location(published) in out


@pytest.mark.slow  # a ResNet-50 checkpoint through the S3 server four times (~5 s)
def test_a_card_in_object_storage_is_read_beside_its_checkpoint(imported, s3_server):
    """model.checkpoint on s3://: the card is fetched from beside it, and its absence is no
    error (checkpoints from before cards)."""
    from pipeline.chips.planning import model_facts, scene_problems
    from pipeline.io.raster import read_scene_info

    checkpoint, card_path = imported
    s3_server.create_bucket(Bucket="card-tests")
    s3_server.upload_file(str(checkpoint), "card-tests", "models/retinanet.pt")
    s3_server.upload_file(str(card_path), "card-tests", "models/retinanet.pt.stac-item.json")
    s3_server.upload_file(str(checkpoint), "card-tests", "older/retinanet.pt")
    facts = model_facts("s3://card-tests/models/retinanet.pt")
    assert facts.card is not None and facts.card.path == "s3://card-tests/models/retinanet.pt.stac-item.json"
    assert model_facts("s3://card-tests/older/retinanet.pt").card is None
    errors, _ = scene_problems(read_scene_info(str(real("rgb1_fake_nir_epsg3857.tif"))), None, facts, None)
    assert any("1 band" in e and facts.card.path in e for e in errors)
