"""`pipeline train`: fine-tune RetinaNet on labelled scenes with Ray Train (the driver).

1. check the job (:func:`check_trainable`), pair scenes with labels, split train /
   validation by scene or by region, cut both into chip records (pipeline.eval.labelled);
2. compute the per-band statistics once for the dataset (pipeline.chips.normalize) and put
   them in the model config (image_mean / image_std travel inside the checkpoint);
   optionally fit the anchors to the training boxes (pipeline.train.anchors);
3. run :func:`pipeline.train.loop.train_loop` on ``train.workers`` Ray Train workers
   (``TorchTrainer``, ``ScalingConfig(num_workers, use_gpu)``, DDP through ``prepare_model``).

A worker that dies makes Ray restart the worker group (``FailureConfig(max_failures)``);
each worker then starts from ``ray.train.get_checkpoint()``. ``pipeline train --resume``
starts a new driver on the same Ray run directory and resumes from its latest checkpoint.

Outputs in ``train.output_dir``: ``best.pt`` (highest validation AP50, ties broken by
AP), ``last.pt``, ``metrics.csv``, ``metrics.png``, ``summary.json``, ``run.json`` and
``ray/<run name>/`` (Ray's run directory with the checkpoints). With ``train.publish:
true`` best.pt is then copied to ``model.checkpoint``, so ``pipeline run`` on the same
job uses the trained model. Each of these checkpoints gets a model card beside it
(``best.pt.stac-item.json``: a STAC MLM item, :mod:`pipeline.io.model_card`) with the
bands, data type, chip size, classes and validation AP. On a multi-node cluster
``output_dir`` must be storage every node sees (NFS), as Ray's ``storage_path`` must.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from pipeline.compute.console import console_line, native_log_lines_hidden
from pipeline.config.locations import is_remote
from pipeline.config.spec import JobSpec, TrainSpec, writable_dir_problem
from pipeline.errors import ConfigError, InputError, TrainingError
from pipeline.io.inputs import expand_patterns
from pipeline.io.model_card import TrainingFacts, band_names, common_data_type, write_model_card
from pipeline.train.anchors import fit_anchors
from pipeline.train.loop import MODEL_FILE, STATE_FILE, STEP_FILE, Prepared, checkpoint_step, train_loop
from pipeline.train.progress import budget_stop_line, progress_from_metrics
from pipeline.train.schedule import plan_steps
from retinanet.config import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES
from retinanet.files import write_atomically
from retinanet.options import TRAINABLE_FIELDS


def check_trainable(spec: JobSpec) -> None:
    """Check that ``pipeline train`` can start; one ConfigError listing every problem.

    Unlike :func:`pipeline.config.spec.check_runnable`, ``model.checkpoint`` need not exist
    (training writes it). Checked: a ``train`` section; every ``train.scenes`` glob
    matches a file; label files, ``backbone_weights`` (``imagenet``: fetched into torch's
    cache) and ``init_checkpoint`` exist;
    ``train.output_dir`` can be created or written.
    """
    source = spec.source or "job"
    t = train_section(spec)
    problems = []
    for i, pattern in enumerate(t.scenes):
        if is_remote(pattern):
            problems.append(f"{source}: train.scenes[{i}]: training scenes must be local files, got {pattern!r}")
        elif expand_patterns([pattern]).unmatched:
            problems.append(f"{source}: train.scenes[{i}]: no file matches {pattern!r}")
    for i, path in enumerate(t.labels):
        if not os.path.isfile(path):
            problems.append(f"{source}: train.labels[{i}]: file not found: {path}")
    for key in ("backbone_weights", "init_checkpoint"):
        value = getattr(t, key)
        if key == "backbone_weights" and value == "imagenet":
            from retinanet.backbones import imagenet_weights_state
            from retinanet.hub_cache import NamedSourceError

            try:  # into torch's cache now (workers on this machine read it there), or why not
                imagenet_weights_state(t.backbone)
            except NamedSourceError as err:
                problems.append(f"{source}: train.{key}: {err}")
        elif value is not None and not os.path.isfile(value):
            problems.append(f"{source}: train.{key}: file not found: {value}")
    why = writable_dir_problem(t.output_dir)
    if why:
        problems.append(f"{source}: train.output_dir: {why}")
    if problems:
        raise ConfigError("\n".join(problems))


def train_section(spec: JobSpec) -> TrainSpec:
    """The job's train: section; ConfigError when the job has none."""
    if spec.train is None:
        raise ConfigError(f"{spec.source or 'job'}: train: required key is missing "
                          "(pipeline train needs a train: section)")
    return spec.train


def scene_bands(spec: JobSpec, first_scene: str) -> tuple[Optional[list[int]], int]:
    """(bands to read, model in_channels): ``inputs.bands``, or every non-alpha band."""
    from pipeline.io.raster import read_scene_info

    if spec.inputs.bands is not None:
        return list(spec.inputs.bands), len(spec.inputs.bands)
    return None, len(read_scene_info(first_scene).data_bands)


def training_data(spec: JobSpec):
    """(labelled scenes, train records, val records, scene paths) of the job's train section."""
    from pipeline.eval.labelled import build_records, expand_scene_paths, labelled_scenes, split_regions

    t = train_section(spec)
    inputs = expand_scene_paths(t.scenes)
    scenes = labelled_scenes(inputs, t.labels, t.classes, t.label_field, t.scene_field)
    gap = t.val_split.gap if t.val_split.gap is not None else t.chip_size
    train_regions, val_regions = split_regions(scenes, t.val_split.by, t.val_split.fraction, gap,
                                               t.val_split.side, t.seed)
    common = (t.chip_size, t.overlap, t.min_box_inside, t.min_valid_fraction)
    return (scenes, build_records(scenes, train_regions, *common), build_records(scenes, val_regions, *common),
            [s.location for s in inputs])


def fit_job_anchors(spec: JobSpec):
    """Anchor fit on the job's training chips (``pipeline anchors``) -> AnchorFit."""
    from pipeline.eval.labelled import box_sizes

    check_trainable(spec)
    _, train_records, _, _ = training_data(spec)
    sizes = box_sizes(train_records)
    if len(sizes) == 0:
        raise InputError(f"{spec.source}: the training chips hold no box to fit anchors to")
    return fit_anchors(sizes, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS, seed=train_section(spec).seed)


def evaluate_checkpoint_on_job(checkpoint: str | os.PathLike, spec: JobSpec, split: str = "val",
                               batch_size: int = 8, voc: bool = False, out_dir: Optional[str | os.PathLike] = None,
                               precision: str = "fp32", untrained: bool = False) -> dict:
    """Chip-level evaluation on the chips of a training job (``pipeline eval-checkpoint
    --job``): its validation split (the chips `pipeline train` validates on) or its training
    split (``split="train"``). Here, not in pipeline.eval: the split is training's rule."""
    from pipeline.eval.evaluate import evaluate_records, finish_report, model_for_eval

    check_trainable(spec)
    t = train_section(spec)
    model, classes = model_for_eval(checkpoint, untrained, t.seed)
    if classes != list(t.classes):
        raise InputError(f"{checkpoint}: classes {classes} differ from {spec.source}: train.classes "
                         f"{list(t.classes)}")
    _, train_records, val_records, _ = training_data(spec)
    records = val_records if split == "val" else train_records
    metrics = evaluate_records(model, records, classes, spec.inputs.bands, t.chip_size, batch_size,
                               "cpu", precision, voc)
    return finish_report(metrics, {"checkpoint": str(checkpoint), "chips": len(records), "untrained": untrained,
                                   "job": spec.source, "split": split}, out_dir, "eval_checkpoint")


def prepare(spec: JobSpec) -> Prepared:
    """Chips, statistics, anchors and the model config of a training job (driver side)."""
    from pipeline.chips.normalize import compute_band_stats
    from pipeline.eval.labelled import box_sizes
    from retinanet.backbones import build_backbone

    t = train_section(spec)
    _, train_records, val_records, paths = training_data(spec)
    if not train_records:
        raise InputError(f"{spec.source}: no training chip (check train.scenes, val_split and min_valid_fraction)")
    per_epoch, total = plan_steps(t, len(train_records))
    bands, in_channels = scene_bands(spec, paths[0])
    stats = compute_band_stats(paths, bands, out_channels=in_channels)
    anchor_sizes: Sequence[Sequence[float]] = DEFAULT_SIZES
    ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS
    fit: Optional[dict] = None
    if t.fit_anchors:
        result = fit_anchors(box_sizes(train_records), DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS, seed=t.seed)
        anchor_sizes, ratios, fit = result.anchor_sizes, result.aspect_ratios, result.to_dict()
    c5 = build_backbone(t.backbone, in_channels).out_channels[-1]
    config = {
        **{name: getattr(t, name) for name in TRAINABLE_FIELDS},  # the job's train: section, as it is
        "num_classes": len(t.classes), "in_channels": in_channels,
        "image_mean": tuple(stats.mean), "image_std": tuple(stats.std),
        # Pretrained trunks keep frozen BN (tiny batches); from scratch BN must learn.
        "frozen_bn": t.backbone_weights is not None,
        "p6_from": "c5" if c5 != t.fpn_channels else "p5",
        "anchor_sizes": tuple(tuple(level) for level in anchor_sizes), "aspect_ratios": tuple(ratios),
    }
    if t.init_checkpoint:  # fine-tuning keeps the source's resize rule and inference settings
        from retinanet.checkpoint import read_checkpoint

        source = read_checkpoint(t.init_checkpoint)["config"]
        config.update({k: source[k] for k in INHERITED_FROM_INIT if k in source})
    return Prepared(config, list(t.classes), bands, train_records, val_records, per_epoch, total, fit,
                    stats.to_dict())


# Config fields a fine-tuned model takes from train.init_checkpoint (an imported DeepForest
# model keeps resizing its chips to 800 px and its thresholds).
INHERITED_FROM_INIT = ("min_size", "max_size", "score_threshold", "nms_threshold", "detections_per_image",
                       "topk_candidates")


def _latest_checkpoint_dir(run_dir: Path) -> Optional[str]:
    """The checkpoint directory with the highest step under a Ray run directory."""
    best, best_step = None, -1
    for d in sorted(run_dir.glob("checkpoint_*")):
        step = checkpoint_step(d)
        if step is not None and step > best_step and (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file():
            best, best_step = str(d), step
    return best


def _run_name(spec: JobSpec, output_dir: Path, resume: bool) -> str:
    """Ray run name: the previous one when resuming, else a fresh one (recorded in run.json)."""
    record = output_dir / "run.json"
    if resume:
        try:
            return json.loads(record.read_text())["ray_run"]
        except (OSError, ValueError, KeyError):
            # nothing ran: the run cannot start (exit 2), not a training that failed (exit 1)
            raise InputError(f"{output_dir}: nothing to resume (no run.json from an earlier pipeline train)") \
                from None
    name = f"{spec.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"ray_run": name, "job": spec.source}, indent=2))
    return name


def _cpus_per_worker(t: TrainSpec) -> int:
    import ray

    if t.cpus_per_worker is not None:
        return t.cpus_per_worker
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, total // t.workers)


def train(spec: JobSpec, resume: bool = False, *, max_failures: int = 2, verbose: bool = False, log=None,
          _fault: Optional[dict] = None) -> dict:
    """Train the job's model; returns the summary (also written to summary.json).

    Args:
        resume: continue the previous run of this output_dir from its latest checkpoint.
        max_failures: worker-group restarts Ray may do (each from the latest checkpoint).
        verbose: a Ray started here shows Ray's own lines and the workers' output; without
            it the console gets one progress line per validation (pipeline.train.progress).
        log: where progress lines go (default: stderr).
        _fault: test-only fault injection, never read from job files:
            ``{"crash_at_step": k, "marker": path, "rank": r}`` makes worker r call
            ``os._exit(1)`` after step k, once (the marker file remembers it).

    Raises:
        ConfigError / InputError for a bad job or data, TrainingError when training fails.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    check_trainable(spec)
    t = train_section(spec)
    output_dir = Path(t.output_dir).resolve()
    prepared = prepare(spec)
    run_name = _run_name(spec, output_dir, resume)
    storage = output_dir / "ray"
    resume_from = _latest_checkpoint_dir(storage / run_name) if resume else None

    # Ray Train's print patch would bypass contextlib.redirect_stdout (pycocotools' chatter).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from pipeline.compute.cluster import connect_ray

    started_ray = not ray.is_initialized()
    # null: a Ray of our own, with the dashboard (Ray Train polls its State API)
    connect_ray(spec.compute.address, quiet=not verbose, dashboard=True)
    start_step = (resume_from and checkpoint_step(resume_from)) or 0  # progress lines after it
    say = log or console_line
    try:
        cpus = _cpus_per_worker(t)
        loop_config = {
            "prepared": prepared, "train": t.model_dump(), "job_name": spec.name, "output_dir": str(output_dir),
            "resume_from": resume_from, "cpus": cpus, "fault": _fault,
            "backbone_weights": t.backbone_weights, "init_checkpoint": t.init_checkpoint,
        }
        resources = {"CPU": cpus}
        if t.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                storage_path=str(storage), name=run_name,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        started = time.time()
        quiet = contextlib.nullcontext() if verbose else native_log_lines_hidden()
        try:
            with quiet, progress_from_metrics(output_dir / "metrics.csv", prepared.total_steps, start_step, say):
                result = trainer.fit()
        except Exception as err:  # Ray wraps worker errors in its own types
            raise TrainingError(f"{spec.source}: training failed: {type(err).__name__}: {err}") from err
        if getattr(result, "error", None):
            raise TrainingError(f"{spec.source}: training failed: {result.error}")
        wall = time.time() - started
    finally:
        if started_ray:
            ray.shutdown()
    if result.checkpoint is None:
        raise TrainingError(f"{spec.source}: training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / MODEL_FILE, output_dir / "last.pt")
        final = json.loads((Path(d) / STEP_FILE).read_text())
    if final.get("stopped_early"):
        assert t.time_budget_minutes is not None  # only a time budget stops a run early (TrainLoop.over_budget)
        say(budget_stop_line(final["step"], prepared.total_steps, t.time_budget_minutes))
    summary = {
        "job": spec.source, "ray_run": run_name, "output_dir": str(output_dir),
        "best": str(output_dir / "best.pt"), "last": str(output_dir / "last.pt"),
        "metrics_csv": str(output_dir / "metrics.csv"), "metrics_png": str(output_dir / "metrics.png"),
        "steps": final["step"], "total_steps": prepared.total_steps, "epochs_done": final["epoch"],
        "stopped_early": final.get("stopped_early", False), "best_val": final.get("best"),
        "train_chips": len(prepared.train_records), "val_chips": len(prepared.val_records),
        "workers": t.workers, "cpus_per_worker": cpus, "use_gpu": t.use_gpu, "wall_seconds": round(wall, 1),
        "train_seconds": final.get("elapsed"), "anchor_fit": prepared.anchor_fit, "band_stats": prepared.stats,
        "resumed_from": resume_from,
    }
    if t.publish:
        summary["published"] = publish_best(output_dir, spec.model.checkpoint)
    # A model card beside each checkpoint written (pipeline.io.model_card)
    facts = training_facts(spec, prepared, run_name)
    summary["model_cards"] = [str(write_model_card(path, facts)) for path in
                              (output_dir / "best.pt", output_dir / "last.pt", summary.get("published"))
                              if path is not None and os.path.isfile(path)]
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def training_facts(spec: JobSpec, prepared: Prepared, run_name: Optional[str]) -> TrainingFacts:
    """What the model cards of a training job's checkpoints say beyond the checkpoint: the
    bands read (named by the first scene's colour interpretation), the training scenes'
    data type, the chip size, what the weights started from."""
    from pipeline.eval.labelled import expand_scene_paths
    from pipeline.io.raster import read_scene_info

    t = train_section(spec)
    infos = [read_scene_info(scene.location) for scene in expand_scene_paths(t.scenes)]
    bands = prepared.bands if prepared.bands is not None else list(infos[0].data_bands)
    started = (f"fine-tuned from {t.init_checkpoint}" if t.init_checkpoint else
               f"ImageNet (backbone weights {t.backbone_weights})" if t.backbone_weights else None)
    return TrainingFacts(job=spec.source or spec.name, band_names=band_names(infos[0].colorinterp, bands),
                         data_type=common_data_type([info.dtype for info in infos]), chip_size=t.chip_size,
                         pretrained_source=started, train_chips=len(prepared.train_records),
                         val_chips=len(prepared.val_records), ray_run=run_name)


def publish_best(output_dir: Path, checkpoint: str) -> str:
    """Copy ``output_dir/best.pt`` (else last.pt) to ``checkpoint`` atomically -> its path."""
    source = output_dir / "best.pt"
    if not source.is_file():
        source = output_dir / "last.pt"
    return str(write_atomically(checkpoint, lambda tmp: shutil.copyfile(source, tmp)))
