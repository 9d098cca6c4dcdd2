"""`pipeline run`: the streaming Ray Data graph from scenes to committed GeoParquet rows.

    driver: expand inputs -> skip committed scenes -> plan the first PLAN_BATCH scenes (while Ray starts)
    Ray Data: the other scenes -> plan tasks (header + mask/overview, across the cluster)
              -> chip rows (the first planned scenes' rows ahead of them)
              -> read windows (CPU tasks, bounded retries)
              -> ChipPredictor actor pool (GPU-pinned, bounded restarts)
    driver: collect detections per scene -> seam merge -> georeference -> commit the scene

Each scene's plan travels down the stream with its first chip, so the driver holds the
plans and detections of scenes in flight, never the job's chip list, and never pixels.
Scenes are committed one by one as their last chip arrives, so an interrupted run keeps
what it finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.chips.planning import (
    PLAN_BATCH,
    PLAN_THREADS,
    ModelFacts,
    ScenePlan,
    model_facts,
    plan_scenes,
    scene_problems,
)
from pipeline.chips.stream import plan_scene_batch, read_chip_batch, scene_rows
from pipeline.compute.cluster import connect_ray
from pipeline.compute.console import console_line, eta_text, native_log_lines_hidden
from pipeline.config.spec import JobSpec, check_runnable, job_hash
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.int8_gate import int8_allowed, measure_int8
from pipeline.infer.int8 import graph_for_actors
from pipeline.infer.ledger import ChipLedger
from pipeline.infer.predictor import (
    ChipPredictor,
    convert_ahead,
    local_cpu_openvino,
    resolve_batch_size,
)
from pipeline.io.inputs import InputSet, SceneInput, job_inputs, require_scenes, scene_key
from pipeline.io.objstore import cache_dir
from pipeline.io.raster import read_scene_info
from pipeline.io.stac import StacSelection
from pipeline.run.runbook import RunReport, SceneBook, stac_since, stage_figures
from pipeline.table.commit import RunInfo, new_run_id
from pipeline.table.maintenance import recover, write_run_report
from pipeline.table.state import committed_scenes, is_current
from pipeline.table.store import open_store

# Chips per read task and predictor call when the model takes fewer (see transport_batch).
MIN_READ_BATCH = 8
# Blocks of the first scenes' chip rows at most (see head_blocks).
MAX_HEAD_BLOCKS = 1000


@dataclass
class Preflight:
    """What `pipeline validate` checks and `pipeline run` starts from."""

    inputs: InputSet
    stac: Optional[StacSelection]  # the STAC selection (newest item time, skipped items), or None
    model: ModelFacts
    warnings: list[str]


def preflight(spec: JobSpec, check_scenes: bool = True) -> Preflight:
    """Everything a run needs, checked before anything runs; raises one ConfigError
    listing every problem.

    Job level (always): the job's files (:func:`pipeline.config.spec.check_runnable`), the
    checkpoint is readable and is a checkpoint, the inputs expand to at least one scene
    and no two scenes share an id. Scene level (``check_scenes``, what validate adds):
    each scene's header against the model and the table (:func:`scene_problems`).
    `pipeline run` skips the scene level: there a bad scene fails alone, the others run.
    Patterns that match nothing are warnings (a nightly folder may be empty tonight).
    """
    source = spec.source or "job"
    check_runnable(spec)
    model = model_facts(spec.model.checkpoint)
    inputs, stac = job_inputs(spec, stac_since(spec))
    field_name = "inputs.stac" if spec.inputs.stac else "inputs.paths"
    require_scenes(inputs, field_name, source)
    warnings_ = [f"{source}: {field_name}: {p!r} matched nothing" for p in inputs.unmatched]
    if check_scenes:
        def check(scene: SceneInput) -> tuple[list[str], list[str]]:
            try:
                info = read_scene_info(scene.location, scene_id=scene.scene_id)
            except PipelineError as err:
                return [str(err)], []
            return scene_problems(info, spec.inputs.bands, model, spec.output.crs)

        errors = []
        with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on I/O (remote: round trips)
            for errs, warns in pool.map(check, inputs.scenes):
                errors += errs
                warnings_ += warns
        if errors:
            raise ConfigError("\n".join(f"{source}: scene {e}" for e in errors))
    return Preflight(inputs, stac, model, warnings_)


def actor_gpus(requested: float, cluster_gpus: float, local: bool, log) -> float:
    """GPUs per actor to ask Ray for: a local Ray without GPUs falls back to CPU actors."""
    if requested > 0 and cluster_gpus == 0:
        if local:
            log("no GPU in the local Ray: predictor actors run on CPU (compute.gpus_per_actor ignored)")
            return 0.0
        log(f"warning: the cluster reports no GPUs; actors asking for {requested} GPU wait for the autoscaler")
    return requested


def default_read_tasks(actors: int, cpus_per_actor: float, cluster_cpus: float) -> int:
    """Chip-reading tasks in flight when compute.read_concurrency is null.

    Every CPU the predictor actors leave free, and at least one per actor. A GPU actor
    consumes chips far faster than one task decodes them (10-30 ms per 512-px chip here),
    so on a GPU node the spare cores must all read. On a node whose CPUs all went to CPU
    actors, one read per actor keeps up (a run of 8 chips reads in ~0.2 s and predicts in
    ~1 s), and every further read task is one more process competing for the same cores:
    on 2 cores, 4 reads instead of 2 cost 1.6 s of start-up and 27 % of the chips/s
    (BENCHMARKS.md). Examples: 1 actor x 1 CPU on 16 CPUs -> 15; 2 actors x 1 CPU on 2 CPUs -> 2.
    """
    return max(actors, int(cluster_cpus - actors * cpus_per_actor))


def progress_line(chips_done: int, chips_total: int, scenes_done: int, scenes_total: int,
                  seconds_predicting: float, estimated: bool = False) -> str:
    """One progress line: the rate since the first predictions arrived (start-up excluded,
    so it says what the rest of the run will do) and the time left at that rate.
    Example: (120, 400, 3, 10, 60.0) -> '  120/400 chips, 3/10 scenes committed, 2.0 chips/s, ETA 2m20s'."""
    rate = chips_done / seconds_predicting if seconds_predicting > 0 else 0.0
    total = f"~{chips_total}" if estimated else str(chips_total)  # "~": later scenes not yet planned
    return (f"  {chips_done}/{total} chips, {scenes_done}/{scenes_total} scenes committed, {rate:.1f} chips/s, "
            f"{eta_text(chips_total - chips_done, rate)}")


def transport_batch(batch_size: int, n_chips: int, actors: int, parallel_passes: int = 1) -> int:
    """Chips per read task and per predictor call: runs of up to MIN_READ_BATCH (or one
    forward pass for each of `parallel_passes`, the most an actor runs at once: a CPU actor's
    OpenVINO streams are at most its CPUs) as long as every actor still gets about four
    calls' worth of work, rounded up to whole rounds of `parallel_passes` passes of
    `batch_size` chips (a run of 7 on two streams would end with one stream idle).

    Examples: (1, 10000, 2) -> 8; (64, 10000, 2) -> 64; (1, 18, 2) -> 3; (4, 18, 2) -> 4;
    (1, 10000, 1, 16) -> 16; (1, 25, 1, 2) -> 8 (not 7).
    """
    spread = -(-n_chips // (4 * actors))  # ceil
    one_round = parallel_passes * batch_size
    run = min(max(MIN_READ_BATCH, one_round), spread)
    return max(1, -(-run // one_round)) * one_round


def head_blocks(n_rows: int, run: int, max_blocks: int = MAX_HEAD_BLOCKS) -> list[tuple[int, int]]:
    """(start, stop) of each block of the first scenes' chip rows (planned on the driver):
    whole runs of `run` chips (one read and one predictor call each), as few runs a block as
    keep the blocks to `max_blocks`, the last block also taking a remainder shorter than a
    run. Ray Data reads and predicts a block in batches of `run`: a block of 9 rows went as a
    run of 8 and a run of 1, and a block shorter than a run waits for rows of the scenes
    planned later to fill its batch. Examples: (50, 8) -> five blocks of 8 and (40, 50);
    (20000, 8) -> blocks of 24; (5, 8) -> [(0, 5)]."""
    runs = -(-n_rows // run)  # ceil
    size = run * max(1, -(-runs // max_blocks))
    starts = list(range(0, n_rows, size))
    if len(starts) > 1 and n_rows - starts[-1] < run:
        starts.pop()  # the short remainder joins the block before it
    return [(start, stop) for start, stop in zip(starts, starts[1:] + [n_rows])]


def in_flight_bytes(prefetch_batches: int, actors: int, batch_size: int, channels: int, chip_size: int,
                    itemsize: int) -> int:
    """Object-store budget for chips in flight: `prefetch_batches` batches per actor.

    A chip costs its pixels plus its bit-packed valid mask. Example: 4 batches x 1 actor x
    4 chips of 3 x 512 x 512 uint8 -> 16 x (786432 + 32768) = 13,107,200 bytes.
    """
    chip_bytes = channels * chip_size * chip_size * itemsize + chip_size * ((chip_size + 7) // 8)
    return prefetch_batches * actors * batch_size * chip_bytes


def scene_keys(scenes: list[SceneInput]) -> tuple[dict[str, dict], list[dict]]:
    """Each scene's content identity (:func:`pipeline.io.inputs.scene_key`), PLAN_THREADS at a
    time (remote scenes: one HEAD request each) -> ({scene id: key}, failures)."""
    def attempt(scene: SceneInput) -> tuple[Optional[dict], Optional[dict]]:
        try:
            return scene_key(scene.location), None
        except PipelineError as err:
            return None, {"scene_id": scene.scene_id, "path": scene.location, "reason": str(err)}

    with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
        outcomes = list(pool.map(attempt, scenes))
    keys = {s.scene_id: key for s, (key, _) in zip(scenes, outcomes) if key is not None}
    return keys, [failure for _, failure in outcomes if failure is not None]


def estimated_chips(head_chips: int, head_scenes: int, scenes: int) -> int:
    """The job's chip count guessed from the scenes planned first (for batch sizes and the
    ETA while later scenes are still being planned). Example: (30, 3, 10) -> 100."""
    return round(head_chips / head_scenes * scenes) if head_scenes else 0


@dataclass
class RunStart:
    """What a run knows before its first chip is read (:func:`open_run`)."""

    pre: Preflight
    keys: dict[str, dict]  # scene id -> content key, for the scenes that could be identified
    failed: list[dict]  # scenes that could not be identified: id, path, reason
    committed: dict[tuple[str, str], dict]  # the table's current scene manifests
    done: set[str]  # scenes committed complete with this content, model and job (skipped)
    todo: list[SceneInput]
    head: list  # outcomes of planning todo[:PLAN_BATCH] (ScenePlan or failure dict)


def open_run(spec: JobSpec, jhash: str, force: bool, log) -> RunStart:
    """Preflight, the scenes' content keys, the table's state (finishing commits an earlier
    run published but did not move), what is left to do, and the plans of its first scenes."""
    pre = preflight(spec, check_scenes=False)
    for warning in pre.warnings:
        log(f"warning: {warning}")
    keys, failed = scene_keys(pre.inputs.scenes)
    if open_store(spec.output.table).exists():
        recovered = recover(spec.output.table)
        if recovered["moved"] or recovered["removed"]:
            log(f"recovered interrupted commits: {len(recovered['moved'])} files moved into place, "
                f"{len(recovered['removed'])} superseded files removed")
    committed = committed_scenes(spec.output.table)
    current = {} if force else committed
    done = {s.scene_id for s in pre.inputs.scenes if s.scene_id in keys and is_current(
        current.get((spec.name, s.scene_id)), keys[s.scene_id], pre.model.model_id, jhash)}
    todo = [s for s in pre.inputs.scenes if s.scene_id in keys and s.scene_id not in done]
    head = plan_scenes(spec, todo[:PLAN_BATCH], pre.model) if todo else []
    if todo:
        import ray.data  # noqa: F401  (half a second of imports, while Ray is still starting)
    return RunStart(pre, keys, failed, committed, done, todo, head)


def start_run(spec: JobSpec, jhash: str, force: bool, verbose: bool, log) -> RunStart:
    """Ray starting (seconds: its daemons, a raylet registering) beside :func:`open_run`
    (seconds too: torch's imports, listing inputs and table, planning the first scenes).
    Ray starts even when every scene turns out done: the two run side by side."""
    if local_cpu_openvino(spec.model, spec.compute):
        # A checkpoint's first run on this node: its graph converts while Ray starts (mostly
        # waiting) rather than after the actor has started. Daemon: a run that stops early
        # does not wait for it (the child still finishes and caches the graph).
        threading.Thread(target=convert_ahead, args=(spec.model.checkpoint, spec.tiling.chip_size), daemon=True,
                         name="openvino-convert-ahead").start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(open_run, spec, jhash, force, log)
        connect_ray(spec.compute.address, quiet=not verbose, log=log)
        return opening.result()


def int8_gate(spec: JobSpec, start: RunStart, log) -> dict:
    """Quantise, measure AP50 against f32 and refuse or warn (pipeline.eval.int8_gate), before
    any chip is read (a refusal stops the run here) -> {"report": for the run report, "graph":
    the verdict's graph, handed down to the actors}."""
    measured, graph, geometry = measure_int8(spec, start.pre.model, start.pre.inputs.scenes, cache_dir() / "openvino",
                                             log)
    running, message = int8_allowed(measured, spec.model.int8_max_ap50_drop, spec.model.int8_on_drop)
    log(message + (" (measured earlier, cached)" if measured.cached else ""))
    return {"report": measured.report(spec.model.int8_max_ap50_drop, spec.model.int8_on_drop, running),
            "graph": graph_for_actors(measured.key, graph, geometry)}


def job_graph(spec: JobSpec, start: RunStart, int8: Optional[dict], ledger: ChipLedger, faults, log):
    """The Ray Data graph of a run: the first scenes' chip rows (planned on the driver) and
    the other scenes planned by Ray tasks -> read tasks -> the predictor actor pool.
    Returns the stream of predicted batches (nothing runs until it is iterated) and the
    read tasks in flight (the run report's read workers)."""
    import ray
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    model, todo = start.pre.model, start.todo
    node = ray.get_runtime_context().get_node_id()
    head_rows = [row for outcome in start.head for row in scene_rows(outcome, node)]
    tail = todo[PLAN_BATCH:]
    cluster = ray.cluster_resources()
    gpus = actor_gpus(spec.compute.gpus_per_actor, cluster.get("GPU", 0), spec.compute.address is None, log)
    if int8 and gpus > 0:
        raise ConfigError(f"{spec.source or 'job'}: model.precision int8 runs on CPU actors (OpenVINO); "
                          f"set compute.gpus_per_actor: 0 (it is {gpus:g})")
    retries = spec.compute.max_retries
    batch_size = resolve_batch_size(spec.model, spec.tiling.chip_size, gpus)  # null: from free GPU memory
    read_tasks = spec.compute.read_concurrency or default_read_tasks(
        spec.compute.actors, spec.compute.cpus_per_actor, cluster.get("CPU", 0))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = 0  # never drop a block silently
    head_plans = [o for o in start.head if isinstance(o, ScenePlan)]
    chips_guess = estimated_chips(sum(len(p.windows) for p in head_plans), len(start.head), len(todo))
    # Chips travel in runs of at least MIN_READ_BATCH (one read task, one predictor call
    # each) even when the model takes one chip per forward (CPU): Ray's per-call cost
    # (task dispatch, ledger round trips) is then paid once per run, not per chip.
    # A CPU actor runs up to one forward pass per CPU at once (OpenVINO's streams): runs that
    # keep each stream busy.
    parallel = 1 if gpus > 0 else max(1, int(spec.compute.cpus_per_actor))
    read_batch = transport_batch(batch_size, max(chips_guess, 1), spec.compute.actors, parallel)
    # Budgeted at the pixel size of the scenes planned first (a budget, not a cap per chip).
    itemsize = max((np.dtype(p.info.dtype).itemsize for p in head_plans), default=4)
    budget = in_flight_bytes(spec.compute.prefetch_batches, spec.compute.actors, read_batch, model.in_channels,
                             spec.tiling.chip_size, itemsize)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=budget)
    # from_blocks keeps the blocks as cut, and reads their metadata here (from_arrow asks a Ray task).
    ds = ray.data.from_blocks([pa.Table.from_pylist(head_rows[start:stop])
                               for start, stop in head_blocks(len(head_rows), read_batch)])
    with warnings.catch_warnings():
        # max_retries / max_restarts travel as ray_remote_args, which Ray 2.60 deprecates
        # without a named replacement; pyproject keeps Ray below 2.64, where they go.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        if tail:  # the other scenes are planned by Ray tasks, their chips streaming on
            scenes = ray.data.from_items([dataclasses.asdict(s) for s in tail],
                                         override_num_blocks=-(-len(tail) // PLAN_BATCH))
            # Reserve no CPU slot (as reads, below); the pool size bounds them instead.
            # Ray types fn as a one-argument callable; fn_kwargs (spec, model) are not in its annotation.
            ds = ds.union(scenes.map_batches(plan_scene_batch,  # type: ignore[arg-type]
                                             batch_size=PLAN_BATCH, batch_format="numpy",
                                             fn_kwargs={"spec": spec, "model": model}, num_cpus=0,
                                             max_retries=retries,
                                             compute=ray.data.TaskPoolStrategy(size=read_tasks)))
        ds = ds.map_batches(read_chip_batch, batch_size=read_batch, batch_format="numpy",
                            fn_kwargs={"bands": spec.inputs.bands, "chip_size": spec.tiling.chip_size,
                                       "out_channels": model.in_channels},
                            # Reads reserve no CPU slot: the predictor actors hold the slots, and
                            # a reserved read would deadlock a node whose CPUs all went to actors.
                            # The task pool size bounds how many run at once instead.
                            num_cpus=0, max_retries=retries,
                            compute=ray.data.TaskPoolStrategy(size=read_tasks))
        # Bounded actor restarts: enough for each poison chip to collect its strikes.
        restarts = (retries + 2) * 4
        ds = ds.map_batches(ChipPredictor, batch_size=read_batch, batch_format="pyarrow",
                            fn_constructor_kwargs={"checkpoint": spec.model.checkpoint,
                                                   "score_threshold": spec.model.score_threshold,
                                                   "nms_threshold": spec.model.nms_threshold,
                                                   "detections_per_chip": spec.model.detections_per_chip,
                                                   "precision": spec.model.precision, "device": spec.model.device,
                                                   "backend": spec.model.backend,
                                                   "ledger": ledger, "max_strikes": retries,
                                                   "num_threads": max(1, int(spec.compute.cpus_per_actor)),
                                                   "faults": faults, "forward_batch": batch_size,
                                                   "chip_size": spec.tiling.chip_size,
                                                   "int8": int8["graph"] if int8 else None},
                            compute=ray.data.ActorPoolStrategy(size=spec.compute.actors), num_gpus=gpus,
                            num_cpus=spec.compute.cpus_per_actor, max_restarts=restarts,
                            max_task_retries=restarts)
    return blocks_as_done(ds), read_tasks


def blocks_as_done(ds):
    """A dataset's output blocks on the driver, each as soon as it is done (numpy batches).

    Ray Data's default read-ahead (prefetch_batches=1) holds a finished block back until
    the next one is done too. A block here is a transport batch of predictions, seconds of
    CPU work, so that held every run's first predictions (and every commit after) back by one
    batch: 1.3-1.5 s of the demo job's start-up. The driver's share of a block is a
    few ms, so reading ahead buys it nothing."""
    return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def drain(stream, book: SceneBook, todo_scenes: int, started: float, verbose: bool, log) -> Optional[float]:
    """Hand every predicted chip to the scene book (which commits each scene as its last
    chip arrives), with a progress line every 5 s -> seconds from start to the first
    predictions (None when none came)."""
    first_predictions = None
    last_log = time.time()
    quiet = contextlib.nullcontext() if verbose else native_log_lines_hidden()
    with quiet:  # Ray's native lines (actor start-up) only with --verbose
        for batch in stream:
            if first_predictions is None:  # start-up: planning, actor start, model load, first batch
                first_predictions = time.time() - started
                last_log = time.time()  # the first progress line comes with a measured rate
            for i in range(len(batch["chip_id"])):
                book.take(batch, i)
            if time.time() - last_log > 5:
                last_log = time.time()
                planned = len(book.settled) + len(book.plans)
                total = estimated_chips(book.chips_planned, planned, todo_scenes)  # exact once all are planned
                log(progress_line(book.done_chips, total, len(book.report.scenes_ok), todo_scenes,
                                  last_log - started - first_predictions, estimated=planned < todo_scenes))
    return first_predictions


def run_job(spec: JobSpec, run_id: str | None = None, force: bool = False, log=None, faults=None,
            verbose: bool = False) -> dict:
    """Run a job to completion and return its report (also written next to the manifests).

    Scenes stream: the first PLAN_BATCH are planned on the driver while Ray starts, the rest
    by Ray tasks across the cluster, and each scene's chips are read and predicted as soon
    as it is planned. The driver holds the plans and detections of scenes in flight only.

    A scene is complete when every planned chip was predicted; one with unpredicted
    chips is committed as ``partial`` (its rows, plus the missing chips and reasons) and
    one with none, or that cannot be planned, as ``failed``. Neither counts as done: the
    next run processes it again, whole (the seam merge needs all of a scene's chips, and
    the chip-level raw detections are not kept). Exit code 1 while any scene is not complete.
    """

    log = log or console_line
    started = time.time()
    check_runnable(spec)  # the job's own files are named before Ray starts
    jhash = job_hash(spec)
    start = start_run(spec, jhash, force, verbose, log)
    pre, todo = start.pre, start.todo
    run_id = run_id or new_run_id()
    int8 = int8_gate(spec, start, log) if todo and spec.model.precision == "int8" else None
    log(f"run {run_id}: {len(todo)} scenes to run ({len(start.done)} already committed, skipped), "
        f"{len(start.failed)} scenes failed to open")

    stac = pre.stac
    report = RunReport(run_id, spec.name, jhash, pre.model.model_id, stac.newest if stac else None,
                       stac.skipped if stac else [], pre.inputs.unmatched, list(pre.warnings), sorted(start.done),
                       int8=int8["report"] if int8 else None, score_threshold=spec.model.score_threshold,
                       started_at=dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="milliseconds"))
    run_info = RunInfo(run_id, spec.name, jhash, pre.model.model_id, spec.output.crs)
    book = SceneBook(spec, run_info, start.keys, start.committed, pre.model.class_names, report, log,
                     acquired={s.scene_id: s.acquired_at for s in todo if s.acquired_at is not None})
    for failure in start.failed:
        book.record_failure(failure)
    first_predictions = None
    read_tasks, streamed = 0, 0.0
    if todo:
        ledger = ChipLedger.start(run_id)  # its process starts while the graph is built
        try:
            stream, read_tasks = job_graph(spec, start, int8, ledger, faults, log)
            streaming = time.perf_counter()
            first_predictions = drain(stream, book, len(todo), started, verbose, log)
            streamed = time.perf_counter() - streaming
        finally:
            with contextlib.suppress(Exception):  # a failed run's error, not its ledger's end
                ledger.clear()
        book.close(todo)

    wall = time.time() - started
    report.workers = dict(book.workers)
    report.wall_seconds = round(wall, 3)
    report.startup_seconds = round(first_predictions, 3) if first_predictions is not None else None
    report.chips_per_second = round(book.done_chips / wall, 3) if wall else 0.0
    # How busy each stage's workers were while the stream ran (Ray's start excluded, the actors' included).
    report.stages, report.bottleneck = stage_figures(
        book.stage_seconds, {"read": read_tasks, "predict": spec.compute.actors, "driver": 1}, streamed)
    report.exit_code = 1 if report.scenes_failed or report.scenes_partial or report.chips_quarantined else 0
    report.report_path = str(write_run_report(spec.output.table, run_id, report.as_dict()))
    return report.as_dict()
