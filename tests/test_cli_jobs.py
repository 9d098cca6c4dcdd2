"""Bad job files through the real CLI: exit code 2, the message names the field, nothing written."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from retinanet import build_model, save_checkpoint


@pytest.fixture()
def good_job(tmp_path):
    (tmp_path / "scenes").mkdir()
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": rasterio.transform.from_origin(500000, 4000000, 1, 1)}
    with rasterio.open(tmp_path / "scenes" / "a.tif", "w", **profile) as dst:  # validate reads its header
        dst.write(np.zeros((3, 64, 64), np.uint8))
    torch.manual_seed(0)
    # statistics in pixel units, as training here and `pipeline import` write them
    save_checkpoint(tmp_path / "model.pt", build_model(num_classes=1, backbone="resnet18", head_width=16,
                                                       head_depth=1, image_mean=(120.0,) * 3,
                                                       image_std=(60.0,) * 3), ["thing"])
    return {
        "name": "cli-test",
        "inputs": {"paths": ["scenes/*.tif"], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 512, "overlap": 64},
        "model": {"checkpoint": "model.pt"},
        "compute": {"actors": 1},
        "output": {"table": "out/detections"},
    }


def _with(job: dict, dotted: str, value):
    """A deep copy of `job` with `dotted` set to `value` (_DELETE removes the key)."""
    import copy

    job = copy.deepcopy(job)
    *parents, key = dotted.split(".")
    node = job
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return job


_DELETE = object()

BAD_CASES = [
    ("tiling.overlap", 512, "tiling.overlap"),
    ("tiling.chip_size", "big", "tiling.chip_size"),
    ("tiling.min_valid_fraction", 1.5, "tiling.min_valid_fraction"),
    ("model.score_threshold", -0.1, "model.score_threshold"),
    ("model.checkpoint", "missing.pt", "model.checkpoint"),
    ("model.batch_size", 0, "model.batch_size"),
    ("inputs.paths", ["nothing/*.tif"], "inputs.paths"),
    ("inputs.bands", [0, 1], "inputs.bands"),
    ("compute.actors", 0, "compute.actors"),
    ("compute.gpus_per_actor", 1.5, "compute.gpus_per_actor"),
    ("compute.address", "not an address", "compute.address"),
    ("merge.method", "soft-nms", "merge.method"),
    ("output.crs", "EPSG:999999", "output.crs"),
    ("tiling.stride", 448, "stride"),
    ("name", _DELETE, "name"),
]


@pytest.mark.parametrize("field,value,named", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("command", ["validate", pytest.param("run", marks=pytest.mark.ray)])
def test_bad_job_exits_2_names_the_field_and_writes_nothing(tmp_path, good_job, field, value, named, command, request):
    if command == "run":  # run starts Ray while it lists the inputs (start_run): the session's Ray
        request.getfixturevalue("ray_session")
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(_with(good_job, field, value)))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [command, str(job_path)])
    assert result.exit_code == 2, result.output
    assert named in result.output, result.output
    assert "job.yaml" in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a bad job must write nothing"


def test_good_job_validates(tmp_path, good_job):
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(good_job))
    result = CliRunner().invoke(main, ["validate", str(job_path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()


def test_yaml_tags_are_not_evaluated(tmp_path, good_job):
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(good_job) + "extra: !!python/object/apply:os.system ['touch pwned']\n")
    result = CliRunner().invoke(main, ["validate", str(job_path)])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path.parent / "pwned").exists()
