"""Predicting from Python, without Ray: :func:`predict_scene` and :func:`predict_image`.

The steps of `pipeline run` (:mod:`pipeline.run.graph`), run in this process one run of
chips at a time, through the same functions:

    settings -> JobSpec            pipeline.config.spec (apply_values: the names --set takes)
    scenes and their ids           pipeline.io.inputs.job_inputs
    plan: windows, checks          pipeline.chips.planning.plan_scene (empty chips skipped unread)
    windowed reads                 pipeline.chips.tiling.read_chips, in runs of transport_batch chips
    the model                      pipeline.infer.predictor.ChipEngine (the actors' engine, chosen alike)
    seam merge, map polygons, rows pipeline.infer.finalize.finalize_scene

so the same scene and settings give the rows a run commits. Only a run of chips is in memory
at a time, and the detections of the scene in progress: never a whole scene's pixels.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
import pandas
import pyarrow as pa
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from tqdm.auto import tqdm

from pipeline.chips.planning import ModelFacts, ScenePlan, model_facts, plan_scene
from pipeline.chips.stream import READ_TASK_CACHE_MB
from pipeline.chips.tiling import chip_id, read_chips
from pipeline.config.spec import JobSpec, apply_values, job_hash, parse_job
from pipeline.errors import ConfigError, InputError
from pipeline.infer.finalize import finalize_scene, scene_acquired_at
from pipeline.infer.predictor import ChipEngine, local_batch_size, local_device, resolve_backend
from pipeline.io.inputs import SceneInput, has_wildcard, job_inputs, require_scenes
from pipeline.io.raster import bounded_block_cache
from pipeline.run.graph import transport_batch

# A JobSpec names its table; predicting writes none and reads none (job_hash leaves paths out).
UNWRITTEN_TABLE = "predict-writes-no-table"
PREDICT_JOB = "predict"
# Columns only a commit has: the run that wrote a row under which job name, when, and the
# date partition it went to. Predicting commits nothing, so its rows have none of them.
COMMIT_COLUMNS = ("run_id", "job_name", "processed_at", "date")
# predict_image's columns, as DeepForest's predict_image has them (plus label_id).
IMAGE_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "score", "label", "label_id")
# The scene id of an array (pixel rows carry it).
IMAGE_SCENE_ID = "image"


def predict_job(paths: list[str], checkpoint: str, overrides: dict[str, Any], caller: str,
                defaults: Optional[dict[str, Any]] = None) -> JobSpec:
    """The JobSpec of a prediction: the scenes and checkpoint, then `defaults`, then the
    caller's settings (dotted names as ``--set`` takes them, or section dicts; relative
    paths against the current directory). Raises ConfigError naming the field."""
    data = {"name": PREDICT_JOB, "inputs": {}, "model": {}, "output": {"table": UNWRITTEN_TABLE}}
    data = apply_values(data, {"inputs.paths": paths, "model.checkpoint": checkpoint, **(defaults or {})}, caller)
    data = apply_values(data, overrides, caller)
    spec = parse_job(data, source=caller)
    if spec.model.precision == "int8":
        raise ConfigError(f"{caller}: model.precision int8 runs behind pipeline run's INT8 gate (measured on "
                          "labelled chips before it may run); predict with fp32, bf16 or auto")
    return spec


def load_engine(spec: JobSpec, model: ModelFacts) -> ChipEngine:
    """The model in this process, on the device and backend a run's actor would pick here
    (``auto``: cuda where torch sees a GPU; on the CPU OpenVINO where it imports), with the
    job's postprocessing settings and batch size (``compute`` is Ray's and is not read)."""
    device = local_device(spec.model.device)
    return ChipEngine(spec.model.checkpoint, device, resolve_backend(spec.model.backend, device),
                      precision=spec.model.precision, score_threshold=spec.model.score_threshold,
                      nms_threshold=spec.model.nms_threshold, detections_per_chip=spec.model.detections_per_chip,
                      forward_batch=local_batch_size(spec.model, spec.tiling.chip_size, device),
                      chip_size=spec.tiling.chip_size)


def predict_chips(spec: JobSpec, plan: ScenePlan, engine: ChipEngine, model: ModelFacts, bar
                  ) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """Read and predict a planned scene's chips, a run of them at a time -> ((chip id,
    encoded detections) per chip, like a run's stream brings them; chips that could not be
    read: chip_id, reason)."""
    run = transport_batch(engine.forward_batch or 1, len(plan.windows), 1)
    results, missing = [], []
    for start in range(0, len(plan.windows), run):
        windows = plan.windows[start:start + run]
        with bounded_block_cache(READ_TASK_CACHE_MB):  # as a run's read task: a run of neighbours shares blocks
            chips, failures = read_chips(plan.path, windows, spec.inputs.bands, spec.tiling.chip_size,
                                         model.in_channels, dtype=None)
        missing += [{"chip_id": chip_id(plan.scene_id, f.row, f.col), "reason": f.reason} for f in failures]
        if chips:
            pixels = np.stack([c.pixels for c in chips])  # the file's dtype; the engine casts on its device
            valid = np.stack([np.packbits(c.valid, axis=-1) for c in chips])
            offsets = np.array([c.window[:2] for c in chips])
            found = engine.chip_detections(pixels, valid, offsets)
            results += [(chip_id(plan.scene_id, c.row, c.col), blob) for c, blob in zip(chips, found)]
        bar.update(len(windows))
    return results, missing


def predict_plans(spec: JobSpec, plans: list[ScenePlan], model: ModelFacts, progress: bool, caller: str
                  ) -> pa.Table:
    """Every planned scene's rows (the detection table's columns), one scene at a time;
    chips that could not be read are left out with a warning naming them."""
    engine = load_engine(spec, model)
    jhash = job_hash(spec)
    tables, missing = [], []
    with tqdm(total=sum(len(p.windows) for p in plans), unit="chip", desc=f"{caller} chips",
              disable=not progress) as bar:
        for plan in plans:
            results, lost = predict_chips(spec, plan, engine, model, bar)
            missing += lost
            acquired_at, problem = scene_acquired_at(None, plan.info)  # a path has no STAC item: the raster's tag
            if problem:
                warnings.warn(f"{caller}: {problem}", stacklevel=3)
            tables.append(finalize_scene(spec, plan, results, model.class_names, run_id="", model_id=model.model_id,
                                         job_hash=jhash, acquired_at=acquired_at))
    if missing:
        warnings.warn(f"{caller}: {len(missing)} chips could not be read and have no detections: "
                      + "; ".join(f"{m['chip_id']}: {m['reason']}" for m in missing[:5]), stacklevel=3)
    return pa.concat_tables(tables).drop_columns(list(COMMIT_COLUMNS))


def predict_scene(path: str, checkpoint: str, *, progress: bool = True, **job_overrides: Any):
    """Detections of one scene (or of every scene a glob or URL pattern matches) as a
    ``geopandas.GeoDataFrame``: the rows `pipeline run` commits for the same scene and
    settings, in ``output.crs`` (default EPSG:4326; ``None``: scene pixels), without Ray.

    Columns: the detection table's as ``geopandas.read_parquet`` reads it (``geometry``,
    ``scene_id``, ``scene_path``, ``label``, ``label_id``, ``score``, ``px_xmin`` ...
    ``px_ymax`` in scene pixels, ``model_id``, ``job_hash``, ...) except those only a commit
    has: ``run_id``, ``job_name``, ``processed_at``, ``date``.

    ``job_overrides``: the job's settings by the names ``pipeline run --set`` takes, as
    dotted keys (``**{"tiling.chip_size": 256, "model.score_threshold": 0.4}``) or one
    dict per section (``tiling={"chip_size": 256}, merge={"method": "wbf"}``);
    ``compute`` is not read (no Ray: one model in this process). ``progress``: a progress
    bar of the chips (tqdm: terminal or notebook).

    The scene streams as in a run: planned (empty chips skipped unread), then read a run of
    chip windows at a time, so memory does not grow with the scene.

    Raises InputError (a missing or unreadable scene; bands that do not fit the model; a
    scene without CRS under an ``output.crs``) or ConfigError (a setting, the checkpoint).
    """
    spec = predict_job([str(path)], str(checkpoint), job_overrides, "predict_scene")
    model = model_facts(spec.model.checkpoint)
    inputs, _ = job_inputs(spec)
    if not inputs.scenes:
        raise InputError(f"{path}: " + ("matched no raster" if has_wildcard(str(path)) else "file not found"))
    require_scenes(inputs, "inputs.paths", "predict_scene")
    plans = [plan_scene(scene, spec, model) for scene in inputs.scenes]  # a bad scene fails before the model loads
    for plan in plans:
        for warning in plan.warnings:
            warnings.warn(warning, stacklevel=2)
    return detections_frame(predict_plans(spec, plans, model, progress, "predict_scene"), spec.output.crs)


def detections_frame(table: pa.Table, crs: Optional[str]):
    """Detection rows (WKB geometry) -> a GeoDataFrame in `crs` (None: pixel coordinates),
    with the columns in the table's order."""
    import geopandas  # a dependency, imported here only: runs and the CLI never need it
    # bbox is GeoParquet's covering column, for readers that filter files by it; GeoPandas
    # reads the table without it (geometry.bounds is the same box), so predicting leaves it out.
    frame = table.drop_columns(["geometry", "bbox"]).to_pandas()
    frame.insert(0, "geometry", geopandas.GeoSeries.from_wkb(table.column("geometry").to_pylist(), crs=crs))
    return geopandas.GeoDataFrame(frame, geometry="geometry", crs=crs)


def image_bands(array: np.ndarray) -> np.ndarray:
    """An image array (H, W, C) or (H, W) -> (C, H, W); InputError for any other shape, a
    channels-first look or a dtype the pipeline does not read."""
    array = np.asarray(array)
    what = f"predict_image: array of shape {array.shape} and dtype {array.dtype}"
    if array.dtype.kind not in "uif":
        raise InputError(f"{what}: expected integer or floating-point pixels (uint8, uint16, ...)")
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise InputError(f"{what}: expected (H, W, C) or (H, W)")
    if array.shape[2] > 4 and array.shape[0] <= 4:
        raise InputError(f"{what}: looks channels-first; predict_image takes (H, W, C): "
                         "pass np.moveaxis(array, 0, -1)")
    return np.moveaxis(array, -1, 0)


def predict_image(array: np.ndarray, checkpoint: str, *, progress: bool = True, **job_overrides: Any):
    """Detections in an in-memory image as a pandas DataFrame of pixel boxes: columns
    ``xmin, ymin, xmax, ymax`` (pixels, x right, y down), ``score``, ``label`` (class name),
    ``label_id``.

    ``array``: (H, W, C) channels last, as PIL, matplotlib and DeepForest hold images (a
    rasterio (C, H, W) read: ``np.moveaxis(a, 0, -1)``), or (H, W) for one band; uint8 or
    uint16 (any integer or float dtype a run reads; NaN is nodata). An array larger than a
    chip is tiled, predicted and seam-merged as a scene in `pipeline run`: it is handed to
    the same steps as an in-memory GeoTIFF without georeferencing (one copy of the pixels).
    ``job_overrides`` and ``progress`` as in :func:`predict_scene`.
    """
    bands = image_bands(array)
    # One row per strip: no internal block to align the chip grid on, as an array has none.
    profile = dict(driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                   dtype=bands.dtype, tiled=False, blockysize=1)
    with MemoryFile() as memory:
        with warnings.catch_warnings():  # an array has no georeferencing: that is what output.crs None is for
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with memory.open(**profile) as dst:
                dst.write(bands)
        spec = predict_job([memory.name], str(checkpoint), job_overrides, "predict_image",
                           defaults={"output.crs": None})
        model = model_facts(spec.model.checkpoint)
        plan = plan_scene(SceneInput(memory.name, IMAGE_SCENE_ID, "predict_image"), spec, model)
        rows = predict_plans(spec, [plan], model, progress, "predict_image")
    return pandas.DataFrame({"xmin": rows.column("px_xmin").to_numpy(), "ymin": rows.column("px_ymin").to_numpy(),
                             "xmax": rows.column("px_xmax").to_numpy(), "ymax": rows.column("px_ymax").to_numpy(),
                             "score": rows.column("score").to_numpy(), "label": rows.column("label").to_pylist(),
                             "label_id": rows.column("label_id").to_numpy()}, columns=list(IMAGE_COLUMNS))
