"""model.precision int8: quantised with NNCF, measured on labelled chips, then run or refused.

Oracle for the measurement: labels made from torch fp32's own detections of each scene
(one chip per scene), so the f32 graph must score AP50 ~1 on them (OpenVINO f32 and torch
fp32 agree to float rounding) and anything INT8 changes shows up as a drop.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from workspaces import tiny_checkpoint

from pipeline.config.spec import JobSpec
from pipeline.errors import ConfigError
from pipeline.eval.int8_gate import Int8Measurement, ap50_drop_points, int8_allowed
from pipeline.infer.int8 import evenly_spaced
from pipeline.tools.synth import SYNTH_CLASSES, synthesize
from retinanet import Detector, load_checkpoint

pytestmark = pytest.mark.timeout(600)

SCORE = 0.3


def test_drop_is_in_points_and_the_gate_refuses_or_warns():
    assert ap50_drop_points(0.807, 0.795) == 1.2
    assert ap50_drop_points(0.631, 0.674) == -4.3
    small = Int8Measurement("k", 0.80, 0.795, 64, 50)
    large = Int8Measurement("k", 0.80, 0.75, 64, 50)
    assert int8_allowed(small, 1.0, "refuse")[0]
    with pytest.raises(ConfigError, match=r"refused: AP50 0\.800 \(f32\) -> 0\.750 \(int8\) on 50 labelled chips, "
                                          r"a drop of 5\.0 points.*int8_max_ap50_drop \(1\)"):
        int8_allowed(large, 1.0, "refuse")
    running, message = int8_allowed(large, 1.0, "warn")
    assert running and message.startswith("warning:") and "5.0 points" in message


def test_calibration_chips_are_spread_evenly():
    assert evenly_spaced(10, 3) == [0, 3, 6]
    assert evenly_spaced(2, 5) == [0, 1]


@pytest.mark.parametrize("model, message", [
    ({"precision": "int8"}, "model.int8_labels"),
    ({"precision": "int8", "int8_labels": ["t.json"], "backend": "torch"}, "backend must be auto or openvino"),
    ({"precision": "int8", "int8_labels": ["t.json"], "device": "cuda"}, "device not cuda"),
])
def test_int8_needs_labels_and_a_cpu_engine(model, message):
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate({"name": "j", "inputs": {"paths": ["x.tif"]}, "model": {"checkpoint": "m.pt", **model},
                                "output": {"table": "t"}})


def test_validate_names_a_missing_label_file(tmp_path):
    from pipeline.config.spec import check_runnable

    (tmp_path / "m.pt").write_bytes(b"")
    spec = JobSpec.model_validate({"name": "j", "inputs": {"paths": ["x.tif"]},
                                   "model": {"checkpoint": str(tmp_path / "m.pt"), "precision": "int8",
                                             "int8_labels": [str(tmp_path / "truth.json")]},
                                   "output": {"table": str(tmp_path / "t")}})
    with pytest.raises(ConfigError, match=r"model\.int8_labels\[0\]: file not found: .*truth\.json"):
        check_runnable(spec)


@pytest.fixture(scope="module")
def labelled(module_tmp):
    """Scenes of one chip each, a tiny untrained model, and COCO labels made from torch
    fp32's own detections of each scene."""
    root = module_tmp("int8")
    paths = synthesize(root / "scenes", scenes=3, size=256, seed=11)
    tiny_checkpoint(root / "model.pt", head_width=16, fpn_channels=16)
    reference = load_checkpoint(root / "model.pt")[0]
    reference.config.score_threshold = SCORE
    detector = Detector(reference, device="cpu", precision="fp32")
    images, annotations = [], []
    for i, path in enumerate(paths):
        with rasterio.open(path) as src:
            pixels = torch.from_numpy(src.read().astype(np.float32))[None]
        found = detector(pixels)[0]
        images.append({"id": i + 1, "file_name": path.name, "width": 256, "height": 256})
        for (x1, y1, x2, y2), label in zip(found["boxes"].tolist(), found["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    assert len(annotations) > 30
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SYNTH_CLASSES)]
    (root / "truth.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": categories}))
    return root


def int8_job(root, table: str, **model) -> JobSpec:
    return JobSpec.model_validate({
        "name": "int8", "inputs": {"paths": [str(root / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 0, "min_valid_fraction": 0.0},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": SCORE, "precision": "int8",
                  "int8_labels": [str(root / "truth.json")], "int8_calibration_chips": 2, **model},
        "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1},
        "output": {"table": str(root / table), "crs": None}})


def test_int8_is_measured_against_f32_then_run(labelled, ray_session, monkeypatch, tmp_path):
    from pipeline.run.graph import run_job

    monkeypatch.setenv("RETINANET_PIPELINE_CACHE", str(tmp_path / "cache"))
    report = run_job(int8_job(labelled, "allowed", int8_max_ap50_drop=100.0), log=lambda m: None)
    gate = report["int8"]
    assert report["exit_code"] == 0 and len(report["scenes_ok"]) == 3
    assert gate["calibration_chips"] == 2 and gate["evaluation_chips"] == 3 and not gate["cached"]
    # f32 reproduces the detections the labels were made from; INT8 moves some of them.
    assert gate["ap50_f32"] > 0.95, gate
    assert gate["ap50_int8"] < gate["ap50_f32"] and gate["drop_points"] == ap50_drop_points(gate["ap50_f32"],
                                                                                                gate["ap50_int8"])
    assert gate["running_int8"] and all(" int8 " in w for w in report["workers"]), report["workers"]
    assert report["detections"] > 0

    # The graph and the measurement are reused: no second calibration.
    again = run_job(int8_job(labelled, "again", int8_max_ap50_drop=100.0), log=lambda m: None)
    assert again["int8"]["cached"] and again["int8"]["ap50_int8"] == gate["ap50_int8"]

    # Over the limit: refused before anything runs, with both figures.
    with pytest.raises(ConfigError, match=rf"refused: AP50 {gate['ap50_f32']:.3f} \(f32\) -> "
                                          rf"{gate['ap50_int8']:.3f} \(int8\)"):
        run_job(int8_job(labelled, "refused", int8_max_ap50_drop=0.0), log=lambda m: None)
    assert not (labelled / "refused" / "_manifests").exists()
