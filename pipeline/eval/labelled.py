"""Labelled scenes -> chip records, and detections on them (plain functions, no Ray).

What a model is measured and trained on: evaluation of a checkpoint
(:mod:`pipeline.eval.evaluate`), the INT8 gate (:mod:`pipeline.eval.int8_gate`) and
training (:mod:`pipeline.train`, which sits above and takes its chips from here) read the
same records, cut by the same rules.

Steps, all on the driver and cheap (headers, masks and label files only):

1. :func:`labelled_scenes`: expand ``train.scenes``, read every label file
   (:func:`pipeline.io.labels.read_labels`: COCO JSON, VOC XML, CSV, vector files) and pair
   each scene with its boxes (scene id = file stem) and class indices.
2. :func:`split_regions`: the validation split, as pixel regions of scenes. By scene:
   the last ``round(fraction * n)`` scenes (at least one, at most n - 1) of a seeded
   shuffle are validation scenes. By region: the last ``fraction`` of each scene's rows
   (``side: bottom``) or columns (``side: right``) is validation; training stops
   ``gap`` pixels before it, so the two never share a pixel, nor an object smaller
   than the gap.
3. :func:`region_chips`: a chip grid (:func:`pipeline.chips.tiling.chip_grid`) over each
   region, nearly empty windows skipped with the scene's validity mask, and the chip's
   boxes from :func:`pipeline.io.labels.chip_labels` (a box is kept when at least
   ``min_box_inside`` of it is inside the chip, clipped to it).

Pixels are read later, where they are used (:func:`read_records`, in the workers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.chips.tiling import ChipWindow, chip_grid, read_chips, valid_fractions
from pipeline.errors import ConfigError, InputError
from pipeline.eval.metrics import ImageBoxes
from pipeline.io.inputs import SceneInput, expand_patterns, id_collisions, match_label_images, scene_id_for
from pipeline.io.labels import Annotations, by_scene, chip_labels, read_labels
from pipeline.io.raster import SceneInfo, open_raster, read_scene_info


@dataclass(frozen=True, eq=False)
class LabelledScene:
    """A scene with its ground truth.

    boxes: (N, 4) float32 XYXY scene pixel edges; labels: (N,) int64 class indices.
    """

    info: SceneInfo
    boxes: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def scene_id(self) -> str:
        return self.info.scene_id


@dataclass(frozen=True)
class Region:
    """A rectangle of one scene, XYXY scene pixels (x0, y0, x1, y1)."""

    scene_id: str
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True, eq=False)
class ChipRecord:
    """One training/validation chip: where to read it and its boxes.

    window: (col_off, row_off, width, height) scene pixels; boxes: (M, 4) float32 XYXY
    chip pixels; labels: (M,) int64 class indices.
    """

    path: str
    scene_id: str
    window: tuple[int, int, int, int]
    boxes: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def chip_id(self) -> str:
        col_off, row_off, _, _ = self.window
        return f"{self.scene_id}/x{col_off}y{row_off}"


def expand_scene_paths(patterns: Sequence[str], source: str = "train.scenes") -> list[SceneInput]:
    """Training scenes through the one expander (:func:`pipeline.io.inputs.expand_patterns`),
    with their ids. Raises ConfigError naming each pattern that matches nothing (a missing
    training scene would silently shrink the training set) and each id collision."""
    inputs = expand_patterns(patterns)
    problems = [f"{source}[{list(patterns).index(p)}]: no file matches {p!r}" for p in inputs.unmatched]
    problems += [f"{source}: {c}" for c in id_collisions(inputs.scenes)]
    if problems:
        raise ConfigError("\n".join(problems))
    return inputs.scenes


def class_indices(annotations: Annotations, classes: Sequence[str]) -> np.ndarray:
    """(N,) int64 index into ``classes`` of each label; InputError names an unknown one."""
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for label in annotations.labels if label not in lookup})
    if unknown:
        raise InputError(f"{annotations.source}: labels {unknown} of image {annotations.image!r} "
                         f"are not in train.classes {list(classes)}")
    return np.array([lookup[label] for label in annotations.labels], dtype=np.int64)


def labelled_scenes(scenes: Sequence[SceneInput | str], label_paths: Sequence[str], classes: Sequence[str],
                    label_field: str = "label", scene_field: str | None = None) -> list[LabelledScene]:
    """Pair every scene with its annotations from any of the label files.

    Image-indexed formats (COCO, VOC, CSV) are matched to scene ids by
    :func:`pipeline.io.inputs.match_label_images` (the image name relative to the scenes'
    folder, or a file name that only one scene has); vector files are read per scene
    (reprojected into its pixel grid). A scene listed by no label file raises
    InputError: an unlabelled training scene would teach the model that its objects are
    background. Plain paths get their file stem as id.
    """
    scene_inputs = [s if isinstance(s, SceneInput) else SceneInput(s, scene_id_for(s), s) for s in scenes]
    infos = [read_scene_info(s.location, scene_id=s.scene_id) for s in scene_inputs]
    indexed: dict[str, Annotations] = {}
    vector_files = []
    for path in label_paths:
        if Path(path).suffix.lower() in (".json", ".xml", ".csv"):
            images = by_scene(read_labels(path))
            for image_id, scene_id in match_label_images(images, [i.scene_id for i in infos], path).items():
                if scene_id in indexed:
                    raise InputError(f"{path}: scene {scene_id!r} is also labelled by image "
                                     f"{indexed[scene_id].image!r} of {indexed[scene_id].source}")
                indexed[scene_id] = images[image_id]
        else:
            vector_files.append(path)
    out = []
    for info in infos:
        parts = [indexed[info.scene_id]] if info.scene_id in indexed else []
        for path in vector_files:
            parts.extend(read_labels(path, info, label_field=label_field, scene_field=scene_field))
        if not parts:
            raise InputError(f"{info.path}: scene {info.scene_id!r} has no labels in "
                             f"{', '.join(map(str, label_paths))}")
        boxes = np.concatenate([p.boxes.reshape(-1, 4) for p in parts]).astype(np.float32)
        labels = np.concatenate([class_indices(p, classes) for p in parts]).astype(np.int64)
        out.append(LabelledScene(info, boxes, labels))
    return out


def split_regions(scenes: Sequence[LabelledScene], by: str, fraction: float, gap: int,
                  side: str = "bottom", seed: int = 0) -> tuple[list[Region], list[Region]]:
    """(train regions, validation regions); see the module docstring for the rules.

    By region, with H the scene height (``side: bottom``; columns likewise for ``right``):
    validation rows [H - v, H) with v = round(fraction * H), training rows [0, H - v - gap).
    Raises ConfigError when a split leaves one side empty.
    """
    if not scenes:
        raise ConfigError("train.scenes: no scene to train on")
    if by == "scene":
        if len(scenes) < 2:
            raise ConfigError("train.val_split: by scene needs at least 2 scenes "
                              f"(got {len(scenes)}); use by: region")
        order = np.random.default_rng(seed).permutation(len(scenes))
        n_val = min(len(scenes) - 1, max(1, int(round(fraction * len(scenes)))))
        val_ids = {scenes[i].scene_id for i in order[len(scenes) - n_val:]}
        whole = [Region(s.scene_id, 0, 0, s.info.width, s.info.height) for s in scenes]
        return ([r for r in whole if r.scene_id not in val_ids], [r for r in whole if r.scene_id in val_ids])
    if by != "region":
        raise ConfigError(f"train.val_split.by: expected 'scene' or 'region', got {by!r}")
    train, val = [], []
    for s in scenes:
        w, h = s.info.width, s.info.height
        length = h if side == "bottom" else w
        n_val = int(round(fraction * length))
        n_train = length - n_val - gap
        if n_val < 1 or n_train < 1:
            raise ConfigError(f"train.val_split: scene {s.scene_id} ({w}x{h}) is too small to hold out "
                              f"{fraction} of its {'rows' if side == 'bottom' else 'columns'} "
                              f"with a gap of {gap} px")
        if side == "bottom":
            train.append(Region(s.scene_id, 0, 0, w, n_train))
            val.append(Region(s.scene_id, 0, h - n_val, w, h))
        else:
            train.append(Region(s.scene_id, 0, 0, n_train, h))
            val.append(Region(s.scene_id, w - n_val, 0, w, h))
    return train, val


def region_windows(region: Region, chip_size: int, overlap: int) -> list[ChipWindow]:
    """Chip grid over a region, in scene pixels (windows never leave the region)."""
    windows = chip_grid(region.width, region.height, chip_size, overlap)
    return [ChipWindow(w.row, w.col, w.col_off + region.x0, w.row_off + region.y0, w.width, w.height)
            for w in windows]


def region_chips(scene: LabelledScene, region: Region, chip_size: int, overlap: int,
                 min_box_inside: float, min_valid_fraction: float) -> list[ChipRecord]:
    """Chip records of one region: windows worth reading and their chip-pixel boxes."""
    windows = region_windows(region, chip_size, overlap)
    if min_valid_fraction > 0:
        with open_raster(scene.path) as dataset:
            fractions = valid_fractions(dataset, windows, chip_size)
        windows = [w for w, f in zip(windows, fractions) if f >= min_valid_fraction]
    records = []
    for w in windows:
        boxes, labels = chip_labels(scene.boxes, list(scene.labels), w, min_box_inside)
        records.append(ChipRecord(scene.path, scene.scene_id, w.as_tuple(), boxes.reshape(-1, 4),
                                  np.asarray(labels, dtype=np.int64).reshape(-1)))
    return records


def build_records(scenes: Sequence[LabelledScene], regions: Sequence[Region], chip_size: int,
                  overlap: int, min_box_inside: float, min_valid_fraction: float) -> list[ChipRecord]:
    """Chip records of many regions, in region order."""
    by_id = {s.scene_id: s for s in scenes}
    out: list[ChipRecord] = []
    for region in regions:
        out.extend(region_chips(by_id[region.scene_id], region, chip_size, overlap,
                                min_box_inside, min_valid_fraction))
    return out


def read_records(records: Sequence[ChipRecord], bands: Sequence[int] | None, chip_size: int,
                 out_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read the pixels of chip records, opening each scene once.

    Returns (pixels (N, C, chip_size, chip_size) float32 raw units, valid (N, chip_size,
    chip_size) bool), in the order of ``records``. Raises the reader's InputError /
    RasterReadError: a training set with unreadable chips should be fixed, not skipped.
    """
    pixels = np.zeros((len(records), out_channels, chip_size, chip_size), dtype=np.float32)
    valid = np.zeros((len(records), chip_size, chip_size), dtype=bool)
    by_path: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_path.setdefault(r.path, []).append(i)
    for path, indices in by_path.items():
        windows = [ChipWindow(0, k, *records[i].window) for k, i in enumerate(indices)]
        chips, failures = read_chips(path, windows, bands, chip_size, out_channels)
        if failures:
            raise InputError(failures[0].reason)
        for chip, i in zip(chips, indices):
            pixels[i] = chip.pixels
            valid[i] = chip.valid
    return pixels, valid


def box_sizes(records: Sequence[ChipRecord]) -> np.ndarray:
    """(N, 2) float64 widths and heights (pixels) of every box of the records."""
    boxes = [r.boxes for r in records if len(r.boxes)]
    if not boxes:
        return np.zeros((0, 2))
    b = np.concatenate(boxes).astype(np.float64)
    return np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


# ------------------------------------------------------------------ detections on records


def predict_records(model, records, bands, chip_size: int, batch_size: int = 8, device: str = "cpu",
                    precision: str = "fp32", pixels: Optional[np.ndarray] = None,
                    channels_last: bool = True) -> list[ImageBoxes]:
    """Run a RetinaNet on chip records (:class:`ChipRecord`) -> detections per chip.

    Chips are read in batches (bounded memory) unless ``pixels`` (N, C, S, S) holds them
    already; ``precision`` as retinanet.runtime. Leaves the model in eval mode.
    """
    from retinanet.runtime import Detector

    detector = Detector(model, device=device, precision=precision, channels_last=channels_last)
    return detect_records(detector, records, bands, chip_size, model.config.in_channels, batch_size, pixels)


def detect_records(detector, records, bands, chip_size: int, in_channels: int, batch_size: int = 8,
                   pixels: Optional[np.ndarray] = None) -> list[ImageBoxes]:
    """Detections per chip record of any detector with `retinanet.Detector`'s interface
    (torch, OpenVINO, ONNX): (B, C, S, S) float tensor -> one dict per chip."""
    import torch

    out = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        if pixels is None:
            chunk, _ = read_records(batch, bands, chip_size, in_channels)
        else:
            chunk = pixels[start:start + batch_size]
        results = detector(torch.from_numpy(np.ascontiguousarray(chunk)))
        for record, det in zip(batch, results):
            out.append(ImageBoxes(record.chip_id, det["boxes"].float().cpu().numpy(),
                                  det["labels"].cpu().numpy(), det["scores"].float().cpu().numpy(),
                                  chip_size, chip_size))
    return out


def records_truth(records, chip_size: int) -> list[ImageBoxes]:
    """Ground truth of chip records as ImageBoxes (one image per chip)."""
    return [ImageBoxes(r.chip_id, r.boxes, r.labels, None, chip_size, chip_size) for r in records]
