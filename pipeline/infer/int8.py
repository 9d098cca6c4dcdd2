"""model.precision int8: the INT8 engine, made from the job's own chips.

NNCF's post-training quantisation of the f32 OpenVINO graph, calibrated on
``model.int8_calibration_chips`` chips of the job's own scenes (evenly spread over the
chips worth reading of its first scenes). Whether a run may use the graph is the INT8
gate's question (:mod:`pipeline.eval.int8_gate`: AP50 against f32 on labelled chips, then
refuse or warn), asked by the run's driver (:func:`pipeline.run.graph.int8_gate`), which
hands the graph down to the predictor actors (:func:`graph_for_actors`).

The graph is cached per node (the pipeline's cache folder) under a key of the checkpoint,
chip size, calibration chips and library versions, so only the first run pays for it;
predictor actors on other nodes receive the graph from the driver instead of calibrating
again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.chips.planning import PLAN_BATCH, ScenePlan, plan_scenes
from pipeline.errors import InputError
from pipeline.io.objstore import local_file


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


def int8_key(checkpoint_sha: str, chip_size: int, chip_ids: list[str]) -> str:
    """Cache key of an INT8 graph: what it was made from (checkpoint, chip size,
    calibration chips) and with (NNCF and OpenVINO versions)."""
    blob = json.dumps([checkpoint_sha, chip_size, chip_ids, version("nncf"), version("openvino")])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Int8Graph:
    """The INT8 graph of a job's checkpoint at its chip size, made (:meth:`make`) from the
    f32 graph on the calibration chips ``cells`` of the job's scenes, cached under ``key``."""

    f32: Any  # the f32 engine (retinanet.openvino_backend.OpenVinoDetector) it is made from
    cells: list  # (scene plan, window) of each calibration chip
    key: str
    path: Path  # the graph (.xml, weights beside it in .bin)
    geometry: Path  # its postprocessing geometry
    checkpoint: str
    cache_dir: Path
    chip_size: int

    def exists(self) -> bool:
        from retinanet.openvino_backend import graph_exists

        return graph_exists(self.path)

    def make(self, spec, model) -> None:
        """Quantise: NNCF on the pixels of the calibration chips."""
        self.f32.quantize((self.chip_size, self.chip_size), read_cells(spec, model, self.cells), self.key)

    def detector(self):
        """The INT8 engine on this graph (made already)."""
        from retinanet.openvino_backend import OpenVinoDetector

        return OpenVinoDetector(self.checkpoint, precision="int8", num_threads=os.cpu_count() or 1,
                                cache_dir=self.cache_dir, int8_key=self.key)


def int8_graph(spec, model, scenes, cache_dir: Path) -> Int8Graph:
    """Where the INT8 graph of the job's checkpoint for the job's ``scenes`` is (or will be,
    once made): its f32 engine, calibration chips, cache key and paths. Nothing is quantised here."""
    from pipeline.chips.tiling import chip_id
    from retinanet.openvino_backend import OpenVinoDetector

    checkpoint = local_file(spec.model.checkpoint)
    chip_hw = (spec.tiling.chip_size, spec.tiling.chip_size)
    f32 = OpenVinoDetector(checkpoint, precision="fp32", num_threads=os.cpu_count() or 1, cache_dir=cache_dir)
    cells = calibration_cells(spec, scenes, model)
    key = int8_key(f32.sha256, spec.tiling.chip_size, [chip_id(p.scene_id, w.row, w.col) for p, w in cells])
    return Int8Graph(f32, cells, key, f32.graph_path(chip_hw, key), f32.geometry_path(chip_hw), checkpoint, cache_dir,
                     spec.tiling.chip_size)


def graph_for_actors(key: str, graph: Path, geometry: Path) -> dict:
    """The INT8 graph and its postprocessing geometry as bytes for the predictor actors
    (other nodes install them in their own cache; calibration is not repeated per node)."""
    return {"key": key, "name": graph.name, "xml": graph.read_bytes(), "bin": graph.with_suffix(".bin").read_bytes(),
            "geometry_name": geometry.name, "geometry": geometry.read_bytes()}
