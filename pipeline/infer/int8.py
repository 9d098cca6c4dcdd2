"""model.precision int8: a quantised graph only after measuring what it costs.

INT8 moves scores and drops or adds boxes (post-training quantisation rounds activations
to 256 levels), so before a run uses it the driver:

1. calibrates: NNCF's post-training quantisation of the f32 OpenVINO graph on
   ``model.int8_calibration_chips`` chips of the job's own scenes (evenly spread over the
   chips worth reading of its first scenes);
2. measures: AP50 of the f32 graph and of the INT8 graph on the chips of labelled scenes
   (``model.int8_labels`` for ``model.int8_scenes``, default the job's inputs), with the
   job's postprocessing settings;
3. decides: an AP50 drop above ``model.int8_max_ap50_drop`` points is refused (the run
   stops with exit 2 and both figures) or, with ``model.int8_on_drop: warn``, run with a
   warning. The figures go into the run report (``int8``).

Graph and measurement are cached per node (the pipeline's cache folder) under a key of
the checkpoint, chip size, calibration chips and library versions, so only the first run
pays for them (about a minute for an R50 on two cores); predictor actors on other nodes
receive the graph from the driver instead of calibrating again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from pipeline.chips.planning import PLAN_BATCH, ScenePlan, plan_scenes
from pipeline.errors import ConfigError, InputError
from pipeline.eval.metrics import coco_metrics
from pipeline.infer.predictor import apply_job_settings
from pipeline.io.objstore import local_file
from retinanet.files import write_atomically


@dataclass(frozen=True)
class Int8Measurement:
    """What INT8 costs on labelled chips: AP50 of the f32 graph and of the INT8 graph."""

    key: str  # the INT8 graph's cache key
    ap50_f32: float
    ap50_int8: float
    calibration_chips: int
    evaluation_chips: int
    cached: bool = False

    @property
    def drop_points(self) -> float:
        return ap50_drop_points(self.ap50_f32, self.ap50_int8)

    def report(self, max_drop: float, on_drop: str, running: bool) -> dict:
        return {**asdict(self), "drop_points": self.drop_points, "max_drop_points": max_drop, "on_drop": on_drop,
                "running_int8": running}


def ap50_drop_points(ap50_f32: float, ap50_int8: float) -> float:
    """AP50 lost to INT8 in points (AP x 100); negative when INT8 scores higher.
    Example: (0.807, 0.795) -> 1.2."""
    return round(100.0 * (ap50_f32 - ap50_int8), 2)


def int8_allowed(measurement: Int8Measurement, max_drop: float, on_drop: str) -> tuple[bool, str]:
    """(run INT8?, what to tell the user). Raises ConfigError when the drop is above
    ``max_drop`` points and ``on_drop`` is "refuse"."""
    figures = (f"AP50 {measurement.ap50_f32:.3f} (f32) -> {measurement.ap50_int8:.3f} (int8) on "
               f"{measurement.evaluation_chips} labelled chips, a drop of {measurement.drop_points:.1f} points")
    if measurement.drop_points <= max_drop:
        return True, f"INT8 gate passed: {figures} (at most {max_drop:g} allowed)"
    if on_drop == "warn":
        return True, (f"warning: INT8 costs more than model.int8_max_ap50_drop ({max_drop:g}): {figures}; "
                      "running INT8 as model.int8_on_drop is warn")
    raise ConfigError(f"model.precision int8 refused: {figures}, more than model.int8_max_ap50_drop "
                      f"({max_drop:g}). Run with model.precision auto (bf16 on this CPU, within 0.1 point "
                      "of fp32), or accept the drop with model.int8_on_drop: warn")


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when fewer).
    Example: (10, 3) -> [0, 3, 6]; (2, 5) -> [0, 1]."""
    if total <= count:
        return list(range(total))
    return [int(i * total / count) for i in range(count)]


def calibration_cells(spec, scenes, model) -> list:
    """The chips of the job's own scenes to calibrate on, as (scene plan, window):
    ``model.int8_calibration_chips`` of the chips worth reading of its first scenes (the
    ones the driver plans first), evenly spread."""

    plans = [o for o in plan_scenes(spec, scenes[:PLAN_BATCH], model) if isinstance(o, ScenePlan)]
    cells = [(plan, window) for plan in plans for window in plan.windows]
    if not cells:
        raise InputError(f"{spec.source or 'job'}: model.precision int8: no chip of the first scenes to "
                         "calibrate on (every scene failed to plan or is empty)")
    return [cells[i] for i in evenly_spaced(len(cells), spec.model.int8_calibration_chips)]


def read_cells(spec, model, cells) -> np.ndarray:
    """Pixels (N, C, S, S) float32 of the calibration cells that read (a damaged tile costs
    one calibration chip, not the gate), each scene opened once."""
    from pipeline.chips.tiling import read_chips

    pixels, failed = [], []
    for plan in {id(p): p for p, _ in cells}.values():
        chips, failures = read_chips(plan.path, [w for p, w in cells if p is plan], spec.inputs.bands,
                                     spec.tiling.chip_size, model.in_channels, dtype="float32")
        pixels += [c.pixels for c in chips]
        failed += [f"{plan.path}: {f.reason}" for f in failures]
    if not pixels:
        raise InputError(f"{spec.source or 'job'}: model.precision int8: no calibration chip could be read: "
                         + "; ".join(failed[:3]))
    return np.stack(pixels)


def labelled_records(spec, classes: list[str]):
    """Chip records (pipeline.train.data) of the labelled scenes INT8 is measured on."""
    from pipeline.train.data import Region, build_records, expand_scene_paths, labelled_scenes

    if spec.model.int8_scenes is None and spec.inputs.stac:
        raise ConfigError(f"{spec.source or 'job'}: model.int8_scenes: name the labelled scenes (the job's "
                          "inputs are a STAC selection)")
    patterns = spec.model.int8_scenes or spec.inputs.paths
    labelled = labelled_scenes(expand_scene_paths(patterns, "model.int8_scenes"), spec.model.int8_labels, classes)
    regions = [Region(s.scene_id, 0, 0, s.info.width, s.info.height) for s in labelled]
    records = build_records(labelled, regions, spec.tiling.chip_size, spec.tiling.overlap, 0.5,
                            spec.tiling.min_valid_fraction)
    if not any(len(r.boxes) for r in records):
        raise InputError(f"{spec.source or 'job'}: model.int8_labels: no labelled box on the chips of "
                         f"{patterns}; INT8 cannot be measured there")
    return records


def _labels_digest(spec) -> str:
    digest = hashlib.sha256()
    for path in spec.model.int8_labels:
        digest.update(Path(path).read_bytes())
    digest.update(json.dumps([spec.model.int8_scenes or spec.inputs.paths, spec.tiling.model_dump(),
                              spec.inputs.bands, spec.model.score_threshold, spec.model.nms_threshold,
                              spec.model.detections_per_chip], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def int8_key(checkpoint_sha: str, chip_size: int, chip_ids: list[str]) -> str:
    """Cache key of an INT8 graph: what it was made from (checkpoint, chip size,
    calibration chips) and with (NNCF and OpenVINO versions)."""
    blob = json.dumps([checkpoint_sha, chip_size, chip_ids, version("nncf"), version("openvino")])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measure_int8(spec, model, scenes, cache_dir: Path, log) -> tuple[Int8Measurement, Path, Path]:
    """Quantise (or reuse) the INT8 graph of the job's checkpoint for the job's ``scenes``
    and measure it against the f32 graph on the labelled chips (see the module doc) ->
    (the measurement, the INT8 graph's path, its postprocessing geometry's path)."""
    from pipeline.chips.tiling import chip_id
    from pipeline.train.data import detect_records, records_truth
    from retinanet.openvino_backend import OpenVinoDetector, graph_exists

    checkpoint = local_file(spec.model.checkpoint)
    threads = os.cpu_count() or 1
    chip_hw = (spec.tiling.chip_size, spec.tiling.chip_size)
    f32 = OpenVinoDetector(checkpoint, precision="fp32", num_threads=threads, cache_dir=cache_dir)
    cells = calibration_cells(spec, scenes, model)
    key = int8_key(f32.sha256, spec.tiling.chip_size, [chip_id(p.scene_id, w.row, w.col) for p, w in cells])
    graph, geometry = f32.graph_path(chip_hw, key), f32.geometry_path(chip_hw)
    measured = graph.with_suffix(f".{_labels_digest(spec)}.json")
    if measured.is_file() and graph_exists(graph):
        return Int8Measurement(**{**json.loads(measured.read_text()), "cached": True}), graph, geometry
    log(f"INT8: calibrating on {len(cells)} chips of the job's scenes (once per checkpoint and node)")
    f32.quantize(chip_hw, read_cells(spec, model, cells), key)
    int8 = OpenVinoDetector(checkpoint, precision="int8", num_threads=threads, cache_dir=cache_dir, int8_key=key)
    records = labelled_records(spec, list(model.class_names))
    log(f"INT8: measuring AP50 against f32 on {len(records)} labelled chips")
    truth = records_truth(records, spec.tiling.chip_size)
    ap50 = {}
    for name, detector in (("f32", f32), ("int8", int8)):
        apply_job_settings(detector.config, spec.model.score_threshold, spec.model.nms_threshold,
                           spec.model.detections_per_chip)
        found = detect_records(detector, records, spec.inputs.bands, spec.tiling.chip_size, model.in_channels)
        ap50[name] = coco_metrics(truth, found, list(model.class_names))["AP50"] or 0.0
    result = Int8Measurement(key, round(ap50["f32"], 4), round(ap50["int8"], 4), len(cells), len(records))
    record = json.dumps({k: v for k, v in asdict(result).items() if k != "cached"})
    write_atomically(measured, lambda tmp: tmp.write_text(record))
    return result, graph, geometry


def graph_for_actors(key: str, graph: Path, geometry: Path) -> dict:
    """The INT8 graph and its postprocessing geometry as bytes for the predictor actors
    (other nodes install them in their own cache; calibration is not repeated per node)."""
    return {"key": key, "name": graph.name, "xml": graph.read_bytes(), "bin": graph.with_suffix(".bin").read_bytes(),
            "geometry_name": geometry.name, "geometry": geometry.read_bytes()}
