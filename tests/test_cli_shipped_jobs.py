"""Every job in jobs/ validates on the data `make demo` makes (the Makefile's own synth commands,
at small sizes, in a copy of the repository's layout), and the inspection job runs on plain,
non-georeferenced PNGs with output.crs: null, writing pixel geometry."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from workspaces import tiny_checkpoint

from pipeline.cli import main
from pipeline.config.spec import load_job

REPO = Path(__file__).resolve().parents[1]
SMALL_SIZE = 600     # px: 2 x 2 chips of the inspection job (512, overlap 96), seconds to write
SMALL_SCENES = 2

pytestmark = pytest.mark.timeout(300)


def make_rules(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines) of a plain Makefile (no pattern rules)."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            rules[current][1].append(line.strip())
            continue
        rule = re.match(r"^([^\s:=#][^:=]*):(?!=)(.*)$", line)
        current = None
        if rule:
            prereqs = rule.group(2).replace("|", " ").split()
            for target in rule.group(1).split():
                rules[target] = (prereqs, [])
                current = target
    return rules


def demo_commands(target: str = "demo") -> list[list[str]]:
    """The `pipeline ...` commands (arguments after `pipeline`) of every recipe `target` needs
    first, depth first: what `make demo` runs before its own lines."""
    rules = make_rules((REPO / "Makefile").read_text())
    seen: set[str] = set()
    commands: list[list[str]] = []

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        prereqs, recipe = rules[name]
        for p in prereqs:
            visit(p)
        if name != target:
            commands.extend(shlex.split(line)[1:] for line in recipe if shlex.split(line)[0].endswith("/pipeline"))

    visit(target)
    return commands


def small(args: list[str]) -> list[str]:
    """The same command at test size: --size SMALL_SIZE, at most SMALL_SCENES scenes."""
    out = list(args)
    for flag, fit in (("--size", lambda v: SMALL_SIZE), ("--scenes", lambda v: min(int(v), SMALL_SCENES))):
        if flag in out:
            i = out.index(flag) + 1
            out[i] = str(fit(out[i]))
    return out


@pytest.fixture(scope="module")
def demo_layout(module_tmp):
    """A copy of jobs/ beside the data and model `make demo` makes before its own lines."""
    root = module_tmp("repo")
    shutil.copytree(REPO / "jobs", root / "jobs")
    commands = demo_commands()
    synths = [c for c in commands if c[0] == "synth"]
    trains = [c for c in commands if c[0] == "train"]
    assert synths and trains == [["train", "jobs/train_synth.yaml"]], commands
    runner = CliRunner()
    for args in synths:  # `synth OUT_DIR ...`, OUT_DIR relative to the repository's root
        result = runner.invoke(main, ["synth", str(root / args[1]), *small(args[2:])], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    # The demo trains train_synth.yaml, which publishes its best checkpoint to its model.checkpoint:
    # here a tiny untrained model stands in for it, at that path.
    trained = load_job(root / trains[0][1])
    assert trained.train is not None and trained.train.publish
    tiny_checkpoint(Path(trained.model.checkpoint))
    return root


def test_the_demo_makes_the_inspection_data():
    kinds = [c[c.index("--kind") + 1] for c in demo_commands() if c[0] == "synth" and "--kind" in c]
    assert "inspection" in kinds


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_shipped_job_validates_after_make_demo(demo_layout, job):
    result = CliRunner().invoke(main, ["validate", str(demo_layout / "jobs" / job)])
    assert result.exit_code == 0, result.output
    assert ": ok (" in result.output and " 0 scenes" not in result.output


def test_the_inspection_job_runs_on_plain_pngs_with_pixel_geometry(demo_layout, ray_session):
    job = demo_layout / "jobs" / "inspection.yaml"
    spec = load_job(job)
    assert spec.output.crs is None
    images = sorted(Path(spec.inputs.paths[0]).parent.glob("*.png"))
    assert len(images) == SMALL_SCENES
    # CPU actors on this machine, and a threshold under the untrained model's scores (its prior, 0.3);
    # everything else as shipped
    result = CliRunner().invoke(main, ["run", str(job), "--set", "compute.gpus_per_actor=0",
                                       "--set", "model.score_threshold=0.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert summary["scenes_ok"] == SMALL_SCENES and summary["scenes_failed"] == [], summary
    assert summary["detections"] > 0
    table = Path(spec.output.table)
    files = sorted(table.glob("date=*/*.parquet"))
    listed = [str(f) for f in files]
    rows = duckdb.sql(f"SELECT scene_id, px_xmin, px_ymin, px_xmax, px_ymax FROM read_parquet({listed}) "
                      "ORDER BY ALL").fetchall()
    assert len(rows) == summary["detections"]
    assert {r[0] for r in rows} == {p.stem for p in images}
    geo = json.loads(pq.read_schema(files[0]).metadata[b"geo"])
    assert geo["columns"]["geometry"].get("crs") is None  # undefined CRS: pixel coordinates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = geopandas.read_parquet(files[0])
    assert frame.crs is None
    bounds = frame.geometry.bounds.to_numpy()
    # No map: each polygon is its pixel box, x right and y down, inside the image.
    np.testing.assert_allclose(bounds, frame[["px_xmin", "px_ymin", "px_xmax", "px_ymax"]].to_numpy(), atol=1e-6)
    assert bounds.min() >= 0 and bounds.max() <= SMALL_SIZE
