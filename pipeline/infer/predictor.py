"""The predictor actor: one RetinaNet per actor (per GPU), detections per chip.

Bounded failure handling, because Ray Data restarts a crashing actor forever by default:

- A Python exception while predicting a batch: the batch is re-run chip by chip, and a
  chip that raises on its own is returned as ``quarantined`` with the error. Nothing
  else is lost.
- A hard crash (segfault, OOM kill, os._exit) takes the actor down; Ray restarts it and
  retries the batch a bounded number of times. The run's ChipLedger (a small Ray actor of
  the run, :mod:`pipeline.infer.ledger`) remembers which chips
  were in flight when a predictor died ("strikes"). A batch that holds a chip with a
  strike is run chip by chip, so only the culprit collects more strikes; a chip with more
  than ``max_strikes`` is quarantined without being run again.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.io.objstore import local_file
from retinanet.options import CPU_BATCH_SIZE

if TYPE_CHECKING:  # each actor imports the one backend it runs (torch, ONNX Runtime or OpenVINO)
    from retinanet.export import OnnxDetector
    from retinanet.openvino_backend import OpenVinoDetector
    from retinanet.runtime import Detector, StagedCopies

DETECTION_FIELDS = 6  # x1, y1, x2, y2 (scene pixels), score, label id
# The predictor's stages, timed per call and returned as <stage>_seconds columns (the run report's figures).
ACTOR_STAGES = ("transfer", "forward", "postprocess")


@dataclass
class FaultPlan:
    """Test-only fault injection, passed by run_job's caller (never read from job files).

    crash_always: chip ids whose prediction kills the actor process on every attempt.
    crash_once: chip ids that kill the actor the first time only (marker files in marker_dir).
    raise_always: chip ids whose prediction raises a Python exception.
    stall: chip ids whose first prediction writes ``stalled-<chip>`` (holding the pid) into marker_dir and then
    sleeps ``stall_seconds``, so a test can act (remove a node) while the chip is in flight.
    """

    crash_always: list[str] = field(default_factory=list)
    crash_once: list[str] = field(default_factory=list)
    raise_always: list[str] = field(default_factory=list)
    stall: list[str] = field(default_factory=list)
    stall_seconds: float = 0.0
    marker_dir: str = ""

    def apply(self, chip_ids) -> None:
        for cid in chip_ids:
            if cid in self.crash_always:
                os._exit(13)
            if cid in self.crash_once:
                marker = os.path.join(self.marker_dir, f"crashed-{cid.replace('/', '_')}")
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(13)
            if cid in self.raise_always:
                raise RuntimeError(f"injected failure on chip {cid}")
            if cid in self.stall:
                marker = os.path.join(self.marker_dir, f"stalled-{cid.replace('/', '_')}")
                if not os.path.exists(marker):
                    with open(marker, "w") as f:  # the stalled process, for the test to tell it apart
                        f.write(str(os.getpid()))
                    time.sleep(self.stall_seconds)


def encode_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> bytes:
    """(N, 6) float32 rows x1, y1, x2, y2, score, label as bytes (a compact Arrow binary cell)."""
    rows = np.empty((len(boxes), DETECTION_FIELDS), dtype=np.float32)
    rows[:, :4] = boxes
    rows[:, 4] = scores
    rows[:, 5] = labels
    return rows.tobytes()


def apply_job_settings(config, score_threshold: float | None, nms_threshold: float | None,
                       detections_per_chip: int | None) -> None:
    """The job's postprocessing settings (model.score_threshold, ...) onto a model config
    where the job has them; the checkpoint's own stay where it does not."""
    for name, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold),
                        ("detections_per_image", detections_per_chip)):
        if value is not None:
            setattr(config, name, value)


def stack_chip_pixels(blobs: list, dtypes: list[str], chip_size: int) -> np.ndarray:
    """Chips as they travel (each chip's raw bytes in its file's dtype: bytes or a uint8
    view, see :func:`binary_views`) -> one (B, C, S, S) array in the smallest dtype that
    holds them all exactly (numpy's promotion: uint8 with uint16 -> uint16; with float32 ->
    float32). The one copy of the pixels on the actor's host side.

    Why bytes: a job may mix scenes of several dtypes, and Ray Data hands on a batch merged
    from uint8 and uint16 tensor blocks as uint8, without an error; a binary column merges
    without touching the values.
    """
    return np.stack([np.frombuffer(b, dtype=d).reshape(-1, chip_size, chip_size) for b, d in zip(blobs, dtypes)])


def binary_views(column) -> list[np.ndarray]:
    """A pyarrow binary column (ChunkedArray, any chunking and slicing) -> one read-only
    uint8 view per row into its Arrow buffer, without copying.

    Ray Data's numpy batches turn each cell of a binary column into a Python bytes object,
    a copy of every chip; with these views (and the packed-bit centre lookup) the host-side
    work on a block of 64 RGB chips of 512² fell to 0.42-0.44x (bench/predictor_bench.py)."""
    import pyarrow as pa

    views: list[np.ndarray] = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError("a chip's pixels are null (a read task writes empty bytes, never null)")
        _, offsets_buffer, data_buffer = chunk.buffers()
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
        views.extend(data[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    return views


def chip_batch_columns(table) -> dict:
    """A predictor's input block (a pyarrow Table, as Ray Data hands it with
    batch_format="pyarrow") -> {column: numpy array}, except ``pixels``: a list of uint8
    views (:func:`binary_views`). ``valid`` (a Ray tensor column) comes as a view too."""
    from ray.data.block import BlockAccessor

    block = BlockAccessor.for_block(table)
    # one column's to_numpy is an array (Ray's annotation says array or dict of arrays)
    columns: dict[str, Any] = {name: block.to_numpy(name) for name in table.column_names if name != "pixels"}
    columns["pixels"] = binary_views(table.column("pixels"))
    return columns


def centres_on_valid_pixels(boxes: np.ndarray, valid_bits: np.ndarray, width: int) -> np.ndarray:
    """(N,) bool: True where the centre of a chip-pixel XYXY box lies on a valid pixel.

    valid_bits: (H, ceil(W / 8)) the chip's valid-pixel mask bit-packed along x, as the read
    task packs it (np.packbits, most significant bit first); only the N centres' bits are
    read, not the H x W mask. Detections centred on nodata (scene borders, masked regions,
    the padding of edge chips) describe no real object and are dropped.
    """
    height = valid_bits.shape[0]
    cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, width - 1)
    cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, height - 1)
    return ((valid_bits[cy, cx >> 3] >> (7 - (cx & 7))) & 1).astype(bool)


def decode_detections(blob: bytes) -> np.ndarray:
    """Inverse of encode_detections -> (N, 6) float32."""
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, DETECTION_FIELDS)


def probe_batch_size(checkpoint: str, chip_size: int, precision: str, device: str, fraction: float) -> int:
    """Batch size for this process's device from its free memory (see retinanet.runtime.auto_batch_size)."""

    from retinanet import load_checkpoint
    from retinanet.runtime import auto_batch_size

    model, _ = load_checkpoint(local_file(checkpoint))
    return auto_batch_size(model, chip_size, local_device(device), precision, fraction=fraction)


def resolve_batch_size(model_spec, chip_size: int, gpus_per_actor: float) -> int:
    """`model.batch_size`, or when it is null one chosen for the predictors' device.

    No GPU per actor (or device cpu): retinanet.options.CPU_BATCH_SIZE. Otherwise a one-off
    Ray task holding one actor's GPU share loads the model there and measures (the driver
    may have no GPU); Ray ends a GPU task's worker after it, so its memory is returned
    before the actors start. A fractional share gets that fraction of the free memory.
    The ONNX backend is probed in fp32, the precision its graph runs in.
    """
    if model_spec.batch_size:
        return model_spec.batch_size
    if gpus_per_actor <= 0 or model_spec.device == "cpu":
        return CPU_BATCH_SIZE
    import ray

    probe = ray.remote(num_gpus=gpus_per_actor, num_cpus=0)(probe_batch_size)
    fraction = 0.8 * min(1.0, gpus_per_actor)
    return int(ray.get(probe.remote(model_spec.checkpoint, chip_size, probed_precision(model_spec), model_spec.device,
                                    fraction)))


def probed_precision(model_spec) -> str:
    """The precision a batch size is measured in: the ONNX backend's graph runs in fp32."""
    return "fp32" if model_spec.backend == "onnx" else model_spec.precision


def local_batch_size(model_spec, chip_size: int, device: str) -> int:
    """`model.batch_size`, or when it is null one chosen for `device` in this process (no
    Ray): retinanet.options.CPU_BATCH_SIZE on the CPU, else measured on the GPU's free memory."""
    if model_spec.batch_size:
        return model_spec.batch_size
    if device == "cpu":
        return CPU_BATCH_SIZE
    return probe_batch_size(model_spec.checkpoint, chip_size, probed_precision(model_spec), device, 0.8)


def local_device(device: str) -> str:
    """model.device in this process: ``auto`` is cuda where torch sees a GPU, else cpu."""
    if device != "auto":
        return device
    from retinanet.runtime import resolve_device  # the one answer to "auto" (imports torch)

    return resolve_device(device).type


def actor_device(device: str) -> str:
    """model.device for this actor: ``auto`` is cuda when Ray gave the actor a GPU that
    torch can see (Ray pins GPUs through CUDA_VISIBLE_DEVICES), else cpu. A CPU actor
    decides without importing torch."""
    if device != "auto":
        return device
    import ray

    if not ray.get_gpu_ids():
        return "cpu"
    return local_device(device)


def resolve_backend(backend: str, device: str) -> str:
    """model.backend for an actor on `device` (cpu or cuda): ``auto`` is openvino on the
    CPU where the package imports, torch otherwise."""
    if backend != "auto":
        return backend
    if device == "cpu":
        from retinanet.openvino_backend import openvino_available

        return "openvino" if openvino_available() else "torch"
    return "torch"


def local_cpu_openvino(model_spec, compute_spec) -> bool:
    """Whether a run's predictors will be OpenVINO actors on this very machine, known
    before Ray starts and without torch: a local Ray (no ``compute.address``), and backend
    openvino, or auto with CPU actors (``model.device`` cpu, no GPU per actor, or no NVIDIA
    device on this machine, in which case the local Ray has no GPU to give)."""
    if compute_spec.address is not None or model_spec.backend not in ("auto", "openvino"):
        return False
    if model_spec.backend == "auto":
        on_cpu = (model_spec.device == "cpu" or compute_spec.gpus_per_actor == 0
                  or not any(Path("/dev").glob("nvidia[0-9]*")))
        if not on_cpu:
            return False
    return importlib.util.find_spec("openvino") is not None  # installed; importing it is the actors' cost


def convert_ahead(checkpoint: str, chip_size: int) -> None:
    """Convert the checkpoint's OpenVINO graph for this chip size on this node now (in a
    child process; nothing when it is cached), so that actors starting meanwhile find it
    or wait on its lock instead of converting after they start. Best effort: a conversion
    that fails here is repeated, and reported with its reason, by the actor that needs it."""
    from pipeline.io.objstore import cache_dir
    from retinanet.checkpoint import file_sha256
    from retinanet.openvino_backend import OpenVinoDetector, graph_exists, graph_file

    with contextlib.suppress(Exception):
        path, graphs = local_file(checkpoint), cache_dir() / "openvino"
        if not graph_exists(graph_file(graphs, file_sha256(path), (chip_size, chip_size))):  # else: no openvino import
            OpenVinoDetector(path, cache_dir=graphs).convert((chip_size, chip_size))


class ChipEngine:
    """One model in this process: chips in their file dtype in, detections in scene pixels
    out. No Ray: each predictor actor holds one, and so does `pipeline.predict_scene`.

    ``device`` (cpu or cuda) and ``backend`` (torch, onnx or openvino) are resolved already
    (:func:`actor_device` or :func:`local_device`, then :func:`resolve_backend`).
    ``forward_batch``: chips per forward pass (None: all chips of a call at once).
    ``chip_size``: an OpenVINO graph is converted and compiled for it now, not on the first call.
    """

    def __init__(self, checkpoint: str, device: str, backend: str, precision: str = "auto",
                 num_threads: int | None = None, score_threshold: float | None = None,
                 nms_threshold: float | None = None, detections_per_chip: int | None = None,
                 forward_batch: int | None = None, chip_size: int | None = None, int8: dict | None = None):
        checkpoint = local_file(checkpoint)  # s3:// / gs://: fetched once per node
        self.detector: OpenVinoDetector | OnnxDetector | Detector  # the backend's
        if backend == "openvino":
            # No torch in this process: numpy postprocessing, conversion in a child process.
            from pipeline.io.objstore import cache_dir
            from retinanet.openvino_backend import OpenVinoDetector

            self.detector = OpenVinoDetector(checkpoint, precision=precision, num_threads=num_threads,
                                             cache_dir=cache_dir() / "openvino",
                                             int8_key=int8["key"] if int8 else None)
            if int8:  # measured and made by the driver (pipeline.infer.int8): install it on this node
                self.detector.install_graph(int8["name"], int8["xml"], int8["bin"], int8["geometry_name"],
                                            int8["geometry"])
            if chip_size:  # convert (or load the cached graph) and compile now, not on the first batch
                self.detector.prepare((chip_size, chip_size))
            config = self.detector.config
        else:
            config = self._torch_detector(checkpoint, backend, device, precision, num_threads)
        apply_job_settings(config, score_threshold, nms_threshold, detections_per_chip)
        self.backend = backend
        self.numpy_detector = backend == "openvino"  # numpy in and out (OpenVinoDetector.detect)
        self.in_channels = config.in_channels
        # torch: the StagedCopies of this engine's device, made on its first batch
        self.staging: StagedCopies | None = None
        # Chips per forward pass; callers hand over larger batches (fewer, cheaper transfers)
        # and they are cut to this size here. None: the whole batch at once.
        self.forward_batch = forward_batch

    def _torch_detector(self, checkpoint: str, backend: str, device: str, precision: str,
                        num_threads: int | None):
        """The torch or ONNX Runtime detector -> the model's config."""
        import torch

        from retinanet import Detector, load_checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        if backend == "onnx":
            # The graph: CHECKPOINT.onnx when `pipeline export` made it from this very
            # checkpoint (SHA-256 in its metadata), else exported once per node into
            # $TMPDIR/retinanet-onnx and reused; onnxruntime picks GPU providers itself.
            from retinanet.export import OnnxDetector, onnx_for_checkpoint

            self.detector = OnnxDetector(onnx_for_checkpoint(checkpoint), device=device, precision=precision,
                                         num_threads=num_threads)
            return self.detector.model.config  # a weightless model: config, anchors and postprocess only
        if precision == "int8":
            raise ValueError(f"model.precision int8 runs on OpenVINO CPU actors; this actor runs {backend} "
                             f"on {device}")
        from retinanet.runtime import fold_batch_norm, resolve_precision

        model = load_checkpoint(checkpoint)[0]
        if resolve_precision(precision, torch.device(device)) is not None:
            # bf16/fp16: one op per convolution instead of two (1.6x on CPU). fp32 stays
            # op for op the model as trained: the reference path, exact to float32.
            model = fold_batch_norm(model)
        detector = Detector(model, device=device, precision=precision)
        self.detector = detector
        return detector.model.config

    @property
    def name(self) -> str:
        """What runs, for reports: device, precision and backend."""
        return f"device={self.detector.device} {self.detector.precision} {self.backend}"

    def chip_detections(self, pixels: np.ndarray, valid_bits: np.ndarray, offsets: np.ndarray,
                        seconds: dict[str, float] | None = None) -> list[bytes]:
        """Detections of a batch of chips, each encoded (:func:`encode_detections`) in scene pixels.

        pixels: (B, C, S, S) in the file's dtype (cast on the device). valid_bits: (B, S,
        ceil(S / 8)) each chip's valid-pixel mask bit-packed along x (detections centred on
        nodata are dropped, see :func:`centres_on_valid_pixels`). offsets: (B, 2) each chip's
        (col_off, row_off) in the scene. Raises ValueError when C is not the model's channels.
        seconds: where given, the call's wall seconds are added to it under ``transfer`` (chips
        onto the device, in their dtype), ``forward`` (the model: network, decoding, NMS) and
        ``postprocess`` (the copy back, the valid-pixel check, encoding), see :func:`add_seconds`.
        """
        if pixels.shape[1] != self.in_channels:
            raise ValueError(f"chips have {pixels.shape[1]} bands, the model expects {self.in_channels}")
        seconds = {} if seconds is None else seconds
        chip_size = pixels.shape[-1]
        found = []
        detected = self.detect(pixels, self.forward_batch or len(pixels), seconds)
        started = time.perf_counter()
        for r, valid, (col_off, row_off) in zip(detected, valid_bits, offsets):
            boxes, scores, labels = r["boxes"], r["scores"], r["labels"]
            keep = centres_on_valid_pixels(boxes, valid, chip_size)
            offset = np.array([col_off, row_off] * 2, dtype=np.float32)
            found.append(encode_detections(boxes[keep] + offset, scores[keep], labels[keep]))
        add_seconds(seconds, "postprocess", started)
        return found

    def detect(self, pixels: np.ndarray, step: int, seconds: dict[str, float] | None = None
               ) -> list[dict[str, np.ndarray]]:
        """Forward passes of `step` chips (in their file dtype) -> numpy detections per chip.

        Torch: the chips go to the device in their own dtype (the model normalises them
        there), each pass's copy queued while the pass before runs (StagedCopies: pinned
        buffers, non-blocking copies, one side stream on CUDA), and each pass's detections
        come back in one copy (detections_to_host). `seconds`: as in :meth:`chip_detections`.
        On CUDA a copy the forward has to wait for counts as forward (the host sees its end only)."""
        seconds = {} if seconds is None else seconds
        if self.numpy_detector:  # OpenVINO runs the passes on its parallel streams
            from retinanet.openvino_backend import OpenVinoDetector

            assert isinstance(self.detector, OpenVinoDetector)  # numpy_detector: backend openvino (__init__)
            started = time.perf_counter()
            floats = pixels.astype(np.float32, copy=False)
            started = add_seconds(seconds, "transfer", started)
            per_chip = self.detector.detect(floats, chips_per_request=step)
            add_seconds(seconds, "forward", started)
            return per_chip
        import torch

        from retinanet.runtime import StagedCopies, detections_to_host

        if self.staging is None:
            device = self.detector.device
            assert isinstance(device, torch.device)  # torch's and ONNX Runtime's detectors (OpenVINO's: above)
            self.staging = StagedCopies(device)
        staging = self.staging  # its pinned buffers are reused by the next call
        batches = staging.each(torch.from_numpy(pixels[start:start + step]) for start in range(0, len(pixels), step))
        found: list[dict[str, np.ndarray]] = []
        while True:
            started = time.perf_counter()
            images = next(batches, None)
            if images is None:
                add_seconds(seconds, "transfer", started)
                return found
            images = images.float()  # on the device: integer chips travelled small
            started = add_seconds(seconds, "transfer", started)
            detections = self.detector(images)
            started = add_seconds(seconds, "forward", started)
            found += detections_to_host(detections)
            add_seconds(seconds, "postprocess", started)


def add_seconds(seconds: dict[str, float], stage: str, started: float) -> float:
    """Add the wall seconds since `started` (time.perf_counter) to ``seconds[stage]`` -> now."""
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - started
    return now


class ChipPredictor:
    """Callable class for Ray Data's map_batches: loads the checkpoint once, predicts batches.

    Input: a pyarrow Table (map_batches' batch_format="pyarrow", so that the pixels are not
    copied into Python bytes, see :func:`binary_views`) with columns chip_id, scene_id,
    col_off, row_off, pixels (raw bytes of each chip's (C, S, S) array) and pixel_dtype (its
    file's dtype), see :func:`stack_chip_pixels`,
    valid (B, S, S/8) bit-packed valid-pixel masks (detections centred on nodata are dropped),
    status ("ok" or a read failure), error. Output columns: chip_id, scene_id, status,
    error, detections (bytes, see encode_detections; boxes in SCENE pixels), worker.
    """

    def __init__(self, checkpoint: str, score_threshold: float | None = None, precision: str = "auto",
                 device: str = "auto", ledger=None, max_strikes: int = 2, num_threads: int | None = None,
                 faults: FaultPlan | None = None, backend: str = "auto", forward_batch: int | None = None,
                 nms_threshold: float | None = None, detections_per_chip: int | None = None,
                 chip_size: int | None = None, int8: dict | None = None):
        import ray

        device = actor_device(device)
        self.engine = ChipEngine(checkpoint, device, resolve_backend(backend, device), precision=precision,
                                 num_threads=num_threads, score_threshold=score_threshold,
                                 nms_threshold=nms_threshold, detections_per_chip=detections_per_chip,
                                 forward_batch=forward_batch, chip_size=chip_size, int8=int8)
        self.ledger = ledger
        self.max_strikes = max_strikes
        self.faults = faults
        gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
        self.worker = f"pid={os.getpid()} gpus=[{gpu_ids}] {self.engine.name}"
        self.node = ray.get_runtime_context().get_node_id()
        self.seconds: dict[str, float] = {}  # the current call's stage seconds (ACTOR_STAGES)

    def __call__(self, table) -> dict[str, np.ndarray]:
        batch = chip_batch_columns(table)
        chip_ids = [str(c) for c in batch["chip_id"]]
        n = len(chip_ids)
        status = np.array([str(s) for s in batch["status"]], dtype=object)
        error = np.array([str(e) for e in batch["error"]], dtype=object)
        detections = np.array([b""] * n, dtype=object)
        runnable = np.flatnonzero(status == "ok")
        self.seconds = dict.fromkeys(ACTOR_STAGES, 0.0)  # this call's, see ChipEngine.chip_detections

        runnable_ids = [chip_ids[i] for i in runnable]
        ledger = self.ledger if runnable_ids else None
        strikes = ledger.enter(runnable_ids) if ledger else [0] * len(runnable)
        if ledger and any(strikes):
            # A predictor died with these chips in flight: isolate them one by one.
            for i, s in zip(runnable, strikes):
                if s > self.max_strikes:
                    status[i], error[i] = "quarantined", f"chip crashed the predictor {s} times"
                    ledger.leave_alone(chip_ids[i])
                    continue
                ledger.enter_alone(chip_ids[i], s)
                self._predict_into(batch, [i], chip_ids, status, error, detections)
                ledger.leave_alone(chip_ids[i])
        else:
            self._predict_into(batch, list(runnable), chip_ids, status, error, detections)
        if ledger:
            ledger.leave(runnable_ids)
        out = {"chip_id": np.array(chip_ids, dtype=object), "scene_id": batch["scene_id"], "status": status,
               "error": error, "detections": detections, "worker": np.array([self.worker] * n, dtype=object),
               "predicted_on": np.array([self.node] * n, dtype=object)}
        for passed in ("plan", "planned_on", "read_on", "read_seconds"):  # for the driver: the scene's plan,
            if passed in batch:                                           # where work ran, the read's seconds
                out[passed] = batch[passed]
        for stage, spent in self.seconds.items():  # each row its share (the driver sums rows)
            out[f"{stage}_seconds"] = np.full(n, spent / max(n, 1))
        return out

    def _predict_into(self, batch, indices, chip_ids, status, error, detections) -> None:
        if not indices:
            return
        try:
            self._predict(batch, indices, chip_ids, detections)
        except Exception as err:  # noqa: BLE001 - isolate the failing chip, keep the rest
            if len(indices) == 1:
                i = indices[0]
                status[i], error[i] = "quarantined", f"prediction failed: {type(err).__name__}: {err}"
                return
            for i in indices:
                self._predict_into(batch, [i], chip_ids, status, error, detections)

    def _predict(self, batch, indices, chip_ids, detections) -> None:
        if self.faults:
            self.faults.apply([chip_ids[i] for i in indices])
        started = time.perf_counter()
        chip_size = batch["valid"].shape[1]
        pixels = stack_chip_pixels([batch["pixels"][i] for i in indices], [batch["pixel_dtype"][i] for i in indices],
                                   chip_size)  # file dtypes; the engine casts on device
        offsets = np.stack([batch["col_off"][indices], batch["row_off"][indices]], axis=1)
        add_seconds(self.seconds, "transfer", started)  # the host's stack is part of getting chips there
        for i, found in zip(indices, self.engine.chip_detections(pixels, batch["valid"][indices], offsets,
                                                                 self.seconds)):
            detections[i] = found
