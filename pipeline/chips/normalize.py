"""Per-band statistics for normalisation, computed once per dataset.

The model normalises its input as (x - mean) / std with the statistics stored in the
model config, for training and inference alike. Stretching every chip on its own
(min/max or percentiles per chip) is deliberately not offered: it makes one object
look different in two neighbouring chips.

Statistics are sampled from random full-resolution patches (cost proportional to the
sample, not to the scene; deterministic for a given seed) and ignore invalid pixels
(nodata, masked, alpha = 0, NaN). Overviews are not used on purpose: overviews built
with averaging shrink the standard deviation, and the statistics would then depend on
how each file's overviews were made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.chips.tiling import PLAN_CACHE_MB, select_bands
from pipeline.errors import InputError, RasterReadError
from pipeline.io.raster import bounded_block_cache, error_reason, open_raster, scene_info_from_dataset

DEFAULT_MAX_PIXELS = 1_000_000
PATCH = 32  # side of a sampled patch, pixels
# A band whose std is below this (constant band) is divided by 1 instead of ~0.
MIN_STD = 1e-6


@dataclass(frozen=True)
class BandStats:
    """Mean and standard deviation per model input channel, in raw pixel units."""

    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must be non-empty "
                             "and of equal length")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "BandStats":
        return cls(mean=[float(v) for v in data["mean"]], std=[float(v) for v in data["std"]])

    def replicate(self, channels: int) -> "BandStats":
        """Stats of a single band repeated for ``channels`` channels (grey -> RGB)."""
        if len(self.mean) != 1:
            raise ValueError(f"only single-band stats can be replicated, got {len(self.mean)}")
        return BandStats(self.mean * channels, self.std * channels)


def patch_windows(width: int, height: int, budget: int, seed: int = 0) -> list[Window]:
    """Random PATCH x PATCH windows covering about ``budget`` pixels, row-major sorted.

    The whole raster is one window when it has at most ``budget`` pixels. Sorting keeps
    reads of neighbouring patches on the same (cached) blocks.
    """
    if width * height <= budget:
        return [Window(0, 0, width, height)]
    pw, ph = min(PATCH, width), min(PATCH, height)
    count = max(1, -(-budget // (pw * ph)))
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, width - pw + 1, size=count)
    rows = rng.integers(0, height - ph + 1, size=count)
    order = np.lexsort((cols, rows))
    return [Window(int(cols[i]), int(rows[i]), pw, ph) for i in order]


def sample_valid_pixels(path: str | Path, bands: Sequence[int] | None, max_pixels: int,
                        seed: int = 0) -> np.ndarray:
    """(C, M) float64 values of valid pixels sampled from a scene, M <= ~max_pixels.

    Samples full-resolution random patches (see :func:`patch_windows`): the cost grows
    with the sample, not the scene, and unlike averaged overviews the spread of the
    values is not smoothed away. A pixel is valid when the dataset mask says so
    (nodata / alpha / internal mask) and no selected band is NaN.
    """
    with open_raster(path) as dataset:
        scene = scene_info_from_dataset(dataset, path, allow_rotated=True)
        chosen = select_bands(scene, bands)
        samples = []
        try:
            with bounded_block_cache(PLAN_CACHE_MB):
                for window in patch_windows(scene.width, scene.height, max_pixels, seed):
                    data = dataset.read(chosen, window=window)
                    valid = dataset.dataset_mask(window=window) > 0
                    if data.dtype.kind == "f":
                        valid &= ~np.isnan(data).any(axis=0)
                    samples.append(data[:, valid].astype(np.float64))
        except RasterioError as err:
            raise RasterReadError(f"{path}: cannot read a sample for band statistics "
                                  f"({error_reason(err)})") from err
    return np.concatenate(samples, axis=1)


def compute_band_stats(paths: Sequence[str | Path], bands: Sequence[int] | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS,
                       out_channels: int | None = None) -> BandStats:
    """Mean/std per selected band over the valid pixels of a dataset of scenes.

    Args:
        paths: the scenes of the dataset (the same band layout in each).
        bands: 1-based bands, as given to the chip reader (None: non-alpha bands).
        max_pixels: total sampling budget, split evenly between the scenes; a scene
            with fewer pixels than its share is read whole (exact statistics).
        out_channels: when one band feeds a model of this many channels, its stats are
            replicated so they line up with the replicated chip.

    Returns:
        BandStats in raw units; std floored at MIN_STD (constant bands).

    Raises:
        InputError: no path, or no valid pixel in the whole sample.
    """
    if not paths:
        raise InputError("band statistics need at least one scene")
    budget = max(1, max_pixels // len(paths))
    # Pooled sums in float64: exact enough for uint16 sums over millions of pixels.
    count = 0
    total = None
    total_sq = None
    for index, path in enumerate(paths):
        values = sample_valid_pixels(path, bands, budget, seed=index)
        if total is None:
            total = np.zeros(values.shape[0])
            total_sq = np.zeros(values.shape[0])
        elif values.shape[0] != total.shape[0]:
            raise InputError(f"{path}: {values.shape[0]} bands selected, other scenes have "
                             f"{total.shape[0]}")
        count += values.shape[1]
        total += values.sum(axis=1)
        total_sq += np.square(values).sum(axis=1)
    if total is None or total_sq is None or count == 0:
        raise InputError(f"no valid pixel in {len(paths)} scene(s) "
                         f"({', '.join(str(p) for p in paths[:3])}...) to compute band statistics")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    stats = BandStats([float(m) for m in mean], [float(max(s, MIN_STD)) for s in std])
    if out_channels is not None and len(stats.mean) == 1 and out_channels > 1:
        stats = stats.replicate(out_channels)
    return stats
