"""The chip stream of a run: its rows (one per chip window, no pixels) and the two Ray
Data tasks that make and fill them, planning scenes and reading chips.

A Ray worker imports the module of each task function it runs, so these live apart from
the run's driver code (:mod:`pipeline.run.graph`: the table, the INT8 gate, the predictor
actor's module): a worker that only reads chips imports rasterio and the tiling code,
0.15 s on top of Ray Data here instead of 0.43 s, paid by every read worker that starts.
"""
from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING

import numpy as np

from pipeline.chips.tiling import ChipWindow, chip_id, read_chips
from pipeline.errors import PipelineError
from pipeline.io.inputs import SceneInput
from pipeline.io.raster import bounded_block_cache

if TYPE_CHECKING:
    from pipeline.chips.planning import ModelFacts, ScenePlan
    from pipeline.config.spec import JobSpec

# Status of a row in the chip stream. "ok" rows are chips to read; the two scene markers
# stand for a scene with no chip to read (all empty: committed with no rows) and one that
# could not be planned (committed as failed). Markers pass the read and predict stages untouched.
SCENE_EMPTY, SCENE_FAILED = "scene_empty", "scene_failed"
# GDAL block cache per chip-reading task, in MB: holds the blocks one batch of
# neighbouring chips shares (a 512-px RGB uint8 chip spans < 1 MB of blocks).
READ_TASK_CACHE_MB = 64


def scene_rows(outcome: ScenePlan | dict, node: str = "") -> list[dict]:
    """The chip stream's rows for one planned scene: one small row per chip to read
    (identifiers and the window, no pixels), or one marker row when it has none.

    The scene's first row carries its pickled plan (or failure) in ``plan``: the driver
    learns a scene's chip count and geometry from the stream itself, so it never holds
    the plans of scenes that are not in flight. Other rows carry ``b""``.
    """
    blob = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    if isinstance(outcome, dict):  # the scene could not be planned
        return [marker_row(outcome["scene_id"], outcome["path"], SCENE_FAILED, outcome["reason"], blob, node)]
    if not outcome.windows:
        return [marker_row(outcome.scene_id, outcome.path, SCENE_EMPTY, "", blob, node)]
    return [
        {"chip_id": chip_id(outcome.scene_id, w.row, w.col), "scene_id": outcome.scene_id, "path": outcome.path,
         "row": int(w.row), "col": int(w.col), "col_off": int(w.col_off), "row_off": int(w.row_off),
         "width": int(w.width), "height": int(w.height), "status": "ok", "error": "",
         "plan": blob if i == 0 else b"", "planned_on": node}
        for i, w in enumerate(outcome.windows)
    ]


def marker_row(scene_id: str, path: str, status: str, error: str, plan: bytes, node: str) -> dict:
    """The one row of a scene with no chip to read (`status` SCENE_EMPTY or SCENE_FAILED)."""
    return {"chip_id": f"{scene_id}/-", "scene_id": scene_id, "path": path, "row": -1, "col": -1, "col_off": 0,
            "row_off": 0, "width": 0, "height": 0, "status": status, "error": error, "plan": plan,
            "planned_on": node}


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> one Ray Data numpy batch (strings and bytes as object columns)."""
    return {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], (str, bytes)) else None)
            for k in rows[0]}


def plan_scene_batch(batch: dict[str, np.ndarray], spec: JobSpec, model: ModelFacts) -> dict[str, np.ndarray]:
    """Ray Data task: plan a batch of scenes (PLAN_THREADS at a time) -> their chip rows."""
    import ray

    from pipeline.chips.planning import plan_scenes  # here: a read worker has no use for it

    scenes = [SceneInput(str(loc), str(sid), str(src))
              for loc, sid, src in zip(batch["location"], batch["scene_id"], batch["source"])]
    node = ray.get_runtime_context().get_node_id()
    return rows_to_batch([row for outcome in plan_scenes(spec, scenes, model) for row in scene_rows(outcome, node)])


def read_chip_batch(batch: dict[str, np.ndarray], bands: list[int] | None, chip_size: int,
                    out_channels: int) -> dict[str, np.ndarray]:
    """Ray Data task: read the pixels of a batch of chip windows, opening each scene once.

    A window that fails to read (damaged tiles) marks its chip ``read_error``; a scene that
    fails as a whole marks all of its chips. Other chips are read normally. Scene marker
    rows pass through unread.
    """
    import ray

    started = time.perf_counter()  # the run report's read seconds (pipeline.run.runbook.stage_figures)
    n = len(batch["chip_id"])
    status = np.array([str(s) for s in batch["status"]], dtype=object)
    error = np.array([str(e) for e in batch["error"]], dtype=object)
    paths = batch["path"].astype(str)
    chips_of: dict[int, np.ndarray] = {}
    # Valid-pixel masks, bit-packed along x (chip_size / 8 bytes per row).
    valid = np.zeros((n, chip_size, (chip_size + 7) // 8), dtype=np.uint8)
    for path in dict.fromkeys(paths[status == "ok"]):
        rows = np.flatnonzero((paths == path) & (status == "ok"))
        windows = [ChipWindow(int(batch["row"][i]), int(batch["col"][i]), int(batch["col_off"][i]),
                              int(batch["row_off"][i]), int(batch["width"][i]), int(batch["height"][i]))
                   for i in rows]
        try:  # read in the file's dtype
            # A batch is a run of neighbouring chips: a small block cache serves their
            # overlaps; GDAL's default (5 % of RAM per reader) only grows with the scene.
            with bounded_block_cache(READ_TASK_CACHE_MB):
                chips, failures = read_chips(path, windows, bands, chip_size, out_channels, dtype=None)
        except PipelineError as err:
            status[rows], error[rows] = "read_error", str(err)
            continue
        by_cell = {(c.row, c.col): c for c in chips}
        reasons = {(f.row, f.col): f.reason for f in failures}
        for i, w in zip(rows.tolist(), windows):
            chip = by_cell.get((w.row, w.col))
            if chip is None:
                status[i], error[i] = "read_error", reasons.get((w.row, w.col), "window was not read")
            else:
                chips_of[i] = chip.pixels
                valid[i] = np.packbits(chip.valid, axis=-1)
    # Each chip travels as its raw bytes in the file's dtype (uint8 moves 4x fewer bytes than
    # float32); the predictor stacks them (pipeline.infer.predictor.stack_chip_pixels).
    pixels = np.array([chips_of[i].tobytes() if i in chips_of else b"" for i in range(n)], dtype=object)
    pixel_dtype = np.array([str(chips_of[i].dtype) if i in chips_of else "" for i in range(n)], dtype=object)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    out = {"chip_id": batch["chip_id"], "scene_id": batch["scene_id"], "col_off": batch["col_off"],
           "row_off": batch["row_off"], "pixels": pixels, "pixel_dtype": pixel_dtype, "valid": valid,
           "status": status, "error": error, "read_on": np.array([node] * n, dtype=object)}
    for passed in ("plan", "planned_on"):  # the scene's plan travels on to the driver
        if passed in batch:
            out[passed] = batch[passed]
    # each row carries its share, so the driver's sum is right however Ray Data re-cuts blocks
    out["read_seconds"] = np.full(n, (time.perf_counter() - started) / max(n, 1))
    return out
