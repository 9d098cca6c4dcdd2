"""Job spec: loading, malformed files named by field, overrides, paths, checks, job hash."""
from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config.spec import (
    JobSpec,
    apply_overrides,
    check_runnable,
    job_hash,
    load_job,
    parse_job,
)
from pipeline.errors import ConfigError
from pipeline.io.inputs import expand_patterns

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: test-job
inputs:   {paths: ["data/*.tif"], bands: [1, 2, 3]}
tiling:   {chip_size: 512, overlap: 64, min_valid_fraction: 0.05}
model:    {checkpoint: models/m.pt, score_threshold: 0.3, batch_size: 8}
compute:  {address: null, actors: 2, gpus_per_actor: 1, cpus_per_actor: 1}
merge:    {method: nms, iou_threshold: 0.5}
output:   {table: out/detections, crs: "EPSG:4326"}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def replace_line(prefix: str, new: str) -> str:
    """GOOD with the line starting with ``prefix`` replaced (or removed when new is '')."""
    lines = [new if line.startswith(prefix) else line for line in GOOD.splitlines()]
    return "\n".join(x for x in lines if x) + "\n"


def test_repo_jobs_load_and_resolve_against_their_directory():
    sat = load_job(REPO / "jobs" / "satellite.yaml")
    assert sat.inputs.paths == [str(REPO / "data" / "scenes" / "*.tif")]
    assert sat.model.checkpoint == str(REPO / "models" / "retinanet.pt")
    assert sat.output.table == str(REPO / "out" / "detections")
    assert sat.output.crs == "EPSG:4326"
    assert sat.merge.seam_margin == sat.tiling.overlap == 64  # null -> the overlap
    insp = load_job(REPO / "jobs" / "inspection.yaml")
    assert insp.output.crs is None  # pixel outputs
    assert insp.inputs.paths == [str(REPO / "data" / "inspection" / "*.png")]
    assert insp.merge.method == "wbf"


def test_defaults_fill_optional_sections(tmp_path):
    spec = load_job(write(tmp_path, "name: j\ninputs: {paths: [a.tif]}\n"
                                    "model: {checkpoint: m.pt}\noutput: {table: t}\n"))
    assert (spec.tiling.chip_size, spec.tiling.overlap, spec.tiling.min_valid_fraction) == (512, 64, 0.05)
    # score, NMS IoU and detections per chip: null means the checkpoint's own settings
    assert (spec.model.score_threshold, spec.model.nms_threshold, spec.model.detections_per_chip) == (None, None, None)
    assert (spec.model.batch_size, spec.model.precision, spec.model.device) == (None, "auto", "auto")
    assert (spec.compute.address, spec.compute.actors, spec.compute.gpus_per_actor, spec.compute.max_retries,
            spec.compute.prefetch_batches) == (None, 2, 1.0, 2, 8)
    assert (spec.merge.method, spec.merge.iou_threshold, spec.merge.seam_margin) == ("nms", 0.5, 64)
    assert spec.output.crs == "EPSG:4326" and spec.inputs.bands is None


# Each malformed job, and the text its error must contain (the YAML path of the field).
MALFORMED = [
    ("unknown-top", GOOD + "nmae: x\n", "nmae: unknown key"),
    ("unknown-key", replace_line("tiling:", "tiling: {chipsize: 512}"), "tiling.chipsize: unknown key"),
    ("wrong-type", replace_line("tiling:", "tiling: {chip_size: big}"),
     "tiling.chip_size: input should be a valid integer, got 'big'"),
    (
        "overlap-ge-chip",
        replace_line("tiling:", "tiling: {chip_size: 512, overlap: 512}"),
        "job.yaml: tiling.overlap: must be smaller than tiling.chip_size (512), got 512",
    ),
    ("score-range", replace_line("model:", "model: {checkpoint: m.pt, score_threshold: 1.5}"), "model.score_threshold"),
    ("iou-range", replace_line("merge:", "merge: {iou_threshold: -0.1}"), "merge.iou_threshold"),
    ("actors-zero", replace_line("compute:", "compute: {actors: 0}"), "compute.actors"),
    ("actors-bool", replace_line("compute:", "compute: {actors: yes}"), "compute.actors"),
    ("method", replace_line("merge:", "merge: {method: soft-nms}"), "merge.method"),
    ("missing-section", replace_line("model:", ""), "model: required key is missing"),
    ("missing-key", replace_line("output:", "output: {crs: null}"), "output.table: required key is missing"),
    ("bands-zero", replace_line("inputs:", "inputs: {paths: [a.tif], bands: [0, 1]}"), "inputs.bands"),
    ("paths-empty", replace_line("inputs:", "inputs: {paths: []}"), "inputs.paths"),
    ("paths-not-list", replace_line("inputs:", "inputs: {paths: a.tif}"), "inputs.paths"),
    ("paths-item-type", replace_line("inputs:", "inputs: {paths: [a.tif, 3]}"), "inputs.paths[1]"),
    ("bad-crs", replace_line("output:", "output: {table: t, crs: 'EPSG:999999'}"), "output.crs"),
    ("remote-table", replace_line("output:", "output: {table: 'https://host/t'}"), "output.table"),
    ("gpu-fraction", replace_line("compute:", "compute: {gpus_per_actor: 1.5}"), "compute.gpus_per_actor"),
    ("address", replace_line("compute:", "compute: {address: somewhere}"), "compute.address"),
    ("precision", replace_line("model:", "model: {checkpoint: m.pt, precision: fp8}"), "model.precision"),
    ("name", replace_line("name:", "name: ../evil"), "name:"),
    ("section-not-mapping", replace_line("tiling:", "tiling: 512"), "tiling:"),
    ("yaml-syntax", GOOD + "tiling: {chip_size: [\n", "not valid YAML (line"),
    ("top-level-list", "- a\n- b\n", "must be a YAML mapping"),
    ("empty-file", "", "must be a YAML mapping"),
]


@pytest.mark.parametrize("case, text, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_job_names_the_field(tmp_path, case, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    message = str(err.value)
    assert expected in message
    assert message.startswith(str(path) + ": ")  # every line names the file


def test_all_problems_reported_at_once(tmp_path):
    text = replace_line("tiling:", "tiling: {chip_size: 256, overlap: 300}")
    text = text.replace("score_threshold: 0.3", "score_threshold: 2")
    lines = str(pytest.raises(ConfigError, load_job, write(tmp_path, text)).value).splitlines()
    assert len(lines) == 2
    assert any("tiling.overlap: must be smaller than tiling.chip_size (256), got 300" in x for x in lines)
    assert any("model.score_threshold" in x for x in lines)


def test_missing_job_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- overrides


def test_overrides_parse_values_as_yaml(tmp_path):
    spec = load_job(
        write(tmp_path, GOOD),
        ["compute.actors=3", "output.crs=null", "inputs.bands=[1, 1, 1]", "merge.method=wbf", "name=other",
         "compute.gpus_per_actor=0.5"],
    )
    assert spec.compute.actors == 3 and isinstance(spec.compute.actors, int)
    assert spec.output.crs is None
    assert spec.inputs.bands == [1, 1, 1]
    assert spec.merge.method == "wbf" and spec.name == "other"
    assert spec.compute.gpus_per_actor == 0.5


def test_override_fills_a_section_absent_from_the_file(tmp_path):
    spec = load_job(write(tmp_path, replace_line("compute:", "")), ["compute.address=auto"])
    assert spec.compute.address == "auto" and spec.compute.actors == 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("compte.actors=3", "unknown section 'compte'"),
        ("compute.actor=3", "unknown key compute.actor"),
        ("compute=3", "expected compute.KEY=VALUE"),
        ("compute.actors", "expected section.key=value"),
        ("name.x=1", "'name' has no sub-keys"),
    ],
)
def test_bad_override_names_it(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")) as err:
        load_job(write(tmp_path, GOOD), [override])
    assert f"--set {override}" in str(err.value)


def test_override_value_is_validated_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"tiling\.overlap: must be smaller"):
        load_job(write(tmp_path, GOOD), ["tiling.overlap=600"])


def test_relative_paths_file_vs_command_line(tmp_path, monkeypatch):
    job = write(tmp_path, GOOD.replace('"data/*.tif"', '"../data/*.tif", "s3://bucket/x/*.tif", "/abs/y.tif"'),
                "jobs/job.yaml")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = load_job(job, ["model.checkpoint=ckpt/m.pt"])
    # In the file: against the file's directory; remote and absolute untouched.
    assert spec.inputs.paths == [str(tmp_path / "data" / "*.tif"), "s3://bucket/x/*.tif", "/abs/y.tif"]
    assert spec.output.table == str(tmp_path / "jobs" / "out" / "detections")
    # On the command line: against the current directory.
    assert spec.model.checkpoint == str(work / "ckpt" / "m.pt")


def test_apply_overrides_does_not_mutate_input():
    data = {"compute": {"actors": 1}}
    out = apply_overrides(data, ["compute.actors=4"])
    assert data == {"compute": {"actors": 1}} and out["compute"]["actors"] == 4


# ---------------------------------------------------------------- check_runnable


def runnable_tree(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s1.tif").write_bytes(b"x")
    (tmp_path / "data" / "s2.tif").write_bytes(b"x")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.pt").write_bytes(b"x")
    return write(tmp_path, GOOD)


def test_check_runnable_ok_and_writes_nothing(tmp_path):
    spec = load_job(runnable_tree(tmp_path))
    before = sorted(p for p in tmp_path.rglob("*"))
    check_runnable(spec)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # output dir not created
    assert expand_patterns(spec.inputs.paths).locations == [str(tmp_path / "data" / "s1.tif"),
                                                            str(tmp_path / "data" / "s2.tif")]


def test_check_runnable_names_every_problem(tmp_path):
    job = runnable_tree(tmp_path)
    (tmp_path / "data" / "s1.tif").unlink()
    (tmp_path / "data" / "s2.tif").unlink()
    (tmp_path / "models" / "m.pt").unlink()
    (tmp_path / "out").write_text("a file where the table's parent dir should be")
    spec = load_job(job)
    with pytest.raises(ConfigError) as err:
        check_runnable(spec)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{job}: model.checkpoint: file not found")
    assert lines[1].startswith(f"{job}: output.table: cannot be created")
    assert expand_patterns(spec.inputs.paths).unmatched == [str(tmp_path / "data" / "*.tif")]  # preflight's job


def test_int8_without_nncf_is_refused_by_name(tmp_path, monkeypatch):
    """NNCF is the `int8` extra: a job asking for int8 without it is told what to install."""
    job = runnable_tree(tmp_path)
    (tmp_path / "truth.json").write_text("{}")
    int8 = ["model.precision=int8", f"model.int8_labels=[{tmp_path / 'truth.json'}]"]
    check_runnable(load_job(job, int8))  # installed here (the test extra)
    monkeypatch.setitem(sys.modules, "nncf", None)  # Python's own "not importable" marker
    with pytest.raises(ConfigError, match=r"model\.precision: int8 quantises with NNCF, which is not installed: "
                                          r"pip install 'retinanet-pipeline\[int8\]'"):
        check_runnable(load_job(job, int8))
    check_runnable(load_job(job))  # the default precision does not need it


def test_check_runnable_table_path_is_a_file(tmp_path):
    job = runnable_tree(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "detections").write_text("not a dir")
    with pytest.raises(ConfigError, match=r"output\.table: exists and is not a directory"):
        check_runnable(load_job(job))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere, os.access says yes")
def test_check_runnable_read_only_parent(tmp_path):
    job = runnable_tree(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"output\.table: cannot be created: .* is not writable"):
            check_runnable(load_job(job, [f"output.table={ro / 'a' / 'b'}"]))
    finally:
        ro.chmod(0o755)


def test_http_inputs_are_taken_as_given(tmp_path):
    job = runnable_tree(tmp_path)
    spec = load_job(job, ["inputs.paths=['https://example.com/a.tif']"])
    check_runnable(spec)  # no network access, no error
    assert expand_patterns(spec.inputs.paths).locations == ["https://example.com/a.tif"]


# ---------------------------------------------------------------- job hash


def spec_from(text: str, tmp_path: Path, *overrides: str) -> JobSpec:
    return load_job(write(tmp_path, text), list(overrides))


def test_job_hash_golden_value(tmp_path):
    # Pinned so an accidental change to what is hashed (which would make every
    # committed scene look stale) fails here; bump JOB_HASH_VERSION on purpose instead.
    # The hashed document, written out: sorted keys, no spaces, seam_margin resolved.
    blob = (
        '{"bands":[1,2,3],"crs":"EPSG:4326",'
        '"merge":{"iou_threshold":0.5,"method":"nms","seam_margin":64},"score_threshold":0.3,'
        '"tiling":{"chip_size":512,"min_valid_fraction":0.05,"overlap":64},"version":1}'
    )
    assert job_hash(spec_from(GOOD, tmp_path)) == hashlib.sha256(blob.encode()).hexdigest()
    assert job_hash(spec_from(GOOD, tmp_path)) == "dd3eb71f64803632745f61ccaee03f7766d1cf2615ebe12907ebfdcdbeca9562"


def test_job_hash_ignores_what_does_not_change_results(tmp_path):
    base = job_hash(spec_from(GOOD, tmp_path))
    reordered = "\n".join(reversed(GOOD.splitlines())) + "\n"
    assert job_hash(spec_from(reordered, tmp_path)) == base
    for o in ["compute.actors=8", "compute.address=auto", "model.batch_size=32", "model.device=cpu",
              "model.precision=bf16", "name=renamed", "model.checkpoint=other.pt", "inputs.paths=[x.tif]",
              "output.table=elsewhere", "output.crs=epsg:4326", "merge.seam_margin=64"]:
        assert job_hash(spec_from(GOOD, tmp_path, o)) == base, o


def test_job_hash_changes_with_what_changes_results(tmp_path):
    base = job_hash(spec_from(GOOD, tmp_path))
    changed = {
        job_hash(spec_from(GOOD, tmp_path, o))
        for o in ["tiling.chip_size=256", "tiling.overlap=32", "tiling.min_valid_fraction=0.1",
                  "model.score_threshold=0.5", "merge.method=wbf", "merge.iou_threshold=0.6",
                  "merge.seam_margin=80", "inputs.bands=[3, 2, 1]", "output.crs=EPSG:3857", "output.crs=pixel"]
    }
    assert base not in changed and len(changed) == 10


def test_pixel_crs_is_null(tmp_path):
    assert spec_from(GOOD, tmp_path, "output.crs=pixel").output.crs is None


def test_parse_job_without_file():
    spec = parse_job(
        {"name": "n", "inputs": {"paths": ["a"]}, "model": {"checkpoint": "m"}, "output": {"table": "t"}},
        source="inline"
    )
    assert spec.source == "inline" and spec.inputs.paths == ["a"]  # no base_dir: paths as given
    with pytest.raises(ConfigError, match=r"^inline: output: required key is missing"):
        parse_job({"name": "n", "inputs": {"paths": ["a"]}, "model": {"checkpoint": "m"}}, source="inline")


# ---------------------------------------------------------------- overrides at any depth


TRAIN = GOOD + """\
train:
  scenes: ["data/train/*.tif"]
  labels: [data/train/truth.json]
  classes: [vehicle]
  output_dir: models/run
  augment: {hflip: true, vflip: true}
"""


def test_overrides_reach_any_depth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_job(write(tmp_path, TRAIN), ["train.augment.hflip=false", "train.augment.scale_range=[0.5, 2]",
                                             "train.val_split.by=region", "train.val_split.fraction=0.3"])
    assert spec.train is not None
    assert spec.train.augment.hflip is False and spec.train.augment.vflip is True  # the file's other keys stay
    assert spec.train.augment.scale_range == [0.5, 2.0]
    assert (spec.train.val_split.by, spec.train.val_split.fraction) == ("region", 0.3)
    # a nested section the file does not have, and a nested path resolved against the current directory
    stac = load_job(write(tmp_path, GOOD), ["inputs.paths=null", "inputs.stac.source=cat/catalog.json",
                                            "inputs.stac.asset=image"])
    assert stac.inputs.stac is not None and stac.inputs.paths is None
    assert stac.inputs.stac.source == str(tmp_path / "cat" / "catalog.json") and stac.inputs.stac.asset == "image"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.augment.hfilp=false", "unknown key train.augment.hfilp (known: brightness,"),
        ("train.agument.hflip=false", "unknown key train.agument (known: augment,"),
        ("train.augment.hflip.x=1", "'train.augment.hflip' has no sub-keys"),
        ("inputs.stac.sauce=x", "unknown key inputs.stac.sauce"),
        ("train.augment=3", "expected train.augment.KEY=VALUE"),
    ],
)
def test_bad_deep_override_names_the_full_path(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, TRAIN), [override])
    assert expected in str(err.value) and f"--set {override}" in str(err.value)


def test_deep_override_into_a_non_mapping_is_named(tmp_path):
    text = TRAIN.replace("augment: {hflip: true, vflip: true}", "augment: 7")
    with pytest.raises(ConfigError, match=r"--set train\.augment\.hflip=false: train\.augment in the job file "
                                          r"is not a mapping"):
        load_job(write(tmp_path, text), ["train.augment.hflip=false"])


def test_deep_override_value_is_validated_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.augment\.contrast"):
        load_job(write(tmp_path, TRAIN), ["train.augment.contrast=2"])


def test_unknown_nested_key_in_the_file_lists_its_sections_keys(tmp_path):
    text = TRAIN.replace("augment: {hflip: true, vflip: true}", "augment: {hfilp: true}")
    with pytest.raises(ConfigError, match=r"train\.augment\.hfilp: unknown key \(known: brightness, "):
        load_job(write(tmp_path, text))
