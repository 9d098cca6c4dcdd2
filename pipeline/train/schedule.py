"""Training schedule math: the learning-rate curve, worker shards, epoch orders, step counts.

Pure functions of their arguments, so a restored run replays exactly the steps an unbroken
run would have taken (see :mod:`pipeline.train.loop`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline.config.spec import TrainSpec
from pipeline.errors import ConfigError

WARMUP_FACTOR = 0.001  # LR at step 0 of the linear warm-up, as a fraction of train.lr


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
