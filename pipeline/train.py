"""`pipeline train`: fine-tune RetinaNet on labelled scenes with Ray Train.

Driver (:func:`train`):

1. check the job (:func:`check_trainable`), pair scenes with labels, split train /
   validation by scene or by region, cut both into chip records (pipeline.trainset);
2. compute the per-band statistics once for the dataset (pipeline.normalize) and put
   them in the model config (image_mean / image_std travel inside the checkpoint);
   optionally fit the anchors to the training boxes (pipeline.anchorfit);
3. run :func:`train_loop` on ``train.workers`` Ray Train workers (``TorchTrainer``,
   ``ScalingConfig(num_workers, use_gpu)``, DDP through ``prepare_model``).

Workers: worker r of W owns the training chips with index = r (mod W) and reads only
those (cached in memory after the first read). Epoch e visits its shard in the order
``permutation(seed, e, r)``; the augmentation of the j-th sample of global step s draws
from ``rng(seed, e, r, s, j)``. So the data of every step is a pure function of (seed,
step, rank): a run restored at step s continues with exactly the batches an unbroken
run would have seen, and with the optimizer, schedule and step counter of the
checkpoint it ends where the unbroken run ends.

Checkpoints (every ``checkpoint_every`` steps, at every epoch end and at the end) are
directories reported with ``ray.train.report(metrics, checkpoint=...)``:

    model.pt         retinanet.checkpoint format (weights, config, classes, metadata)
    train_state.pt   optimizer, LR schedule, step, epoch, metrics history, best score
                     (loaded with torch.load(weights_only=True))
    step.json        {"step": ..., "epoch": ...} (cheap to read when choosing a resume point)

A worker that dies makes Ray restart the worker group (``FailureConfig(max_failures)``);
each worker then starts from ``ray.train.get_checkpoint()``. ``pipeline train --resume``
starts a new driver on the same Ray run directory and resumes from its latest checkpoint.

Outputs in ``train.output_dir``: ``best.pt`` (highest validation AP50, ties broken by
AP), ``last.pt``, ``metrics.csv``, ``metrics.png``, ``summary.json``, ``run.json`` and
``ray/<run name>/`` (Ray's run directory with the checkpoints). With ``train.publish:
true`` best.pt is then copied to ``model.checkpoint``, so ``pipeline run`` on the same
job uses the trained model. On a multi-node cluster
``output_dir`` must be storage every node sees (NFS), as Ray's ``storage_path`` must.

Validation runs on rank 0 at every epoch end (and when training stops early) on the
validation chips: COCO AP and AP50 through pycocotools (:mod:`pipeline.evaluate`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.inputs import expand_patterns, is_remote
from pipeline.spec import JobSpec, TrainSpec, writable_dir_problem
from retinanet.files import write_atomically

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
STEP_FILE = "step.json"
METRIC_COLUMNS = ("epoch", "step", "loss", "cls_loss", "box_loss", "lr", "val_AP", "val_AP50")
WARMUP_FACTOR = 0.001  # LR at step 0 of the linear warm-up, as a fraction of train.lr
CACHE_LIMIT_BYTES = 2 << 30  # chips a worker keeps in memory; beyond it they are re-read


class TrainingError(PipelineError):
    """Training could not run or did not finish (the message says which worker/step)."""


# ------------------------------------------------------------------------- checks


def check_trainable(spec: JobSpec) -> None:
    """Check that ``pipeline train`` can start; one ConfigError listing every problem.

    Unlike :func:`pipeline.spec.check_runnable`, ``model.checkpoint`` need not exist
    (training writes it). Checked: a ``train`` section; every ``train.scenes`` glob
    matches a file; label files, ``backbone_weights`` and ``init_checkpoint`` exist;
    ``train.output_dir`` can be created or written.
    """
    source = spec.source or "job"
    if spec.train is None:
        raise ConfigError(f"{source}: train: required key is missing (pipeline train needs a train: section)")
    t = spec.train
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
        if value is not None and not os.path.isfile(value):
            problems.append(f"{source}: train.{key}: file not found: {value}")
    why = writable_dir_problem(t.output_dir)
    if why:
        problems.append(f"{source}: train.output_dir: {why}")
    if problems:
        raise ConfigError("\n".join(problems))


# ---------------------------------------------------------------- schedule, data


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str, milestones: Sequence[float] = (),
              gamma: float = 0.1, warmup_factor: float = WARMUP_FACTOR) -> float:
    """Multiplier of the base LR at ``step`` (0-based) of ``total`` steps.

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps`` (Goyal et al.), times
    the schedule: "step" multiplies by ``gamma`` at each milestone (fractions of total,
    the paper's 60k/80k of 90k is (0.67, 0.89)); "cosine" is 0.5 * (1 + cos(pi * step /
    total)); "constant" is 1.
    """
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        warm = warmup_factor * (1 - alpha) + alpha
    if schedule == "step":
        drops = sum(1 for m in milestones if step >= m * total)
        base = gamma ** drops
    elif schedule == "cosine":
        base = 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    elif schedule == "constant":
        base = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return warm * base


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of the training chips that worker ``rank`` of ``world`` owns: i = rank (mod world)."""
    return np.arange(rank, n, world, dtype=np.int64)


def epoch_order(shard_size: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """The order in which a worker visits its shard in ``epoch`` (a seeded permutation)."""
    return np.random.default_rng([seed, epoch, rank, 7]).permutation(shard_size)


def steps_per_epoch(n_chips: int, world: int, per_worker_batch: int) -> int:
    """Full batches every worker can take per epoch (the smallest shard decides)."""
    smallest = n_chips // world
    return smallest // per_worker_batch


def plan_steps(t: TrainSpec, n_chips: int) -> tuple[int, int]:
    """(steps per epoch, total steps). ``max_steps`` overrides ``epochs`` when given."""
    per_epoch = steps_per_epoch(n_chips, t.workers, t.batch_size // t.workers)
    if per_epoch < 1:
        raise ConfigError(f"train.batch_size: {n_chips} training chips are too few for a batch of "
                          f"{t.batch_size} over {t.workers} worker(s); lower the batch size or add scenes")
    total = t.max_steps if t.max_steps is not None else t.epochs * per_epoch
    return per_epoch, total


# ---------------------------------------------------------------------- driver


@dataclass
class Prepared:
    """Everything the workers need, built once on the driver (picklable, small)."""

    model_config: dict
    class_names: list
    bands: Optional[list]
    train_records: list
    val_records: list
    steps_per_epoch: int
    total_steps: int
    anchor_fit: Optional[dict]
    stats: dict


def scene_bands(spec: JobSpec, first_scene: str) -> tuple[Optional[list[int]], int]:
    """(bands to read, model in_channels): ``inputs.bands``, or every non-alpha band."""
    from pipeline.raster import read_scene_info

    if spec.inputs.bands is not None:
        return list(spec.inputs.bands), len(spec.inputs.bands)
    return None, len(read_scene_info(first_scene).data_bands)


def training_data(spec: JobSpec):
    """(labelled scenes, train records, val records, scene paths) of the job's train section."""
    from pipeline.trainset import build_records, expand_scene_paths, labelled_scenes, split_regions

    t = spec.train
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
    from pipeline.anchorfit import fit_anchors
    from pipeline.trainset import box_sizes
    from retinanet.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES

    check_trainable(spec)
    _, train_records, _, _ = training_data(spec)
    sizes = box_sizes(train_records)
    if len(sizes) == 0:
        raise InputError(f"{spec.source}: the training chips hold no box to fit anchors to")
    return fit_anchors(sizes, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS, seed=spec.train.seed)


def prepare(spec: JobSpec) -> Prepared:
    """Chips, statistics, anchors and the model config of a training job (driver side)."""
    from pipeline.anchorfit import fit_anchors
    from pipeline.normalize import compute_band_stats
    from pipeline.trainset import box_sizes
    from retinanet.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES
    from retinanet.backbones import build_backbone

    t = spec.train
    _, train_records, val_records, paths = training_data(spec)
    if not train_records:
        raise InputError(f"{spec.source}: no training chip (check train.scenes, val_split and min_valid_fraction)")
    per_epoch, total = plan_steps(t, len(train_records))
    bands, in_channels = scene_bands(spec, paths[0])
    stats = compute_band_stats(paths, bands, out_channels=in_channels)
    anchor_sizes, ratios, fit = DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS, None
    if t.fit_anchors:
        result = fit_anchors(box_sizes(train_records), DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS, seed=t.seed)
        anchor_sizes, ratios, fit = result.anchor_sizes, result.aspect_ratios, result.to_dict()
    c5 = build_backbone(t.backbone, in_channels).out_channels[-1]
    config = {
        "num_classes": len(t.classes), "backbone": t.backbone, "in_channels": in_channels,
        "image_mean": tuple(stats.mean), "image_std": tuple(stats.std),
        # Pretrained trunks keep frozen BN (tiny batches); from scratch BN must learn.
        "frozen_bn": t.backbone_weights is not None,
        "fpn_channels": t.fpn_channels, "p6_from": "c5" if c5 != t.fpn_channels else "p5",
        "head_width": t.head_width, "head_depth": t.head_depth,
        "anchor_sizes": tuple(tuple(level) for level in anchor_sizes), "aspect_ratios": tuple(ratios),
        "focal_alpha": t.focal_alpha, "focal_gamma": t.focal_gamma, "box_loss": t.box_loss,
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
        try:
            step = json.loads((d / STEP_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue  # partial or foreign directory
        if step > best_step and (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file():
            best, best_step = str(d), step
    return best


def _run_name(spec: JobSpec, output_dir: Path, resume: bool) -> str:
    """Ray run name: the previous one when resuming, else a fresh one (recorded in run.json)."""
    record = output_dir / "run.json"
    if resume:
        try:
            return json.loads(record.read_text())["ray_run"]
        except (OSError, ValueError, KeyError):
            raise TrainingError(f"{output_dir}: nothing to resume (no run.json from an earlier pipeline train)") \
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


def train(spec: JobSpec, resume: bool = False, *, max_failures: int = 2,
          _fault: Optional[dict] = None) -> dict:
    """Train the job's model; returns the summary (also written to summary.json).

    Args:
        resume: continue the previous run of this output_dir from its latest checkpoint.
        max_failures: worker-group restarts Ray may do (each from the latest checkpoint).
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
    t = spec.train
    output_dir = Path(t.output_dir).resolve()
    prepared = prepare(spec)
    run_name = _run_name(spec, output_dir, resume)
    storage = output_dir / "ray"
    resume_from = _latest_checkpoint_dir(storage / run_name) if resume else None

    # Ray Train's print patch would bypass contextlib.redirect_stdout (pycocotools' chatter).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from pipeline.execution import connect_ray

    started_ray = not ray.is_initialized()
    connect_ray(spec.compute.address, quiet=False)  # null: a Ray of our own, with worker logs shown
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
        try:
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
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def publish_best(output_dir: Path, checkpoint: str) -> str:
    """Copy ``output_dir/best.pt`` (else last.pt) to ``checkpoint`` atomically -> its path."""
    source = output_dir / "best.pt"
    if not source.is_file():
        source = output_dir / "last.pt"
    return str(write_atomically(checkpoint, lambda tmp: shutil.copyfile(source, tmp)))


# ---------------------------------------------------------------------- worker


class ChipCache:
    """Pixels of a worker's chips, read on first use and kept up to a byte budget."""

    def __init__(self, records: Sequence, bands, chip_size: int, channels: int, limit: int = CACHE_LIMIT_BYTES):
        self.records, self.bands, self.chip_size, self.channels = records, bands, chip_size, channels
        self.limit = limit
        self._store: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bytes = 0

    def get(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pixels (C, S, S) float32, valid (S, S) bool)] of the given record indices."""
        from pipeline.trainset import read_records

        missing = [i for i in indices if i not in self._store]
        fresh = {}
        if missing:
            pixels, valid = read_records([self.records[i] for i in missing], self.bands, self.chip_size,
                                         self.channels)
            for k, i in enumerate(missing):
                fresh[i] = (pixels[k], valid[k])
                if self._bytes + pixels[k].nbytes <= self.limit:
                    self._store[i] = fresh[i]
                    self._bytes += pixels[k].nbytes + valid[k].nbytes
        return [self._store.get(i) or fresh[i] for i in indices]


def make_batch(cache: ChipCache, records: Sequence, indices: Sequence[int], augment, seed_key: Sequence[int],
               mean, std):
    """(images (B, C, S, S) float32 tensor, targets [{"boxes", "labels"}]) of a batch.

    Sample j is augmented with ``rng([*seed_key, j])`` (see module docstring).
    """
    import torch

    from pipeline.augment import random_augment

    images, targets = [], []
    for j, (i, (pixels, valid)) in enumerate(zip(indices, cache.get(indices))):
        record = records[i]
        boxes, labels = record.boxes, record.labels
        if augment is not None:
            rng = np.random.default_rng([*seed_key, j])
            pixels, valid, boxes, labels = random_augment(pixels, valid, boxes, labels, augment, rng, mean, std)
        images.append(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        # np.array copies: records arrive read-only from Ray's object store.
        targets.append({"boxes": torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4)),
                        "labels": torch.from_numpy(np.array(labels, dtype=np.int64).reshape(-1))})
    return torch.stack(images), targets


def _augment_config(aug: dict):
    from pipeline.augment import AugmentConfig

    enabled = any(aug[k] for k in ("hflip", "vflip", "rot90", "brightness_contrast", "scale_jitter"))
    if not enabled:
        return None
    return AugmentConfig(hflip=aug["hflip"], vflip=aug["vflip"], rot90=aug["rot90"],
                         brightness_contrast=aug["brightness_contrast"], scale_jitter=aug["scale_jitter"],
                         brightness=aug["brightness"], contrast=aug["contrast"],
                         scale_range=tuple(aug["scale_range"]))


def _load_init_weights(model, path: str) -> int:
    """Copy every tensor of checkpoint ``path`` whose name and shape fit ``model``; -> count."""
    from retinanet.checkpoint import read_checkpoint

    state = read_checkpoint(path)["state_dict"]
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise InputError(f"{path}: no weight of this checkpoint fits the model (different backbone?)")
    model.load_state_dict(fitting, strict=False)
    return len(fitting)


def _validate(model, prepared: Prepared, val_pixels, chip_size: int, device, precision: str) -> dict:
    from pipeline.metrics import coco_metrics
    from pipeline.trainset import predict_records, records_truth

    was_training = model.training
    detections = predict_records(model, prepared.val_records, prepared.bands, chip_size, batch_size=8,
                                 device=str(device), precision=precision, pixels=val_pixels, channels_last=False)
    model.train(was_training)
    metrics = coco_metrics(records_truth(prepared.val_records, chip_size), detections, prepared.class_names)
    return {"val_AP": metrics["AP"], "val_AP50": metrics["AP50"]}


def _score(row: dict) -> tuple:
    """Best-checkpoint key: AP50 first, AP to break ties; missing values rank lowest."""
    return (row.get("val_AP50") if row.get("val_AP50") is not None else -1.0,
            row.get("val_AP") if row.get("val_AP") is not None else -1.0)


def write_metrics_csv(history: Sequence[dict], path: str | os.PathLike) -> None:
    """metrics.csv: one row per validation (epoch end or early stop), METRIC_COLUMNS."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(METRIC_COLUMNS))
            writer.writeheader()
            for row in history:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})

    write_atomically(path, write)


def plot_metrics(history: Sequence[dict], path: str | os.PathLike) -> Optional[Path]:
    """metrics.png: training loss (total, classification, box) and validation AP / AP50
    per epoch. None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row["epoch"] for row in history]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, style in (("loss", "-"), ("cls_loss", "--"), ("box_loss", ":")):
        ax_loss.plot(x, [row[key] for row in history], style, marker="o", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for key in ("val_AP50", "val_AP"):
        ax_ap.plot(x, [np.nan if row.get(key) is None else row[key] for row in history], marker="o", label=key)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("validation (COCO, chips)")
    ax_ap.set_ylim(0, 1)
    ax_ap.grid(alpha=0.3)
    ax_ap.legend()
    fig.tight_layout()
    try:
        return write_atomically(path, fig.savefig)
    finally:
        plt.close(fig)


def _save_checkpoint_dir(directory: Path, model, class_names, metadata: dict, state: dict) -> None:
    import torch

    from retinanet.checkpoint import save_checkpoint

    save_checkpoint(directory / MODEL_FILE, model, class_names, metadata)
    torch.save(state, directory / STATE_FILE)
    (directory / STEP_FILE).write_text(json.dumps({"step": state["step"], "epoch": state["epoch"],
                                                   "best": state["best"], "elapsed": state["elapsed"],
                                                   "stopped_early": state["stopped_early"]}))


def _restore(checkpoint_dir: str, model, optimizer, scheduler) -> dict:
    import torch

    from retinanet.checkpoint import read_checkpoint

    payload = read_checkpoint(Path(checkpoint_dir) / MODEL_FILE)
    model.load_state_dict(payload["state_dict"])
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def _maybe_crash(fault: Optional[dict], rank: int, step: int) -> None:
    """Test-only: kill this worker process once at the configured step (see train())."""
    if not fault or fault.get("rank", 0) != rank or fault.get("crash_at_step") != step:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"worker rank {rank} killed itself after step {step}\n")
    os._exit(1)


def _resume_point(config: dict) -> Optional[str]:
    """Where to start: Ray's restored checkpoint (worker failure) or --resume's, latest step wins."""
    import ray.train

    candidates = []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        candidates.append(restored.path)
    if config.get("resume_from"):
        candidates.append(config["resume_from"])
    best, best_step = None, -1
    for path in candidates:
        try:
            step = json.loads((Path(path) / STEP_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def train_loop(config: dict) -> None:
    """The Ray Train worker function (every worker runs it; rank 0 also validates and writes
    best.pt, last.pt, metrics.csv and metrics.png)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from retinanet.model import RetinaNetConfig, build_model
    from retinanet.runtime import precision_name, resolve_precision

    prepared: Prepared = config["prepared"]
    t = config["train"]
    out = Path(config["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus"])))
    seed = int(t["seed"])
    torch.manual_seed(seed)

    model_config = RetinaNetConfig(**prepared.model_config, backbone_weights=config.get("backbone_weights"))
    model = build_model(model_config)
    if config.get("init_checkpoint"):
        _load_init_weights(model, config["init_checkpoint"])
    device = ray.train.torch.get_device()
    params = [p for p in model.parameters() if p.requires_grad]
    if t["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    total, per_epoch = prepared.total_steps, prepared.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, t["warmup_steps"], t["schedule"], t["lr_steps"], t["lr_gamma"]))

    state = {"step": 0, "epoch": 0, "history": [], "best": None, "elapsed": 0.0, "sums": [0.0, 0.0, 0.0, 0],
             "stopped_early": False}
    start_dir = _resume_point(config)
    if start_dir is not None:
        restored = _restore(start_dir, model, optimizer, scheduler)
        state.update({k: restored[k] for k in state})
        by_rank = restored.get("sums_by_rank") or []
        if len(by_rank) == world:
            state["sums"] = list(by_rank[rank])
    # channels_last: oneDNN's fast convolution layout on CPU (and tensor cores' on GPU).
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1
    core = model.module if hasattr(model, "module") else model

    # The inference rule: bf16 on CUDA and on CPUs with bf16 matrix units, where a training
    # step measured 1.7x faster than fp32 (docs/training.md). Weights, optimizer and losses stay fp32.
    dtype = resolve_precision(t["precision"], device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    augment = _augment_config(t["augment"])
    mean, std = prepared.stats["mean"], prepared.stats["std"]
    chip = int(t["chip_size"])
    records = prepared.train_records
    shard = shard_indices(len(records), rank, world)
    per_worker = int(t["batch_size"]) // world
    cache = ChipCache(records, prepared.bands, chip, model_config.in_channels)
    val_pixels = None
    budget = t["time_budget_minutes"] * 60 if t["time_budget_minutes"] else None
    precision = precision_name(dtype)

    def all_reduce(values: list[float], op=None) -> list[float]:
        if world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather_sums() -> list[list[float]]:
        """Every rank's running loss sums (a checkpoint restores each rank's own)."""
        if world == 1:
            return [list(state["sums"])]
        mine = torch.tensor(state["sums"], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        return [p.tolist() for p in parts]

    def checkpoint_and_report(metrics: dict, final: bool = False) -> None:
        state_now = {**state, "sums_by_rank": gather_sums(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                metadata = {"job": config["job_name"], "step": state["step"], "epoch": state["epoch"],
                            "val": state["history"][-1] if state["history"] else None,
                            "band_stats": prepared.stats, "anchor_fit": prepared.anchor_fit}
                _save_checkpoint_dir(Path(tmp), core, prepared.class_names, metadata, state_now)
                write_atomically(out / "last.pt", lambda dest: shutil.copyfile(Path(tmp) / MODEL_FILE, dest))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": state["step"], "final": final}, checkpoint=checkpoint)

    def validate_and_record(lr: float) -> dict:
        nonlocal val_pixels
        sums = all_reduce(list(state["sums"]))
        count = max(sums[3], 1)
        row = {"epoch": state["epoch"], "step": state["step"], "loss": sums[0] / count,
               "cls_loss": sums[1] / count, "box_loss": sums[2] / count, "lr": lr, "val_AP": None, "val_AP50": None}
        if rank == 0:
            if prepared.val_records:
                if val_pixels is None:
                    from pipeline.trainset import read_records

                    val_pixels, _ = read_records(prepared.val_records, prepared.bands, chip,
                                                 model_config.in_channels)
                row.update(_validate(core, prepared, val_pixels, chip, device, precision))
            state["history"].append(row)
            if state["best"] is None or _score(row) > _score(state["best"]):
                state["best"] = row
                from retinanet.checkpoint import save_checkpoint

                save_checkpoint(out / "best.pt", core, prepared.class_names,
                                {"job": config["job_name"], "step": state["step"], "epoch": state["epoch"],
                                 "val": row, "band_stats": prepared.stats, "anchor_fit": prepared.anchor_fit})
            write_metrics_csv(state["history"], out / "metrics.csv")
            plot_metrics(state["history"], out / "metrics.png")
        state["sums"] = [0.0, 0.0, 0.0, 0]
        return row

    model.train()
    attempt_start = time.time() - state["elapsed"]
    while state["step"] < total:
        step = state["step"]
        epoch, within = divmod(step, per_epoch)
        state["epoch"] = epoch
        order = shard[epoch_order(len(shard), seed, epoch, rank)]
        picked = order[within * per_worker:(within + 1) * per_worker]
        images, targets = make_batch(cache, records, picked, augment, (seed, epoch, rank, step), mean, std)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        targets = [{k: v.to(device) for k, v in tg.items()} for tg in targets]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        if not torch.isfinite(loss):
            raise TrainingError(f"worker {rank}: loss is {loss.item()} at step {step} (epoch {epoch}); "
                                f"lower train.lr ({t['lr']}) or check the labels")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["step"] = step + 1
        state["sums"] = [state["sums"][0] + loss.item(), state["sums"][1] + losses["classification"].item(),
                         state["sums"][2] + losses["bbox_regression"].item(), state["sums"][3] + 1]
        state["elapsed"] = time.time() - attempt_start
        _maybe_crash(config.get("fault"), rank, state["step"])

        over_budget = budget is not None and state["elapsed"] >= budget
        if budget is not None:
            over_budget = all_reduce([1.0 if over_budget else 0.0], dist.ReduceOp.MAX if world > 1 else None)[0] > 0
        done = state["step"] >= total or over_budget
        epoch_end = state["step"] % per_epoch == 0 or done
        if over_budget and state["step"] < total:
            state["stopped_early"] = True
        if epoch_end:
            row = validate_and_record(lr)
            checkpoint_and_report({k: v for k, v in row.items() if v is not None}, final=done)
        elif state["step"] % int(t["checkpoint_every"]) == 0:
            checkpoint_and_report({"loss": loss.item(), "lr": lr})
        if done:
            break


__all__ = ["train", "train_loop", "check_trainable", "prepare", "fit_job_anchors", "lr_factor", "shard_indices",
           "epoch_order", "plan_steps", "write_metrics_csv", "plot_metrics", "TrainingError"]
