"""Chip grid, cheap empty-chip skipping, and windowed chip reads.

The model never sees a whole scene: a scene is cut into square chips of ``chip_size``
pixels that overlap by ``overlap`` pixels (stride = chip_size - overlap), read one
window at a time so memory does not grow with scene size.

Two-step use, so that planning happens once (on the driver) and reading happens where
the compute is (in Ray tasks):

    plan = plan_chips(path, chip_size=512, overlap=64, min_valid_fraction=0.05)
    chips, failures = read_chips(path, plan.windows, bands=[1, 2, 3], chip_size=512)

or in one loop without Ray: ``for item in iter_chips(...)``.

Pixels stay in raw units (no stretch): normalisation uses per-dataset statistics
(:mod:`pipeline.chips.normalize`) inside the model, so one object looks the same in every chip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.errors import InputError, RasterReadError
from pipeline.io.raster import (
    SceneInfo,
    bounded_block_cache,
    error_reason,
    open_raster,
    scene_info_from_dataset,
)

# Tested: uint8, uint16, int16, float32 (NaN = invalid). Any other real dtype (int8,
# (u)int32, float64) is read too and converted to float32; complex data is refused.
SUPPORTED_KINDS = "uif"

# Planning reads decimated masks: each block is touched once and never again, so a
# big GDAL block cache only costs memory there.
PLAN_CACHE_MB = 64
# Upper bound on the decimated mask used for planning (bytes of uint8; the integral
# image costs 4x that). 4M cells keep planning of a 100k x 100k scene under ~50 MB.
MAX_MASK_CELLS = 4 * 1024 * 1024
# Aim for at least this many mask cells along each side of a chip when an overview
# makes decimation free.
MASK_CELLS_PER_CHIP_SIDE = 16


def chip_id(scene_id: str, row: int, col: int) -> str:
    """A chip's id: its scene and grid cell, e.g. ``scene_a/r3c7``."""
    return f"{scene_id}/r{row}c{col}"


@dataclass(frozen=True)
class ChipWindow:
    """One cell of the chip grid, in scene pixels.

    Attributes:
        row, col: grid indices (0-based) of the chip.
        col_off, row_off: pixel offset of the chip's upper-left corner in the scene.
        width, height: pixels of the scene inside the chip; equal to chip_size except
            when the scene is smaller than one chip along that axis.
    """

    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height)."""
        return (self.col_off, self.row_off, self.width, self.height)

    def to_rasterio(self) -> Window:
        return Window(self.col_off, self.row_off, self.width, self.height)


@dataclass(frozen=True, eq=False)
class Chip:
    """A chip ready for the model, traceable to the scene and the map.

    Attributes:
        scene_id: scene the chip comes from.
        row, col: grid indices of the chip.
        window: (col_off, row_off, width, height) in scene pixels.
        transform: affine (a, b, c, d, e, f) of the chip: chip pixel (x, y) -> map
            coordinates (pixel frame of the scene when ``crs_wkt`` is None).
        crs_wkt: CRS of ``transform``, or None for non-georeferenced scenes.
        pixels: (C, chip_size, chip_size) float32 in raw units (not normalised); 0
            outside the scene (padding) and where ``valid`` is False. (The file's own
            dtype when read with ``dtype=None``.)
        valid: (chip_size, chip_size) bool, True on valid scene pixels.
    """

    scene_id: str
    row: int
    col: int
    window: tuple[int, int, int, int]
    transform: tuple[float, float, float, float, float, float]
    crs_wkt: str | None
    pixels: np.ndarray = field(repr=False)
    valid: np.ndarray = field(repr=False)

    @property
    def valid_fraction(self) -> float:
        """Fraction of the window's scene pixels that are valid."""
        _, _, width, height = self.window
        return float(self.valid.sum()) / float(max(width * height, 1))


@dataclass(frozen=True)
class ChipFailure:
    """A chip whose window could not be read (damaged tiles, I/O failure).

    Reported instead of raised when ``on_error="report"`` so that one bad window does
    not take the rest of the scene down.
    """

    scene_id: str
    path: str
    row: int
    col: int
    window: tuple[int, int, int, int]
    reason: str


class ChipPlan(NamedTuple):
    """Result of :func:`plan_chips`: the scene, the windows to read, and how many
    windows of the full grid were skipped as (nearly) empty."""

    scene: SceneInfo
    windows: list[ChipWindow]
    n_skipped: int


# --------------------------------------------------------------------------- grid


def _check_grid_args(chip_size: int, overlap: int) -> None:
    if chip_size < 1:
        raise ValueError(f"chip_size must be >= 1, got {chip_size}")
    if not 0 <= overlap < chip_size:
        raise ValueError(f"overlap must be in [0, chip_size={chip_size}), got {overlap}")


def chips_along(length: int, chip_size: int, overlap: int) -> int:
    """Number of chips along one axis of ``length`` pixels.

    n = 1                                       if length <= chip_size
    n = ceil((length - chip_size) / stride) + 1  otherwise, stride = chip_size - overlap
    """
    _check_grid_args(chip_size, overlap)
    if length <= chip_size:
        return 1
    stride = chip_size - overlap
    return -(-(length - chip_size) // stride) + 1


def axis_offsets(length: int, chip_size: int, overlap: int, block: int | None = None) -> list[int]:
    """Chip start offsets along one axis (pixels), see :func:`chip_grid`.

    Regular grid: offset_i = i * stride, the last one snapped to ``length - chip_size``.
    With ``block``: offsets are moved back onto multiples of ``block`` where that keeps
    the same number of chips, an overlap >= ``overlap`` with the previous chip, and
    lets the remaining chips still reach the edge — alignment that costs nothing.
    """
    n = chips_along(length, chip_size, overlap)
    if n == 1:
        return [0]
    stride = chip_size - overlap
    last = length - chip_size
    if not block or block <= 1 or stride % block == 0:
        return [i * stride for i in range(n - 1)] + [last]
    offsets = [0]
    for i in range(1, n - 1):
        furthest = offsets[-1] + stride            # overlap with previous == overlap
        nearest = last - (n - 1 - i) * stride      # remaining chips can still reach `last`
        aligned = (furthest // block) * block
        offsets.append(aligned if aligned >= nearest and aligned > offsets[-1] else furthest)
    offsets.append(last)
    return offsets


def chip_grid(width: int, height: int, chip_size: int, overlap: int,
              block_shape: tuple[int, int] | None = None) -> list[ChipWindow]:
    """All chip windows of a ``width`` x ``height`` scene, row-major.

    Count formula (per axis, stride = chip_size - overlap):

        n(L) = 1                                  if L <= chip_size
        n(L) = ceil((L - chip_size) / stride) + 1 otherwise
        total = n(width) * n(height)

    Invariants (tested table-driven):
      * coverage: every scene pixel lies in at least one window;
      * no window reaches past the scene: the last row/column is snapped to the edge
        (offset = L - chip_size), so its overlap with the previous one may be larger;
      * consecutive windows overlap by at least ``overlap`` pixels;
      * a scene smaller than a chip along an axis gives one window of the scene's size
        there (the chip is padded when read).

    Args:
        block_shape: (rows, cols) of the file's internal blocks. When given, offsets
            are aligned to block multiples wherever that costs nothing (same count,
            overlap still >= ``overlap``); see :func:`axis_offsets`.
    """
    block_rows, block_cols = block_shape if block_shape else (None, None)
    # Strip-organised files (one block spans the width) have nothing to align on.
    if block_cols is not None and block_cols >= width:
        block_cols = None
    xs = axis_offsets(width, chip_size, overlap, block_cols)
    ys = axis_offsets(height, chip_size, overlap, block_rows)
    w = min(chip_size, width)
    h = min(chip_size, height)
    return [ChipWindow(row=r, col=c, col_off=x, row_off=y, width=w, height=h)
            for r, y in enumerate(ys) for c, x in enumerate(xs)]


# ------------------------------------------------------------- valid fractions


def _all_valid(dataset: rasterio.io.DatasetReader) -> bool:
    """True when GDAL says every pixel is valid and NaN cannot occur."""
    if any(np.dtype(dt).kind == "f" for dt in dataset.dtypes):
        return False
    return all(flags == [MaskFlags.all_valid] for flags in dataset.mask_flag_enums)


def _mask_decimation(width: int, height: int, chip_size: int, overviews: Sequence[int],
                     max_cells: int) -> int:
    """Decimation factor of the planning mask: bounded memory, free with overviews."""
    bounded = math.ceil(math.sqrt(width * height / max_cells))
    free = max((f for f in overviews if f <= chip_size // MASK_CELLS_PER_CHIP_SIDE), default=1)
    return max(1, bounded, free)


def valid_mask_decimated(dataset: rasterio.io.DatasetReader, factor: int) -> np.ndarray:
    """(ceil(H/factor), ceil(W/factor)) bool: decimated dataset validity.

    Combines GDAL's dataset mask (nodata / alpha / internal mask; a pixel is valid when
    any band is) with NaN for float rasters (invalid when NaN in every band). GDAL
    serves the decimated read from overviews when the file has them.
    """
    out_h = max(1, -(-dataset.height // factor))
    out_w = max(1, -(-dataset.width // factor))
    with bounded_block_cache(PLAN_CACHE_MB):
        valid = dataset.dataset_mask(out_shape=(out_h, out_w)) > 0
        if any(np.dtype(dt).kind == "f" for dt in dataset.dtypes):
            all_nan = np.ones_like(valid)
            for band in range(1, dataset.count + 1):  # one band at a time: bounded memory
                all_nan &= np.isnan(dataset.read(band, out_shape=(out_h, out_w)))
            valid &= ~all_nan
    return valid


def window_fractions(mask: np.ndarray, scene_width: int, scene_height: int,
                     windows: Sequence[ChipWindow]) -> np.ndarray:
    """(N,) float64 valid fraction of each window, from a decimated validity mask.

    ``mask`` (h, w) bool covers the whole scene; a window covers the mask cells that it
    touches (rounded outward). Uses a summed-area table: O(h*w + N).
    """
    if not windows:
        return np.zeros(0, dtype=np.float64)
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    win = np.array([wd.as_tuple() for wd in windows], dtype=np.float64)
    sx, sy = scene_width / w, scene_height / h
    x0 = np.clip(np.floor(win[:, 0] / sx), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.floor(win[:, 1] / sy), 0, h - 1).astype(np.int64)
    x1 = np.clip(np.ceil((win[:, 0] + win[:, 2]) / sx), x0 + 1, w).astype(np.int64)
    y1 = np.clip(np.ceil((win[:, 1] + win[:, 3]) / sy), y0 + 1, h).astype(np.int64)
    total = (table[y1, x1].astype(np.int64) - table[y0, x1] - table[y1, x0] + table[y0, x0])
    return total / ((x1 - x0) * (y1 - y0))


def valid_fractions(dataset: rasterio.io.DatasetReader, windows: Sequence[ChipWindow],
                    chip_size: int, max_cells: int = MAX_MASK_CELLS) -> np.ndarray:
    """(N,) estimated valid fraction of each window, without full-resolution reads.

    No read at all when GDAL reports every band all-valid (and the dtype has no NaN).
    Otherwise one decimated read of the dataset mask, at most ``max_cells`` cells,
    served by overviews when present; without overviews GDAL visits each block once.

    Raises:
        RasterReadError: the mask could not be read.
    """
    if not windows:
        return np.zeros(0, dtype=np.float64)
    if _all_valid(dataset):
        return np.ones(len(windows), dtype=np.float64)
    factor = _mask_decimation(dataset.width, dataset.height, chip_size,
                              dataset.overviews(1), max_cells)
    try:
        mask = valid_mask_decimated(dataset, factor)
    except RasterioError as err:
        raise RasterReadError(f"{dataset.name}: cannot read the validity mask "
                              f"({error_reason(err)})") from err
    return window_fractions(mask, dataset.width, dataset.height, windows)


def plan_chips(path: str | Path, chip_size: int, overlap: int, min_valid_fraction: float,
               *, align_to_blocks: bool = True, allow_rotated: bool = False,
               scene_id: str | None = None) -> ChipPlan:
    """Windows of a scene worth reading, without reading pixels.

    A window is kept when its estimated valid fraction is >= ``min_valid_fraction``
    (0 keeps every window and reads nothing). Fractions come from
    :func:`valid_fractions` (mask/overviews, decimated).

    Raises:
        InputError / GeoreferenceError: see :func:`pipeline.io.raster.read_scene_info`.
        RasterReadError: the decimated mask could not be read.
    """
    with open_raster(path) as dataset:
        scene = scene_info_from_dataset(dataset, path, allow_rotated=allow_rotated, scene_id=scene_id)
        _check_dtype(scene)
        block = scene.block_shape if align_to_blocks else None
        windows = chip_grid(scene.width, scene.height, chip_size, overlap, block)
        if min_valid_fraction <= 0:
            return ChipPlan(scene, windows, 0)
        fractions = valid_fractions(dataset, windows, chip_size)
    keep = fractions >= min_valid_fraction
    kept = [wd for wd, k in zip(windows, keep) if k]
    return ChipPlan(scene, kept, len(windows) - len(kept))


def _check_dtype(scene: SceneInfo) -> None:
    try:
        kind = np.dtype(scene.dtype).kind
    except TypeError:  # GDAL-only types such as complex_int16
        kind = "c"
    if kind not in SUPPORTED_KINDS:
        raise InputError(f"{scene.path}: dtype {scene.dtype} is not supported "
                         "(expected integer or floating-point bands)")


# ---------------------------------------------------------------------- reading


def select_bands(scene: SceneInfo, bands: Sequence[int] | None,
                 out_channels: int | None = None) -> list[int]:
    """Validate a 1-based band selection (None: every non-alpha band).

    Raises InputError when a band does not exist or the selection cannot feed a model
    of ``out_channels`` channels (only a single band may be replicated).
    """
    chosen = list(scene.data_bands if bands is None else bands)
    if not chosen:
        raise InputError(f"{scene.path}: no band selected")
    bad = [b for b in chosen if not isinstance(b, (int, np.integer)) or not 1 <= b <= scene.count]
    if bad:
        raise InputError(f"{scene.path}: bands {bad} do not exist; bands are 1-based and "
                         f"the scene has {scene.count}")
    if out_channels is not None and len(chosen) not in (1, out_channels):
        raise InputError(f"{scene.path}: {len(chosen)} bands {chosen} selected but the model "
                         f"takes {out_channels} channels; select {out_channels} bands or one "
                         "band to replicate")
    return [int(b) for b in chosen]


def read_chip(dataset: rasterio.io.DatasetReader, window: ChipWindow,
              bands: Sequence[int] | None, chip_size: int, out_channels: int | None = None,
              *, scene: SceneInfo | None = None, dtype: str | None = "float32",
              out: np.ndarray | None = None) -> Chip:
    """Read one chip from an open dataset.

    Args:
        dataset: open rasterio dataset (see :func:`pipeline.io.raster.open_raster`).
        window: the chip's window in scene pixels (from :func:`plan_chips`).
        bands: 1-based band indexes, or None for every non-alpha band.
        chip_size: side of the returned arrays; windows smaller than it are padded.
        out_channels: channels the model takes; a single band is replicated to it.
        scene: the scene's SceneInfo, to skip re-reading the header per chip.
        dtype: dtype of ``pixels``; None keeps the file's dtype (uint8 chips are 4x
            smaller to ship between processes; convert where the model runs).
        out: optional (C, chip_size, chip_size) array of that dtype to read into (e.g.
            one row of a model batch): no allocation, and fresh memory costs page
            faults that show at these sizes. ``chip.pixels`` is then ``out``.

    Returns:
        Chip with pixels (C, chip_size, chip_size) in ``dtype`` (float32 by default),
        raw units, and valid (chip_size, chip_size) bool.

    Raises:
        RasterReadError: the window could not be read (message names file and window).
        InputError: bad band selection or unsupported dtype.
    """
    scene = scene or scene_info_from_dataset(dataset, dataset.name)
    _check_dtype(scene)
    chosen = select_bands(scene, bands, out_channels)
    win = window.to_rasterio()
    channels = out_channels if out_channels is not None else len(chosen)
    out_dtype = np.dtype(scene.dtype if dtype is None else dtype)
    full = window.height == chip_size and window.width == chip_size
    shape = (channels, chip_size, chip_size)
    if out is None:
        # Full-size chips are overwritten entirely: skip zero-filling them.
        pixels = (np.empty if full else np.zeros)(shape, dtype=out_dtype)
    else:
        if out.shape != shape or out.dtype != out_dtype:
            raise ValueError(f"out must be {shape} {out_dtype}, got {out.shape} {out.dtype}")
        pixels = out
        if not full:
            pixels[...] = 0
    target = pixels[:len(chosen), :window.height, :window.width]  # (C, h, w) view
    try:
        # GDAL converts the dtype while copying out of its block cache: one pass, no
        # temporary, when the view is contiguous (full-size chips); padded chips copy.
        if target.flags.c_contiguous:
            dataset.read(chosen, window=win, out=target)
        else:
            target[...] = dataset.read(chosen, window=win, out_dtype=out_dtype)
        valid = None if _all_valid(dataset) else dataset.dataset_mask(window=win) > 0
    except RasterioError as err:
        raise RasterReadError(f"{scene.path}: cannot read chip row={window.row} col={window.col} "
                              f"window={window.as_tuple()} ({error_reason(err)})") from err
    if np.dtype(scene.dtype).kind == "f":
        finite = ~np.isnan(target).any(axis=0)  # NaN is invalid even without a nodata tag
        valid = finite if valid is None else valid & finite
    if valid is not None and not valid.all():
        target[:, ~valid] = 0
    if channels > len(chosen):
        pixels[1:] = pixels[0]  # one band replicated for a multi-channel model
    full_valid = np.zeros((chip_size, chip_size), dtype=bool)
    full_valid[:window.height, :window.width] = True if valid is None else valid
    return Chip(
        scene_id=scene.scene_id,
        row=window.row,
        col=window.col,
        window=window.as_tuple(),
        # The chip's upper-left pixel is (col_off, row_off) of the scene: compose a translation.
        transform=tuple(Affine(*scene.transform[:6]) @ Affine.translation(window.col_off, window.row_off))[:6],
        crs_wkt=scene.crs_wkt,
        pixels=pixels,
        valid=full_valid,
    )


def read_chips(path: str | Path, windows: Sequence[ChipWindow], bands: Sequence[int] | None,
               chip_size: int, out_channels: int | None = None, *,
               allow_rotated: bool = False, dtype: str | None = "float32",
               out: np.ndarray | None = None) -> tuple[list[Chip], list[ChipFailure]]:
    """Read many windows of one scene, opening it once (the unit of work of a task).

    A window that fails to read becomes a :class:`ChipFailure`; the others are read.
    With ``out`` (len(windows), C, chip_size, chip_size), chip k is read into
    ``out[k]`` (rows of failed windows are zero-filled): a model batch filled in place.

    Raises:
        InputError / GeoreferenceError: the scene itself cannot be used.
    """
    chips: list[Chip] = []
    failures: list[ChipFailure] = []
    if out is not None and len(out) != len(windows):
        raise ValueError(f"out has {len(out)} rows for {len(windows)} windows")
    for item in _read_windows(path, windows, bands, chip_size, out_channels,
                              on_error="report", allow_rotated=allow_rotated, dtype=dtype,
                              out=out):
        if isinstance(item, ChipFailure):
            failures.append(item)
        else:
            chips.append(item)
    return chips, failures


def _read_windows(path: str | Path, windows: Sequence[ChipWindow], bands: Sequence[int] | None,
                  chip_size: int, out_channels: int | None, on_error: str,
                  allow_rotated: bool, dtype: str | None, out: np.ndarray | None = None
                  ) -> Iterator[Chip | ChipFailure]:
    if on_error not in ("raise", "report"):
        raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
    with open_raster(path) as dataset:
        scene = scene_info_from_dataset(dataset, path, allow_rotated=allow_rotated)
        _check_dtype(scene)
        select_bands(scene, bands, out_channels)  # fail once for the scene, not per chip
        for k, window in enumerate(windows):
            row = None if out is None else out[k]
            try:
                yield read_chip(dataset, window, bands, chip_size, out_channels, scene=scene,
                                dtype=dtype, out=row)
            except RasterReadError as err:
                if on_error == "raise":
                    raise
                if row is not None:
                    row[...] = 0
                yield ChipFailure(scene.scene_id, str(path), window.row, window.col,
                                  window.as_tuple(), str(err))


def iter_chips(path: str | Path, chip_size: int, overlap: int, bands: Sequence[int] | None,
               min_valid_fraction: float, out_channels: int | None = None, *,
               on_error: Literal["raise", "report"] = "raise",
               align_to_blocks: bool = True,
               allow_rotated: bool = False,
               dtype: str | None = "float32") -> Iterator[Chip | ChipFailure]:
    """Plan and read every non-empty chip of a scene, row-major.

    Row-major order reads each internal block about once: the GDAL block cache keeps
    the blocks shared by overlapping neighbours.

    Args:
        on_error: ``"raise"`` stops at the first unreadable window with
            RasterReadError; ``"report"`` yields a :class:`ChipFailure` for it and goes
            on, so a damaged tile costs only the chips that touch it.
        align_to_blocks: see :func:`chip_grid`.
        dtype: pixel dtype of the chips, see :func:`read_chip`.

    Yields:
        Chip (and ChipFailure when ``on_error="report"``).
    """
    plan = plan_chips(path, chip_size, overlap, min_valid_fraction,
                      align_to_blocks=align_to_blocks, allow_rotated=allow_rotated)
    yield from _read_windows(path, plan.windows, bands, chip_size, out_channels,
                             on_error=on_error, allow_rotated=allow_rotated, dtype=dtype)
