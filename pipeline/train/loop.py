"""The Ray Train worker: one training run on one worker (:func:`train_loop`).

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

Validation runs on rank 0 at every epoch end (and when training stops early) on the
validation chips: COCO AP and AP50 (:mod:`pipeline.eval.metrics`).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import numpy as np

from pipeline.errors import InputError, TrainingError
from pipeline.eval.metrics import coco_metrics
from pipeline.train.schedule import epoch_order, lr_factor, shard_indices
from retinanet.files import write_atomically

if TYPE_CHECKING:  # torch loads inside the worker only (the driver imports this module)
    import torch

    from retinanet.model import RetinaNet

MODEL_FILE = "model.pt"

STATE_FILE = "train_state.pt"

STEP_FILE = "step.json"

METRIC_COLUMNS = ("epoch", "step", "loss", "cls_loss", "box_loss", "lr", "val_AP", "val_AP50")

CACHE_LIMIT_BYTES = 2 << 30  # chips a worker keeps in memory; beyond it they are re-read


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


class ChipCache:
    """Pixels of a worker's chips, read on first use and kept up to a byte budget."""

    def __init__(self, records: Sequence, bands, chip_size: int, channels: int, limit: int = CACHE_LIMIT_BYTES):
        self.records, self.bands, self.chip_size, self.channels = records, bands, chip_size, channels
        self.limit = limit
        self._store: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bytes = 0

    def get(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pixels (C, S, S) float32, valid (S, S) bool)] of the given record indices."""
        from pipeline.eval.labelled import read_records

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

    from pipeline.train.augment import random_augment

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
    from pipeline.train.augment import AugmentConfig

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
    from pipeline.eval.labelled import predict_records, records_truth

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


def checkpoint_step(directory: str | os.PathLike) -> Optional[int]:
    """The training step a checkpoint directory holds, or None for a partial or foreign one."""
    try:
        return json.loads((Path(directory) / STEP_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


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
        step = checkpoint_step(path)
        if step is not None and step > best_step:
            best, best_step = path, step
    return best


class WorkerRun:
    """One worker's training run: its model, optimiser, schedule and data shard, and the
    state a checkpoint carries (step, epoch, history, best, running loss sums).

    :func:`train_loop` drives it through named steps; rank 0 also validates and writes
    best.pt, last.pt, metrics.csv and metrics.png.
    """

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch
        import torch

        from retinanet.config import RetinaNetConfig
        from retinanet.model import build_model
        from retinanet.runtime import precision_name, resolve_precision

        self.config = config
        self.prepared: Prepared = config["prepared"]
        self.t = t = config["train"]
        self.out = Path(config["output_dir"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(config["cpus"])))
        self.seed = int(t["seed"])
        torch.manual_seed(self.seed)

        self.model_config = RetinaNetConfig(**self.prepared.model_config,
                                            backbone_weights=config.get("backbone_weights"))
        self.model: torch.nn.Module = build_model(self.model_config)
        if config.get("init_checkpoint"):
            _load_init_weights(self.model, config["init_checkpoint"])
        self.device = ray.train.torch.get_device()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer
        if t["optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"],
                                             weight_decay=t["weight_decay"])
        else:
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        self.total, self.per_epoch = self.prepared.total_steps, self.prepared.steps_per_epoch
        total = self.total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, total, t["warmup_steps"], t["schedule"], t["lr_steps"], t["lr_gamma"]))
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "history": [], "best": None, "elapsed": 0.0,
                                      "sums": [0.0, 0.0, 0.0, 0], "stopped_early": False}

        # The inference rule: bf16 on CUDA and on CPUs with bf16 matrix units, where a training
        # step measured 1.7x faster than fp32 (docs/training.md). Weights, optimizer and losses stay fp32.
        self.dtype = resolve_precision(t["precision"], self.device)
        self.scaler = (torch.amp.GradScaler("cuda")
                       if self.dtype == torch.float16 and self.device.type == "cuda" else None)
        self.precision = precision_name(self.dtype)
        self.augment = _augment_config(t["augment"])
        self.chip = int(t["chip_size"])
        self.shard = shard_indices(len(self.prepared.train_records), self.rank, self.world)
        self.per_worker = int(t["batch_size"]) // self.world
        self.cache = ChipCache(self.prepared.train_records, self.prepared.bands, self.chip,
                               self.model_config.in_channels)
        self.val_pixels: Optional[np.ndarray] = None
        self.budget = t["time_budget_minutes"] * 60 if t["time_budget_minutes"] else None

    def resume(self) -> None:
        """Continue from Ray's restored checkpoint or --resume's, whichever is further on."""
        start_dir = _resume_point(self.config)
        if start_dir is None:
            return
        restored = _restore(start_dir, self.model, self.optimizer, self.scheduler)
        self.state.update({k: restored[k] for k in self.state})
        by_rank = restored.get("sums_by_rank") or []
        if len(by_rank) == self.world:
            self.state["sums"] = list(by_rank[self.rank])

    def place_model(self) -> None:
        """channels_last (oneDNN's fast convolution layout on CPU, tensor cores' on GPU), the
        device, and DDP when there is more than one worker."""
        import ray.train.torch
        import torch

        self.model = ray.train.torch.prepare_model(self.model.to(memory_format=torch.channels_last))
        # DDP wraps the model; checkpoints hold the plain RetinaNet.
        self.core = cast("RetinaNet", getattr(self.model, "module", self.model))

    def next_batch(self):
        """The images and targets of the current step: a pure function of (seed, step, rank)."""
        import torch

        step = self.state["step"]
        epoch, within = divmod(step, self.per_epoch)
        self.state["epoch"] = epoch
        order = self.shard[epoch_order(len(self.shard), self.seed, epoch, self.rank)]
        picked = order[within * self.per_worker:(within + 1) * self.per_worker]
        mean, std = self.prepared.stats["mean"], self.prepared.stats["std"]
        images, targets = make_batch(self.cache, self.prepared.train_records, picked, self.augment,
                                     (self.seed, epoch, self.rank, step), mean, std)
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        return images, [{k: v.to(self.device) for k, v in tg.items()} for tg in targets]

    def train_step(self) -> tuple[float, float]:
        """One optimiser step on the current batch -> (loss, the learning rate it used)."""
        import torch

        step = self.state["step"]
        images, targets = self.next_batch()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            losses = self.model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        if not torch.isfinite(loss):
            raise TrainingError(f"worker {self.rank}: loss is {loss.item()} at step {step} "
                                f"(epoch {self.state['epoch']}); lower train.lr ({self.t['lr']}) or check the labels")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        sums = self.state["sums"]
        self.state["step"] = step + 1
        self.state["sums"] = [sums[0] + loss.item(), sums[1] + losses["classification"].item(),
                              sums[2] + losses["bbox_regression"].item(), sums[3] + 1]
        return loss.item(), lr

    def over_budget(self) -> bool:
        """train.time_budget_minutes spent, on any worker (all stop at the same step)."""
        if self.budget is None:
            return False
        import torch.distributed as dist

        mine = 1.0 if self.state["elapsed"] >= self.budget else 0.0
        return self.all_reduce([mine], dist.ReduceOp.MAX if self.world > 1 else None)[0] > 0

    def end_step(self, loss: float, lr: float) -> bool:
        """Validate and checkpoint where the schedule says so -> True when training is done."""
        over_budget = self.over_budget()
        done = self.state["step"] >= self.total or over_budget
        if over_budget and self.state["step"] < self.total:
            self.state["stopped_early"] = True
        if self.state["step"] % self.per_epoch == 0 or done:
            row = self.validate_and_record(lr)
            self.checkpoint_and_report({k: v for k, v in row.items() if v is not None}, final=done)
        elif self.state["step"] % int(self.t["checkpoint_every"]) == 0:
            self.checkpoint_and_report({"loss": loss, "lr": lr})
        return done

    def all_reduce(self, values: list[float], op=None) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather_sums(self) -> list[list[float]]:
        """Every rank's running loss sums (a checkpoint restores each rank's own)."""
        if self.world == 1:
            return [list(self.state["sums"])]
        import torch
        import torch.distributed as dist

        mine = torch.tensor(self.state["sums"], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return [p.tolist() for p in parts]

    def metadata(self, val: Optional[dict]) -> dict:
        """What a checkpoint written here says about its training."""
        return {"job": self.config["job_name"], "step": self.state["step"], "epoch": self.state["epoch"],
                "val": val, "band_stats": self.prepared.stats, "anchor_fit": self.prepared.anchor_fit}

    def checkpoint_and_report(self, metrics: dict, final: bool = False) -> None:
        import ray.train

        state_now = {**self.state, "sums_by_rank": self.gather_sums(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                history = self.state["history"]
                _save_checkpoint_dir(Path(tmp), self.core, self.prepared.class_names,
                                     self.metadata(history[-1] if history else None), state_now)
                write_atomically(self.out / "last.pt", lambda dest: shutil.copyfile(Path(tmp) / MODEL_FILE, dest))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": self.state["step"], "final": final}, checkpoint=checkpoint)

    def validate_and_record(self, lr: float) -> dict:
        """The epoch's mean losses (all workers) and, on rank 0, validation AP, best.pt and
        the metrics files -> the metrics row."""
        from pipeline.eval.labelled import read_records
        from retinanet.checkpoint import save_checkpoint

        sums = self.all_reduce(list(self.state["sums"]))
        count = max(sums[3], 1)
        row = {"epoch": self.state["epoch"], "step": self.state["step"], "loss": sums[0] / count,
               "cls_loss": sums[1] / count, "box_loss": sums[2] / count, "lr": lr, "val_AP": None, "val_AP50": None}
        if self.rank == 0:
            prepared = self.prepared
            if prepared.val_records:
                if self.val_pixels is None:
                    self.val_pixels, _ = read_records(prepared.val_records, prepared.bands, self.chip,
                                                      self.model_config.in_channels)
                row.update(_validate(self.core, prepared, self.val_pixels, self.chip, self.device, self.precision))
            self.state["history"].append(row)
            if self.state["best"] is None or _score(row) > _score(self.state["best"]):
                self.state["best"] = row
                save_checkpoint(self.out / "best.pt", self.core, prepared.class_names, self.metadata(row))
            write_metrics_csv(self.state["history"], self.out / "metrics.csv")
            plot_metrics(self.state["history"], self.out / "metrics.png")
        self.state["sums"] = [0.0, 0.0, 0.0, 0]
        return row


def train_loop(config: dict) -> None:
    """The Ray Train worker function: every worker runs it (see :class:`WorkerRun`)."""
    run = WorkerRun(config)
    run.resume()
    run.place_model()
    run.model.train()
    attempt_start = time.time() - run.state["elapsed"]
    while run.state["step"] < run.total:
        loss, lr = run.train_step()
        run.state["elapsed"] = time.time() - attempt_start
        _maybe_crash(config.get("fault"), run.rank, run.state["step"])
        if run.end_step(loss, lr):
            break
