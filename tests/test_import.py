"""Bring your own model: torchvision and DeepForest RetinaNets imported with `pipeline import`
predict as they do at home, in the library and through `pipeline run`.

The oracle is torchvision itself: its retinanet_resnet50_fpn with its own transform (resize
to min_size 800, [0, 1] input, ImageNet normalisation) and thresholds. Untrained heads give
every anchor nearly the same score, so the head weights get a seeded spread and the class
bias a shift that lets a few dozen distinct boxes through the score threshold.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import rasterio
import torch
import yaml
from click.testing import CliRunner
from real_data import real
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from pipeline.cli import main
from retinanet import load_checkpoint
from retinanet.checkpoint import CheckpointError
from retinanet.imports import import_model, parse_input_range, pixel_statistics, torchvision_layout

MARKER = Path("/tmp/retinanet-import-test-marker")


def detecting(tv, cls_bias: float, seed: int = 1, std: float = 0.013):
    """Seeded head weights: distinct scores, some above the thresholds."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tv.head.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        tv.head.classification_head.cls_logits.bias += cls_bias
    return tv.eval()


def osbs_pixels() -> np.ndarray:
    with rasterio.open(real("OSBS_029.tif")) as f:
        return f.read()  # (3, 400, 400) uint8


def osbs_without_nodata(folder: Path) -> Path:
    """OSBS_029's pixels and georeferencing without its nodata=255 declaration: the
    pipeline honours nodata (zero-filled, no detections centred there) where DeepForest
    and torchvision see 255, so parity is checked on pixels both read alike."""
    with rasterio.open(real("OSBS_029.tif")) as src:
        profile = {**src.profile, "nodata": None}
        path = folder / "OSBS_029.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read())
    return path


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def assert_same_boxes(expected: dict, got: dict, atol: float = 5e-3) -> None:
    """Same count; every expected box has its own match within atol px with the same label
    and score (order can differ only between near-equal scores).

    5e-3 px: fp32 convolutions round differently on different CPUs (oneDNN picks its
    kernels per instruction set); the same weights differed by up to 1.0e-3 px on an AMX
    Xeon and 1.8e-3 px on an AVX2 EPYC. A half-pixel offset or a wrong anchor is >= 0.5 px."""
    assert len(got["boxes"]) == len(expected["boxes"])
    e_boxes, g_boxes = np.asarray(expected["boxes"], np.float64), np.asarray(got["boxes"], np.float64)
    distance = np.abs(e_boxes[:, None, :] - g_boxes[None, :, :]).max(axis=2)
    nearest = distance.argmin(axis=1)
    assert len(set(nearest.tolist())) == len(nearest), "two expected boxes matched one detection"
    assert distance[np.arange(len(nearest)), nearest].max(initial=0) <= atol
    np.testing.assert_allclose(np.asarray(got["scores"])[nearest], np.asarray(expected["scores"]), atol=1e-4)
    assert np.array_equal(np.asarray(got["labels"])[nearest], np.asarray(expected["labels"]))


def torchvision_says(tv, pixels: np.ndarray) -> dict:
    with torch.no_grad():
        out = tv([torch.from_numpy(pixels.astype(np.float32) / 255)])[0]
    return {k: v.numpy() for k, v in out.items()}


def ours_says(model, pixels: np.ndarray) -> dict:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels.astype(np.float32))[None])[0]
    return {k: v.numpy() for k, v in out.items()}


# ------------------------------------------------------------------ small pure helpers


def test_input_range_and_pixel_statistics():
    assert parse_input_range("0-1") == 1.0 and parse_input_range("0-255") == 255.0
    for bad in ("1-2", "0-0", "255", ""):
        with pytest.raises(ValueError, match="0-1 or 0-255"):
            parse_input_range(bad)
    mean, std = pixel_statistics((0.485, 0.5), (0.229, 0.25), 1.0, 255.0)
    assert mean == pytest.approx((123.675, 127.5)) and std == pytest.approx((58.395, 63.75))
    # a source that saw raw 8-bit values keeps its statistics; 16-bit scenes seen as [0, 1]
    assert pixel_statistics((100.0,), (50.0,), 255.0, 255.0) == ((100.0,), (50.0,))
    assert pixel_statistics((0.5,), (0.25,), 1.0, 65535.0) == ((32767.5,), (16383.75,))


def test_layout_is_read_from_the_shapes():
    v1 = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).state_dict()
    v2 = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2).state_dict()
    assert torchvision_layout(v1) == (5, False)
    assert torchvision_layout(v2) == (2, True)
    with pytest.raises(CheckpointError, match="not a torchvision RetinaNet state dict"):
        torchvision_layout({"conv.weight": torch.zeros(1)})


# ------------------------------------------------------------------ torchvision sources


@pytest.fixture(scope="module")
def tv_default():
    """torchvision's model with its default transform and thresholds (min_size 800)."""
    torch.manual_seed(0)
    return detecting(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1), cls_bias=0.6)


def test_state_dict_import_needs_names_and_reads_torchvision_defaults(tmp_path, tv_default):
    source = tmp_path / "weights.pt"
    torch.save(tv_default.state_dict(), source)
    code, out = cli("import", source, "--out", tmp_path / "m.pt")
    assert code == 2 and "1 classes but the file names none" in out and "--classes" in out
    code, out = cli("import", source, "--out", tmp_path / "m.pt", "--classes", "tree")
    assert code == 0, out
    model, info = load_checkpoint(tmp_path / "m.pt")
    cfg = model.config
    assert (cfg.min_size, cfg.max_size, cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image,
            cfg.topk_candidates) == (800, 1333, 0.05, 0.5, 300, 1000)
    # torchvision's own model says the same
    assert (tv_default.transform.min_size, tv_default.transform.max_size, tv_default.score_thresh,
            tv_default.nms_thresh, tv_default.detections_per_img, tv_default.topk_candidates) == \
        ((800,), 1333, 0.05, 0.5, 300, 1000)
    assert cfg.image_mean == pytest.approx(tuple(255 * m for m in tv_default.transform.image_mean))
    assert info["class_names"] == ["tree"]
    assert info["metadata"]["imported_from"]["kind"] == "torchvision"
    assert "min_size 800" in out and "image_mean [123.675" in out


@pytest.mark.slow  # a full-size ResNet-50 v2 RetinaNet at 600-1000 px, run twice
def test_whole_model_keeps_its_own_settings_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    tv = detecting(retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2, min_size=600,
                                             max_size=1000, score_thresh=0.2, nms_thresh=0.4,
                                             detections_per_img=50), cls_bias=0.0, seed=2, std=0.05)
    torch.save(tv, tmp_path / "whole.pt")
    imported = import_model(tmp_path / "whole.pt", class_names=["car", "truck"])
    cfg = imported.model.config
    assert (cfg.min_size, cfg.max_size, cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image) == \
        (600, 1000, 0.2, 0.4, 50)
    assert cfg.head_group_norm and cfg.p6_from == "c5"  # v2 read from the weights
    pixels = np.random.default_rng(5).integers(0, 256, (3, 300, 300), dtype=np.uint8)
    expected = torchvision_says(tv, pixels)
    assert len(expected["boxes"]) >= 10
    assert_same_boxes(expected, ours_says(imported.model, pixels))


class RunsCode:
    """Unpickling this creates MARKER: proof that code in the file ran."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def test_a_pickle_with_other_objects_is_refused_without_running_it(tmp_path):
    MARKER.unlink(missing_ok=True)
    torch.save({"model": retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1),
                "extra": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused: .*\(io.open\).*torch.save\(model.state_dict\(\)"):
        import_model(tmp_path / "evil.pt", class_names=["x"])
    assert not MARKER.exists()


def test_our_own_checkpoint_is_not_imported_again(tmp_path, tv_default):
    torch.save(tv_default.state_dict(), tmp_path / "w.pt")
    assert cli("import", tmp_path / "w.pt", "--out", tmp_path / "m.pt", "--classes", "tree")[0] == 0
    code, out = cli("import", tmp_path / "m.pt", "--out", tmp_path / "again.pt")
    assert code == 2 and "use it as model.checkpoint directly" in out


# ------------------------------------------------------------------ DeepForest


def deepforest_checkpoint(path: Path, tv) -> Path:
    """A checkpoint laid out as DeepForest's Lightning module saves it."""
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in tv.state_dict().items()},
                "label_dict": {"Tree": 0},
                "hyper_parameters": {"label_dict": {"Tree": 0}, "num_classes": 1,
                                     "config": {"nms_thresh": 0.05, "retinanet": {"score_thresh": 0.1},
                                                "batch_size": 1}}}, path)
    return path


@pytest.mark.slow  # a full-size ResNet-50 RetinaNet run twice
def test_deepforest_checkpoint_predicts_as_deepforest(tmp_path):
    pixels = osbs_pixels()
    torch.manual_seed(0)
    tv = detecting(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1), cls_bias=1.6)
    tv.nms_thresh, tv.score_thresh = 0.05, 0.1  # DeepForest's settings on torchvision's model
    source = deepforest_checkpoint(tmp_path / "deepforest.ckpt", tv)
    code, out = cli("import", source, "--out", tmp_path / "df.pt")
    assert code == 0, out
    model, info = load_checkpoint(tmp_path / "df.pt")
    assert info["class_names"] == ["Tree"]
    assert (model.config.min_size, model.config.nms_threshold, model.config.score_threshold) == (800, 0.05, 0.1)
    expected = torchvision_says(tv, pixels)
    assert len(expected["boxes"]) >= 20
    assert_same_boxes(expected, ours_says(model, pixels))
    # without the resize rule the same weights find other boxes: the rule is what makes parity
    code, _ = cli("import", source, "--out", tmp_path / "native.pt", "--no-resize")
    unresized = ours_says(load_checkpoint(tmp_path / "native.pt")[0], pixels)
    assert code == 0
    assert len(unresized["boxes"]) != len(expected["boxes"]) or \
        np.abs(unresized["boxes"] - expected["boxes"]).max() > 1


def test_deepforest_weights_saved_by_the_refusal_recipe(tmp_path, tv_default):
    """What the refusal of a DeepForest file with Python objects tells the user to save."""
    torch.save({"state_dict": tv_default.state_dict(), "label_dict": {"Tree": 0}}, tmp_path / "df_weights.pt")
    imported = import_model(tmp_path / "df_weights.pt")
    assert imported.class_names == ["Tree"] and imported.metadata["imported_from"]["kind"] == "deepforest"


def test_bare_deepforest_state_dict(tmp_path, tv_default):
    torch.save({f"model.{k}": v for k, v in tv_default.state_dict().items()}, tmp_path / "df_state.pt")
    imported = import_model(tmp_path / "df_state.pt")
    assert imported.class_names == ["Tree"]
    assert imported.metadata["imported_from"]["kind"] == "deepforest"
    assert imported.model.config.nms_threshold == 0.05


# ------------------------------------------------------------------ through `pipeline run`


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_pipeline_run_matches_torchvision_on_a_400px_chip(tmp_path, tv_default, ray_session, backend):
    """Both engines at fp32, the torch path op for op as trained; OpenVINO f32, the CPU
    default engine, resizes before its graph normalises and rounds differently (measured
    1.2e-3 px)."""
    scene = osbs_without_nodata(tmp_path)
    torch.save(tv_default.state_dict(), tmp_path / "weights.pt")
    assert cli("import", tmp_path / "weights.pt", "--out", tmp_path / "model.pt", "--classes", "tree")[0] == 0
    job = {"name": "byom", "inputs": {"paths": [str(scene)], "bands": [1, 2, 3]},
           "tiling": {"chip_size": 400, "overlap": 0, "min_valid_fraction": 0.05},
           "model": {"checkpoint": str(tmp_path / "model.pt"), "precision": "fp32", "device": "cpu",
                     "backend": backend},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "max_retries": 0},
           "output": {"table": str(tmp_path / "table"), "crs": "EPSG:4326"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out = cli("run", tmp_path / "job.yaml")
    assert code == 0, out
    rows = duckdb.sql(f"SELECT px_xmin, px_ymin, px_xmax, px_ymax, score FROM read_parquet("
                      f"'{tmp_path}/table/date=*/*.parquet', hive_partitioning = true)").fetchnumpy()
    got = {"boxes": np.stack([rows[c] for c in ("px_xmin", "px_ymin", "px_xmax", "px_ymax")], axis=1),
           "scores": rows["score"], "labels": np.zeros(len(rows["score"]), np.int64)}
    expected = torchvision_says(tv_default, osbs_pixels())
    assert len(expected["boxes"]) >= 20
    assert_same_boxes(expected, got)


def test_job_fields_override_the_checkpoint_settings(tmp_path, tv_default, ray_session):
    from pipeline.config.spec import job_hash, load_job

    torch.save(tv_default.state_dict(), tmp_path / "weights.pt")
    assert cli("import", tmp_path / "weights.pt", "--out", tmp_path / "model.pt", "--classes", "tree")[0] == 0
    base = {"name": "byom", "inputs": {"paths": [str(real("OSBS_029.tif"))]},
            "tiling": {"chip_size": 400, "overlap": 0},
            "model": {"checkpoint": str(tmp_path / "model.pt"), "precision": "fp32", "detections_per_chip": 5},
            "compute": {"actors": 1, "gpus_per_actor": 0},
            "output": {"table": str(tmp_path / "table")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base))
    code, out = cli("run", tmp_path / "job.yaml")
    assert code == 0, out
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/table/date=*/*.parquet')").fetchall()[0][0]
    assert count == 5
    spec = load_job(tmp_path / "job.yaml")
    assert job_hash(spec) != job_hash(load_job(tmp_path / "job.yaml", ["model.detections_per_chip=6"]))
    assert job_hash(load_job(tmp_path / "job.yaml", ["model.nms_threshold=0.3"])) != job_hash(spec)


def test_unit_statistics_model_is_refused_on_pixel_scenes(tmp_path, tv_default):
    """The trap the issue found: a [0, 1] model fed raw pixels scores every box 1.0."""
    from retinanet import from_torchvision, save_checkpoint

    save_checkpoint(tmp_path / "unit.pt", from_torchvision(tv_default.state_dict(), 1), ["tree"])
    job = {"name": "unit", "inputs": {"paths": [str(real("OSBS_029.tif"))]}, "tiling": {"chip_size": 400, "overlap": 0},
           "model": {"checkpoint": str(tmp_path / "unit.pt")}, "compute": {"actors": 1, "gpus_per_actor": 0},
           "output": {"table": str(tmp_path / "table")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out = cli("validate", tmp_path / "job.yaml")
    assert code == 2
    assert "OSBS_029.tif: uint8 pixel values" in out and "inputs in [0, 1]" in out and "pipeline import" in out
