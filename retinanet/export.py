"""ONNX export of RetinaNet's dense part, and a detector that runs it with onnxruntime.

What goes into the ONNX graph, and what stays in torch::

    images (B, C, H, W) float32, units of config.image_mean
      -> normalise -> pad right/bottom to a multiple of 32 -> backbone -> FPN -> subnets
      -> cls_logits (B, A, K) float32, box_deltas (B, A, 4) float32       [ONNX graph]
      -> anchors, score threshold + top-k, float32 decode, class-aware NMS  [torch]

B, H and W are dynamic: one file serves every batch size and chip size (H, W >= MIN_SIDE). Anchors, decoding
and NMS run through the very same code as the torch model (`RetinaNet.postprocess` and
its `AnchorGenerator`, on a weightless "meta" copy of the model), so both backends apply
the same detection logic and differ only by the float rounding of the dense part.

The graph carries its own description in ONNX ``metadata_props`` under
``METADATA_KEY``: a JSON object with the model config, the class names and the SHA-256
of the checkpoint it came from. `OnnxDetector` needs nothing but the file.

Dependencies are optional (``pip install 'retinanet-pipeline[onnx]'``): ``onnx`` and
``onnxscript`` to export (torch's default, dynamo-based exporter needs both), and
``onnxruntime`` to run. They are imported inside the functions that use them, so
importing this module costs nothing.
"""
from __future__ import annotations

import importlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retinanet.checkpoint import file_sha256, load_checkpoint
from retinanet.config import SIZE_DIVISOR, RetinaNetConfig, padded_size
from retinanet.files import default_cache_dir, write_atomically
from retinanet.model import RetinaNet, box_ratios, build_model
from retinanet.numpy_postprocess import Geometry, check_anchor_count

ONNX_OPSET = 18
METADATA_KEY = "retinanet_pipeline"
FORMAT_NAME = "retinanet-pipeline/onnx-dense"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "box_deltas")
# Provider preference when the device is "auto" or "cuda": fastest first.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
INSTALL_HINT = "install the optional dependencies: pip install 'retinanet-pipeline[onnx]'"
# Smallest height/width the graph is exported for. torch.export proves the traced graph
# valid for a range of sizes; its shape guards assume no pyramid level is 1 pixel wide
# (P7 = ceil(padded / 128) > 1), which holds from 129 px up. Smaller chips: torch backend.
MIN_SIDE = 129


class OnnxUnavailableError(ImportError):
    """An optional ONNX dependency is missing; the message says which and how to install it."""


def _require(module: str, purpose: str):
    """Import an optional dependency or raise OnnxUnavailableError naming it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OnnxUnavailableError(f"{purpose} needs the '{module}' package ({err}); {INSTALL_HINT}") from err


class DenseRetinaNet(nn.Module):
    """The exportable part of a RetinaNet: images -> (cls_logits, box_deltas).

    images: (B, C, H, W) float32 in the units of config.image_mean.
    Returns cls_logits (B, A, num_classes) and box_deltas (B, A, 4), A = anchors over all
    levels of the padded image, in the order of `AnchorGenerator` (level, location, anchor).
    Shares the modules of the RetinaNet it wraps (no copy). Mirrors RetinaNet.forward up to
    the heads, except that it always pads (a zero pad is a no-op) so that the traced graph
    has no branch on the input size.
    """

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def pyramid(self, images: Tensor) -> list[Tensor]:
        """Normalised, padded images -> the FPN levels P3..P7."""
        m = self.model
        height, width = images.shape[-2:]
        x = (images - m.image_mean) / m.image_std
        x = F.pad(x, (0, -width % SIZE_DIVISOR, 0, -height % SIZE_DIVISOR))
        features = m.backbone(x)
        return list(m.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pyramid = self.pyramid(images)
        return self.model.cls_head(pyramid), self.model.box_head(pyramid)


def skeleton_model(config: RetinaNetConfig) -> RetinaNet:
    """A RetinaNet built on the "meta" device: config, anchors and postprocess, no weights.

    Costs no memory; used to reuse the model's own shape logic and postprocessing.
    """
    with torch.device("meta"):
        return build_model(config).eval()


def pyramid_shapes(skeleton: RetinaNet, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(H_l, W_l) of P3..P7 for an input of image_hw, by running the model's own backbone
    and FPN on a meta tensor (shapes only, no arithmetic). Example for 256x320: P3 32x40 ...
    P7 2x3."""
    c = skeleton.config.in_channels
    probe = torch.empty(1, c, *image_hw, device="meta")
    return [(p.shape[-2], p.shape[-1]) for p in DenseRetinaNet(skeleton).pyramid(probe)]


def onnx_metadata(model: RetinaNet, class_names: Sequence[str], checkpoint_sha256: str | None = None) -> dict:
    """The JSON-able description stored in the ONNX file (see the module docstring)."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "class_names": list(class_names), "checkpoint_sha256": checkpoint_sha256,
            "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)}


def parse_onnx_metadata(props: dict[str, str], source: str) -> dict:
    """metadata_props of an ONNX file -> our metadata dict; ValueError naming `source` if absent/foreign."""
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{source}: no '{METADATA_KEY}' metadata: not exported by retinanet.export")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source}: ONNX metadata format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; this library reads {FORMAT_NAME} v{FORMAT_VERSION}")
    return meta


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """Our metadata of an exported file (reads the file with `onnx`, without running it)."""
    onnx = _require("onnx", "reading ONNX metadata")
    proto = onnx.load(str(path), load_external_data=False)
    return parse_onnx_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def export_onnx(model: RetinaNet, path: str | os.PathLike, class_names: Sequence[str],
                checkpoint_sha256: str | None = None, example_hw: tuple[int, int] = (256, 256),
                opset: int = ONNX_OPSET) -> Path:
    """Export `model`'s dense part to `path` (one self-contained file) and return the path.

    The graph is traced with torch.export (batch, height and width dynamic, height and
    width >= MIN_SIDE) and translated by torch's dynamo-based ONNX exporter (the default
    since torch 2.9; it needs onnxscript). Tracing first, on our own, makes a shape the
    graph cannot serve an error here; left to itself the exporter would fall back to a
    "draft" export that ignores violated shape guards. The example input only drives
    tracing. Written atomically (temp file + rename), so a concurrent reader never sees
    half a file. The model is exported in fp32 and left in eval mode on the CPU.
    """
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch's dynamo exporter)")
    meta = onnx_metadata(model, class_names, checkpoint_sha256)
    model = model.float().cpu().eval()
    dense = DenseRetinaNet(model).eval()
    # Batch 2: torch.export specialises a dimension whose example value is 0 or 1.
    example = torch.zeros(2, model.config.in_channels, *example_hw)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=MIN_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE)}
    with torch.no_grad():
        traced = torch.export.export(dense, (example,), dynamic_shapes={"images": dims}, strict=False)
        program = torch.onnx.export(traced, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    opset_version=opset, dynamo=True, verbose=False)
    assert program is not None  # dynamo=True returns the ONNXProgram (None: the TorchScript exporter only)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    return write_atomically(path, lambda tmp: program.save(str(tmp), external_data=False))


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """Where `pipeline export` writes by default and `model.backend: onnx` looks first: CHECKPOINT.onnx."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".onnx")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Export a checkpoint file to ONNX (default: its sidecar CHECKPOINT.onnx); returns the path.

    The checkpoint's SHA-256 goes into the metadata, so a sidecar left over from an older
    checkpoint is recognised as stale (see `onnx_for_checkpoint`).
    """
    model, info = load_checkpoint(checkpoint)
    return export_onnx(model, out or sidecar_path(checkpoint), info["class_names"], file_sha256(checkpoint))


def is_export_of(onnx_path: str | os.PathLike, checkpoint_sha256: str) -> bool:
    """True when `onnx_path` exists, is ours and was exported from the checkpoint with this hash."""
    if not Path(onnx_path).is_file():
        return False
    try:
        return read_onnx_metadata(onnx_path).get("checkpoint_sha256") == checkpoint_sha256
    except OnnxUnavailableError:
        raise
    except Exception:  # noqa: BLE001 - foreign or damaged file (onnx raises protobuf's DecodeError): not used
        return False


def onnx_for_checkpoint(checkpoint: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX file for `checkpoint`, exporting it only when no current export exists.

    Looked up in order, each used only if its metadata carries the checkpoint's SHA-256
    (a stale or foreign file is ignored; file times are not trusted, copies reset them):

    1. the sidecar CHECKPOINT.onnx, which `pipeline export CHECKPOINT` writes;
    2. CACHE_DIR/<first 16 hex of the SHA-256>.onnx (default $TMPDIR/retinanet-onnx);
    3. otherwise the checkpoint is exported into that cache. The write is atomic, so two
       actors exporting at once on one node both end up with a whole, identical file, and
       later actors and runs on the node reuse it.
    """
    sha = file_sha256(checkpoint)
    sidecar = sidecar_path(checkpoint)
    if is_export_of(sidecar, sha):
        return sidecar
    cached = Path(cache_dir or default_cache_dir()) / f"{sha[:16]}.onnx"
    if is_export_of(cached, sha):
        return cached
    model, info = load_checkpoint(checkpoint)
    return export_onnx(model, cached, info["class_names"], sha)


def choose_providers(available: Sequence[str], device: str = "auto") -> list[str]:
    """onnxruntime execution providers for `device`, best first.

    auto: TensorRT and CUDA when this onnxruntime build offers them, then CPU.
    cuda: the same, but at least one GPU provider must be offered (else RuntimeError).
    cpu:  CPU only.
    Example: choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) ->
    ["CUDAExecutionProvider", "CPUExecutionProvider"].
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    gpu = [p for p in GPU_PROVIDERS if p in available] if device != "cpu" else []
    if device == "cuda" and not gpu:
        raise RuntimeError(f"device 'cuda' requested but onnxruntime offers no GPU provider (has {list(available)}); "
                           "install onnxruntime-gpu")
    return gpu + [CPU_PROVIDER]


class OnnxDetector:
    """Batch inference from an exported ONNX file, with `retinanet.Detector`'s interface.

    `detector(images)` takes a (B, C, H, W) float tensor (any batch, H and W >= MIN_SIDE) and returns
    one dict per image: "boxes" (N, 4) float32 XYXY chip pixels, "scores" (N,) float32,
    "labels" (N,) int64, on the CPU. The dense part runs in onnxruntime (providers chosen
    by `choose_providers`); anchors, decoding and NMS run in torch on the CPU through the
    model's own `postprocess`.

    Attributes: `model` is a weightless RetinaNet holding the config (set
    `model.config.score_threshold` to change the threshold, as with a torch model),
    `class_names`, `providers` (those the session really uses), `device`, `precision`.
    Precision: the graph is fp32; "auto" and "fp32" are accepted, "bf16"/"fp16" raise.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", precision: str = "auto",
                 num_threads: int | None = None, providers: Sequence[str] | None = None):
        ort = _require("onnxruntime", "the ONNX backend")
        if precision not in ("auto", "fp32"):
            raise ValueError(f"the ONNX backend runs the fp32 graph; precision must be 'auto' or 'fp32', "
                             f"got {precision!r}")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        wanted = list(providers) if providers else choose_providers(ort.get_available_providers(), device)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.path = Path(path)
        self.model = skeleton_model(RetinaNetConfig.from_dict(meta["config"]))
        self.class_names = list(meta["class_names"])
        self.checkpoint_sha256 = meta.get("checkpoint_sha256")
        self.providers = self.session.get_providers()
        self.device = torch.device("cuda" if any(p in GPU_PROVIDERS for p in self.providers) else "cpu")
        self.precision = "fp32"
        self._anchors: dict[tuple[int, int], tuple[Tensor, list[int]]] = {}

    def dense(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The ONNX part alone: images -> (cls_logits (B, A, K), box_deltas (B, A, 4)) CPU float32."""
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        cls_logits, box_deltas = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> list[dict[str, Tensor]]:
        self.model._check_images(images)  # the torch model's own input checks and messages
        height, width = self.model.network_size(*(int(s) for s in images.shape[-2:]))
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"{self.path}: the ONNX graph serves images of at least {MIN_SIDE} x {MIN_SIDE} "
                             f"pixels, got {height} x {width} (use the torch backend for smaller chips)")
        return detect_with_dense(self.model, images, self.dense, self._anchors, str(self.path))


def detect_with_dense(skeleton: RetinaNet, images: Tensor, dense, anchors_cache: dict, source: str
                      ) -> list[dict[str, Tensor]]:
    """Detections of a batch whose dense part (`dense`: network-size images -> (cls_logits,
    box_deltas) on the CPU) runs outside torch: the model's resize rule before it, and its
    own anchors, postprocess and box mapping after it, on a weightless ``skeleton``.
    anchors_cache: a dict kept by the caller, :func:`pyramid_anchors` per network size."""
    skeleton._check_images(images)
    input_hw = (int(images.shape[-2]), int(images.shape[-1]))
    images, _ = skeleton.resize_input(images)  # the graphs hold the network, not the resize rule
    height, width = (int(s) for s in images.shape[-2:])
    cls_logits, box_deltas = dense(images)
    if (height, width) not in anchors_cache:
        anchors_cache[(height, width)] = pyramid_anchors(skeleton, (height, width))
    anchors, level_counts = anchors_cache[(height, width)]
    check_anchor_count(cls_logits.shape[1], level_counts, source)
    detections = skeleton.postprocess(cls_logits, box_deltas, anchors, level_counts, (height, width))
    return skeleton.boxes_to_input(detections, (height, width), input_hw)


def pyramid_anchors(skeleton: RetinaNet, network_hw: tuple[int, int]) -> tuple[Tensor, list[int]]:
    """The anchors of one network input size, (A, 4) float32 on the CPU, levels concatenated,
    and the number of anchors on each level."""
    shapes = pyramid_shapes(skeleton, network_hw)
    anchors = skeleton.anchor_generator(padded_size(*network_hw), shapes, torch.device("cpu"))
    per_location = skeleton.anchor_generator.num_anchors_per_location
    return anchors, [h * w * per_location for h, w in shapes]


def postprocess_geometry(config: RetinaNetConfig, input_hw: tuple[int, int]) -> Geometry:
    """What numpy postprocessing needs for inputs of ``input_hw`` (anchors, level sizes,
    network size, box scale), computed by the torch model's own code."""
    skeleton = skeleton_model(config)
    network_hw = skeleton.network_size(*input_hw)
    anchors, level_counts = pyramid_anchors(skeleton, network_hw)
    return Geometry(anchors.numpy(), tuple(level_counts), network_hw, box_ratios(network_hw, input_hw, None).numpy())


class ResizingDenseRetinaNet(DenseRetinaNet):
    """:class:`DenseRetinaNet` with the config's resize rule in front: input-size images ->
    (cls_logits, box_deltas) of the network-size image. For graphs that serve one chip size."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(self.model.resize_input(images)[0])
