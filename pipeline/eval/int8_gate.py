"""The INT8 gate: what a quantised graph costs, measured before a run uses it, and the verdict.

INT8 moves scores and drops or adds boxes (post-training quantisation rounds activations
to 256 levels), so before a run uses it the driver (:func:`pipeline.run.graph.int8_gate`):

1. has the INT8 graph made (:mod:`pipeline.infer.int8`: NNCF's post-training quantisation
   of the f32 OpenVINO graph on ``model.int8_calibration_chips`` chips of the job's own
   scenes);
2. measures: AP50 of the f32 graph and of the INT8 graph on the chips of labelled scenes
   (``model.int8_labels`` for ``model.int8_scenes``, default the job's inputs), with the
   job's postprocessing settings (:func:`measure_int8`);
3. decides (:func:`int8_allowed`): an AP50 drop above ``model.int8_max_ap50_drop`` points
   is refused (the run stops with exit 2 and both figures) or, with ``model.int8_on_drop:
   warn``, run with a warning. The figures go into the run report (``int8``).

The measurement is cached beside the graph (the pipeline's cache folder, per node) under
a digest of the labels and the settings that move AP50, so only the first run pays for
it (about a minute for an R50 on two cores, calibration included).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import ConfigError, InputError
from pipeline.eval.labelled import (
    Region,
    build_records,
    detect_records,
    expand_scene_paths,
    labelled_scenes,
    records_truth,
)
from pipeline.eval.metrics import coco_metrics
from pipeline.infer.int8 import int8_graph
from pipeline.infer.predictor import apply_job_settings
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


def labelled_records(spec, classes: list[str]):
    """Chip records (pipeline.eval.labelled) of the labelled scenes INT8 is measured on."""
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


def measure_int8(spec, model, scenes, cache_dir: Path, log) -> tuple[Int8Measurement, Path, Path]:
    """Have the INT8 graph of the job's checkpoint made for the job's ``scenes`` (or reuse
    it) and measure it against the f32 graph on the labelled chips (see the module doc) ->
    (the measurement, the INT8 graph's path, its postprocessing geometry's path)."""
    made = int8_graph(spec, model, scenes, cache_dir)
    measured = made.path.with_suffix(f".{_labels_digest(spec)}.json")
    if measured.is_file() and made.exists():
        return Int8Measurement(**{**json.loads(measured.read_text()), "cached": True}), made.path, made.geometry
    log(f"INT8: calibrating on {len(made.cells)} chips of the job's scenes (once per checkpoint and node)")
    made.make(spec, model)
    records = labelled_records(spec, list(model.class_names))
    log(f"INT8: measuring AP50 against f32 on {len(records)} labelled chips")
    truth = records_truth(records, spec.tiling.chip_size)
    ap50 = {}
    for name, detector in (("f32", made.f32), ("int8", made.detector())):
        apply_job_settings(detector.config, spec.model.score_threshold, spec.model.nms_threshold,
                           spec.model.detections_per_chip)
        found = detect_records(detector, records, spec.inputs.bands, spec.tiling.chip_size, model.in_channels)
        ap50[name] = coco_metrics(truth, found, list(model.class_names))["AP50"] or 0.0
    result = Int8Measurement(made.key, round(ap50["f32"], 4), round(ap50["int8"], 4), len(made.cells), len(records))
    record = json.dumps({k: v for k, v in asdict(result).items() if k != "cached"})
    write_atomically(measured, lambda tmp: tmp.write_text(record))
    return result, made.path, made.geometry
