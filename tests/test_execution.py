"""`pipeline run` end to end on a real local Ray (logical GPUs), with fault injection."""
from __future__ import annotations

import datetime as dt
import json
import os
import time

import numpy as np
import pytest
from workspaces import tiny_checkpoint

from pipeline.config.spec import JobSpec
from pipeline.infer.predictor import FaultPlan
from pipeline.tools.synth import synthesize

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def workspace(module_tmp):
    """Two small synthetic scenes and an untrained tiny model that emits many boxes."""
    root = module_tmp("run")
    synthesize(root / "scenes", scenes=2, size=600, seed=3)
    tiny_checkpoint(root / "model.pt")
    return root


def make_spec(root, table: str, **compute) -> JobSpec:
    return JobSpec.model_validate({
        "name": "test-run",
        "inputs": {"paths": [str(root / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": 4,
                  "precision": "fp32"},
        "compute": {"actors": 2, "gpus_per_actor": 1, "cpus_per_actor": 1, "max_retries": 1, **compute},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    })


def committed_rows(table_root) -> list[tuple]:
    from pipeline.table.state import read_committed

    t = read_committed(table_root).to_pydict()
    return sorted(zip(t["scene_id"], t["label"], np.round(t["px_xmin"], 3), np.round(t["px_ymin"], 3),
                      np.round(t["px_xmax"], 3), np.round(t["px_ymax"], 3)))


@pytest.fixture(scope="module")
def clean_run(workspace, ray_session):
    from pipeline.run.graph import run_job

    report = run_job(make_spec(workspace, "clean"))
    return report, committed_rows(workspace / "clean")


def test_run_commits_every_scene_on_two_gpu_pinned_actors(clean_run):
    report, rows = clean_run
    assert report["exit_code"] == 0, report
    assert sorted(report["scenes_ok"]) == ["synth_000", "synth_001"]
    assert report["detections"] == len(rows) > 0
    # Each actor asked Ray for one logical GPU: two actors, distinct GPU ids, both did work.
    gpu_sets = {w.split("gpus=[")[1].split("]")[0] for w in report["workers"]}
    assert len(report["workers"]) == 2 and len(gpu_sets) == 2, report["workers"]
    assert all(n > 0 for n in report["workers"].values())
    saved = json.loads(open(report["report_path"]).read())
    assert saved["run_id"] == report["run_id"]


def test_the_report_says_when_the_run_started(clean_run):
    """started_at (UTC, ms) places the run in time: a bench adds startup_seconds to it to
    time a whole command to its first predictions. The report is written at the run's end."""
    report = clean_run[0]
    started = dt.datetime.fromisoformat(report["started_at"])
    assert started.utcoffset() == dt.timedelta(0) and "." in report["started_at"]
    written = os.path.getmtime(report["report_path"])
    assert written - report["wall_seconds"] - 1 <= started.timestamp() <= written


def test_tightest_prefetch_budget_streams_every_chip(workspace, clean_run):
    """One batch per actor in the object store: nothing stalls, nothing is lost."""
    import ray.data

    from pipeline.run.graph import in_flight_bytes, run_job

    report = run_job(make_spec(workspace, "prefetch-1", prefetch_batches=1))
    assert report["exit_code"] == 0, report
    assert committed_rows(workspace / "prefetch-1") == clean_run[1]
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    # 2 actors x 1 batch of 4 chips (model.batch_size; 18 chips are too few for longer
    # runs, see transport_batch) of 3 x 256^2 uint8 pixels + 256 x 32 mask bytes
    assert limits.object_store_memory == in_flight_bytes(1, 2, 4, 3, 256, 1) == 8 * (3 * 256 * 256 + 256 * 32)


def test_actor_killed_once_mid_batch_loses_nothing(workspace, clean_run, tmp_path):
    from pipeline.run.graph import run_job

    faults = FaultPlan(crash_once=["synth_000/r1c1"], marker_dir=str(tmp_path))
    report = run_job(make_spec(workspace, "crash-once"), faults=faults)
    assert (tmp_path / "crashed-synth_000_r1c1").exists(), "the fault was not injected"
    assert report["exit_code"] == 0, report
    assert committed_rows(workspace / "crash-once") == clean_run[1]


def test_poison_chip_is_quarantined_and_the_rest_committed(workspace, clean_run):
    from pipeline.run.graph import run_job

    poison = "synth_001/r0c1"
    report = run_job(make_spec(workspace, "poison"), faults=FaultPlan(crash_always=[poison]))
    assert report["exit_code"] == 1
    assert [q["chip_id"] for q in report["chips_quarantined"]] == [poison]
    assert report["scenes_ok"] == ["synth_000"]  # the poisoned scene committed what was found, as partial
    assert [(p["scene_id"], p["chips_missing"]) for p in report["scenes_partial"]] == [("synth_001", 1)]
    rows = committed_rows(workspace / "poison")
    clean_other = [r for r in clean_run[1] if r[0] == "synth_000"]
    assert [r for r in rows if r[0] == "synth_000"] == clean_other


def test_the_chip_ledger_keeps_strikes_in_an_actor_of_the_run(ray_session):
    """The ledger's bookkeeping through its actor, crash by crash: a retried call finds its
    chips in flight, a chip that died alone collects one strike more, and the run's ledger
    goes with clear() (another run's stays)."""
    import pytest
    import ray

    from pipeline.infer.ledger import ChipLedger

    ledger, other = ChipLedger.start("run-a"), ChipLedger.start("run-b")
    call = ["s/r0c0", "s/r0c1", "s/r0c2"]
    assert ledger.enter(call) == [0, 0, 0]
    ledger.leave(call)
    assert ledger.enter(call) == [0, 0, 0], "a call that finished leaves no strike"
    assert other.enter(call) == [0, 0, 0], "runs are apart"
    # The predictor died with the call in flight: on the retry each chip is a suspect.
    assert ledger.enter(call) == [1, 1, 1]
    ledger.enter_alone("s/r0c0", 1)
    ledger.leave_alone("s/r0c0")  # predicted alone
    ledger.enter_alone("s/r0c1", 1)  # ... and the predictor died with this one alone
    assert ledger.enter(call) == [1, 2, 1]
    ledger.enter_alone("s/r0c1", 2)  # died again
    assert ledger.enter(call) == [1, 3, 1]

    ledger.clear()
    # ray.kill is asynchronous: calls may still land until the actor is gone (bounded wait).
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ledger.enter(call)
    assert other.enter(call) == [1, 1, 1], "another run's ledger stays"
    other.clear()


def test_python_exception_in_a_chip_quarantines_only_that_chip(workspace, ray_session):
    from pipeline.run.graph import run_job

    report = run_job(make_spec(workspace, "raises"), faults=FaultPlan(raise_always=["synth_000/r0c0"]))
    assert report["exit_code"] == 1
    assert [q["chip_id"] for q in report["chips_quarantined"]] == ["synth_000/r0c0"]
    assert "injected failure" in report["chips_quarantined"][0]["reason"]


def test_predictor_cuts_ray_batches_into_forward_batches(workspace, ray_session):
    """forward_batch only changes how many chips go through one forward, not what is found."""
    from ray.data.block import BlockAccessor

    from pipeline.infer.predictor import ChipPredictor, decode_detections

    rng = np.random.default_rng(0)
    n = 5
    batch = {"chip_id": np.array([f"s/r0c{i}" for i in range(n)], dtype=object),
             "scene_id": np.array(["s"] * n, dtype=object), "col_off": np.arange(n) * 224, "row_off": np.zeros(n, int),
             "pixels": np.array([c.tobytes() for c in rng.integers(0, 255, (n, 3, 256, 256), dtype=np.uint8)],
                                dtype=object),
             "pixel_dtype": np.array(["uint8"] * n, dtype=object),
             "valid": np.full((n, 256, 32), 255, dtype=np.uint8),
             "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object)}
    block = BlockAccessor.batch_to_block(batch)  # the Arrow block Ray Data hands the actor
    outputs = {}
    for step in (None, 2):
        predictor = ChipPredictor(str(workspace / "model.pt"), score_threshold=0.3, precision="fp32", device="cpu",
                                  forward_batch=step)
        outputs[step] = predictor(block)
    assert list(outputs[2]["status"]) == ["ok"] * n
    found = 0
    for whole, cut in zip(outputs[None]["detections"], outputs[2]["detections"]):
        a, b = decode_detections(whole), decode_detections(cut)
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-3)
        found += len(a)
    assert found > 0


def test_detections_centred_on_nodata_are_dropped():
    from pipeline.infer.predictor import centres_on_valid_pixels

    valid = np.zeros((8, 8), dtype=bool)
    valid[:, :4] = True  # left half valid
    boxes = np.array([[0, 0, 2, 2],     # centre (1, 1): valid
                      [4, 4, 8, 8],     # centre (6, 6): nodata
                      [2, 0, 7, 2],     # centre (4.5 -> 4, 1): nodata, though it overlaps valid pixels
                      [-3, -3, 1, 1],   # centre (-1, -1) clipped to (0, 0): valid
                      ], dtype=np.float32)
    assert centres_on_valid_pixels(boxes, np.packbits(valid, axis=-1), 8).tolist() == [True, False, False, True]


def test_valid_centres_read_from_packed_bits_match_the_unpacked_mask():
    """The predictor reads each centre's bit from the mask as the read task packs it; numpy's
    unpackbits of the same mask is the oracle (widths that are not a multiple of 8 too)."""
    from pipeline.infer.predictor import centres_on_valid_pixels

    rng = np.random.default_rng(4)
    for height, width in ((64, 64), (37, 61), (512, 512)):
        valid = rng.random((height, width)) < 0.5
        corners = rng.uniform(-20, max(height, width) + 20, (500, 2, 2))
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)
        cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(int), 0, width - 1)
        cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(int), 0, height - 1)
        packed = np.packbits(valid, axis=-1)
        unpacked = np.unpackbits(packed, axis=-1, count=width).astype(bool)
        assert np.array_equal(centres_on_valid_pixels(boxes, packed, width), unpacked[cy, cx])


def test_chip_pixels_are_read_from_the_arrow_block_without_copies():
    """binary_views: one view per row into the Arrow buffer, whatever the chunking and slicing
    of the column; pyarrow's own to_pylist is the oracle."""
    import pyarrow as pa

    from pipeline.infer.predictor import binary_views, stack_chip_pixels

    rng = np.random.default_rng(5)
    chips = [rng.integers(0, 255, (3, 8, 8), dtype=np.uint8).tobytes() for _ in range(7)]
    chips[3] = b""  # a chip that failed to read travels empty
    for column in (pa.chunked_array([pa.array(chips, pa.binary())]),
                   pa.chunked_array([pa.array(chips[:2], pa.binary()), pa.array(chips, pa.binary()).slice(2)]),
                   pa.chunked_array([pa.array(chips, pa.large_binary()).slice(1, 5)])):
        views = binary_views(column)
        assert [v.tobytes() for v in views] == column.to_pylist()
        # views, not copies: they point into the column's data buffers
        buffers = [c.buffers()[2] for c in column.chunks]
        assert all(any(b.address <= v.ctypes.data < b.address + b.size for b in buffers) for v in views if v.size)
    views = binary_views(pa.chunked_array([pa.array(chips, pa.binary())]))
    ok = [0, 1, 2, 4]
    assert np.array_equal(stack_chip_pixels([views[i] for i in ok], ["uint8"] * 4, 8),
                          np.stack([np.frombuffer(chips[i], np.uint8).reshape(3, 8, 8) for i in ok]))


def test_quicklook_is_linked_from_the_run_report(clean_run, workspace, tmp_path):
    from pipeline.render import render_quicklook

    report = clean_run[0]
    summary = render_quicklook(workspace / "clean", str(workspace / "scenes" / "synth_000.tif"),
                               tmp_path / "q.png")
    assert summary["reports"] == [report["report_path"]]
    saved = json.loads(open(report["report_path"]).read())
    assert saved["quicklooks"]["synth_000"] == str((tmp_path / "q.png").resolve())


def test_progress_line_rate_excludes_start_up_and_gives_an_eta():
    from pipeline.run.graph import progress_line

    assert progress_line(120, 400, 3, 10, 60.0) == "  120/400 chips, 3/10 scenes committed, 2.0 chips/s, ETA 2m20s"
    assert progress_line(10, 100000, 0, 10, 10.0).endswith("1.0 chips/s, ETA 27h46m")
    assert progress_line(0, 400, 0, 10, 0.0).endswith("ETA unknown")
    assert progress_line(120, 400, 3, 10, 60.0, estimated=True).startswith("  120/~400 chips")


GATED_STREAM = """
import json, time
import numpy as np
import ray
import ray.data
from pipeline.compute.cluster import connect_ray
from pipeline.run.graph import blocks_as_done

connect_ray(None)

@ray.remote(num_cpus=0)
class Gate:
    def __init__(self):
        self.opened = False

    def open(self):
        self.opened = True

    def is_open(self):
        return self.opened

# Counts its own calls rather than looking at row ids: the pool may hand the actor
# either block first, and only the one it runs second must wait for the driver.
class WaitForTheGateFromTheSecondCallOn:

    def __init__(self, gate):
        self.gate = gate
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        opened = True
        if self.calls >= 2:
            deadline = time.monotonic() + 90
            while not ray.get(self.gate.is_open.remote()) and time.monotonic() < deadline:
                time.sleep(0.05)
            opened = ray.get(self.gate.is_open.remote())
        return {"i": batch["i"], "gate_opened_in_time": np.array([opened] * len(batch["i"]))}

gate = Gate.remote()
ds = ray.data.from_items([{"i": i} for i in range(4)], override_num_blocks=2)
ds = ds.map_batches(WaitForTheGateFromTheSecondCallOn, batch_size=2, fn_constructor_kwargs={"gate": gate},
                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
blocks = []
for batch in blocks_as_done(ds):
    blocks.append({"i": [int(i) for i in batch["i"]], "in_time": bool(all(batch["gate_opened_in_time"]))})
    ray.get(gate.open.remote())
print(json.dumps(sorted(blocks, key=lambda b: b["i"])))
"""


@pytest.mark.ray  # a Ray of its own in a child process
def test_the_driver_gets_each_block_as_soon_as_it_is_done():
    """The block the actor runs second finishes only after the driver opened the gate on
    seeing the first: a stream that held a finished block back until the next one was
    done (Ray Data's default read-ahead) would leave it waiting out its 90 s, which no
    loaded machine comes near when blocks do stream (6-10 s at worst, measured). In a
    Ray of its own, as a run has: the test session's Ray Data context carries earlier
    tests' settings and executors."""
    from tests.children import run_child

    blocks, _ = run_child(GATED_STREAM, timeout=180)
    assert blocks == [{"i": [0, 1], "in_time": True}, {"i": [2, 3], "in_time": True}]
