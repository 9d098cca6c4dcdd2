"""The job specification: the one way configuration enters the pipeline.

A job file is YAML with these sections (every key below is part of the public
contract; unknown keys are rejected so a typo never silently falls back to a default)::

    name: satellite-nightly
    inputs:   {paths: ["../data/scenes/*.tif"], bands: [1, 2, 3]}
    tiling:   {chip_size: 512, overlap: 64, min_valid_fraction: 0.05}
    model:    {checkpoint: ../models/retinanet.pt, score_threshold: 0.3, nms_threshold: null,
               detections_per_chip: null, batch_size: null, precision: auto, device: auto}
    compute:  {address: null, actors: 2, gpus_per_actor: 1, cpus_per_actor: 1,
               max_retries: 2, read_concurrency: null, prefetch_batches: 8}
    merge:    {method: nms, iou_threshold: 0.5, seam_margin: null}
    output:   {table: ../out/detections, crs: "EPSG:4326"}

Path resolution: relative *local* paths written in a job file (``inputs.paths``,
``model.checkpoint``, ``output.table``) are resolved against the directory that holds
the job file, so a job means the same thing whatever the current directory is.
Relative paths given on the command line with ``--set`` are resolved against the current
directory, because that is where the person typing them is. Remote paths (anything
with a ``scheme://`` prefix, e.g. ``s3://`` or ``https://``) are left as they are.

Errors: every problem raises :class:`~pipeline.errors.ConfigError` whose message names
the file and the YAML path of the field, one line per problem, e.g.
``job.yaml: tiling.overlap: must be smaller than tiling.chip_size (512), got 512``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config.locations import is_remote
from pipeline.config.options import MergeMethod
from pipeline.config.stac_filters import check_bbox, parse_interval, read_geometry
from pipeline.errors import ConfigError
from retinanet.options import BACKBONES, TRAINABLE, Backend, BoxLoss, Precision

# Bump when the meaning of a hashed field changes, so old table rows are not mistaken
# for results of the new semantics.
JOB_HASH_VERSION = 1

# Names end up in file names and table partitions: keep them shell- and path-safe.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# `host:port` of a running Ray head (the GCS address), e.g. 10.0.0.5:6379.
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")


class StacSpec(BaseModel):
    """``inputs.stac``: scenes from a static STAC catalog or a STAC API search (see pipeline.io.stac)::

        stac: {source: ../catalog/catalog.json, asset: visual,
               datetime: "2026-01-01/..", bbox: [12.0, 41.0, 13.0, 42.0],
               since_last_success: true}
        stac: {source: "https://earth-search.aws.element84.com/v1", collections: [sentinel-2-l2a],
               bbox: [12.0, 41.0, 13.0, 42.0], filter: {op: "<=", args: [{property: eo:cloud_cover}, 20]}}

    source: local JSON (resolved like other paths) or http(s) URL of a Catalog,
    Collection, ItemCollection or Item, or of a STAC API landing page (searched).
    asset: the asset key of each item to read;
    default ``visual``, the STAC best-practice key of the display (RGB) image.
    datetime: ISO 8601 interval, inclusive, ``..`` or empty for an open side.
    bbox: [minx, miny, maxx, maxy] in EPSG:4326. since_last_success: start at the
    newest item time of this job's last successful run in ``output.table``.
    collections: collection ids (required for an API). intersects: a GeoJSON geometry,
    or a GeoJSON file (resolved like other paths; read at load time), lon/lat; excludes
    bbox. filter: CQL2-JSON, API only (where it conforms to Filter). max_items: at most
    this many items (not with since_last_success). page_size: items per API page (default: the API's). sign: sign asset
    hrefs, ``planetary-computer`` (the ``pc`` extra).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(min_length=1)
    asset: str = Field("visual", min_length=1)
    datetime: Optional[str] = None
    bbox: Optional[list[float]] = None
    since_last_success: bool = False
    collections: Optional[list[str]] = Field(None, min_length=1)
    intersects: Optional[dict[str, Any]] = None
    filter: Optional[dict[str, Any]] = None
    max_items: Optional[int] = Field(None, ge=1)
    page_size: Optional[int] = Field(None, ge=1)
    sign: Optional[Literal["planetary-computer"]] = None

    @field_validator("intersects", mode="before")
    @classmethod
    def _geometry(cls, v: Any) -> Any:
        # A file name (already resolved against the job's folder) or a geometry: one lon/lat geometry.
        return None if v is None else read_geometry(v)

    @model_validator(mode="after")
    def _one_area(self) -> "StacSpec":
        if self.bbox is not None and self.intersects is not None:
            raise ValueError("bbox and intersects exclude each other: give one")
        if self.max_items is not None and self.since_last_success:
            # APIs return items in their own order: the next night would start after the newest
            # item taken, and the matching items past the cap would never be offered again.
            raise ValueError("max_items and since_last_success exclude each other: items past the cap would be "
                             "skipped for good; bound a night with datetime instead")
        return self

    @field_validator("datetime", mode="before")
    @classmethod
    def _yaml_dates_as_text(cls, v: Any) -> Any:
        # YAML reads an unquoted 2026-01-01 as a date: take it as the instant it names.
        return v.isoformat() if isinstance(v, (_dt.date, _dt.datetime)) else v

    @field_validator("datetime")
    @classmethod
    def _interval(cls, v: Optional[str]) -> Optional[str]:

        if v is not None:
            parse_interval(v)  # ValueError names the bad part
        return v

    @field_validator("bbox")
    @classmethod
    def _lonlat_box(cls, v: Optional[list[float]]) -> Optional[list[float]]:

        return None if v is None else check_bbox(v)


class InputsSpec(BaseModel):
    """Which scenes to read — local globs or remote URLs (``paths``), or the items of a
    STAC catalog (``stac``), exactly one of the two — and which bands (1-based)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    paths: Optional[list[str]] = Field(None, min_length=1)
    stac: Optional[StacSpec] = None
    # None: all bands of the scene. Repeats are allowed ([1, 1, 1] makes a grey scene RGB).
    bands: Optional[list[int]] = None

    @model_validator(mode="after")
    def _paths_or_stac(self) -> "InputsSpec":
        if self.paths is None and self.stac is None:
            raise ValueError("give inputs.paths (files, globs, URLs) or inputs.stac (a STAC catalog)")
        if self.paths is not None and self.stac is not None:
            raise ValueError("inputs.paths and inputs.stac exclude each other: give one")
        return self

    @field_validator("paths")
    @classmethod
    def _paths_not_blank(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for i, p in enumerate(v or []):
            if not p.strip():
                raise ValueError(f"paths[{i}] is empty")
        return v

    @field_validator("bands")
    @classmethod
    def _bands_one_based(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one band, or be null for all bands")
        bad = [b for b in v if b < 1]
        if bad:
            raise ValueError(f"band numbers are 1-based, got {bad}")
        return v


class TilingSpec(BaseModel):
    """Chip grid: square chips of ``chip_size`` px overlapping by ``overlap`` px."""

    model_config = ConfigDict(extra="forbid", strict=True)

    chip_size: int = Field(512, ge=32)
    overlap: int = Field(64, ge=0)
    # Chips with less valid (non-nodata) area than this fraction are skipped unread.
    min_valid_fraction: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("overlap")
    @classmethod
    def _overlap_below_chip(cls, v: int, info: ValidationInfo) -> int:
        chip = info.data.get("chip_size")  # absent when chip_size itself was invalid
        if chip is not None and v >= chip:
            raise ValueError(f"must be smaller than tiling.chip_size ({chip}), got {v}")
        return v


class ModelSpec(BaseModel):
    """The checkpoint and how to run it."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    checkpoint: str = Field(min_length=1)
    # null: the checkpoint's own setting (what it was trained or imported with; see
    # `pipeline import`). Within-chip NMS IoU and the detections kept per chip likewise.
    score_threshold: Optional[float] = Field(None, ge=0.0, le=1.0)
    nms_threshold: Optional[float] = Field(None, gt=0.0, le=1.0)
    detections_per_chip: Optional[int] = Field(None, ge=1)
    # None: chosen for the predictors' device (from free GPU memory on CUDA; 1 on CPU,
    # which is fastest per chip there, see retinanet.options.CPU_BATCH_SIZE).
    batch_size: Optional[int] = Field(None, ge=1)
    precision: Literal[Precision, "int8"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: openvino for CPU actors (where the package imports), torch for GPU actors.
    # torch: the checkpoint in torch (batch norm folded). openvino: the network compiled by
    # OpenVINO for the CPU (retinanet.openvino_backend; bf16 on AMX CPUs under precision auto).
    # onnx: its ONNX export in onnxruntime (fp32 graph; CUDA/TensorRT providers where
    # installed), see retinanet.export.onnx_for_checkpoint.
    backend: Backend = "auto"
    # precision int8 (OpenVINO CPU actors only): the graph quantised with NNCF on
    # int8_calibration_chips chips of the job's own scenes, then measured on labelled data
    # (int8_labels: label files for int8_scenes, default the job's inputs.paths) against
    # f32; an AP50 drop above int8_max_ap50_drop points is refused (int8_on_drop: refuse)
    # or run with a warning (warn). See pipeline.eval.int8_gate (and pipeline.infer.int8).
    int8_labels: list[str] = Field(default_factory=list)
    int8_scenes: Optional[list[str]] = None
    int8_max_ap50_drop: float = Field(1.0, ge=0.0)
    int8_on_drop: Literal["refuse", "warn"] = "refuse"
    int8_calibration_chips: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _backend_fits(self) -> "ModelSpec":
        if self.backend == "onnx" and self.precision in ("bf16", "fp16"):
            raise ValueError(f"model.backend 'onnx' runs an fp32 graph; model.precision must be auto or fp32, "
                             f"got {self.precision!r}")
        if self.backend == "openvino" and self.device == "cuda":
            raise ValueError("model.backend 'openvino' runs on the CPU; use backend torch (or auto) with device cuda")
        if self.precision == "int8":
            if self.backend not in ("auto", "openvino") or self.device == "cuda":
                raise ValueError("model.precision 'int8' runs a quantised OpenVINO graph on CPU actors; "
                                 f"backend must be auto or openvino and device not cuda, got backend "
                                 f"{self.backend!r}, device {self.device!r}")
            if not self.int8_labels:
                raise ValueError("model.precision 'int8' needs model.int8_labels: label files of scenes to "
                                 "measure what INT8 costs in AP50 before it runs (INT8 changes results)")
        return self


class ComputeSpec(BaseModel):
    """Where and how wide to run: the Ray address and the predictor actor pool."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # null: join the local head `pipeline ray up` keeps when one is up, else start a
    # local Ray inside the command; "auto", "ray://host:10001" or "host:port": join a
    # running cluster.
    address: Optional[str] = None
    actors: int = Field(2, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, ge=0.0)
    # Attempts after the first, per chip read task and per predictor batch; a chip that
    # still fails is quarantined instead of retried forever.
    max_retries: int = Field(2, ge=0)
    # None: Ray Data decides how many read tasks run at once.
    read_concurrency: Optional[int] = Field(None, ge=1)
    # Read batches (max(model.batch_size, 8) chips each) waiting ahead of each predictor
    # actor. Bounds the object-store memory that chips in flight take, so memory stays
    # flat however large the scene: reading is ~30x faster than a CPU forward and would
    # otherwise buffer a whole scene.
    prefetch_batches: int = Field(8, ge=1)

    @field_validator("address")
    @classmethod
    def _address_form(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v == "auto" or v.startswith("ray://") or _HOST_PORT.match(v):
            return v
        raise ValueError(f"must be null, 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {v!r}")

    @field_validator("gpus_per_actor")
    @classmethod
    def _ray_gpu_quantity(cls, v: float) -> float:
        # Ray accepts fractional GPUs only below one; above one it wants whole GPUs.
        if v > 1 and v != int(v):
            raise ValueError(f"fractions are allowed only below 1 (Ray's rule), got {v}")
        return v


class MergeSpec(BaseModel):
    """Seam merge of detections from overlapping chips (see pipeline.infer.merge)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: MergeMethod = "nms"
    iou_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # Pixels from an interior chip edge within which a box takes part in the seam pass.
    # None: the tiling overlap (filled in by JobSpec).
    seam_margin: Optional[int] = Field(None, ge=0)


class OutputSpec(BaseModel):
    """Where detections are committed and in which coordinate reference system."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # A local directory, or an s3:// / gs:// prefix (pipeline.table.store: exclusive
    # manifest creates are conditional PUTs there).
    table: str = Field(min_length=1)
    # Any CRS pyproj understands; null or "pixel" keep scene pixel coordinates (for
    # images without georeferencing). "pixel" is normalised to null.
    crs: Optional[str] = "EPSG:4326"

    @field_validator("table")
    @classmethod
    def _table_location(cls, v: str) -> str:
        if is_remote(v) and not v.startswith(("s3://", "gs://")):
            raise ValueError(f"must be a local directory or an s3:// or gs:// prefix, got {v!r}")
        return v

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v.strip().lower() == "pixel":
            return None
        import pyproj  # local import: only needed when a CRS is given

        try:
            pyproj.CRS.from_user_input(v)
        except pyproj.exceptions.CRSError as err:
            raise ValueError(f"not a CRS that pyproj knows ({v!r}): {err}") from None
        return v


class ValSplitSpec(BaseModel):
    """How validation data is held out: whole scenes, or a band of every scene.

    ``by: region`` holds out the last ``fraction`` of each scene's rows (``side: bottom``)
    or columns (``side: right``); training chips stay ``gap`` pixels away from that band
    (default: train.chip_size), so no pixel and no object smaller than the gap is in both
    sets. Chips are never split at random: overlapping chips would leak.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    by: Literal["scene", "region"] = "scene"
    fraction: float = Field(0.2, gt=0.0, lt=1.0)
    side: Literal["bottom", "right"] = "bottom"
    gap: Optional[int] = Field(None, ge=0)


class AugmentSpec(BaseModel):
    """Training augmentation (pipeline.train.augment): on/off flags and strengths."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    brightness_contrast: bool = True
    scale_jitter: bool = False
    brightness: float = Field(0.2, ge=0.0)      # max shift, in band std units
    contrast: float = Field(0.2, ge=0.0, lt=1.0)  # max |factor - 1|
    scale_range: list[float] = Field(default_factory=lambda: [0.8, 1.25], min_length=2, max_length=2)

    @field_validator("scale_range")
    @classmethod
    def _ordered_positive(cls, v: list[float]) -> list[float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [min, max] with 0 < min <= max, got {v}")
        return v


class TrainSpec(BaseModel):
    """`pipeline train`: labelled scenes, model shape, optimiser, schedule, workers.

    The model reads ``inputs.bands`` of the training scenes (in_channels = their count),
    so the trained checkpoint fits the job's own inference. ``batch_size`` is global
    (split evenly over ``workers``) so the schedule does not change with the worker count.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    scenes: list[str] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)     # COCO JSON, VOC XML, CSV or vector files
    label_field: str = "label"                  # vector files: attribute with the class name
    scene_field: Optional[str] = None           # vector files: attribute with the scene id
    classes: list[str] = Field(min_length=1)
    val_split: ValSplitSpec = Field(default_factory=ValSplitSpec)
    backbone: str = TRAINABLE.backbone
    # null: from scratch; "imagenet": torchvision's ImageNet weights for train.backbone, through
    # torch's hub cache (retinanet.backbones.IMAGENET_WEIGHTS); else a local state dict file
    backbone_weights: Optional[str] = None
    init_checkpoint: Optional[str] = None       # start from these weights (fine-tuning)
    fpn_channels: int = Field(TRAINABLE.fpn_channels, ge=8)
    head_width: int = Field(TRAINABLE.head_width, ge=8)
    head_depth: int = Field(TRAINABLE.head_depth, ge=1)
    focal_alpha: float = Field(TRAINABLE.focal_alpha, ge=0.0, le=1.0)
    focal_gamma: float = Field(TRAINABLE.focal_gamma, ge=0.0)
    box_loss: BoxLoss = TRAINABLE.box_loss
    fit_anchors: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0001, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    lr_steps: list[float] = Field(default_factory=lambda: [0.67, 0.89])  # fractions of all steps
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    epochs: int = Field(12, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    chip_size: int = Field(512, ge=32)
    overlap: int = Field(64, ge=0)
    min_box_inside: float = Field(0.5, gt=0.0, le=1.0)
    min_valid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Optional[int] = Field(None, ge=1)
    precision: Precision = "auto"
    checkpoint_every: int = Field(100, ge=1)
    output_dir: str = Field(min_length=1)
    seed: int = 0
    time_budget_minutes: Optional[float] = Field(None, gt=0.0)
    # Copy output_dir/best.pt to model.checkpoint when training ends (off: never
    # overwrite a production model by accident).
    publish: bool = False

    @field_validator("scenes", "labels")
    @classmethod
    def _no_blank_paths(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"[{i}] is empty")
        return v

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        return v

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; choose one of {', '.join(BACKBONES)}")
        return v

    @field_validator("lr_steps")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v) or v != sorted(v):
            raise ValueError(f"must be increasing fractions of the total steps in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        if self.overlap >= self.chip_size:
            raise ValueError(f"overlap must be smaller than chip_size ({self.chip_size}), "
                             f"got {self.overlap}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"workers ({self.workers}): it is the global batch")
        return self


class JobSpec(BaseModel):
    """A whole job: what to read, how to chip it, which model, where to run, where to write."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    name: str
    inputs: InputsSpec
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    model: ModelSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    output: OutputSpec
    # `pipeline train` only; `pipeline run` ignores it.
    train: Optional[TrainSpec] = None

    # The file this spec came from, for error messages ("" when built in code).
    _source: str = PrivateAttr(default="")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _SAFE_NAME.match(v):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (it names files), got {v!r}")
        return v

    @model_validator(mode="after")
    def _default_seam_margin(self) -> "JobSpec":
        # The seam zone defaults to the overlap: that is where duplicates can occur.
        if self.merge.seam_margin is None:
            self.merge.seam_margin = self.tiling.overlap
        return self

    @property
    def source(self) -> str:
        """The job file this spec was loaded from ("" if built in code)."""
        return self._source


# Fields holding local paths, as (section, key); resolved against the job file's dir.
# ("inputs", "stac") is the STAC section: its ``source`` is the path.
_PATH_FIELDS = (("inputs", "paths"), ("inputs", "stac"), ("model", "checkpoint"), ("model", "int8_labels"),
                ("model", "int8_scenes"), ("output", "table"),
                ("train", "scenes"), ("train", "labels"), ("train", "backbone_weights"),
                ("train", "init_checkpoint"), ("train", "output_dir"))


def _resolve_path(p: Any, base: Path) -> Any:
    """Make a local relative path absolute against ``base``; anything else unchanged."""
    if not isinstance(p, str) or not p or is_remote(p):
        return p
    expanded = os.path.expanduser(p)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    return os.path.normpath(str(base / expanded))


def _resolve_field(value: Any, base: Path) -> Any:
    if isinstance(value, dict):  # inputs.stac: resolve its source and an intersects file
        return {**value, **{k: _resolve_path(value[k], base) for k in ("source", "intersects") if k in value}}
    if isinstance(value, list):
        return [_resolve_path(p, base) for p in value]
    return _resolve_path(value, base)


def resolve_paths(data: dict, base_dir: os.PathLike | str) -> dict:
    """Return a copy of raw job ``data`` with its local path fields made absolute.

    Only well-typed values are touched; anything else is left for validation to report.
    """
    base = Path(base_dir)
    out = dict(data)
    for section, key in _PATH_FIELDS:
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec and (section, key, sec[key]) not in _NAMED_NOT_PATHS:
            out[section] = {**sec, key: _resolve_field(sec[key], base)}
    return out


# Values of path fields that name something instead of a file (kept as written).
_NAMED_NOT_PATHS = (("train", "backbone_weights", "imagenet"),)


def _field_model(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model a field holds (``Optional[Model]`` too), or None for a plain value."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    candidate = args[0] if len(args) == 1 and type(None) in get_args(annotation) else annotation
    return candidate if isinstance(candidate, type) and issubclass(candidate, BaseModel) else None


def _fields_at(path: Sequence[str]) -> Optional[dict[str, Any]]:
    """Field name -> annotation of the model at dotted ``path`` under JobSpec (``()`` is the
    job itself), or None when ``path`` is not a model (unknown, or a plain value)."""
    model: Optional[type[BaseModel]] = JobSpec
    for part in path:
        field = model.model_fields.get(part) if model is not None else None
        model = _field_model(field.annotation) if field is not None else None
    return None if model is None else {k: f.annotation for k, f in model.model_fields.items()}


def _override_path_resolves(parts: Sequence[str]) -> bool:
    """The overridden field holds a local path (``inputs.stac.source`` is the STAC section's)."""
    key = tuple(parts)
    return key in _PATH_FIELDS or (key[-1] in ("source", "intersects") and key[:-1] in _PATH_FIELDS)


def _set_dotted(data: dict, parts: Sequence[str], value: Any, where: str, prefix: str = "") -> dict:
    """A copy of ``data`` with ``value`` at ``parts``, copying (never mutating) each mapping on the way
    and creating the ones the file does not have."""
    head, rest = parts[0], parts[1:]
    if not rest:
        return {**data, head: value}
    child = data.get(head)
    if child is None:
        child = {}
    if not isinstance(child, dict):
        raise ConfigError(f"{where}: {prefix}{head} in the job file is not a mapping")
    return {**data, head: _set_dotted(child, rest, value, where, f"{prefix}{head}.")}


def apply_overrides(data: dict, overrides: Iterable[str], cwd: os.PathLike | str | None = None) -> dict:
    """Apply ``section.key=value`` overrides, at any depth (``train.augment.hflip=false``,
    ``name=value``), to raw job ``data``.

    ``value`` is parsed with ``yaml.safe_load`` so ``compute.actors=3`` gives an int,
    ``output.crs=null`` gives None and ``inputs.bands=[1,2,3]`` a list. Relative local
    paths are resolved against ``cwd`` (default: the current directory). An unknown
    section or key raises ConfigError naming its full dotted path and the known keys there.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = dict(data)
    for item in overrides:
        where = f"--set {item}"
        if "=" not in item:
            raise ConfigError(f"{where}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: value is not valid YAML: {err}") from None
        out = _apply(out, dotted.strip(), value, where, base)
    return out


def apply_values(data: dict, values: Mapping[str, Any], where: str, cwd: os.PathLike | str | None = None) -> dict:
    """Apply Python values to raw job ``data`` under the dotted names ``--set`` takes
    (``{"tiling.chip_size": 256}``), or a section's keys as one dict (``{"tiling":
    {"chip_size": 256}}``, merged over the section): the keyword arguments of
    ``pipeline.predict_scene``. The same checks and path resolution as
    :func:`apply_overrides`; ``where`` names the caller in errors."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = dict(data)
    for dotted, value in values.items():
        out = _apply(out, dotted, value, where, base)
    return out


def _apply(data: dict, dotted: str, value: Any, where: str, base: Path) -> dict:
    """:func:`_override`, with a mapping given for a whole section (``inputs.stac={source:
    ..., datetime: ...}``) applied key by key, merged over the section."""
    if isinstance(value, Mapping) and _fields_at(dotted.split(".")) is not None:
        for key, item in value.items():
            data = _apply(data, f"{dotted}.{key}", item, where, base)
        return data
    return _override(data, dotted, value, where, base)


def _override(data: dict, dotted: str, value: Any, where: str, base: Path) -> dict:
    """A copy of raw job ``data`` with ``value`` at ``dotted`` (a local path resolved against
    ``base``); an unknown section or key raises ConfigError naming it and the known keys there."""
    parts = dotted.split(".")
    for depth, key in enumerate(parts):
        known = _fields_at(parts[:depth])
        if known is None:  # the path so far is a plain value: nothing below it
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])!r} has no sub-keys")
        if key not in known:
            if depth == 0:
                raise ConfigError(f"{where}: unknown section {key!r} (known: {', '.join(known)})")
            raise ConfigError(f"{where}: unknown key {'.'.join(parts[:depth + 1])} "
                              f"(known: {', '.join(sorted(known))})")
    sub = _fields_at(parts)
    if sub is not None:  # a whole section: say which keys it has
        raise ConfigError(f"{where}: expected {dotted}.KEY=VALUE (one of {', '.join(sorted(sub))})")
    if _override_path_resolves(parts):
        value = _resolve_field(value, base)
    return _set_dotted(data, parts, value, where)


def _dotted(loc: Sequence[Any]) -> str:
    """Pydantic loc tuple -> YAML path: ('inputs', 'paths', 0) -> 'inputs.paths[0]'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _describe(err: Mapping[str, Any]) -> str:
    """One pydantic error (an item of ValidationError.errors()) -> a short human message."""
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys to values, got {err.get('input')!r}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    given = err.get("input")
    if isinstance(given, (dict, list)):
        return msg[:1].lower() + msg[1:]
    return f"{msg[:1].lower() + msg[1:]}, got {given!r}"


def format_validation_error(err: ValidationError, source: str) -> str:
    """ValidationError -> lines ``source: yaml.path: message`` (one per problem)."""
    lines = []
    for e in err.errors():
        path = _dotted(e["loc"])
        line = f"{source}: {path}: {_describe(e)}"
        if e["type"] == "extra_forbidden":
            line += _known_keys_hint(e["loc"])
        lines.append(line)
    return "\n".join(lines)


def _known_keys_hint(loc: Sequence[Any]) -> str:
    """`` (known: a, b)``: the keys of the section holding the unknown key at ``loc``."""
    if not all(isinstance(part, str) for part in loc):
        return ""
    known = _fields_at(loc[:-1])
    if not known:
        return ""
    return f" (known: {', '.join(known if len(loc) == 1 else sorted(known))})"


def parse_job(data: Any, source: str = "job", base_dir: os.PathLike | str | None = None) -> JobSpec:
    """Validate raw (already YAML-parsed) job ``data`` into a JobSpec.

    ``base_dir``: when given, relative local paths are resolved against it.
    ``source`` names the job in error messages. Raises ConfigError.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job must be a YAML mapping of sections, got {type(data).__name__}")
    if base_dir is not None:
        data = resolve_paths(data, base_dir)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    spec._source = source
    return spec


def read_job_file(path: os.PathLike | str) -> Any:
    """Read a job file with ``yaml.safe_load`` (no tags, nothing evaluated)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read job file: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_job(path: os.PathLike | str, overrides: Sequence[str] = ()) -> JobSpec:
    """Load, override and validate a job file. Raises ConfigError naming the field.

    Relative paths in the file resolve against the file's directory; relative paths in
    ``overrides`` resolve against the current directory. Nothing is touched on disk;
    call :func:`check_runnable` to check inputs, checkpoint and output location.
    """
    source = str(path)
    data = read_job_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job must be a YAML mapping of sections, got {type(data).__name__}")
    data = resolve_paths(data, Path(path).resolve().parent)
    data = apply_overrides(data, overrides)
    return parse_job(data, source=source)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_dir_problem(table: str) -> Optional[str]:
    """Why ``table`` could not be created/written, or None. Writes nothing."""
    p = Path(table)
    if p.exists():
        if not p.is_dir():
            return f"exists and is not a directory: {table}"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"directory is not writable: {table}"
        return None
    parent = _nearest_existing(p.parent)
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


def check_runnable(spec: JobSpec) -> None:
    """Check the job's own files before any scene is looked at; raise one ConfigError
    listing every problem (the scenes are checked by :func:`pipeline.run.graph.preflight`).

    - a local ``inputs.stac.source`` is an existing file;
    - ``model.checkpoint`` is a file (local, or an ``s3://``/``gs://`` object);
    - under ``model.precision: int8``, NNCF is installed (the ``int8`` extra) and each of
      ``model.int8_labels`` is a file;
    - ``output.table`` is a writable directory or can be created (the nearest existing
      parent is checked with ``os.access``; nothing is written).
    """
    source = spec.source or "job"
    problems = []
    stac = spec.inputs.stac
    if stac is not None and not is_remote(stac.source) and not os.path.isfile(stac.source):
        problems.append(f"{source}: inputs.stac.source: file not found: {stac.source}")
    ckpt = spec.model.checkpoint
    if is_remote(ckpt) and not ckpt.startswith(("s3://", "gs://")):
        problems.append(f"{source}: model.checkpoint: only local paths, s3:// and gs:// URLs are read, got {ckpt!r}")
    elif not is_remote(ckpt) and not os.path.isfile(ckpt):
        problems.append(f"{source}: model.checkpoint: file not found: {ckpt}")
    if spec.model.precision == "int8":  # the INT8 gate reads them before anything runs
        if find_spec("nncf") is None:  # an extra: quantisation is the only use of OpenVINO's NNCF
            problems.append(f"{source}: model.precision: int8 quantises with NNCF, which is not installed: "
                            "pip install 'retinanet-pipeline[int8]' (or choose precision auto, bf16 or f32)")
        problems += [f"{source}: model.int8_labels[{i}]: file not found: {path}"
                     for i, path in enumerate(spec.model.int8_labels) if not os.path.isfile(path)]
    # An object-store table needs no folder: its first commit creates the keys.
    why = None if is_remote(spec.output.table) else writable_dir_problem(spec.output.table)
    if why:
        problems.append(f"{source}: output.table: {why}")
    if problems:
        raise ConfigError("\n".join(problems))


def _canonical_crs(crs: Optional[str]) -> Optional[str]:
    """'epsg:4326' and 'EPSG:4326' hash alike; CRSs without an authority hash as written."""
    if crs is None:
        return None
    import pyproj

    auth = pyproj.CRS.from_user_input(crs).to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else crs.strip()


def hashed_fields(spec: JobSpec) -> dict:
    """The settings that change the rows a job writes, as a plain dict.

    Included: ``inputs.bands``, all of ``tiling``, ``model.score_threshold`` (and
    ``nms_threshold`` / ``detections_per_chip`` when set), all of
    ``merge`` (with seam_margin resolved) and ``output.crs`` (canonicalised).
    Excluded, because they change speed or placement but not results: ``compute``
    (address, actors, GPUs, retries), ``model.batch_size``, ``model.device``,
    ``model.backend`` and ``model.precision`` (both move scores by rounding noise only; hashing
    it would re-run every scene when a job moves between CPU and GPU; except precision int8,
    hashed with its calibration size), the job name,
    and the paths (scenes and the checkpoint are identified by their own keys).
    """
    return {
        "version": JOB_HASH_VERSION,
        "bands": spec.inputs.bands,
        "tiling": spec.tiling.model_dump(),
        "score_threshold": spec.model.score_threshold,
        "merge": spec.merge.model_dump(),
        "crs": _canonical_crs(spec.output.crs),
        # only when set, so the hashes of jobs written before these fields existed stay put
        **{k: v for k, v in (("nms_threshold", spec.model.nms_threshold),
                             ("detections_per_chip", spec.model.detections_per_chip)) if v is not None},
        # INT8 moves scores beyond rounding noise (a calibrated graph): its rows are its own
        **({"precision": "int8", "int8_calibration_chips": spec.model.int8_calibration_chips}
           if spec.model.precision == "int8" else {}),
    }


def job_hash(spec: JobSpec) -> str:
    """Stable sha256 hex digest of :func:`hashed_fields` (canonical JSON, sorted keys).

    Equal for two specs that produce the same rows from the same scenes and model,
    across processes and machines (no Python ``hash()``, no dict-order dependence).
    """
    blob = json.dumps(hashed_fields(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
