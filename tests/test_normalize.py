"""Per-dataset band statistics: exact on small scenes, close on sampled large ones."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from real_data import real, requires_real_data

from pipeline.chips.normalize import MIN_STD, BandStats, compute_band_stats, patch_windows
from pipeline.errors import InputError
from pipeline.tools.synth import synthesize


def exact_stats(paths, bands):
    """Oracle: full read of every scene, valid pixels only, numpy mean/std."""
    values = []
    for path in paths:
        with rasterio.open(path) as ds:
            data = ds.read(bands).astype(np.float64)
            valid = ds.dataset_mask() > 0
            if data.dtype.kind == "f":
                valid &= ~np.isnan(data).any(axis=0)
            values.append(data[:, valid])
    values = np.concatenate(values, axis=1)
    return values.mean(axis=1), values.std(axis=1)


@requires_real_data
def test_small_scene_is_read_whole_and_exact():
    path = real("RGB.byte.tif")  # 568k pixels < budget; nodata=0 border excluded
    stats = compute_band_stats([path], [1, 2, 3])
    mean, std = exact_stats([path], [1, 2, 3])
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(stats.std, std, rtol=1e-9)
    with rasterio.open(path) as ds:  # the nodata border would pull the mean down
        assert stats.mean[0] > ds.read(1).mean()


@requires_real_data
def test_real_rgba_uint16_default_bands_skip_alpha():
    # RGBA.uint16.tif holds 10000 in every colour band: a constant band gets MIN_STD.
    stats = compute_band_stats([real("RGBA.uint16.tif")])
    assert stats.mean == [10000.0] * 3 and stats.std == [MIN_STD] * 3


def test_alpha_zero_pixels_are_excluded(tmp_path):
    path = tmp_path / "rgba.tif"
    data = np.zeros((4, 16, 16), np.uint16)
    data[:3] = 1000
    data[:3, :, :4] = 60000          # junk under alpha = 0
    data[3] = 65535
    data[3, :, :4] = 0
    data[0, 0, 8] = 3000             # one valid outlier
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16",
                       photometric="RGB", alpha="YES", crs="EPSG:32633",
                       transform=rasterio.Affine(1, 0, 0, 0, -1, 16)) as ds:
        ds.write(data)
    stats = compute_band_stats([path])
    # 192 valid pixels: 191 x 1000 and one 3000 in band 1.
    assert stats.mean[0] == pytest.approx((191 * 1000 + 3000) / 192)
    assert stats.mean[1:] == [1000.0, 1000.0]
    mean, std = exact_stats([path], [1, 2, 3])
    np.testing.assert_allclose(stats.std[0], std[0], rtol=1e-9)


@pytest.mark.slow  # a large raster on purpose
def test_sampled_stats_close_to_exact_on_a_large_dataset(tmp_path):
    paths = synthesize(tmp_path, 2, 1536, seed=2, bands=4, dtype="uint16", nodata_regions=True)
    stats = compute_band_stats(paths, [1, 2, 3, 4], max_pixels=200_000)  # ~4% sample
    mean, std = exact_stats(paths, [1, 2, 3, 4])
    np.testing.assert_allclose(stats.mean, mean, rtol=0.03)
    np.testing.assert_allclose(stats.std, std, rtol=0.06)
    assert min(stats.mean) > 1000  # nodata (0) excluded, 16-bit scale
    again = compute_band_stats(paths, [1, 2, 3, 4], max_pixels=200_000)
    assert again == stats  # deterministic sample


@requires_real_data
def test_nan_is_ignored():
    stats = compute_band_stats([real("float_nan.tif")], [1])
    mean, std = exact_stats([real("float_nan.tif")], [1])
    assert np.isfinite(stats.mean).all()
    np.testing.assert_allclose(stats.mean, mean)


@requires_real_data
def test_single_band_replicated_for_three_channels():
    stats = compute_band_stats([real("rgb1_fake_nir_epsg3857.tif")], [1], out_channels=3)
    assert len(stats.mean) == 3 and stats.mean[0] == stats.mean[2]
    assert stats.std[0] == stats.std[1] > 0


@requires_real_data
def test_no_valid_pixel_is_an_input_error():
    with pytest.raises(InputError, match="no valid pixel"):
        compute_band_stats([real("all-nodata.tif")])


def test_constant_band_gets_a_positive_std(tmp_path):
    path = tmp_path / "flat.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(1, 0, 0, 0, -1, 8)) as ds:
        ds.write(np.full((1, 8, 8), 9, np.uint8))
    stats = compute_band_stats([path])
    assert stats.mean == [9.0] and stats.std[0] > 0


def test_band_stats_round_trip_and_validation():
    stats = BandStats([1.0, 2.0], [3.0, 4.0])
    assert BandStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError):
        BandStats([1.0], [0.0])
    with pytest.raises(ValueError):
        BandStats([1.0, 2.0], [1.0])
    with pytest.raises(InputError):
        compute_band_stats([])


def test_patch_windows_stay_inside_and_meet_the_budget():
    windows = patch_windows(5000, 3000, 100_000, seed=1)
    assert sum(w.width * w.height for w in windows) >= 100_000
    assert all(0 <= w.col_off <= 5000 - w.width and 0 <= w.row_off <= 3000 - w.height
               for w in windows)
    assert patch_windows(100, 100, 100_000)[0].width == 100  # small: one whole window
