"""The CLI's one set of rules: TABLE positional, `--job` a job file, `-o` for `--out`, RAY_ADDRESS,
exit codes 0/1/2/3, versions, the job file's JSON Schema and the reference generated from it."""
from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config.spec import JobSpec
from pipeline.table.commit import RunInfo, commit_scene
from pipeline.table.schema import build_detection_table

REPO = Path(__file__).resolve().parents[1]


def commands() -> dict[str, click.Command]:
    return {name: main.get_command(click.Context(main), name) for name in main.list_commands(click.Context(main))}


# ------------------------------------------------------------------ one rule per flag


def test_table_is_positional_in_every_command_that_reads_a_table():
    takes_table = {name: cmd for name, cmd in commands().items() if any(p.name == "table" for p in cmd.params)}
    assert {"query", "vacuum", "compact", "render", "eval"} <= set(takes_table)
    for name, cmd in takes_table.items():
        table = next(p for p in cmd.params if p.name == "table")
        assert isinstance(table, click.Argument), name


def test_out_has_the_short_form_o_wherever_it_exists():
    with_out = {name: p for name, cmd in commands().items() for p in cmd.params if "--out" in p.opts}
    assert {"render", "eval", "eval-checkpoint", "import", "export"} <= set(with_out)
    assert {name for name, p in with_out.items() if "-o" not in p.opts} == set()


def test_scenes_is_a_count_and_bands_a_band_list_in_every_command():
    """`--scenes N` counts (synth); labelled images to read are `--images`. `--bands 1,2,3`
    lists band numbers, as inputs.bands does; synth's count of bands is `--band-count`."""
    options = [(name, p) for name, cmd in commands().items() for p in cmd.params if isinstance(p, click.Option)]
    scenes = [(name, p) for name, p in options if "--scenes" in p.opts]
    bands = [(name, p) for name, p in options if "--bands" in p.opts]
    assert scenes and all(isinstance(p.type, click.types.IntParamType) and not p.multiple for _, p in scenes)
    assert bands and all(p.type is click.STRING and "e.g. 1,2,3" in (p.help or "") for _, p in bands)


def test_job_means_a_job_file_in_every_command():
    with_job = {name: p for name, cmd in commands().items() for p in cmd.params if "--job" in p.opts}
    assert {"eval", "eval-checkpoint", "render"} <= set(with_job)
    for name, p in with_job.items():
        assert isinstance(p.type, click.Path) and "file" in (p.help or ""), name
    for name in ("eval", "render"):  # a job's name has a flag of its own
        assert any("--job-name" in p.opts for p in commands()[name].params), name


# ------------------------------------------------------------------ eval: TABLE, --table, --job FILE, --job-name


def commit(table: Path, job: str, scene_id: str, boxes, labels, classes) -> None:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    corners = np.stack([boxes[:, [0, 3]], boxes[:, [2, 3]], boxes[:, [2, 1]], boxes[:, [0, 1]]], axis=1)
    rows = build_detection_table(corners, boxes, np.full(len(boxes), 0.9), np.asarray(labels, int), classes,
                                 run_id=f"run-{job}", job_name=job, scene_id=scene_id,
                                 scene_path=f"/data/{scene_id}.tif", model_id="m", job_hash="h")
    commit_scene(table, RunInfo(f"run-{job}", job, "h", "m", None), scene_id, {"k": scene_id}, rows)


@pytest.fixture()
def evaluated(tmp_path):
    """A table where job `good` found s1's box exactly and job `bad` found it 40 px off; truth in COCO;
    a job file naming `good` whose output.table is the table."""
    classes = ["vehicle"]
    truth = {"images": [{"id": 1, "file_name": "s1.tif", "width": 200, "height": 200}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200,
                              "iscrowd": 0}],
             "categories": [{"id": 1, "name": "vehicle"}]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    table = tmp_path / "table"
    commit(table, "good", "s1", [[10, 10, 30, 20]], [0], classes)
    commit(table, "bad", "s1", [[50, 50, 70, 60]], [0], classes)
    job = {"name": "good", "inputs": {"paths": ["scenes/*.tif"]}, "model": {"checkpoint": "m.pt"},
           "output": {"table": "table"}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(job))
    return tmp_path, table


def ap50(out_dir: Path) -> float:
    return json.loads((out_dir / "eval.json").read_text())["AP50"]


def test_eval_takes_the_table_as_argument_or_as_table_option(evaluated):
    root, table = evaluated
    runner = CliRunner()
    a = runner.invoke(main, ["eval", str(table), "--truth", str(root / "truth.json"), "--job-name", "good",
                             "-o", str(root / "a")])
    assert a.exit_code == 0, a.output
    b = runner.invoke(main, ["eval", "--table", str(table), "--truth", str(root / "truth.json"),
                             "--job-name", "good", "--out", str(root / "b")])
    assert b.exit_code == 0, b.output
    assert ap50(root / "a") == ap50(root / "b") == pytest.approx(1.0)
    same = runner.invoke(main, ["eval", str(table), "--table", str(table), "--truth", str(root / "truth.json"),
                                "--job-name", "good", "-o", str(root / "c")])
    assert same.exit_code == 0, same.output
    differ = runner.invoke(main, ["eval", str(table), "--table", str(root / "other"), "--truth",
                                  str(root / "truth.json")])
    assert differ.exit_code == 2 and "TABLE" in differ.output and "--table" in differ.output, differ.output
    assert str(root / "other") in differ.output
    neither = runner.invoke(main, ["eval", "--truth", str(root / "truth.json")])
    assert neither.exit_code == 2 and "TABLE" in neither.output, neither.output


def test_eval_job_is_a_job_file_and_job_name_a_name(evaluated, monkeypatch):
    root, table = evaluated
    monkeypatch.chdir(root)
    runner = CliRunner()
    # --job FILE: that job's scenes, and the table its output.table names when TABLE is not given
    by_file = runner.invoke(main, ["eval", "--job", str(root / "good.yaml"), "--truth", "truth.json",
                                   "-o", "by_file"])
    assert by_file.exit_code == 0, by_file.output
    assert ap50(root / "by_file") == pytest.approx(1.0)
    bad = runner.invoke(main, ["eval", str(table), "--job-name", "bad", "--truth", "truth.json", "-o", "by_name"])
    assert bad.exit_code == 0, bad.output
    assert ap50(root / "by_name") == pytest.approx(0.0)
    # --job NAME, as before: still works for now, with a note that says what to write instead
    old = runner.invoke(main, ["eval", str(table), "--job", "bad", "--truth", "truth.json", "-o", "old"])
    assert old.exit_code == 0, old.output
    assert ap50(root / "old") == pytest.approx(0.0)
    assert "--job-name bad" in old.output and "deprecated" in old.output
    missing = runner.invoke(main, ["eval", str(table), "--job", "jobs/none.yaml", "--truth", "truth.json"])
    assert missing.exit_code == 2 and "jobs/none.yaml" in missing.output, missing.output
    clash = runner.invoke(main, ["eval", "--job", "good.yaml", "--job-name", "bad", "--truth", "truth.json"])
    assert clash.exit_code == 2 and "--job-name" in clash.output, clash.output


# ------------------------------------------------------------------ submit: RAY_ADDRESS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_takes_the_address_from_ray_address_as_rays_cli_does(tmp_path):
    job = {"name": "j", "inputs": {"paths": ["scenes/*.tif"]}, "model": {"checkpoint": "m.pt"},
           "output": {"table": "t"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    port = free_port()  # nothing listens there: the command must try exactly this address
    runner = CliRunner()
    env = {"RAY_ADDRESS": f"http://127.0.0.1:{port}", "RAY_API_SERVER_ADDRESS": None, "RAY_AUTH_MODE": "disabled"}
    result = runner.invoke(main, ["submit", str(tmp_path / "job.yaml")], env=env)
    assert result.exit_code == 2 and f"http://127.0.0.1:{port} ($RAY_ADDRESS)" in result.output, result.output
    # Ray's job CLI reads RAY_API_SERVER_ADDRESS first, and --address beats both
    other = free_port()
    env_api = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{other}"}
    result = runner.invoke(main, ["submit", str(tmp_path / "job.yaml")], env=env_api)
    assert result.exit_code == 2 and f"http://127.0.0.1:{other}" in result.output, result.output
    given = runner.invoke(main, ["submit", str(tmp_path / "job.yaml"), "--address", f"127.0.0.1:{port}"],
                          env=env_api)
    assert given.exit_code == 2 and f"http://127.0.0.1:{port}: cannot reach" in given.output, given.output
    assert str(other) not in given.output
    none = runner.invoke(main, ["submit", str(tmp_path / "job.yaml")],
                         env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None})
    assert none.exit_code == 2 and "RAY_ADDRESS" in none.output, none.output


# ------------------------------------------------------------------ exit codes


def test_help_documents_the_exit_codes():
    text = CliRunner().invoke(main, ["--help"]).output
    for line in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {line}" in text or f"\n    {line}" in text, text
    assert "partial" in text and "internal error" in text


def test_missing_input_exits_2(tmp_path):
    runner = CliRunner()
    query = runner.invoke(main, ["query", str(tmp_path / "none"), "SELECT 1"])
    assert query.exit_code == 2 and str(tmp_path / "none") in query.output, query.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    export = runner.invoke(main, ["export", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert export.exit_code == 2 and "bad.pt" in export.output, export.output


def test_an_unexpected_exception_exits_3_with_the_type_and_where_the_traceback_went(tmp_path, monkeypatch):
    import duckdb

    def broken(*args, **kwargs):
        raise ZeroDivisionError("the library broke")

    monkeypatch.setenv("RETINANET_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(duckdb, "connect", broken)
    table = tmp_path / "table"
    commit(table, "good", "s1", [[10, 10, 30, 20]], [0], ["vehicle"])
    result = CliRunner().invoke(main, ["query", str(table), "SELECT 1"])
    assert result.exit_code == 3, result.output
    assert "internal error" in result.output and "ZeroDivisionError: the library broke" in result.output
    assert "Traceback" not in result.output  # a short message; the traceback is in the file
    logs = list((tmp_path / "cache" / "errors").glob("*.txt"))
    assert len(logs) == 1 and str(logs[0]) in result.output
    text = logs[0].read_text()
    assert "Traceback" in text and "def broken" not in text and "ZeroDivisionError: the library broke" in text
    assert "pipeline query" in text  # the command line that failed
    printed = CliRunner().invoke(main, ["--traceback", "query", str(table), "SELECT 1"])
    assert printed.exit_code == 3 and "Traceback (most recent call last)" in printed.output, printed.output


# ------------------------------------------------------------------ --version, schema


def test_version_names_the_libraries_that_matter():
    import rasterio

    text = CliRunner().invoke(main, ["--version"]).output
    assert f"pipeline {importlib.metadata.version('retinanet-pipeline')}" in text
    assert f"torch {importlib.metadata.version('torch')}" in text
    assert f"Ray {importlib.metadata.version('ray')}" in text
    assert f"GDAL {rasterio.__gdal_version__}" in text
    assert f"OpenVINO {importlib.metadata.version('openvino')}" in text


def test_help_imports_no_heavy_library_and_version_does_not_load_torch_or_ray():
    code = ("import json, sys; from pipeline.cli import main\n"
            "try:\n    main([sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in ('torch', 'ray', 'rasterio', 'openvino') if m in sys.modules)))")
    loaded = {}
    for flag in ("--help", "--version"):
        run = subprocess.run([sys.executable, "-c", code, flag], cwd=REPO, capture_output=True, text=True, check=True)
        loaded[flag] = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["--help"] == []
    assert loaded["--version"] == ["rasterio"]  # GDAL's version is rasterio's to tell


def test_schema_prints_the_job_models_json_schema():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == JobSpec.model_json_schema()


def test_the_committed_job_reference_is_generated_from_the_schema():
    result = CliRunner().invoke(main, ["schema", "--markdown"])
    assert result.exit_code == 0, result.output
    committed = (REPO / "docs" / "job-reference.md").read_text(encoding="utf-8")
    assert committed == result.output, (
        "docs/job-reference.md is stale: regenerate it with `make job-reference` "
        "(.venv/bin/pipeline schema --markdown > docs/job-reference.md)")


def test_the_job_reference_names_every_field_at_every_depth():
    text = CliRunner().invoke(main, ["schema", "--markdown"]).output
    assert "## `train.augment`" in text and "| `hflip` |" in text
    assert "## `inputs.stac`" in text and "| `since_last_success` |" in text
    for key in JobSpec.model_fields:
        assert f"| `{key}` |" in text


def test_named_errors_map_to_their_exit_codes():
    from pipeline.cli import exit_code_of
    from pipeline.errors import ClusterError, CommitError, ConfigError, InputError, RasterReadError, TrainingError
    from pipeline.run.submit import SubmitError

    cannot_start = (ConfigError, InputError, RasterReadError, ClusterError, CommitError, SubmitError)
    assert [exit_code_of(kind("x")) for kind in cannot_start] == [2] * len(cannot_start)
    assert exit_code_of(TrainingError("worker 0: loss is nan at step 3")) == 1  # it ran, and failed on its way


def test_render_selects_a_job_by_file_or_by_name(tmp_path):
    from pipeline.tools.synth import synthesize

    (scene,) = synthesize(tmp_path / "scenes", 1, 256, seed=1)
    table = tmp_path / "table"
    for job, boxes in (("good", [[10, 10, 30, 20]]), ("bad", [[50, 50, 70, 60], [80, 80, 90, 90]])):
        commit(table, job, scene.stem, boxes, [0] * len(boxes), ["vehicle"])
    job = {"name": "bad", "inputs": {"paths": ["scenes/*.tif"]}, "model": {"checkpoint": "m.pt"},
           "output": {"table": "table"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(job))
    runner = CliRunner()
    by_file = runner.invoke(main, ["render", str(table), str(scene), "-o", str(tmp_path / "a.png"),
                                   "--job", str(tmp_path / "bad.yaml")])
    assert by_file.exit_code == 0 and ": 2 detections" in by_file.output, by_file.output
    by_name = runner.invoke(main, ["render", str(table), str(scene), "-o", str(tmp_path / "b.png"),
                                   "--job-name", "good"])
    assert by_name.exit_code == 0 and ": 1 detections" in by_name.output, by_name.output
