"""Predicting from Python without Ray: `pipeline.predict_scene` gives the rows `pipeline run`
commits (read back with GeoPandas and DuckDB, not our code), streams a scene in windowed
chip reads, starts no Ray, and names bad input; `pipeline.predict_image` tiles an array
the same way."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from real_data import real
from workspaces import tiny_checkpoint

import pipeline
from pipeline.errors import ConfigError, InputError
from pipeline.tools.synth import synthesize

pytestmark = pytest.mark.timeout(300)

# The settings both sides run with. `pipeline run` takes them as --set section.key=value;
# predict_scene as the same dotted names, or as section dicts (both forms are used below).
DOTTED = {"inputs.bands": [1, 2, 3], "model.score_threshold": 0.3, "model.batch_size": 4,
          "model.precision": "fp32", "model.backend": "torch"}
SECTIONS = {"tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05}, "merge": {"method": "nms"}}
# Columns only a commit has: which run wrote the row under which job name, when, and the
# date partition it went to. predict_scene writes nothing, so it has none of them.
COMMIT_ONLY = {"run_id", "job_name", "processed_at", "date"}


@pytest.fixture(scope="module")
def workspace(module_tmp):
    root = module_tmp("predict")
    synthesize(root / "scenes", scenes=1, size=600, seed=3)
    synthesize(root / "nodata", scenes=1, size=600, seed=4, nodata_regions=True)  # valid masks matter
    tiny_checkpoint(root / "model.pt")
    return root


def _run_cli(root: Path, scene: Path, table: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    job = {"name": "predict-parity", "inputs": {"paths": [str(scene)]},
           "model": {"checkpoint": str(root / "model.pt")},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1},
           "output": {"table": str(table)}}
    job_path = table.parent / f"{table.name}.yaml"
    job_path.write_text(yaml.safe_dump(job))
    settings = {**DOTTED, **{f"{s}.{k}": v for s, keys in SECTIONS.items() for k, v in keys.items()}}
    args = ["run", str(job_path)]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def _sorted(frame):
    order = np.lexsort([frame["score"].to_numpy(), frame["px_ymin"].to_numpy(), frame["px_xmin"].to_numpy()])
    return frame.iloc[order].reset_index(drop=True)


@pytest.mark.parametrize("which", ["synthetic", "nodata", "real"])
def test_predict_scene_gives_the_rows_pipeline_run_commits(workspace, tmp_path, ray_session, which):
    import duckdb
    import geopandas

    scene = {"synthetic": lambda: workspace / "scenes" / "synth_000.tif",
             "nodata": lambda: workspace / "nodata" / "synth_000.tif",
             "real": lambda: real("2018_SJER_3_252000_4107000_image_477.tif")}[which]()
    table = tmp_path / "table"
    _run_cli(workspace, scene, table)
    committed = geopandas.read_parquet(str(table))
    found = pipeline.predict_scene(str(scene), str(workspace / "model.pt"), progress=False, **DOTTED, **SECTIONS)

    assert isinstance(found, geopandas.GeoDataFrame)
    assert len(found) == len(committed) > 0
    assert set(committed.columns) - set(found.columns) == COMMIT_ONLY
    assert set(found.columns) <= set(committed.columns)
    assert found.crs is not None and found.crs == committed.crs  # EPSG:4326, output.crs's default
    a, b = _sorted(found), _sorted(committed)
    for column in ("px_xmin", "px_ymin", "px_xmax", "px_ymax", "score"):
        assert np.allclose(a[column], b[column], atol=1e-3), column
    for column in ("label", "label_id", "scene_id", "scene_path", "model_id", "job_hash"):
        assert a[column].tolist() == b[column].tolist(), column
    # Map boxes: 1e-3 px of a 0.5 m (synthetic) or 0.1 m (real) pixel is < 1e-7 degrees.
    assert np.allclose(a.geometry.bounds.to_numpy(), b.geometry.bounds.to_numpy(), atol=1e-7, rtol=0)

    # DuckDB reads the same committed rows: labels and scores as predict_scene has them.
    rows = duckdb.sql(f"SELECT label, score, px_xmin, px_ymin FROM read_parquet('{table}/**/*.parquet') "
                      "ORDER BY px_xmin, px_ymin, score").fetchall()
    assert [r[0] for r in rows] == a["label"].tolist()
    assert np.allclose([r[1] for r in rows], a["score"], atol=1e-3)


def test_import_pipeline_stays_light_and_exposes_predict():
    code = ("import sys, pipeline\n"
            "heavy = [m for m in ('torch', 'ray', 'rasterio', 'geopandas', 'pyarrow') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(pipeline.predict_scene) and callable(pipeline.predict_image)\n"
            "assert 'ray' not in sys.modules\n"
            "try:\n"
            "    pipeline.no_such_thing\n"
            "except AttributeError as err:\n"
            "    assert 'no_such_thing' in str(err)\n"
            "else:\n"
            "    raise SystemExit('no AttributeError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # predicts whole scenes (one in a child process)
def test_predict_scene_starts_no_ray_and_shows_progress_unless_told(workspace):
    """In a fresh process (this one runs the test session's Ray): no Ray is started, nor
    even imported; a progress bar counts the chips on stderr, and progress=False is silent."""
    scene, model = workspace / "scenes" / "synth_000.tif", workspace / "model.pt"
    code = (
        "import sys, pipeline\n"
        f"kw = dict(model={{'precision': 'fp32', 'backend': 'torch'}}, tiling={{'chip_size': 256, 'overlap': 32}})\n"
        f"rows = pipeline.predict_scene({str(scene)!r}, {str(model)!r}, **kw)\n"
        "print('ROWS', len(rows), file=sys.stderr)\n"
        "assert 'ray' not in sys.modules, 'predict_scene imported ray'\n"
        "print('QUIET', file=sys.stderr)\n"
        f"pipeline.predict_scene({str(scene)!r}, {str(model)!r}, progress=False, **kw)\n"
        "import ray\n"
        "assert not ray.is_initialized()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    loud, quiet = done.stderr.split("QUIET")
    assert "9/9" in loud and "chips" in loud  # 600 px at 256/32: 3 x 3 chips
    assert int(loud.split("ROWS")[1].split()[0]) > 0
    assert quiet.strip() == ""


def _noise_scene(path: Path, size: int) -> Path:
    rng = np.random.default_rng(5)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True, blockxsize=128,
                   blockysize=128, crs="EPSG:32633", transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4500000))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return path


def test_a_scene_larger_than_a_batch_is_read_in_chip_windows(workspace, tmp_path, monkeypatch):
    """Every read is one chip window, a read call takes one run of chips, and together they
    are the planned grid once: the scene is never read whole."""
    import pipeline.chips.tiling as tiling
    from pipeline.chips.tiling import chip_grid

    size, chip = 512, 64
    scene = _noise_scene(tmp_path / "big.tif", size)
    windows, calls = [], []
    read_chip, read_chips = tiling.read_chip, tiling.read_chips

    def spy_chip(dataset, window, *args, **kwargs):
        windows.append(window.as_tuple())
        return read_chip(dataset, window, *args, **kwargs)

    def spy_chips(path, ws, *args, **kwargs):
        calls.append(len(ws))
        return read_chips(path, ws, *args, **kwargs)

    monkeypatch.setattr(tiling, "read_chip", spy_chip)
    monkeypatch.setattr(tiling, "read_chips", spy_chips)
    import pipeline.run.predict as predict

    monkeypatch.setattr(predict, "read_chips", spy_chips)
    pipeline.predict_scene(str(scene), str(workspace / "model.pt"), progress=False,
                           **{"tiling.chip_size": chip, "tiling.overlap": 0, "model.batch_size": 8,
                              "model.precision": "fp32", "model.backend": "torch", "model.score_threshold": 0.5})
    grid = [w.as_tuple() for w in chip_grid(size, size, chip, 0, (128, 128))]
    assert sorted(windows) == sorted(grid)  # 64 windows, each read once
    assert all(w[2] == w[3] == chip for w in windows)
    assert len(calls) > 1 and max(calls) <= 8 and sum(calls) == len(grid)


@pytest.mark.slow  # predicts whole scenes (one in a child process)
def test_predict_image_tiles_an_array_as_predict_scene_tiles_its_file(workspace):
    """An (H, W, C) array of the scene's pixels gives predict_scene's pixel boxes."""
    scene, model = workspace / "scenes" / "synth_000.tif", str(workspace / "model.pt")
    settings = {"model.precision": "fp32", "model.backend": "torch", **SECTIONS}
    with rasterio.open(scene) as src:
        array = np.moveaxis(src.read(), 0, -1)  # (C, H, W) -> (H, W, C)
    boxes = pipeline.predict_image(array, model, progress=False, **settings)
    rows = pipeline.predict_scene(str(scene), model, progress=False, **settings, **{"output.crs": None})
    assert rows.crs is None  # pixel coordinates
    assert list(boxes.columns[:6]) == ["xmin", "ymin", "xmax", "ymax", "score", "label"]
    assert len(boxes) == len(rows) > 0
    a = boxes.sort_values(["xmin", "ymin", "score"]).reset_index(drop=True)
    b = rows.sort_values(["px_xmin", "px_ymin", "score"]).reset_index(drop=True)
    assert np.allclose(a[["xmin", "ymin", "xmax", "ymax"]].to_numpy(),
                       b[["px_xmin", "px_ymin", "px_xmax", "px_ymax"]].to_numpy(), atol=1e-3)
    assert a["label"].tolist() == b["label"].tolist()
    # A grey (H, W) uint16 array feeds the 3-channel model by replication: the boxes of its RGB copy.
    grey = array[:256, :256, 0].astype(np.uint16)
    one = pipeline.predict_image(grey, model, progress=False, **settings)
    three = pipeline.predict_image(np.repeat(grey[..., None], 3, axis=2), model, progress=False, **settings)
    assert np.allclose(one[["xmin", "ymin", "xmax", "ymax", "score"]], three[["xmin", "ymin", "xmax", "ymax", "score"]])


def test_bad_input_gets_a_named_error(workspace, tmp_path):
    scene, model = workspace / "scenes" / "synth_000.tif", str(workspace / "model.pt")
    with pytest.raises(InputError, match="nothing.tif: file not found"):
        pipeline.predict_scene(str(tmp_path / "nothing.tif"), model, progress=False)
    with pytest.raises(ConfigError, match="model.checkpoint: .*no-model.pt"):
        pipeline.predict_scene(str(scene), str(tmp_path / "no-model.pt"), progress=False)
    two_bands = tmp_path / "two_bands.tif"
    with rasterio.open(scene) as src, rasterio.open(two_bands, "w", **{**src.profile, "count": 2,
                                                                        "photometric": "minisblack"}) as dst:
        dst.write(src.read([1, 2]))
    with pytest.raises(InputError, match="two_bands.tif: 2 bands .* the model takes 3 channels"):
        pipeline.predict_scene(str(two_bands), model, progress=False)
    with pytest.raises(ConfigError, match="tiling.chip_sise"):
        pipeline.predict_scene(str(scene), model, progress=False, **{"tiling.chip_sise": 256})
    with pytest.raises(ConfigError, match="tiling.overlap"):
        pipeline.predict_scene(str(scene), model, progress=False, tiling={"chip_size": 64, "overlap": 64})
    with pytest.raises(InputError, match=r"\(3, 600, 600\).*\(H, W, C\)"):
        pipeline.predict_image(np.zeros((3, 600, 600), np.uint8), model, progress=False)
    with pytest.raises(InputError, match="complex64"):
        pipeline.predict_image(np.zeros((60, 60, 3), np.complex64), model, progress=False)
