"""The network on OpenVINO's CPU runtime, with `retinanet.Detector`'s interface.

What runs where: the dense part (the config's resize rule, normalise, pad, backbone with
batch norm folded, FPN, subnets) is converted from the checkpoint with
``openvino.convert_model`` once per chip size and compiled for the CPU; anchors, decoding
and NMS run in numpy and OpenVINO's NMS kernel (:mod:`retinanet.numpy_postprocess`), on
geometry the torch model computed at conversion and stored beside the graph. Conversion
runs in a child process, so the detector's process never imports torch: an actor saves
~0.6 GB and ~2 s of start-up, and the GBs of a conversion leave with the child.

Precision: ``auto`` leaves the choice to OpenVINO, which runs bf16 on CPUs with AMX or
AVX512-BF16 and f32 elsewhere; ``fp32`` and ``bf16`` force one (``fp16`` only where the
CPU has fp16 units). ``int8`` runs a graph quantised by NNCF (:meth:`OpenVinoDetector.quantize`,
post-training, calibrated on chips the caller chooses) and stored beside the f32 graph
under a key naming its calibration; INT8 changes results, so the pipeline measures it first
(`pipeline.infer.int8`). Measured on this project's 2-core AMX machine (R50-FPN, 512² chips):
0.09-0.11 s per chip against 0.25-0.37 s for torch bf16 (see BENCHMARKS.md).

Streams: the graph is compiled with OpenVINO's throughput hint, which splits the threads
into parallel streams (two of one thread on a 2-core actor), and :meth:`OpenVinoDetector.detect`
runs a batch's chips as one infer request each, postprocessing each chip while the later
ones run. One request over all threads meets at every layer and waits there for the
slowest thread, which loses most when reads share the cores: in a 2-core pipeline run
the chips after start-up went 1.10x (R50) and 1.14x (R18) faster; alone on an idle
machine the two are even. A call of a single chip runs on one stream's threads (half of
them on 2 cores), so callers should pass chips in runs, best in whole rounds (a multiple of `streams`).

Conversion takes seconds (a trace of the model), so converted graphs are cached per node
(``cache_dir``: `pipeline run` passes ``<its cache>/openvino``, see
:func:`pipeline.io.objstore.cache_dir`; default ``$TMPDIR/retinanet-openvino``), keyed by the
checkpoint's SHA-256 and the chip size; writes are atomic, so actors converting at once
each end with a whole file and later runs reuse it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from retinanet.checkpoint import file_sha256, read_checkpoint_header
from retinanet.config import RetinaNetConfig
from retinanet.files import default_cache_dir, write_atomically
from retinanet.numpy_postprocess import Geometry, Nms, check_anchor_count, postprocess

PRECISION_HINTS = {"auto": None, "fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": None}
INSTALL_HINT = "install it with: pip install openvino"


class Compiled(NamedTuple):
    """A graph compiled for one chip size, its postprocessing geometry and the infer
    requests that run it (one per stream)."""

    model: object
    geometry: Geometry
    requests: list


def openvino_available() -> bool:
    """True when the openvino package imports (it is a dependency; a trimmed install may lack it)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoDetector:
    """Batch inference of a checkpoint on OpenVINO's CPU plugin, without torch.

    `detector.detect(images)` takes a (B, C, H, W) float numpy array in the units of the
    model's image_mean and returns one dict per image ("boxes" (N, 4) float32 XYXY input
    pixels, "scores", "labels" int64) of numpy arrays; `detector(images)` does the same for
    a torch tensor and returns tensors, like `retinanet.Detector`. `config` is the model's
    RetinaNetConfig: set its score_threshold (or nms_threshold, detections_per_image) to
    change the postprocessing. `streams`: infer requests run at once (None: what OpenVINO's
    throughput hint picks for `num_threads`; 1: one request over all threads). Attributes:
    `device` ("cpu"), `precision` (what the compiled graph runs in, e.g. bf16), `streams`.
    """

    def __init__(self, checkpoint: str | os.PathLike, precision: str = "auto", num_threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, int8_key: str | None = None, streams: int | None = None):
        try:
            import openvino as ov
        except ImportError as err:
            raise ImportError(f"model.backend openvino needs the openvino package; {INSTALL_HINT}") from err
        if precision not in PRECISION_HINTS:
            raise ValueError(f"precision must be one of {tuple(PRECISION_HINTS)}, got {precision!r}")
        if (precision == "int8") != (int8_key is not None):
            raise ValueError("precision int8 runs a quantised graph and needs its int8_key (and only it does)")
        self.int8_key = int8_key
        self.checkpoint = Path(checkpoint)
        self.config = RetinaNetConfig.from_dict(read_checkpoint_header(checkpoint)["config"])
        self.sha256 = file_sha256(checkpoint)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir("openvino")
        self._core = ov.Core()
        self._requested = precision
        # Parallel streams (see the module doc), as many as OpenVINO's throughput hint picks for
        # the threads unless `streams` says; one stream is its latency hint (all threads, one request).
        self._config: dict = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        if streams is not None and streams > 1:
            self._config["NUM_STREAMS"] = int(streams)
        if num_threads:
            self._config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if PRECISION_HINTS[precision]:
            self._config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        self.device = "cpu"
        self._compiled: dict[tuple[int, int], Compiled] = {}
        self._nms = Nms()
        self.converted = 0  # graphs this detector had to convert (0 when every size was cached)

    # -- cache ---------------------------------------------------------------------------
    def graph_path(self, chip_hw: tuple[int, int], int8_key: str | None = None) -> Path:
        """The cached IR (.xml, weights in the .bin beside it) for chips of one size; with
        ``int8_key``, the graph quantised under that key."""
        return graph_file(self.cache_dir, self.sha256, chip_hw, int8_key)

    def geometry_path(self, chip_hw: tuple[int, int]) -> Path:
        """Anchors and sizes for postprocessing chips of one size (shared by f32 and INT8 graphs)."""
        return graph_file(self.cache_dir, self.sha256, chip_hw).with_suffix(".geometry.npz")

    def convert(self, chip_hw: tuple[int, int]) -> Path:
        """The cached graph for this size, converting it first if no process on this node has
        (nothing is compiled: a driver can convert ahead of the actors that will run it).
        Actors starting together take a file lock, so one converts and the others wait and
        load its result (conversion is seconds of CPU the others would otherwise repeat)."""
        path = self.graph_path(chip_hw)
        if graph_exists(path):
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if graph_exists(path):
                return path
            return self._convert_locked(chip_hw, path)

    def _convert_locked(self, chip_hw: tuple[int, int], path: Path) -> Path:
        """Convert in a child process, so that this one never imports torch: the child's
        torch, traced model and converter (GBs for an R50) are returned to the system when
        it exits, instead of staying in a long-lived actor for the rest of its run."""
        command = [sys.executable, "-c", CONVERT_IN_CHILD, str(self.checkpoint), str(path),
                   str(self.geometry_path(chip_hw)), str(chip_hw[0]), str(chip_hw[1])]
        # the parent's import path (a Ray runtime_env's working_dir, for one) for the child
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        child = subprocess.run(command, capture_output=True, text=True, env=env)
        if child.returncode != 0 or not graph_exists(path):
            reason = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit code {child.returncode}"
            raise RuntimeError(f"{self.checkpoint}: OpenVINO could not convert the network for {chip_hw[0]}x"
                               f"{chip_hw[1]} chips ({reason}); run it with model.backend: torch")
        self.converted += 1
        return path

    # -- INT8 --------------------------------------------------------------------------
    def quantize(self, chip_hw: tuple[int, int], chips: np.ndarray, int8_key: str) -> Path:
        """Quantise the f32 graph for chips of this size to INT8 with NNCF's post-training
        quantisation, calibrated on ``chips`` ((N, C, H, W), the units of the model's
        image_mean: what inference gets), and store it under ``int8_key``. Returns its path
        (kept as it is when a graph of that key exists)."""
        import openvino as ov

        path = self.graph_path(chip_hw, int8_key)
        if graph_exists(path):
            return path
        graph = ov.Core().read_model(str(self.convert(chip_hw)))
        samples = [np.asarray(chip, dtype=np.float32)[None] for chip in chips]
        # NNCF's progress bars go to stderr with the other progress: stdout may carry a report.
        # Its import makes torch warn that there is no CUDA toolkit, which is no news on a CPU node.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):
            import nncf

            quantized = nncf.quantize(graph, nncf.Dataset(samples), subset_size=len(samples))
        save_graph_atomically(quantized, path)
        return path

    def install_graph(self, path_name: str, xml: bytes, weights: bytes, geometry_name: str, geometry: bytes) -> None:
        """Put a graph made on another node (an INT8 graph: calibration is not repeated per
        node) and its geometry into this node's cache under their names, atomically; kept if
        already there."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if not (self.cache_dir / geometry_name).is_file():
            write_atomically(self.cache_dir / geometry_name, lambda tmp: tmp.write_bytes(geometry))
        path = self.cache_dir / path_name
        if not graph_exists(path):
            _write_graph_pair(path, lambda tmp: (tmp.with_suffix(".bin").write_bytes(weights), tmp.write_bytes(xml)))

    # -- inference -----------------------------------------------------------------------
    def _graph_for(self, chip_hw: tuple[int, int]) -> Path:
        if self.int8_key is None:
            return self.convert(chip_hw)
        path = self.graph_path(chip_hw, self.int8_key)
        if not graph_exists(path):
            raise RuntimeError(f"{self.checkpoint}: no INT8 graph {path.name} in {self.cache_dir}; INT8 graphs are "
                               f"made by quantize() (pipeline run with model.precision int8 makes and measures it)")
        return path

    def _compiled_for(self, chip_hw: tuple[int, int]) -> Compiled:
        compiled = self._compiled.get(chip_hw)
        if compiled is None:
            model = self._core.compile_model(str(self._graph_for(chip_hw)), "CPU", self._config)
            streams = int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            compiled = Compiled(model, Geometry.load(self.geometry_path(chip_hw)),
                                [model.create_infer_request() for _ in range(max(1, streams))])
            self._compiled[chip_hw] = compiled
        return compiled

    @property
    def streams(self) -> int:
        """Infer requests that run at once (OpenVINO's streams) for the graphs compiled so far."""
        return max((len(c.requests) for c in self._compiled.values()), default=0)

    @property
    def precision(self) -> str:
        """What the compiled graphs run in: bf16, f32, ... (the hint OpenVINO resolved);
        int8 for a quantised graph (its unquantised ops run in that hint's precision)."""
        if self.int8_key is not None:
            return "int8"
        if self._compiled:
            model = next(iter(self._compiled.values())).model
            return model.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # type: ignore[attr-defined]
        return self._requested

    def prepare(self, chip_hw: tuple[int, int]) -> None:
        """Convert (or load from the cache) and compile for chips of this size now, so the
        first batch does not pay for it."""
        self._compiled_for(chip_hw)

    def dense(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The compiled network alone, one request on one stream: chips (B, C, H, W) ->
        (cls_logits, box_deltas) float32, valid until the next call."""
        compiled = self._compiled_for((int(images.shape[-2]), int(images.shape[-1])))
        outputs = compiled.model(np.ascontiguousarray(images, dtype=np.float32))  # type: ignore[operator]
        return outputs[0], outputs[1]

    def detect(self, images: np.ndarray, chips_per_request: int = 1) -> list[dict[str, np.ndarray]]:
        """Detections of a (B, C, H, W) float batch, numpy in and out (see the class doc).
        The batch runs as requests of `chips_per_request` chips on the parallel streams."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.dtype.kind != "f":
            raise ValueError(f"images must be a (B, {self.config.in_channels}, H, W) floating array, got "
                             f"{images.dtype} of shape {tuple(images.shape)}")
        compiled = self._compiled_for((int(images.shape[-2]), int(images.shape[-1])))
        found: list[dict[str, np.ndarray]] = []
        for cls_logits, box_deltas in outputs_in_order(compiled.requests, images, chips_per_request):
            check_anchor_count(cls_logits.shape[1], compiled.geometry.level_counts, str(self.checkpoint))
            found += postprocess(cls_logits, box_deltas, compiled.geometry, self.config, self._nms)
        return found

    def __call__(self, images):
        """`retinanet.Detector`'s interface: a (B, C, H, W) float tensor -> dicts of tensors."""
        import torch

        found = self.detect(images.detach().to("cpu", torch.float32).numpy())
        return [{k: torch.from_numpy(v) for k, v in d.items()} for d in found]


def outputs_in_order(requests: list, images: np.ndarray, chips_per_request: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run `images` in slices of `chips_per_request` on `requests` in turn (each request
    on its own stream) -> each slice's (cls_logits, box_deltas), in order, as it finishes.

    A request's outputs stay valid until it is started again, which happens only after the
    caller has taken them (the generator resumes): the caller's postprocessing of one slice
    overlaps the network's work on the slices after it."""
    pending: list = []
    try:
        for n, start in enumerate(range(0, len(images), max(1, chips_per_request))):
            if len(pending) == len(requests):
                yield finished_outputs(pending.pop(0))
            request = requests[n % len(requests)]  # the one just taken, once all are busy
            request.start_async({0: np.ascontiguousarray(images[start:start + chips_per_request], dtype=np.float32)})
            pending.append(request)
        while pending:
            yield finished_outputs(pending.pop(0))
    finally:  # the caller stopped early (an error): leave no request running into the next call
        for request in pending:
            request.wait()


def finished_outputs(request) -> tuple[np.ndarray, np.ndarray]:
    """Wait for an infer request -> its (cls_logits, box_deltas), views into its output tensors."""
    request.wait()
    return request.get_output_tensor(0).data, request.get_output_tensor(1).data


def graph_file(cache_dir: Path, checkpoint_sha256: str, chip_hw: tuple[int, int], int8_key: str | None = None
               ) -> Path:
    """Where a node's cache keeps the graph of a checkpoint (by its SHA-256) for chips of one
    size: ``<first 16 hex>-chip512x512.xml``, ``...-int8-<key>.xml`` for a quantised one."""
    variant = f"-int8-{int8_key}" if int8_key else ""
    return cache_dir / f"{checkpoint_sha256[:16]}-chip{chip_hw[0]}x{chip_hw[1]}{variant}.xml"


# What the conversion child runs: python -c CONVERT_IN_CHILD CHECKPOINT GRAPH GEOMETRY H W
CONVERT_IN_CHILD = ("import sys; from retinanet.openvino_backend import convert_checkpoint; "
                    "convert_checkpoint(*sys.argv[1:])")


def convert_checkpoint(checkpoint: str, graph_path: str, geometry_path: str, height: str, width: str) -> None:
    """Trace a checkpoint's network (batch norm folded, resize rule in front) for chips of
    height x width into an OpenVINO graph, and store it with its postprocessing geometry;
    the geometry is written first, so a graph in place implies its geometry."""
    import openvino as ov
    import torch

    from retinanet.checkpoint import load_checkpoint
    from retinanet.export import ResizingDenseRetinaNet, postprocess_geometry
    from retinanet.runtime import fold_batch_norm

    chip_hw = (int(height), int(width))
    folded = fold_batch_norm(load_checkpoint(checkpoint)[0])
    channels = folded.config.in_channels
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # convert_model traces with torch.jit.trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # the resize rule's scale factor, traced as a constant
        graph = ov.convert_model(ResizingDenseRetinaNet(folded), example_input=torch.zeros(1, channels, *chip_hw),
                                 input=[ov.PartialShape([-1, channels, *chip_hw])])
    write_atomically(Path(geometry_path), postprocess_geometry(folded.config, chip_hw).save)
    save_graph_atomically(graph, Path(graph_path))


def graph_exists(path: Path) -> bool:
    """True when an IR graph and its weights are both in place (:func:`_write_graph_pair`)."""
    return path.is_file() and path.with_suffix(".bin").is_file()


def save_graph_atomically(graph, path: Path) -> None:
    """Write an OpenVINO graph (.xml + .bin) so that readers see a whole graph or none."""
    import openvino as ov

    _write_graph_pair(path, lambda tmp: ov.save_model(graph, tmp, compress_to_fp16=False))


def _write_graph_pair(path: Path, write) -> None:
    """``write(tmp_xml)`` writes a graph under temporary names; then the weights and then
    the graph are renamed into place (a reader checks the .xml, so it never meets half a pair)."""
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:8]}.xml")
    try:
        write(tmp)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
