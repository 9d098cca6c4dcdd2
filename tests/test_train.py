"""pipeline train: schedule, shards, splits, anchor fitting, and Ray Train runs that are
killed and resumed (they must end with the weights of an unbroken run)."""
from __future__ import annotations

import csv
import json
import math
import os
import time

import numpy as np
import pytest
import torch
import yaml

from pipeline.config.spec import load_job
from pipeline.errors import ConfigError, InputError, TrainingError
from pipeline.eval.labelled import (
    box_sizes,
    build_records,
    expand_scene_paths,
    labelled_scenes,
    read_records,
    split_regions,
)
from pipeline.tools.synth import synthesize
from pipeline.train.anchors import anchor_shapes, centred_iou, fit_anchors, match_share
from pipeline.train.driver import check_trainable, train
from pipeline.train.loop import plot_metrics, write_metrics_csv
from pipeline.train.schedule import epoch_order, lr_factor, plan_steps, shard_indices
from retinanet import build_model, save_checkpoint
from retinanet.anchors import cell_anchors
from retinanet.checkpoint import load_checkpoint
from retinanet.config import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES

CLASSES = ["vehicle", "building", "tank"]


@pytest.fixture(scope="module")
def synth_dir(module_tmp):
    out = module_tmp("train_synth")
    synthesize(out, scenes=3, size=384, seed=3)
    return out


def write_job(folder, **train_overrides):
    """A tiny training job (resnet18, 32-channel FPN/heads, 128-px chips) in ``folder``."""
    train_section = {
        "scenes": ["data/*.tif"], "labels": ["data/truth.json"], "classes": CLASSES,
        "val_split": {"by": "scene", "fraction": 0.34}, "backbone": "resnet18",
        "fpn_channels": 32, "head_width": 32, "head_depth": 1, "chip_size": 128, "overlap": 0,
        "batch_size": 4, "workers": 2, "max_steps": 6, "warmup_steps": 2, "checkpoint_every": 2,
        "augment": {"scale_jitter": True}, "output_dir": "runs", "seed": 5,
    }
    train_section.update(train_overrides)
    job = {"name": "tiny", "inputs": {"paths": ["data/*.tif"], "bands": [1, 2, 3]},
           "model": {"checkpoint": "model.pt"}, "output": {"table": "out"}, "train": train_section}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def job_folder(synth_dir, module_tmp):
    folder = module_tmp("train_job")
    os.symlink(synth_dir, folder / "data")
    return folder


# ------------------------------------------------------------------ schedule


def test_lr_factor_golden_values():
    # Warm-up: 0.001 at step 0, linear to 1 at step 100: step 50 -> 0.001 * 0.5 + 0.5 = 0.5005.
    assert lr_factor(0, 1000, 100, "constant") == pytest.approx(0.001)
    assert lr_factor(50, 1000, 100, "constant") == pytest.approx(0.5005)
    assert lr_factor(100, 1000, 100, "constant") == 1.0
    # Step schedule, the paper's milestones 0.67 and 0.89 of 100 steps: drops at 67 and 89.
    assert lr_factor(66, 100, 0, "step", [0.67, 0.89]) == 1.0
    assert lr_factor(67, 100, 0, "step", [0.67, 0.89]) == pytest.approx(0.1)
    assert lr_factor(89, 100, 0, "step", [0.67, 0.89]) == pytest.approx(0.01)
    # Cosine: 0.5 * (1 + cos(pi * 25 / 100)) = 0.853553...; 0 at the end.
    assert lr_factor(25, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    # Warm-up multiplies the schedule: step 5 of 10 warm-up steps under cosine of 100.
    assert lr_factor(5, 100, 10, "cosine") == pytest.approx(0.5005 * 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_shards_partition_the_chips_and_orders_are_seeded():
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert shards[0].tolist() == [0, 3, 6, 9] and shards[2].tolist() == [2, 5, 8]
    a, b = epoch_order(9, 5, 0, 1), epoch_order(9, 5, 0, 1)
    assert a.tolist() == b.tolist() and sorted(a.tolist()) == list(range(9))
    assert epoch_order(9, 5, 1, 1).tolist() != a.tolist()  # a new order every epoch


def test_plan_steps(job_folder):
    spec = load_job(write_job(job_folder, max_steps=None, epochs=3))
    # 18 chips over 2 workers: shards of 9, per-worker batch 2 -> 4 full steps per epoch.
    assert plan_steps(spec.train, 18) == (4, 12)
    spec = load_job(write_job(job_folder, max_steps=7))
    assert plan_steps(spec.train, 18) == (4, 7)
    with pytest.raises(ConfigError, match="train.batch_size"):
        plan_steps(spec.train, 3)


def test_check_trainable_lists_every_problem_and_ignores_model_checkpoint(tmp_path, job_folder):
    spec = load_job(write_job(job_folder))
    check_trainable(spec)  # model.checkpoint (model.pt) does not exist: fine for training
    bad = load_job(write_job(tmp_path, scenes=["nope/*.tif"], labels=["nope.json"],
                             backbone_weights="missing.pth"))
    with pytest.raises(ConfigError) as err:
        check_trainable(bad)
    text = str(err.value)
    for field in ("train.scenes[0]", "train.labels[0]", "train.backbone_weights"):
        assert field in text
    no_train = load_job(write_job(tmp_path))
    no_train.train = None
    with pytest.raises(ConfigError, match="train: required"):
        check_trainable(no_train)


def test_eval_checkpoint_on_a_training_jobs_split(job_folder, tmp_path):
    """`pipeline eval-checkpoint --job` evaluates the job's own split (pipeline.train.driver,
    above eval: the split is training's rule): by scene, 0.34 of the 3 scenes of 384 px is
    one validation scene, 3 x 3 chips of 128 px; the two training scenes give 18."""
    from click.testing import CliRunner
    from workspaces import tiny_checkpoint

    from pipeline.cli import main

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    job = write_job(job_folder)
    for split, chips in (("val", 9), ("train", 18)):
        result = CliRunner().invoke(main, ["eval-checkpoint", str(checkpoint), "--job", str(job), "--split", split,
                                           "-o", str(tmp_path / split)])
        assert result.exit_code == 0, result.output
        written = json.loads((tmp_path / split / "eval_checkpoint.json").read_text())
        assert (written["chips"], written["images"], written["split"]) == (chips, chips, split)
    reordered = write_job(job_folder, classes=["tank", "vehicle", "building"])
    result = CliRunner().invoke(main, ["eval-checkpoint", str(checkpoint), "--job", str(reordered)])
    assert result.exit_code == 2 and "differ from" in result.output, result.output


def test_spec_rejects_bad_train_fields(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size|batch_size \\(3\\) must be a multiple"):
        load_job(write_job(tmp_path, batch_size=3, workers=2))
    with pytest.raises(ConfigError, match="train.backbone: unknown backbone"):
        load_job(write_job(tmp_path, backbone="resnet9"))
    with pytest.raises(ConfigError, match="train.val_split.by"):
        load_job(write_job(tmp_path, val_split={"by": "chip", "fraction": 0.2}))
    with pytest.raises(ConfigError, match="train.augment.scale_range"):
        load_job(write_job(tmp_path, augment={"scale_range": [1.2, 0.8]}))


# -------------------------------------------------------------------- splits


def test_region_split_keeps_a_gap_and_chips_stay_inside(synth_dir):
    scenes = labelled_scenes(expand_scene_paths([str(synth_dir / "*.tif")]), [str(synth_dir / "truth.json")],
                             CLASSES)
    train_regions, val_regions = split_regions(scenes, "region", 0.25, 64, "bottom")
    # 384 rows: validation rows [288, 384), training rows [0, 384 - 96 - 64) = [0, 224).
    assert [(r.y0, r.y1) for r in val_regions] == [(288, 384)] * 3
    assert [(r.y0, r.y1) for r in train_regions] == [(0, 224)] * 3
    train = build_records(scenes, train_regions, 128, 32, 0.5, 0.0)
    val = build_records(scenes, val_regions, 128, 32, 0.5, 0.0)
    assert max(r.window[1] + r.window[3] for r in train) <= 224
    assert min(r.window[1] for r in val) >= 288
    right_train, right_val = split_regions(scenes, "region", 0.3, 10, "right")
    assert right_val[0].x0 == 384 - 115 and right_train[0].x1 == 384 - 115 - 10
    with pytest.raises(ConfigError, match="too small"):
        split_regions(scenes, "region", 0.5, 300, "bottom")


def test_scene_split_is_seeded_and_disjoint(synth_dir):
    scenes = labelled_scenes(expand_scene_paths([str(synth_dir / "*.tif")]), [str(synth_dir / "truth.json")],
                             CLASSES)
    a = split_regions(scenes, "scene", 0.34, 0, seed=1)
    b = split_regions(scenes, "scene", 0.34, 0, seed=1)
    assert a == b
    train_ids = {r.scene_id for r in a[0]}
    val_ids = {r.scene_id for r in a[1]}
    assert len(val_ids) == 1 and not train_ids & val_ids and len(train_ids | val_ids) == 3


def test_chip_records_carry_the_scene_boxes_in_chip_pixels(synth_dir):
    scenes = labelled_scenes(expand_scene_paths([str(synth_dir / "*.tif")]), [str(synth_dir / "truth.json")],
                             CLASSES)
    scene = scenes[0]
    records = build_records([scene], split_regions([scene], "region", 0.25, 0)[0], 128, 0, 1.0, 0.0)
    inside = 0
    for r in records:
        col_off, row_off, w, h = r.window
        whole = ((scene.boxes[:, 0] >= col_off) & (scene.boxes[:, 2] <= col_off + w)
                 & (scene.boxes[:, 1] >= row_off) & (scene.boxes[:, 3] <= row_off + h))
        expected = scene.boxes[whole] - np.array([col_off, row_off, col_off, row_off], dtype=np.float32)
        assert sorted(map(tuple, r.boxes.tolist())) == sorted(map(tuple, expected.tolist()))
        assert sorted(r.labels.tolist()) == sorted(scene.labels[whole].tolist())
        inside += len(r.boxes)
    assert inside > 0
    pixels, valid = read_records(records[:2], [1, 2, 3], 128, 3)
    assert pixels.shape == (2, 3, 128, 128) and valid.all()


# ------------------------------------------------------------------- anchors


def test_centred_iou_hand_worked():
    # 10x10 box in a 20x20 anchor: 100 / 400; 10x20 vs 20x10: 100 / (200 + 200 - 100).
    iou = centred_iou(np.array([[10.0, 10.0], [10.0, 20.0]]), np.array([[20.0, 20.0], [20.0, 10.0]]))
    assert iou[0, 0] == pytest.approx(0.25)
    assert iou[1, 1] == pytest.approx(1 / 3)


def test_anchor_shapes_match_the_model_anchors():
    shapes = anchor_shapes(DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)
    oracle = torch.cat([cell_anchors(level, DEFAULT_ASPECT_RATIOS) for level in DEFAULT_SIZES])
    wh = torch.stack([oracle[:, 2] - oracle[:, 0], oracle[:, 3] - oracle[:, 1]], 1).numpy()
    np.testing.assert_allclose(shapes, wh)


def test_anchor_fit_raises_the_matched_share_on_small_objects(synth_dir):
    scenes = labelled_scenes(expand_scene_paths([str(synth_dir / "*.tif")]), [str(synth_dir / "truth.json")],
                             CLASSES)
    regions = split_regions(scenes, "region", 0.25, 0)[0]
    sizes = box_sizes(build_records(scenes, regions, 128, 0, 0.5, 0.0))
    fit = fit_anchors(sizes, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)
    assert fit.share_before == pytest.approx(match_share(sizes, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)[0])
    assert fit.share_after > fit.share_before
    assert fit.share_after == pytest.approx(match_share(sizes, fit.anchor_sizes, fit.aspect_ratios)[0], abs=1e-9)
    assert len(fit.anchor_sizes) == 5 and all(len(level) == 3 for level in fit.anchor_sizes)
    # Boxes the default anchors already fit exactly keep a share of 1.
    square = np.array([[32.0, 32.0], [64.0, 64.0]])
    assert fit_anchors(square, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS).share_after == 1.0


def test_metrics_csv_and_plot(tmp_path):
    history = [{"epoch": 0, "step": 4, "loss": 2.0, "cls_loss": 1.2, "box_loss": 0.8, "lr": 0.01,
                "val_AP": 0.1, "val_AP50": 0.3},
               {"epoch": 1, "step": 8, "loss": 1.5, "cls_loss": 0.9, "box_loss": 0.6, "lr": 0.01,
                "val_AP": None, "val_AP50": None}]
    write_metrics_csv(history, tmp_path / "m.csv")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert rows[0]["val_AP50"] == "0.3" and rows[1]["val_AP"] == ""
    assert list(rows[0]) == ["epoch", "step", "loss", "cls_loss", "box_loss", "lr", "val_AP", "val_AP50"]
    with open(plot_metrics(history, tmp_path / "m.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_progress_line_reads_a_metrics_row():
    from pipeline.train.progress import training_progress_line

    row = {"epoch": "3", "step": "136", "loss": "0.79677", "val_AP50": "0.79639"}
    assert training_progress_line(row, 300, 0.5) == \
        "  step 136/300, epoch 3: loss 0.797, val AP50 0.796, 0.50 steps/s, ETA 5m28s"
    assert training_progress_line({**row, "val_AP50": ""}, 300, 0.0) == \
        "  step 136/300, epoch 3: loss 0.797, 0.00 steps/s, ETA unknown"


def test_progress_shows_each_new_row_once_and_ignores_an_earlier_runs_file(tmp_path):
    from pipeline.train.progress import progress_from_metrics

    def row(step):
        return {"epoch": step // 4, "step": step, "loss": 1.0 / step, "cls_loss": 0, "box_loss": 0, "lr": 0.01,
                "val_AP": 0.1, "val_AP50": 0.2}

    path = tmp_path / "metrics.csv"
    write_metrics_csv([row(4), row(8), row(12)], path)  # an earlier run's, finished
    logged: list[str] = []
    with progress_from_metrics(path, 12, start_step=4, log=logged.append, poll_s=0.02):
        time.sleep(0.1)
        assert logged == []
        write_metrics_csv([row(4), row(8)], path)  # a run resumed from step 4 validates at 8
        deadline = time.monotonic() + 10
        while not logged and time.monotonic() < deadline:
            time.sleep(0.02)
        write_metrics_csv([row(4), row(8), row(12)], path)  # the last row, just before the end
    assert [line.split(":")[0] for line in logged] == ["  step 8/12, epoch 2", "  step 12/12, epoch 3"]
    assert logged[-1].endswith("ETA 0m00s")


# ------------------------------------------------------------- Ray Train runs


def final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "last.pt"), weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def unbroken_run(ray_session, job_folder):
    """2 workers on CPU, 6 steps, never interrupted: the reference (with the progress lines
    it logged under the test-only key "logged")."""
    logged: list[str] = []
    summary = train(load_job(write_job(job_folder, output_dir="runs/unbroken")), log=logged.append)
    return {**summary, "logged": logged}


@pytest.mark.slow
def test_two_workers_train_and_write_every_output(unbroken_run):
    out = unbroken_run["output_dir"]
    assert unbroken_run["steps"] == unbroken_run["total_steps"] == 6
    assert unbroken_run["workers"] == 2
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.png", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    # 18 chips, shards of 9, 2 per worker per step: epoch ends at step 4, training at 6.
    assert [int(r["step"]) for r in rows] == [4, 6]
    # One progress line per validation, its numbers those of metrics.csv.
    assert [line.split(" steps/s")[0].rsplit(", ", 1)[0] for line in unbroken_run["logged"]] == [
        f"  step {r['step']}/6, epoch {r['epoch']}: loss {float(r['loss']):.3f}, val AP50 {float(r['val_AP50']):.3f}"
        for r in rows]
    assert unbroken_run["logged"][-1].endswith("ETA 0m00s")
    model, info = load_checkpoint(os.path.join(out, "best.pt"))
    assert info["class_names"] == CLASSES
    # The dataset's band statistics are the model's normalisation.
    assert list(model.config.image_mean) == pytest.approx(unbroken_run["band_stats"]["mean"])
    assert model.config.image_mean != (0.485, 0.456, 0.406)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_ends_like_an_unbroken_run(ray_session, job_folder,
                                                                              unbroken_run, tmp_path):
    marker = tmp_path / "killed"
    result = train(load_job(write_job(job_folder, output_dir="runs/killed")),
                   _fault={"crash_at_step": 3, "marker": str(marker), "rank": 1})
    assert marker.exists()  # the worker really died once (after step 3; checkpoint at 2)
    assert result["steps"] == 6
    assert_same_weights(final_weights(result["output_dir"]), final_weights(unbroken_run["output_dir"]))
    same_rows = open(os.path.join(result["output_dir"], "metrics.csv")).read()
    assert same_rows == open(os.path.join(unbroken_run["output_dir"], "metrics.csv")).read()


@pytest.mark.slow
def test_resume_flag_continues_a_failed_run(ray_session, job_folder, unbroken_run, tmp_path):
    """The failed run in this process; `pipeline train --resume` as a user runs it, in a Ray
    of its own: Ray's and Ray Train's lines (a checkpoint repr per report, the token
    notice, core_worker.cc) would show only with --verbose, ours show the resumed steps."""
    import subprocess
    import sys

    marker = tmp_path / "killed"
    job = write_job(job_folder, output_dir="runs/resumed")
    spec = load_job(job)
    with pytest.raises(TrainingError, match="training failed"):
        train(spec, max_failures=0, _fault={"crash_at_step": 5, "marker": str(marker), "rank": 0})
    assert marker.exists()
    run = json.loads(open(os.path.join(spec.train.output_dir, "run.json")).read())["ray_run"]

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(job), "--resume"],
                          cwd=job_folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ray_run"] == run and result["resumed_from"] and result["steps"] == 6
    # One line per validation after the resumed checkpoint (step 4), nothing else.
    assert [line.split(",")[0] for line in proc.stderr.splitlines()] == ["  step 6/6"], proc.stderr
    assert_same_weights(final_weights(result["output_dir"]), final_weights(unbroken_run["output_dir"]))


@pytest.mark.slow
def test_time_budget_stops_at_a_validated_checkpoint_and_the_console_says_so(ray_session, job_folder):
    logged: list[str] = []
    spec = load_job(write_job(job_folder, output_dir="runs/budget", workers=1, time_budget_minutes=1e-4))
    summary = train(spec, log=logged.append)
    assert summary["stopped_early"] and summary["steps"] == 1 and summary["total_steps"] == 6
    rows = list(csv.DictReader(open(os.path.join(summary["output_dir"], "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [1]  # validated where it stopped
    assert load_checkpoint(summary["last"])[0] is not None
    # The progress line's ETA guessed at the whole schedule; the last line says why it ended.
    assert [line.split(",")[0] for line in logged[:-1]] == ["  step 1/6"]
    assert logged[-1] == "  stopped early at step 1/6: train.time_budget_minutes (0.0001) spent"


def test_resume_without_an_earlier_run_is_a_clear_error(job_folder, ray_session):
    spec = load_job(write_job(job_folder, output_dir="runs/never"))
    with pytest.raises(InputError, match="nothing to resume"):
        train(spec, resume=True)


@pytest.mark.slow  # training steps
def test_a_batch_of_chips_without_objects_trains(synth_dir):
    # Negative-only batches happen (empty chips, scale jitter cropping every box away).
    from pipeline.eval.labelled import ChipRecord
    from pipeline.train.loop import ChipCache, make_batch
    from retinanet.model import build_model

    path = str(sorted(synth_dir.glob("*.tif"))[0])
    records = [ChipRecord(path, "s", (0, 0, 64, 64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))] * 2
    images, targets = make_batch(ChipCache(records, [1, 2, 3], 64, 3), records, [0, 1], None, (0,), None, None)
    model = build_model(num_classes=3, backbone="resnet18", fpn_channels=32, head_width=32, head_depth=1,
                        image_mean=(100.0,) * 3, image_std=(30.0,) * 3).train()
    losses = model(images, targets)
    assert torch.isfinite(losses["classification"]) and losses["bbox_regression"].item() == 0.0
    (losses["classification"] + losses["bbox_regression"]).backward()


def test_fine_tuning_keeps_the_init_checkpoints_resize_rule_and_settings(tmp_path, job_folder):
    """An imported DeepForest model fine-tuned here keeps resizing chips as it was trained to."""
    from pipeline.train.driver import prepare

    source = build_model(num_classes=3, backbone="resnet18", fpn_channels=32, head_width=32, head_depth=1,
                         min_size=800, max_size=1333, nms_threshold=0.05, score_threshold=0.1,
                         detections_per_image=300)
    save_checkpoint(tmp_path / "imported.pt", source, CLASSES)
    prepared = prepare(load_job(write_job(job_folder, init_checkpoint=str(tmp_path / "imported.pt"))))
    assert {k: prepared.model_config[k] for k in ("min_size", "max_size", "nms_threshold", "score_threshold",
                                             "detections_per_image")} == \
        {"min_size": 800, "max_size": 1333, "nms_threshold": 0.05, "score_threshold": 0.1,
         "detections_per_image": 300}
    plain = prepare(load_job(write_job(job_folder)))
    assert "min_size" not in plain.model_config  # trained from scratch: native chips
