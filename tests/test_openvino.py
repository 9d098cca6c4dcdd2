"""The OpenVINO backend and batch-norm folding give the torch model's detections.

Oracles: the unfolded torch model in fp32 (folding is exact up to float rounding), and
OpenVINO forced to f32 (the same network on another runtime). bf16 changes scores by
rounding, so it is compared by matched boxes, not bit for bit.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retinanet import Detector, build_model, save_checkpoint
from retinanet.openvino_backend import OpenVinoDetector
from retinanet.runtime import fold_batch_norm

pytest.importorskip("openvino")


def with_running_stats(model):
    """Batch norms with non-trivial statistics, so folding has something to fold."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def small_model(backbone="resnet18", **kw):
    torch.manual_seed(0)
    return with_running_stats(build_model(num_classes=3, backbone=backbone, head_width=32, head_depth=1,
                                          image_mean=(120.0,) * 3, image_std=(60.0,) * 3, prior_probability=0.3,
                                          **kw))


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("mobilenet_v3_large", marks=pytest.mark.slow)])
def test_folded_model_predicts_as_the_unfolded_one(backbone):
    model = small_model(backbone)
    folded = fold_batch_norm(model)
    norms = lambda m: sum("BatchNorm" in type(x).__name__ for x in m.modules())  # noqa: E731
    assert norms(model) > 10 and norms(folded) == 0
    assert norms(model) == sum("BatchNorm" in type(x).__name__ for x in model.modules())  # original untouched
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        expected, got = model(images), folded(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 20
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)


def test_group_norm_heads_are_left_alone():
    model = small_model(head_group_norm=True)
    folded = fold_batch_norm(model)
    assert sum(isinstance(x, torch.nn.GroupNorm) for x in folded.modules()) == \
        sum(isinstance(x, torch.nn.GroupNorm) for x in model.modules()) > 0


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_model(), ["a", "b", "c"])
    return path


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_openvino_f32_equals_torch_and_reuses_its_cache(checkpoint, tmp_path):
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 255
    detector = OpenVinoDetector(checkpoint, precision="fp32", num_threads=2, cache_dir=tmp_path / "cache")
    got = detector(images)
    assert detector.converted == 1 and detector.precision == "f32"
    model = small_model()
    expected = Detector(model, device="cpu", precision="fp32", channels_last=False)(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 20
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])
    again = OpenVinoDetector(checkpoint, precision="fp32", cache_dir=tmp_path / "cache")
    again.prepare((256, 256))
    assert again.converted == 0  # the graph converted above is reused
    # the job's thresholds reach the postprocessing, as with a torch model
    again.config.detections_per_image = 5
    assert [len(r["boxes"]) for r in again(images)] == [5, 5]


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_a_batch_on_parallel_streams_gives_each_chip_its_own_detections_in_order(checkpoint, tmp_path):
    images = torch.rand(5, 3, 256, 256, generator=torch.Generator().manual_seed(6)) * 255
    detector = OpenVinoDetector(checkpoint, precision="fp32", num_threads=2, cache_dir=tmp_path / "cache", streams=2)
    got = detector.detect(images.numpy(), chips_per_request=2)  # requests of 2, 2, 1 chips on two streams
    assert detector.streams == 2
    expected = Detector(small_model(), device="cpu", precision="fp32", channels_last=False)(images)
    assert len(got) == 5
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 20
        np.testing.assert_allclose(g["boxes"], e["boxes"].numpy(), atol=1e-2, rtol=0)
        np.testing.assert_allclose(g["scores"], e["scores"].numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_a_caller_that_stops_early_leaves_no_request_running(checkpoint, tmp_path):
    from retinanet.openvino_backend import outputs_in_order

    detector = OpenVinoDetector(checkpoint, precision="fp32", cache_dir=tmp_path / "cache", streams=2)
    detector.prepare((256, 256))
    requests = detector._compiled[(256, 256)].requests
    images = np.random.default_rng(7).uniform(0, 255, (4, 3, 256, 256)).astype(np.float32)
    for _ in outputs_in_order(requests, images, 1):
        break  # as a postprocessing error would: the other request is still running
    # every request is idle again, so the next batch can start them all (a busy one raises)
    assert len(detector.detect(images)) == 4


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_openvino_resizes_like_the_torch_model(tmp_path):
    model = small_model(min_size=320, max_size=640)
    save_checkpoint(tmp_path / "r.pt", model, ["a", "b", "c"])
    images = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(4)) * 255
    got = OpenVinoDetector(tmp_path / "r.pt", precision="fp32", cache_dir=tmp_path / "cache")(images)[0]
    with torch.no_grad():
        expected = model(images)[0]
    assert len(got["boxes"]) == len(expected["boxes"]) > 10
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-2, rtol=0)
    assert float(got["boxes"].max()) <= 160  # boxes in input pixels, not the 320-px network's


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_openvino_bf16_keeps_the_boxes(checkpoint, tmp_path):
    from retinanet.runtime import cpu_has_bf16_matmul

    if not cpu_has_bf16_matmul():
        pytest.skip("no bf16 matrix units on this CPU")
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 255
    got = OpenVinoDetector(checkpoint, precision="bf16", cache_dir=tmp_path / "cache")(images)[0]
    expected = Detector(small_model(), device="cpu", precision="fp32")(images)[0]
    from torchvision.ops import box_iou

    iou = box_iou(expected["boxes"][:50], got["boxes"])
    assert (iou.max(dim=1).values > 0.9).float().mean() >= 0.9  # nine in ten of the top boxes kept


@pytest.mark.parametrize("input_hw, resize, spread", [
    ((256, 256), {}, 1.0),  # a few hundred candidates: the sparse selection
    ((256, 192), {}, 4.0),  # thousands per level: top-k decides
    ((160, 160), {"min_size": 320, "max_size": 640}, 1.0),  # resized: boxes scaled back to input pixels
])
def test_numpy_postprocess_equals_the_torch_models(input_hw, resize, spread):
    """Oracle: RetinaNet.postprocess (torchvision's NMS and box clipping) on the same dense outputs."""
    from retinanet.export import detect_with_dense, postprocess_geometry, skeleton_model
    from retinanet.numpy_postprocess import Nms, postprocess

    config = build_model(num_classes=3, backbone="resnet18", head_width=32, head_depth=1, topk_candidates=300,
                         **resize).config
    geometry = postprocess_geometry(config, input_hw)
    gen = np.random.default_rng(7)
    anchors = sum(geometry.level_counts)
    cls_logits = (gen.standard_normal((3, anchors, 3)) * spread - 3.5).astype(np.float32)
    box_deltas = (gen.standard_normal((3, anchors, 4)) * 0.3).astype(np.float32)
    got = postprocess(cls_logits, box_deltas, geometry, config, Nms())
    dense = (torch.from_numpy(cls_logits), torch.from_numpy(box_deltas))
    expected = detect_with_dense(skeleton_model(config), torch.zeros(3, 3, *input_hw), lambda _: dense, {}, "test")
    for e, g in zip(expected, got):
        assert len(g["boxes"]) == len(e["boxes"]) > 10
        e = {k: v.numpy() for k, v in e.items()}
        assert np.all(np.diff(g["scores"]) <= 0)  # best first
        # equal scores (thousands of float32 sigmoids) may come in either order: compare sorted
        e, g = ({k: v[np.lexsort((d["boxes"][:, 1], d["boxes"][:, 0], d["labels"], -d["scores"]))]
                 for k, v in d.items()} for d in (e, g))
        np.testing.assert_allclose(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(g["scores"], e["scores"], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(g["labels"], e["labels"])
    if resize:
        assert max(float(g["boxes"].max()) for g in got) <= input_hw[1]


@pytest.mark.parametrize("iou_threshold", [0.05, 0.3, 0.45, 0.5, 0.7])
def test_openvino_nms_keeps_what_torchvision_keeps(iou_threshold):
    """Boxes on an 8-px grid make IoUs exactly equal to the threshold: torchvision keeps a
    box whose IoU equals it (it suppresses at IoU > t), and so must we."""
    from torchvision.ops import batched_nms

    from retinanet.numpy_postprocess import Nms

    nms, gen = Nms(), np.random.default_rng(11)
    for _ in range(40):
        n = int(gen.integers(1, 300))
        corner = np.round(gen.uniform(0, 400, (n, 2)) / 8) * 8
        size = np.round(gen.uniform(8, 80, (n, 2)) / 8) * 8
        boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
        scores = gen.permutation(n).astype(np.float32) / n  # distinct: the order is defined
        groups = gen.integers(0, 4, n)
        expected = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups),
                               iou_threshold).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, groups, iou_threshold), expected)


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_openvino_detector_never_imports_torch(checkpoint, tmp_path):
    """An actor process never imports torch (~0.6 GB, ~2 s): with the graph cached it does
    not need it, and a first run converts in a child process that takes torch with it."""
    import subprocess
    import sys

    code = f"""
import json
import sys
import numpy as np
from pipeline.infer.predictor import resolve_backend
from retinanet.openvino_backend import OpenVinoDetector
assert resolve_backend("auto", "cpu") == "openvino"
runs = []
for _ in range(2):  # the first converts, the second reads the cache
    detector = OpenVinoDetector({str(checkpoint)!r}, precision="fp32", cache_dir={str(tmp_path / "cache")!r})
    found = detector.detect(np.random.default_rng(0).uniform(0, 255, (2, 3, 256, 256)).astype(np.float32))
    runs.append({{"converted": detector.converted, "boxes": [len(f["boxes"]) for f in found]}})
print(json.dumps({{"runs": runs, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["converted"] for r in result["runs"]] == [1, 0]
    assert result["runs"][0]["boxes"] == result["runs"][1]["boxes"] and min(result["runs"][0]["boxes"]) > 0
    assert result["torch"] is False


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_a_failed_conversion_names_the_checkpoint_and_the_way_out(tmp_path):
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, small_model(), ["a", "b", "c"])
    detector = OpenVinoDetector(bad, precision="fp32", cache_dir=tmp_path / "cache")
    bad.write_bytes(b"not a checkpoint any more")  # the child converting it finds it broken
    with pytest.raises(RuntimeError, match=r"bad\.pt: OpenVINO could not convert .* model\.backend: torch"):
        detector.prepare((256, 256))
    assert not list((tmp_path / "cache").glob("*.xml"))  # nothing half-made left behind


def test_backend_auto_picks_openvino_on_cpu_and_torch_on_gpu():
    from pipeline.infer.predictor import resolve_backend

    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"


def test_openvino_on_cuda_is_refused_in_the_job():
    from pydantic import ValidationError

    from pipeline.config.spec import ModelSpec

    with pytest.raises(ValidationError, match="runs on the CPU"):
        ModelSpec(checkpoint="m.pt", backend="openvino", device="cuda")
    assert ModelSpec(checkpoint="m.pt").backend == "auto"


def test_pipeline_run_openvino_matches_torch(tmp_path, ray_session):
    """Same job, backend torch fp32 vs openvino f32: the same rows in the table."""
    import duckdb
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.tools.synth import SYNTH_CLASSES, synthesize

    synthesize(tmp_path / "scenes", scenes=1, size=384, seed=2)
    torch.manual_seed(0)
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", head_width=32, head_depth=1,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3)
    save_checkpoint(tmp_path / "model.pt", with_running_stats(model), list(SYNTH_CLASSES))
    rows = {}
    for backend in ("torch", "openvino"):
        job = {"name": backend, "inputs": {"paths": [str(tmp_path / "scenes" / "*.tif")]},
               "tiling": {"chip_size": 256, "overlap": 32},
               "model": {"checkpoint": str(tmp_path / "model.pt"), "precision": "fp32", "backend": backend,
                         "score_threshold": 0.3},
               "compute": {"actors": 1, "gpus_per_actor": 0, "max_retries": 0},
               "output": {"table": str(tmp_path / backend), "crs": None}}
        (tmp_path / f"{backend}.yaml").write_text(yaml.safe_dump(job))
        result = CliRunner().invoke(main, ["run", str(tmp_path / f"{backend}.yaml")], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(next((tmp_path / backend / "_reports").iterdir()).read_text())
        assert all(w.endswith(f" {backend}") for w in report["workers"]), report["workers"]
        rows[backend] = duckdb.sql(f"SELECT label, px_xmin, px_ymin, px_xmax, px_ymax, score FROM read_parquet("
                                   f"'{tmp_path / backend}/date=*/*.parquet') ORDER BY score DESC").fetchall()
    assert len(rows["torch"]) > 20
    assert len(rows["openvino"]) == len(rows["torch"])
    a, b = np.array([r[1:] for r in rows["torch"]]), np.array([r[1:] for r in rows["openvino"]])
    assert np.abs(np.sort(a, axis=0) - np.sort(b, axis=0)).max() < 0.05


def test_local_cpu_openvino_knows_before_ray_starts():
    from pathlib import Path

    from pipeline.config.spec import ComputeSpec, ModelSpec
    from pipeline.infer.predictor import local_cpu_openvino

    cpu_only = not any(Path("/dev").glob("nvidia[0-9]*"))
    model, local = ModelSpec(checkpoint="m.pt"), ComputeSpec()
    assert local_cpu_openvino(model, ComputeSpec(gpus_per_actor=0))
    assert local_cpu_openvino(ModelSpec(checkpoint="m.pt", device="cpu"), local)
    assert local_cpu_openvino(model, local) == cpu_only  # a GPU per actor: CPU only where there is none
    assert not local_cpu_openvino(model, ComputeSpec(address="10.0.0.5:6379", gpus_per_actor=0))  # other nodes
    assert not local_cpu_openvino(ModelSpec(checkpoint="m.pt", backend="torch"), ComputeSpec(gpus_per_actor=0))


@pytest.mark.slow  # OpenVINO converts a model (tens of seconds on 2 cores)
def test_convert_ahead_leaves_the_graph_for_the_actors(checkpoint, tmp_path, monkeypatch):
    from pipeline.infer.predictor import convert_ahead

    monkeypatch.setenv("RETINANET_PIPELINE_CACHE", str(tmp_path / "node-cache"))
    convert_ahead(str(checkpoint), 256)
    actor = OpenVinoDetector(checkpoint, precision="fp32", cache_dir=tmp_path / "node-cache" / "openvino")
    actor.prepare((256, 256))
    assert actor.converted == 0  # the actor found it converted
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    convert_ahead(str(broken), 256)  # best effort: the actor repeats a failed conversion and reports it
