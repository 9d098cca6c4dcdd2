"""ONNX export: onnxruntime's detections equal torch's, the CLI writes the file, the
pipeline's onnx backend commits the rows of the torch backend."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from workspaces import tiny_checkpoint

from pipeline.tools.synth import SYNTH_CLASSES, synthesize  # noqa: E402
from retinanet import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from retinanet import export as export_module  # noqa: E402
from retinanet.checkpoint import file_sha256  # noqa: E402
from retinanet.export import (  # noqa: E402
    CPU_PROVIDER,
    DenseRetinaNet,
    OnnxDetector,
    choose_providers,
    is_export_of,
    onnx_for_checkpoint,
    padded_size,
    pyramid_shapes,
    read_onnx_metadata,
    sidecar_path,
    skeleton_model,
)

# onnxscript (the exporter's dependency) is looked up, not imported: importing it costs every collection ~1 s.
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="onnxscript is not installed")]


@pytest.fixture(scope="module")
def workspace(module_tmp):
    """A synthetic scene, an untrained tiny model that emits many boxes, and its export
    written by `pipeline export` to the default place (CHECKPOINT.onnx)."""
    from pipeline.cli import main

    root = module_tmp("export")
    synthesize(root / "scenes", scenes=1, size=600, seed=5)
    tiny_checkpoint(root / "model.pt")
    result = CliRunner().invoke(main, ["export", str(root / "model.pt"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow  # an ONNX export through torch's dynamo exporter
def test_cli_export_writes_a_self_describing_file(workspace):
    onnx_path = sidecar_path(workspace / "model.pt")
    assert onnx_path == workspace / "model.pt.onnx" and onnx_path.stat().st_size > 1_000_000
    meta = read_onnx_metadata(onnx_path)
    assert meta["class_names"] == list(SYNTH_CLASSES)
    assert meta["checkpoint_sha256"] == file_sha256(workspace / "model.pt")
    assert meta["config"]["backbone"] == "resnet18" and meta["config"]["head_width"] == 32


def test_cli_export_to_an_explicit_path_and_a_bad_checkpoint(tmp_path):
    from pipeline.cli import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, ["export", str(bad), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "bad.pt" in result.output  # cannot start: unreadable input
    assert not (tmp_path / "x.onnx").exists()


def assert_same_detections(ours: list[dict], theirs: list[dict], box_tol: float, score_tol: float) -> None:
    """Per image: equal counts, and each detection of `ours` pairs one-to-one with a
    detection of `theirs` of the same label, boxes within box_tol (max abs, pixels) and
    scores within score_tol. Pairing by nearest box keeps near-equal scores that swap
    places in the sorted order from failing the test."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert len(a["boxes"]) == len(b["boxes"]), f"image {i}: {len(a['boxes'])} vs {len(b['boxes'])} detections"
        if len(a["boxes"]) == 0:
            continue
        dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(dim=2)
        dist[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
        nearest = dist.argmin(dim=1)
        assert len(set(nearest.tolist())) == len(nearest), f"image {i}: detections do not pair one-to-one"
        assert dist.gather(1, nearest[:, None]).max() <= box_tol, f"image {i}: boxes differ"
        assert (a["scores"] - b["scores"][nearest]).abs().max() <= score_tol, f"image {i}: scores differ"
        assert torch.equal(a["labels"], b["labels"][nearest])


@pytest.fixture(scope="module")
def both(workspace):
    """(torch model, OnnxDetector) from the same checkpoint."""
    model, _ = load_checkpoint(workspace / "model.pt")
    return model, OnnxDetector(workspace / "model.pt.onnx", device="cpu", num_threads=2)


@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (3, 3, 256, 256), (2, 3, 200, 232)])
@pytest.mark.slow  # needs the module's ONNX export (torch's dynamo exporter, seconds of CPU)
def test_onnxruntime_detections_match_torch(both, shape):
    # One file, any batch (dynamic batch 1 and 3) and any chip size (200 x 232 is padded
    # to 224 x 256 inside the graph, as the torch model does).
    model, detector = both
    assert detector.providers == [CPU_PROVIDER] and detector.class_names == list(SYNTH_CLASSES)
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[0])) * 255
    with torch.inference_mode():
        expected = model(images)
    got = detector(images)
    assert sum(len(d["boxes"]) for d in expected) > 50 * shape[0], "the model should emit many boxes"
    assert all(d["boxes"].dtype == torch.float32 and d["labels"].dtype == torch.int64 for d in got)
    assert_same_detections(got, expected, box_tol=1e-3, score_tol=1e-4)
    # The dense outputs themselves, before any thresholding: 9 anchors per location.
    logits, deltas = detector.dense(images)
    with torch.inference_mode():
        logits_torch, deltas_torch = DenseRetinaNet(model)(images)
    assert logits.shape == (shape[0], sum(h * w * 9 for h, w in pyramid_shapes(detector.model, shape[2:])), 3)
    torch.testing.assert_close(logits, logits_torch, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(deltas, deltas_torch, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # needs the module's ONNX export (torch's dynamo exporter, seconds of CPU)
def test_onnx_detector_applies_the_score_threshold_set_on_its_model(workspace):
    detector = OnnxDetector(workspace / "model.pt.onnx", device="cpu")
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(7)) * 255
    low = detector(images)[0]
    detector.model.config.score_threshold = float(low["scores"].median())
    high = detector(images)[0]
    assert 0 < len(high["scores"]) < len(low["scores"])
    assert high["scores"].min() > detector.model.config.score_threshold


@pytest.mark.slow  # needs the module's ONNX export (torch's dynamo exporter, seconds of CPU)
def test_onnx_detector_rejects_reduced_precision_and_bad_input(workspace):
    with pytest.raises(ValueError, match="fp32 graph"):
        OnnxDetector(workspace / "model.pt.onnx", precision="bf16")
    detector = OnnxDetector(workspace / "model.pt.onnx", device="cpu")
    with pytest.raises(ValueError, match="expects 3 bands"):
        detector(torch.zeros(1, 4, 256, 256))
    with pytest.raises(ValueError, match="at least 129 x 129"):
        detector(torch.zeros(1, 3, 128, 256))


def test_pyramid_shapes_and_padding():
    skeleton = skeleton_model(build_model(num_classes=2, backbone="resnet18").config)
    # 256 x 320 padded stays; strides 8, 16, 32, then P6/P7 by stride-2 convs (ceil).
    assert pyramid_shapes(skeleton, (256, 320)) == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    assert padded_size(250, 256) == (256, 256) and padded_size(1, 33) == (32, 64)


@pytest.mark.parametrize("available, device, expected", [
    (["CPUExecutionProvider"], "auto", ["CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"], "cuda",
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
])
def test_choose_providers(available, device, expected):
    assert choose_providers(available, device) == expected


def test_choose_providers_cuda_without_gpu_provider_says_so():
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], "cuda")


@pytest.mark.slow  # needs the module's ONNX export (torch's dynamo exporter, seconds of CPU)
def test_onnx_for_checkpoint_uses_current_files_and_ignores_stale_ones(workspace, tmp_path, monkeypatch):
    ckpt = workspace / "model.pt"
    sha = file_sha256(ckpt)
    # 1. The sidecar written by `pipeline export` from this checkpoint is used as it is.
    assert onnx_for_checkpoint(ckpt, cache_dir=tmp_path / "cache") == sidecar_path(ckpt)
    # 2. Same bytes elsewhere without a sidecar: a current file in the cache is reused.
    other = tmp_path / "copy" / "model.pt"
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / f"{sha[:16]}.onnx"
    shutil.copy(sidecar_path(ckpt), cached)
    before = cached.stat().st_mtime_ns
    assert onnx_for_checkpoint(other, cache_dir=tmp_path / "cache") == cached
    assert cached.stat().st_mtime_ns == before, "a current cached export must not be rewritten"
    # 3. A different checkpoint next to a stale sidecar (copied from the first one): the
    #    sidecar is ignored and the checkpoint is exported into the cache. (The export
    #    itself is the one the CLI fixture ran; here it is recorded, not repeated.)
    model, info = load_checkpoint(ckpt)
    changed = tmp_path / "changed" / "model.pt"
    save_checkpoint(changed, model, info["class_names"], metadata={"note": "different bytes"})
    shutil.copy(sidecar_path(ckpt), sidecar_path(changed))
    new_sha = file_sha256(changed)
    assert new_sha != sha and not is_export_of(sidecar_path(changed), new_sha)
    calls = []
    monkeypatch.setattr(export_module, "export_onnx",
                        lambda m, path, names, digest: calls.append((path, names, digest)) or path)
    fresh = onnx_for_checkpoint(changed, cache_dir=tmp_path / "cache")
    assert fresh == tmp_path / "cache" / f"{new_sha[:16]}.onnx"
    assert calls == [(fresh, list(SYNTH_CLASSES), new_sha)]


def test_a_damaged_file_is_never_taken_for_an_export(tmp_path):
    junk = tmp_path / "model.pt.onnx"
    junk.write_bytes(b"\x08\x01garbage")
    assert not is_export_of(junk, "0" * 64)
    assert not is_export_of(tmp_path / "missing.onnx", "0" * 64)


def test_spec_rejects_onnx_backend_with_reduced_precision():
    from pipeline.config.spec import parse_job
    from pipeline.errors import ConfigError

    job = {"name": "x", "inputs": {"paths": ["a.tif"]}, "output": {"table": "t"},
           "model": {"checkpoint": "m.pt", "backend": "onnx", "precision": "bf16"}}
    with pytest.raises(ConfigError, match="model: model.backend 'onnx' runs an fp32 graph"):
        parse_job(job, source="job.yaml")
    job["model"]["precision"] = "auto"
    assert parse_job(job).model.backend == "onnx"
    job["model"]["backend"] = "tensorrt"
    with pytest.raises(ConfigError, match="model.backend"):
        parse_job(job, source="job.yaml")


def committed_detections(table_root) -> dict[str, dict]:
    """Committed rows per scene as detection dicts (scene pixels, label ids)."""
    from pipeline.table.state import read_committed

    t = read_committed(table_root).to_pydict()
    scenes = np.array(t["scene_id"])
    boxes = np.stack([t["px_xmin"], t["px_ymin"], t["px_xmax"], t["px_ymax"]], axis=1).astype(np.float32)
    return {s: {"boxes": torch.from_numpy(boxes[scenes == s]),
                "scores": torch.tensor(np.array(t["score"])[scenes == s]),
                "labels": torch.tensor(np.array(t["label_id"])[scenes == s], dtype=torch.int64)}
            for s in sorted(set(t["scene_id"]))}


def run_spec(root, table: str, backend: str):
    from pipeline.config.spec import JobSpec

    return JobSpec.model_validate({
        "name": "export-test",
        "inputs": {"paths": [str(root / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": 4,
                  "precision": "fp32", "backend": backend},
        "compute": {"actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1, "max_retries": 1},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    })


def test_pipeline_run_with_onnx_backend_commits_the_torch_rows(workspace, ray_session):
    from pipeline.run.graph import run_job

    torch_report = run_job(run_spec(workspace, "torch", "torch"), log=lambda m: None)
    onnx_report = run_job(run_spec(workspace, "onnx", "onnx"), log=lambda m: None)
    assert torch_report["exit_code"] == 0 and onnx_report["exit_code"] == 0, (torch_report, onnx_report)
    assert all(w.endswith(" onnx") for w in onnx_report["workers"]), onnx_report["workers"]
    assert not any(w.endswith(" onnx") for w in torch_report["workers"])
    expected, got = committed_detections(workspace / "torch"), committed_detections(workspace / "onnx")
    assert list(got) == list(expected) == ["synth_000"]
    assert onnx_report["detections"] == torch_report["detections"] > 20
    # Same rows after seam merge and commit: labels equal, boxes within 1e-3 px, scores within 1e-4.
    assert_same_detections(list(got.values()), list(expected.values()), box_tol=1e-3, score_tol=1e-4)
