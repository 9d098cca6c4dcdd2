"""The driver's side of a run's chip stream: scenes in flight, their commits, the run report.

Rows come back from the predictors in any order (:func:`pipeline.run.graph.run_job`). A
scene's first row carries its plan; the scene is committed once its plan and every one of
its chips have come back, and then forgotten, so the driver holds scenes in flight only.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline.chips.planning import ScenePlan
from pipeline.chips.stream import SCENE_EMPTY, SCENE_FAILED
from pipeline.chips.tiling import chip_id
from pipeline.config.spec import JobSpec
from pipeline.config.stac_filters import parse_instant
from pipeline.errors import InputError, PipelineError
from pipeline.infer.finalize import empty_scene_rows, finalize_scene, scene_acquired_at
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.state import scene_status
from pipeline.table.store import open_store

# The run report's key holding the newest item time (ISO 8601, UTC) a run selected from STAC.
REPORT_KEY = "stac_newest_datetime"


@dataclass
class RunReport:
    """What a run did, written to ``_reports/<run_id>.json`` and returned by ``run_job``."""

    run_id: str
    job_name: str
    job_hash: str
    model_id: str
    stac_newest_datetime: Optional[str]  # REPORT_KEY: where the next STAC run starts (stac_since)
    stac_skipped: list[dict]
    inputs_unmatched: list[str]
    warnings: list[str]
    scenes_skipped_done: list[str]
    int8: Optional[dict] = None  # the INT8 gate's figures (pipeline.eval.int8_gate), when it ran
    score_threshold: Optional[float] = None  # model.score_threshold: the rows' lowest possible score
    started_at: str = ""  # when run_job began: ISO 8601, UTC, to the millisecond
    scenes_ok: list[str] = field(default_factory=list)
    scenes_partial: list[dict] = field(default_factory=list)  # scene_id, path, chips_missing, chips_predicted
    scenes_failed: list[dict] = field(default_factory=list)  # scene_id, path, reason
    chips_read: int = 0
    chips_skipped_empty: int = 0
    chips_quarantined: list[dict] = field(default_factory=list)  # chip_id, status, reason
    detections: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # predictor -> chips
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> Ray node id -> scenes/chips
    wall_seconds: float = 0.0
    startup_seconds: Optional[float] = None  # until the first predictions reached the driver
    chips_per_second: float = 0.0
    # Seconds spent per stage (read, transfer, forward, postprocess, merge_commit), the
    # workers doing it and how busy their pool was; the bottleneck stage (see stage_figures).
    stages: dict[str, dict] = field(default_factory=dict)
    bottleneck: Optional[str] = None
    exit_code: int = 0  # 1 while any scene is not complete
    report_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def last_success_datetime(table_root: os.PathLike | str, job_name: str) -> Optional[dt.datetime]:
    """Newest item time recorded by a successful run of ``job_name`` into this table.

    Reads ``_reports/*.json``; a report counts when ``exit_code == 0``, its ``job_name``
    matches and :data:`REPORT_KEY` is set. None when there is no such report (then the
    whole configured range is taken). Raises InputError for an unreadable report.
    """
    store = open_store(table_root)
    best: Optional[dt.datetime] = None
    for entry in store.list("_reports"):
        path = f"{store.url}/{entry.key}"
        if not entry.key.endswith(".json") or entry.key.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            report = json.loads(store.read(entry.key))
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: unreadable run report: {err}") from None
        if report.get("exit_code") != 0 or report.get("job_name") != job_name or not report.get(REPORT_KEY):
            continue
        try:
            when = parse_instant(str(report[REPORT_KEY]))
        except ValueError as err:
            raise InputError(f"{path}: {REPORT_KEY}: {err}") from None
        best = when if best is None or when > best else best
    return best


def stac_since(spec: JobSpec) -> Optional[dt.datetime]:
    """Where a job's STAC selection starts (pipeline.io.inputs.job_inputs' ``since``): with
    ``inputs.stac.since_last_success``, the newest item time of its last successful run
    into ``output.table``; otherwise None (the whole configured range)."""
    stac = spec.inputs.stac
    return last_success_datetime(spec.output.table, spec.name) if stac is not None and stac.since_last_success else None


# Each stage of a run and the pool of workers that does it: read tasks, predictor actors
# (copy to the device, the model, copy back and encoding), the driver (seam merge, commit).
STAGE_POOLS = {"read": "read", "transfer": "predict", "forward": "predict", "postprocess": "predict",
               "merge_commit": "driver"}


def stage_figures(seconds: dict[str, float], workers: dict[str, int], wall: float
                  ) -> tuple[dict[str, dict], Optional[str]]:
    """Per stage: its seconds, its pool's workers and how busy that pool was over `wall`
    (the pool's seconds / (workers x wall)) -> (figures, bottleneck).

    The bottleneck is the largest stage of the busiest pool: the others waited on it. A
    pool's own stages share its workers, so they are compared within it, and pools are
    compared by how busy they were, not by raw seconds (14 read tasks spend more seconds
    than one actor that is never idle). None when nothing was timed. Example: read 36 s on
    4 tasks, forward 3 s + transfer 1 s + postprocess 1 s on 1 actor, merge/commit 1 s, over
    10 s: read 0.9 busy, predictor 0.5, driver 0.1 -> bottleneck read.
    """
    pool_seconds: dict[str, float] = {}
    for stage, spent in seconds.items():
        pool_seconds[STAGE_POOLS[stage]] = pool_seconds.get(STAGE_POOLS[stage], 0.0) + spent

    def busy(pool: str) -> float:
        return pool_seconds[pool] / (max(workers[pool], 1) * wall) if wall > 0 else 0.0

    figures = {stage: {"seconds": round(spent, 3), "workers": workers[STAGE_POOLS[stage]],
                       "pool_busy": round(busy(STAGE_POOLS[stage]), 3)} for stage, spent in seconds.items()}
    if not any(spent > 0 for spent in seconds.values()):
        return figures, None
    busiest = max(pool_seconds, key=busy)
    return figures, max((s for s in seconds if STAGE_POOLS[s] == busiest), key=lambda s: seconds[s])


class SceneBook:
    """Scenes in flight and what came back for them; commits each scene when it is whole.

    acquired: scene id -> acquisition time its STAC item gave (``SceneInput.acquired_at``);
    other scenes take their raster's tag (:func:`pipeline.infer.finalize.scene_acquired_at`).
    """

    def __init__(self, spec: JobSpec, run: RunInfo, keys: dict[str, Any],
                 committed: dict[tuple[str, str], dict], class_names: list[str], report: RunReport,
                 log: Callable[[str], None], acquired: Optional[dict[str, dt.datetime]] = None):
        self.spec, self.run, self.keys, self.committed_before = spec, run, keys, committed
        self.acquired = acquired or {}
        self.class_names, self.report, self.log = class_names, report, log
        self.plans: dict[str, ScenePlan] = {}  # planned, not yet committed
        self.received: dict[str, int] = defaultdict(int)  # chips back per scene
        self.chips: dict[str, list] = defaultdict(list)  # (chip id, encoded detections) per scene
        self.missing: dict[str, list] = defaultdict(list)  # chips that will not come: chip_id, status, reason
        self.settled: set[str] = set()  # scenes committed (or recorded failed) this run, ids only
        self.workers: dict[str, int] = defaultdict(int)
        self.done_chips = 0
        self.chips_planned = 0
        self.stage_seconds = dict.fromkeys(STAGE_POOLS, 0.0)  # summed from the rows (see stage_figures)

    def count(self, stage: str, node: str) -> None:
        counts = self.report.nodes.setdefault(stage, {})
        counts[node] = counts.get(node, 0) + 1

    def record_failure(self, failure: dict) -> None:
        """A scene with nothing to show: reported, and committed as failed so that
        `pipeline query`'s scenes view says so and the next run tries it again. Not when
        the table holds complete rows of the same content (or the content could not even
        be identified): a transient error (a throttled request) must not wipe good rows."""
        self.report.scenes_failed.append(failure)
        previous = self.committed_before.get((self.spec.name, failure["scene_id"]))
        key = self.keys.get(failure["scene_id"])
        if previous and scene_status(previous) == "complete" and (key is None or previous["scene_key"] == key):
            failure["reason"] += "; the rows committed earlier are kept"
            return
        run = self.run
        try:
            empty = empty_scene_rows(self.spec.name, failure["scene_id"], failure["path"], self.class_names,
                                     run.run_id, run.model_id, run.job_hash)
            commit_scene(self.spec.output.table, run, failure["scene_id"], key, empty,
                         scene_path=failure["path"], status="failed", reason=failure["reason"])
        except PipelineError as err:
            self.log(f"warning: scene {failure['scene_id']}: could not record its failure: {err}")

    def commit(self, scene_id: str) -> None:
        """Merge, georeference and commit one scene whose chips have all come back."""
        started = time.perf_counter()
        try:
            self._commit(scene_id)
        finally:
            self.stage_seconds["merge_commit"] += time.perf_counter() - started

    def _commit(self, scene_id: str) -> None:
        plan = self.plans.pop(scene_id)
        self.received.pop(scene_id, None)
        self.settled.add(scene_id)
        missing = self.missing.pop(scene_id, [])
        chips = self.chips.pop(scene_id, [])
        if missing and not chips:
            reasons = sorted({m["reason"] for m in missing})
            self.record_failure({"scene_id": scene_id, "path": plan.path,
                                 "reason": f"no chip of {len(missing)} was predicted: " + "; ".join(reasons)[:2000]})
            return
        run = self.run
        acquired_at, warning = scene_acquired_at(self.acquired.get(scene_id), plan.info)
        if warning:
            self.report.warnings.append(warning)
            self.log(f"warning: {warning}")
        try:
            rows = finalize_scene(self.spec, plan, chips, self.class_names, run.run_id, run.model_id, run.job_hash,
                                  acquired_at=acquired_at)
            commit_scene(self.spec.output.table, run, scene_id, self.keys[scene_id], rows,
                         scene_path=plan.path, status="partial" if missing else "complete",
                         missing_chips=missing)
        except PipelineError as err:
            self.report.scenes_failed.append({"scene_id": scene_id, "path": plan.path, "reason": str(err)})
            return
        if missing:
            self.report.scenes_partial.append({"scene_id": scene_id, "path": plan.path,
                                               "chips_missing": len(missing), "chips_predicted": len(chips)})
        else:
            self.report.scenes_ok.append(scene_id)
        self.report.detections += rows.num_rows

    def arrived(self, outcome: ScenePlan | dict, node: str) -> None:
        """A scene's plan (or planning failure) came down the stream."""
        self.count("plan", node)
        if isinstance(outcome, dict):
            self.settled.add(outcome["scene_id"])
            self.record_failure(outcome)
            return
        self.plans[outcome.scene_id] = outcome
        self.chips_planned += len(outcome.windows)
        self.report.chips_skipped_empty += outcome.skipped_empty
        for warning in outcome.warnings:
            self.report.warnings.append(warning)
            self.log(f"warning: {warning}")

    def settle(self, scene_id: str) -> None:
        """Commit the scene once its plan and every one of its chips have come back."""
        plan = self.plans.get(scene_id)
        if plan is not None and self.received[scene_id] == len(plan.windows):
            self.commit(scene_id)

    def take(self, batch: dict, i: int) -> None:
        """One row of the stream: a scene's plan (on its first row), a chip's outcome."""
        scene_id, status = str(batch["scene_id"][i]), str(batch["status"][i])
        for stage in ("read", "transfer", "forward", "postprocess"):  # each row its share of its batch
            if f"{stage}_seconds" in batch:
                self.stage_seconds[stage] += float(batch[f"{stage}_seconds"][i])
        if batch["plan"][i]:
            self.arrived(pickle.loads(batch["plan"][i]), str(batch["planned_on"][i]))
        if status == SCENE_FAILED:
            return
        if status != SCENE_EMPTY:
            self.done_chips += 1
            self.received[scene_id] += 1
            self.workers[str(batch["worker"][i])] += 1
            self.count("read", str(batch["read_on"][i]))
            self.count("predict", str(batch["predicted_on"][i]))
            if status == "ok":
                self.report.chips_read += 1
                self.chips[scene_id].append((str(batch["chip_id"][i]), batch["detections"][i]))
            else:
                lost = {"chip_id": str(batch["chip_id"][i]), "status": status, "reason": str(batch["error"][i])}
                self.report.chips_quarantined.append(lost)
                self.missing[scene_id].append(lost)
        self.settle(scene_id)

    def close(self, todo_scenes: list) -> None:
        """After the stream: what never came back is committed partial or recorded failed
        (never expected while failed blocks raise), so nothing is lost silently."""
        for scene_id in list(self.plans):
            plan = self.plans[scene_id]
            returned = {c for c, _ in self.chips[scene_id]} | {m["chip_id"] for m in self.missing[scene_id]}
            self.missing[scene_id] += [{"chip_id": chip_id(scene_id, w.row, w.col), "status": "lost",
                                        "reason": "the chip never came back from the stream"}
                                       for w in plan.windows if chip_id(scene_id, w.row, w.col) not in returned]
            self.commit(scene_id)
        for scene in todo_scenes:
            if scene.scene_id not in self.settled:
                self.record_failure({"scene_id": scene.scene_id, "path": scene.location,
                                     "reason": "its plan never came back from the stream"})
