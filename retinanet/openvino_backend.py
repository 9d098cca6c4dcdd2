"""The network on OpenVINO's CPU runtime, with `retinanet.Detector`'s interface.

What runs where: the dense part (normalise, pad, backbone with batch norm folded, FPN,
subnets) is converted from the checkpoint with ``openvino.convert_model`` and compiled for
the CPU; the resize rule, anchors, decoding and NMS run in torch through the model's own
code (:func:`retinanet.export.detect_with_dense`), as for the ONNX backend.

Precision: ``auto`` leaves the choice to OpenVINO, which runs bf16 on CPUs with AMX or
AVX512-BF16 and f32 elsewhere; ``fp32`` and ``bf16`` force one (``fp16`` only where the
CPU has fp16 units). ``int8`` runs a graph quantised by NNCF (:meth:`OpenVinoDetector.quantize`,
post-training, calibrated on chips the caller chooses) and stored beside the f32 graph
under a key naming its calibration; INT8 changes results, so the pipeline measures it first
(`pipeline.infer.int8`). Measured on this project's 2-core AMX machine (R50-FPN, 512² chips):
0.09-0.11 s per chip against 0.25-0.37 s for torch bf16 (see BENCHMARKS.md).

Conversion takes seconds (a trace of the model), so converted graphs are cached per node
(``cache_dir``: `pipeline run` passes ``<its cache>/openvino``, see
:func:`pipeline.io.objstore.cache_dir`; default ``$TMPDIR/retinanet-openvino``), keyed by the
checkpoint's SHA-256 and the network's input size; writes are atomic, so actors
converting at once each end with a whole file and later runs reuse it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from retinanet.checkpoint import file_sha256, load_checkpoint
from retinanet.export import DenseRetinaNet, default_cache_dir, detect_with_dense, skeleton_model
from retinanet.files import write_atomically
from retinanet.model import RetinaNetConfig
from retinanet.runtime import fold_batch_norm

PRECISION_HINTS = {"auto": None, "fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": None}
INSTALL_HINT = "install it with: pip install openvino"


def openvino_available() -> bool:
    """True when the openvino package imports (it is a dependency; a trimmed install may lack it)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoDetector:
    """Batch inference of a checkpoint on OpenVINO's CPU plugin.

    `detector(images)` takes a (B, C, H, W) float tensor in the units of the model's
    image_mean and returns one dict per image ("boxes" XYXY input pixels, "scores",
    "labels") on the CPU, like `retinanet.Detector`. `model` is a weightless copy holding
    the config: set `model.config.score_threshold` (or nms_threshold,
    detections_per_image) to change the postprocessing, as with a torch model.
    Attributes: `device` (cpu), `precision` (what the compiled graph runs in, e.g. bf16).
    """

    def __init__(self, checkpoint: str | os.PathLike, precision: str = "auto", num_threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, int8_key: str | None = None):
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
        self.sha256 = file_sha256(checkpoint)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir("openvino")
        self._core = ov.Core()
        self._requested = precision
        self._config = {"PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            self._config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if PRECISION_HINTS[precision]:
            self._config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        # The torch model is loaded only when a graph has to be converted (nothing cached yet).
        self._torch_model = None if self._any_cached() else load_checkpoint(checkpoint)[0]
        self.model = skeleton_model(self._cached_config() if self._torch_model is None else self._torch_model.config)
        self._folded = None
        self.device = torch.device("cpu")
        self._compiled: dict[tuple[int, int], object] = {}
        self._shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.converted = 0  # graphs this detector had to convert (0 when every size was cached)

    # -- cache ---------------------------------------------------------------------------
    def _prefix(self) -> str:
        return self.sha256[:16]

    def _any_cached(self) -> bool:
        return (self.cache_dir / f"{self._prefix()}.config.pt").is_file()

    def _cached_config(self):
        return RetinaNetConfig.from_dict(torch.load(self.cache_dir / f"{self._prefix()}.config.pt",
                                                    weights_only=True))

    def graph_path(self, network_hw: tuple[int, int], int8_key: str | None = None) -> Path:
        """The cached IR (.xml, weights in the .bin beside it) for one network input size;
        with ``int8_key``, the graph quantised under that key."""
        variant = f"-int8-{int8_key}" if int8_key else ""
        return self.cache_dir / f"{self._prefix()}-{network_hw[0]}x{network_hw[1]}{variant}.xml"

    def _convert(self, network_hw: tuple[int, int]) -> Path:
        """The cached graph for this size, converting it first if no process on this node has.
        Actors starting together take a file lock, so one converts and the others wait and
        load its result (conversion is seconds of CPU the others would otherwise repeat)."""
        path = self.graph_path(network_hw)
        if graph_exists(path):
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if graph_exists(path):
                return path
            return self._convert_locked(network_hw, path)

    def _convert_locked(self, network_hw: tuple[int, int], path: Path) -> Path:
        import openvino as ov

        if self._folded is None:
            model = self._torch_model if self._torch_model is not None else load_checkpoint(self.checkpoint)[0]
            self._folded = fold_batch_norm(model)
            self._torch_model = None
        channels = self._folded.config.in_channels
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # convert_model traces with torch.jit.trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            try:
                graph = ov.convert_model(DenseRetinaNet(self._folded),
                                         example_input=torch.zeros(1, channels, *network_hw),
                                         input=[ov.PartialShape([-1, channels, *network_hw])])
            except Exception as err:  # noqa: BLE001 - name the checkpoint and the way out
                raise RuntimeError(f"{self.checkpoint}: OpenVINO could not convert the network for "
                                   f"{network_hw[0]}x{network_hw[1]} inputs ({type(err).__name__}: {err}); "
                                   "run it with model.backend: torch") from err
        save_graph_atomically(graph, path)
        config_file = self.cache_dir / f"{self._prefix()}.config.pt"
        if not config_file.is_file():
            config = self._folded.config.to_dict()
            write_atomically(config_file, lambda tmp: torch.save(config, tmp))
        self.converted += 1
        self._folded = None  # the torch copy was only needed to convert: do not keep it in the actor
        return path

    # -- INT8 --------------------------------------------------------------------------
    def quantize(self, chip_hw: tuple[int, int], chips: Tensor, int8_key: str) -> Path:
        """Quantise the f32 graph for chips of this size to INT8 with NNCF's post-training
        quantisation, calibrated on ``chips`` ((N, C, H, W) float, the units of the model's
        image_mean: what inference gets), and store it under ``int8_key``. Returns its path
        (kept as it is when a graph of that key exists)."""
        import openvino as ov

        network_hw = self.model.network_size(*chip_hw)
        path = self.graph_path(network_hw, int8_key)
        if graph_exists(path):
            return path
        graph = ov.Core().read_model(str(self._convert(network_hw)))
        samples = [self.model.resize_input(chip[None].float())[0].numpy() for chip in chips]
        # NNCF's progress bars go to stderr with the other progress: stdout may carry a report.
        # Its import makes torch warn that there is no CUDA toolkit, which is no news on a CPU node.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):
            import nncf

            quantized = nncf.quantize(graph, nncf.Dataset(samples), subset_size=len(samples))
        save_graph_atomically(quantized, path)
        return path

    def install_graph(self, path_name: str, xml: bytes, weights: bytes) -> None:
        """Put a graph made on another node (an INT8 graph: calibration is not repeated per
        node) into this node's cache under its name, atomically; kept if already there."""
        path = self.cache_dir / path_name
        if graph_exists(path):
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _write_graph_pair(path, lambda tmp: (tmp.with_suffix(".bin").write_bytes(weights), tmp.write_bytes(xml)))

    # -- inference -----------------------------------------------------------------------
    def _graph_for(self, network_hw: tuple[int, int]) -> Path:
        if self.int8_key is None:
            return self._convert(network_hw)
        path = self.graph_path(network_hw, self.int8_key)
        if not graph_exists(path):
            raise RuntimeError(f"{self.checkpoint}: no INT8 graph {path.name} in {self.cache_dir}; INT8 graphs are "
                               f"made by quantize() (pipeline run with model.precision int8 makes and measures it)")
        return path

    def _compiled_for(self, network_hw: tuple[int, int]):
        compiled = self._compiled.get(network_hw)
        if compiled is None:
            compiled = self._core.compile_model(str(self._graph_for(network_hw)), "CPU", self._config)
            self._compiled[network_hw] = compiled
        return compiled

    @property
    def precision(self) -> str:
        """What the compiled graphs run in: bf16, f32, ... (the hint OpenVINO resolved);
        int8 for a quantised graph (its unquantised ops run in that hint's precision)."""
        if self.int8_key is not None:
            return "int8"
        if self._compiled:
            compiled = next(iter(self._compiled.values()))
            return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return self._requested

    def dense(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The compiled network alone: network-size images -> (cls_logits, box_deltas) float32."""
        compiled = self._compiled_for(tuple(int(s) for s in images.shape[-2:]))
        outputs = compiled(images.detach().to("cpu", torch.float32).contiguous().numpy())
        return torch.from_numpy(outputs[0].copy()), torch.from_numpy(outputs[1].copy())

    def prepare(self, chip_hw: tuple[int, int]) -> None:
        """Convert (or load from the cache) and compile for chips of this size now, so the
        first batch does not pay for it."""
        self._compiled_for(self.model.network_size(*chip_hw))

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> list[dict[str, Tensor]]:
        return detect_with_dense(self.model, images, self.dense, self._shapes, str(self.checkpoint))


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
