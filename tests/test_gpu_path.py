"""The GPU path's CPU-testable parts (issue 33): staged host->device copies, one copy back
per batch, stage seconds from the actor and the driver, the run report's bottleneck.

CUDA itself (pinned staging buffers, the side copy stream) is not exercised here: this
machine has no GPU. What is tested is that the same code path, run on the CPU, gives the
detections of the plain Detector byte for byte, and that a real run reports its stages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from workspaces import tiny_checkpoint

from pipeline.config.spec import JobSpec
from pipeline.infer.predictor import ChipEngine, centres_on_valid_pixels, encode_detections
from pipeline.tools.synth import synthesize
from retinanet import Detector, load_checkpoint

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    return tiny_checkpoint(module_tmp("gpu-path") / "model.pt")


def chips(dtype, n: int = 5, size: int = 64, seed: int = 0) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4000
    return np.random.default_rng(seed).integers(0, top, (n, 3, size, size)).astype(dtype)


def oracle_detections(checkpoint, pixels: np.ndarray, valid: np.ndarray, offsets: np.ndarray,
                      step: int) -> list[bytes]:
    """The detections as the plain Detector gives them: float32 chips on the host, one forward
    per `step` chips, each image's tensors brought back one by one."""
    detector = Detector(load_checkpoint(checkpoint)[0], device="cpu", precision="fp32")
    found = []
    for start in range(0, len(pixels), step):
        for r in detector(torch.from_numpy(pixels[start:start + step].astype(np.float32))):
            found.append({k: v.cpu().numpy() for k, v in r.items()})
    blobs = []
    for r, bits, (col, row) in zip(found, valid, offsets):
        keep = centres_on_valid_pixels(r["boxes"], bits, pixels.shape[-1])
        shift = np.array([col, row] * 2, dtype=np.float32)
        blobs.append(encode_detections(r["boxes"][keep] + shift, r["scores"][keep], r["labels"][keep]))
    return blobs


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("step", [2, 5])  # 2: three forward passes, each next copy staged ahead; 5: one pass
def test_engine_matches_the_plain_detector_byte_for_byte(checkpoint, dtype, step):
    pixels = chips(dtype)
    valid = np.packbits(np.ones((len(pixels), 64, 64), dtype=bool), axis=-1)
    valid[1, :, :4] = 0  # the left half of chip 1 is nodata
    offsets = np.array([[0, 0], [64, 0], [128, 0], [0, 64], [64, 64]])
    engine = ChipEngine(str(checkpoint), "cpu", "torch", precision="fp32", forward_batch=step)
    got = engine.chip_detections(pixels, valid, offsets)
    want = oracle_detections(checkpoint, pixels, valid, offsets, step)
    assert sum(len(b) for b in want) > 0, "the tiny model must find something for the comparison to mean anything"
    assert got == want


def test_batch_detections_come_back_in_one_copy_as_the_model_gave_them(checkpoint):
    """detections_to_host packs a batch's boxes, scores and labels into one tensor, copies it
    once and cuts it per image: the same arrays as each image's tensors copied one by one."""
    from retinanet.runtime import detections_to_host

    detector = Detector(load_checkpoint(checkpoint)[0], device="cpu", precision="fp32")
    found = detector(torch.from_numpy(chips(np.uint8, n=3).astype(np.float32)))
    found.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
    host = detections_to_host(found)
    assert len(host) == len(found)
    for h, r in zip(host, found):
        for key in ("boxes", "scores", "labels"):
            want = r[key].numpy()
            assert h[key].dtype == want.dtype and h[key].shape == want.shape
            assert h[key].tobytes() == want.tobytes()


def test_staged_copies_hand_over_every_batch_in_order_on_the_cpu():
    from retinanet.runtime import StagedCopies

    batches = [torch.arange(12, dtype=torch.uint8).reshape(3, 4) + i for i in range(3)]
    staging = StagedCopies(torch.device("cpu"))
    got = [t.clone() for t in staging.each(batches)]
    assert [g.tolist() for g in got] == [b.tolist() for b in batches]
    assert all(g.dtype == torch.uint8 for g in got)  # raw integers travel; the model's caller casts


def test_engine_adds_its_stage_seconds(checkpoint):
    engine = ChipEngine(str(checkpoint), "cpu", "torch", precision="fp32", forward_batch=2)
    pixels = chips(np.uint8, n=3)
    valid = np.packbits(np.ones((3, 64, 64), dtype=bool), axis=-1)
    seconds: dict[str, float] = {}
    engine.chip_detections(pixels, valid, np.zeros((3, 2), dtype=np.int64), seconds=seconds)
    assert set(seconds) == {"transfer", "forward", "postprocess"}
    assert all(s >= 0 for s in seconds.values()) and seconds["forward"] > 0


@pytest.mark.parametrize("seconds, workers, wall, expected", [
    # read tasks busy 90 % of 4 slots, actors 50 %: reading is what the actors waited on
    ({"read": 36.0, "transfer": 1.0, "forward": 3.0, "postprocess": 1.0, "merge_commit": 1.0},
     {"read": 4, "predict": 1, "driver": 1}, 10.0, "read"),
    # the actor busy the whole time, mostly in its forward: the forward is the bottleneck,
    # though the read tasks together spent more seconds
    ({"read": 20.0, "transfer": 1.0, "forward": 8.0, "postprocess": 0.5, "merge_commit": 0.5},
     {"read": 14, "predict": 1, "driver": 1}, 10.0, "forward"),
    # two actors, transfer the larger share of their time
    ({"read": 2.0, "transfer": 9.0, "forward": 6.0, "postprocess": 1.0, "merge_commit": 0.2},
     {"read": 2, "predict": 2, "driver": 1}, 10.0, "transfer"),
    # the driver merging and committing the whole time
    ({"read": 2.0, "transfer": 0.5, "forward": 2.0, "postprocess": 0.5, "merge_commit": 9.5},
     {"read": 2, "predict": 1, "driver": 1}, 10.0, "merge_commit"),
    ({"read": 0.0, "transfer": 0.0, "forward": 0.0, "postprocess": 0.0, "merge_commit": 0.0},
     {"read": 2, "predict": 1, "driver": 1}, 10.0, None),  # nothing ran: no bottleneck named
])
def test_bottleneck_is_the_largest_stage_of_the_busiest_pool(seconds, workers, wall, expected):
    from pipeline.run.runbook import stage_figures

    figures, bottleneck = stage_figures(seconds, workers, wall)
    assert bottleneck == expected
    assert set(figures) == set(seconds)
    for name, f in figures.items():
        assert f["seconds"] == round(seconds[name], 3)
    # busy fraction of the pool: seconds / (workers x wall); e.g. read in the first row: 36 / (4 x 10) = 0.9
    if expected == "read":
        assert figures["read"]["pool_busy"] == 0.9


def small_job(root, table: str) -> dict:
    return {
        "name": "gpu-path",
        "inputs": {"paths": [str(root / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": 4,
                  "precision": "fp32", "backend": "torch"},
        "compute": {"actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1, "max_retries": 1},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    }


def test_a_run_reports_each_stage_and_names_the_bottleneck(tmp_path, ray_session):
    """`pipeline run` on the local Ray (one actor on a logical GPU, torch on the CPU): its
    summary names the bottleneck, and the report carries read, transfer, forward,
    postprocess and merge/commit seconds, each plausible."""
    from click.testing import CliRunner

    from pipeline.cli import main

    synthesize(tmp_path / "scenes", scenes=2, size=600, seed=3)
    tiny_checkpoint(tmp_path / "model.pt")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(tmp_path, "t")))
    JobSpec.model_validate(yaml.safe_load(job.read_text()))  # the file is a valid job
    result = CliRunner().invoke(main, ["run", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    report = json.loads(open(summary["report_path"]).read())
    stages, wall = report["stages"], report["wall_seconds"]
    assert set(stages) == {"read", "transfer", "forward", "postprocess", "merge_commit"}
    for name, figures in stages.items():
        assert figures["seconds"] >= 0, (name, figures)
        assert figures["seconds"] <= wall * figures["workers"], (name, figures, wall)
        assert 0 <= figures["pool_busy"]
    assert stages["read"]["seconds"] > 0 and stages["forward"]["seconds"] > 0
    assert stages["merge_commit"]["seconds"] > 0
    actor_seconds = sum(stages[s]["seconds"] for s in ("transfer", "forward", "postprocess"))
    assert actor_seconds <= wall * stages["forward"]["workers"]
    assert summary["bottleneck"] == report["bottleneck"] in stages
