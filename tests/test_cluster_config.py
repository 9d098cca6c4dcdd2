"""ray_cluster.yaml: valid for the cluster launcher of the installed Ray, and sensible."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_valid_against_the_schema_that_ships_with_ray(config):
    jsonschema.validate(config, ray_schema())


def test_the_schema_check_can_fail(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_g5"]["max_wrokers"] = 2  # typo: additionalProperties is false
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        jsonschema.validate(broken, ray_schema())


def test_ray_prepares_and_validates_it_like_ray_up(config):
    # What `ray up` does before it contacts AWS: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_cpu_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU on the head
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_families = ("g5.", "g6.", "p4d.", "p5.")
    assert workers and all(t["node_config"]["InstanceType"].startswith(gpu_families) for t in workers.values())
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert any(t["min_workers"] < t["max_workers"] for t in workers.values())  # room to autoscale
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_pins_the_installed_ray_and_installs_this_package(config):
    import ray

    images = [config["docker"]["image"], config["docker"]["head_image"]]
    assert all(re.search(rf":{re.escape(ray.__version__)}-py3\d+", image) for image in images), images
    setup = " ".join(config["setup_commands"])
    assert f"ray[default,data,train]=={ray.__version__}" in setup
    # The package comes from the wheel that file_mounts ships to every node.
    mounts = config["file_mounts"]
    wheel_dir = next(remote for remote, local in mounts.items() if local.rstrip("/") == "./dist")
    assert f"pip install {wheel_dir}/retinanet_pipeline-*.whl" in setup
    name = re.search(r'^name = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert name.replace("-", "_") == "retinanet_pipeline"  # the wheel file name the glob expects


# ---------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "deploy" / "rayjob.yaml").read_text()) if d]


def test_rayjob_manifest_is_a_rayjob_with_autoscaled_gpu_workers(rayjob_docs):
    import ray

    rayjob = next(d for d in rayjob_docs if d.get("kind") == "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("pipeline run ") and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > gpu["minReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_rayjob_runs_a_valid_job_file_mounted_on_the_head(rayjob_docs):
    from pipeline.config.spec import parse_job

    rayjob = next(d for d in rayjob_docs if d.get("kind") == "RayJob")
    job_path = rayjob["spec"]["entrypoint"].split()[2]
    head_pod = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    name = next(n for n, path in mounts.items() if job_path.startswith(path + "/"))
    config_map = volumes[name]["configMap"]["name"]
    cm = next(d for d in rayjob_docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == config_map)
    key = job_path[len(mounts[name]) + 1:]
    spec = parse_job(yaml.safe_load(cm["data"][key]), source=f"ConfigMap {config_map}/{key}")
    assert spec.compute.address == "auto"  # joins the KubeRay cluster instead of starting its own Ray
    # The job's checkpoint and table live on volumes the head mounts.
    assert any(spec.model.checkpoint.startswith(p + "/") for p in mounts.values())
    assert any(spec.output.table.startswith(p + "/") for p in mounts.values())
