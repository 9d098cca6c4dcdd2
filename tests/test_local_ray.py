"""Ray as `pipeline run` and `pipeline train` get it (pipeline.compute.cluster), through Ray's
public means only: ray.init's arguments, `ray start`'s flags, documented variables; and the
long-lived local head of `pipeline ray up` / `status` / `down`."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What issue 34 forbids in the packages: Ray's private modules, its system config, its experimental API.
PRIVATE_RAY = re.compile(r"ray\._|ray\.data\._internal|_system_config|ray\.experimental|_raylet")


def test_no_private_ray_symbol_in_the_packages():
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for folder in ("pipeline", "retinanet") for path in sorted((REPO / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if PRIVATE_RAY.search(line)]
    assert found == []


def test_a_local_rays_options_are_ray_inits_public_arguments():
    from pipeline.compute.cluster import ray_init_options

    assert ray_init_options(None, quiet=True, num_cpus=2) == {
        "log_to_driver": False, "include_dashboard": False, "num_cpus": 2, "logging_level": logging.ERROR}
    assert ray_init_options(None, quiet=False, dashboard=True) == {"log_to_driver": True, "include_dashboard": True}
    # A joined cluster is as it was started: only what this driver hears is ours to say.
    assert ray_init_options("10.0.0.5:6379", quiet=True, num_cpus=2) == {"log_to_driver": False,
                                                                           "logging_level": logging.ERROR}


def test_the_heads_command_uses_ray_starts_public_flags_and_blocks():
    from pipeline.compute.cluster import head_command

    command = head_command(6380, 2, 0, "/tmp/pipeline-ray-x")
    assert Path(command[0]).name == "ray" and command[1:4] == ["start", "--head", "--block"]
    assert {"--port=6380", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--temp-dir=/tmp/pipeline-ray-x",
            "--dashboard-agent-listen-port=0"} <= set(command)
    assert not any(flag.startswith(("--num-cpus", "--num-gpus")) for flag in head_command(6380, None, None, "/t"))


LOCAL_DRIVER = """
import json, os
from pipeline.compute.cluster import connect_ray
heard = []
ray = connect_ray(None, num_cpus=1, log=heard.append)
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "nodes": len(ray.nodes()), "heard": heard,
                  "gcs": ray.get_runtime_context().gcs_address}))
"""


@pytest.mark.ray  # a Ray of its own in a child process
def test_without_a_head_a_run_starts_a_local_ray_of_its_own(tmp_path):
    """No head recorded in the cache: a Ray of this process, with the CPUs asked for."""
    env = {**os.environ, "RETINANET_PIPELINE_CACHE": str(tmp_path / "cache")}
    result = run_child_env(LOCAL_DRIVER, env)
    assert result["cpus"] == 1 and result["nodes"] == 1 and result["heard"] == []


def pipeline_cli(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def session_processes(pid: int) -> list[int]:
    """The live processes of the session (process group) `pid` leads, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.timeout(600)
def test_ray_up_starts_a_head_that_runs_join_and_down_stops_only_it(tmp_path, ray_session):
    """`pipeline ray up` starts a head (its own session); a run with compute.address null
    joins it and says so; `pipeline ray down` stops that head's processes, and another Ray
    on the machine (the test session's) is untouched."""
    import yaml

    from pipeline.tools.synth import synthesize
    from tests.workspaces import tiny_checkpoint

    env = {**os.environ, "RETINANET_PIPELINE_CACHE": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}  # the head brings its own token
    up = pipeline_cli("ray", "up", "--num-cpus", "1", "--num-gpus", "0", env=env)
    head = json.loads((tmp_path / "cache" / "ray" / "local-head.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        assert f"local Ray head up at {head['address']}" in up.stdout
        status = pipeline_cli("ray", "status", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["address"] == head["address"]
        again = pipeline_cli("ray", "up", env=env)
        assert again.returncode == 2 and f"already up at {head['address']}" in again.stderr

        joined = run_child_env(LOCAL_DRIVER, env)  # num_cpus=1 asked, and the head has 1: the head's count
        assert joined["nodes"] == 1 and joined["cpus"] == 1
        assert joined["gcs"].rpartition(":")[2] == head["address"].rpartition(":")[2]
        assert joined["heard"] == [f"joining the local Ray head at {head['address']} "
                                   "(pipeline ray up; pipeline ray down stops it)"]

        # A Python caller that imported Ray before: Ray read the token variables then, so it
        # cannot join; it is told, and runs on a Ray of its own.
        apart = run_child_env("import ray\n" + LOCAL_DRIVER, env)
        assert apart["heard"] == [f"a local Ray head is up at {head['address']}, but Ray was imported before its "
                                  "token was set; starting a Ray of this process instead"]
        assert apart["gcs"].rpartition(":")[2] != head["address"].rpartition(":")[2]

        synthesize(tmp_path / "scenes", scenes=1, size=256, seed=0)
        tiny_checkpoint(tmp_path / "model.pt")
        job = {"name": "joins-the-head", "inputs": {"paths": [str(tmp_path / "scenes" / "*.tif")]},
               "model": {"checkpoint": str(tmp_path / "model.pt")},
               "compute": {"address": None, "gpus_per_actor": 0, "actors": 1, "cpus_per_actor": 1},
               "tiling": {"chip_size": 128, "overlap": 16}, "output": {"table": str(tmp_path / "table")}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        run = pipeline_cli("run", str(tmp_path / "job.yaml"), env=env, timeout=400)
        assert run.returncode == 0, run.stderr[-4000:]
        assert f"joining the local Ray head at {head['address']}" in run.stderr
        assert json.loads(run.stdout)["scenes_ok"] == 1
        assert list((tmp_path / "table").rglob("*.parquet"))  # committed
    finally:
        down = pipeline_cli("ray", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert f"(pid {head['pid']}) stopped" in down.stdout
    assert session_processes(head["pid"]) == []  # the head's daemons and workers ended with it
    assert not (tmp_path / "cache" / "ray" / "local-head.json").exists()
    assert pipeline_cli("ray", "status", env=env).returncode == 1
    assert ray_session.get(ray_session.put("still here"), timeout=30) == "still here"  # the other Ray lives
    assert all(node["Alive"] for node in ray_session.nodes())


def test_a_stale_record_is_neither_joined_nor_signalled(tmp_path, monkeypatch):
    """A head record whose process is gone, or whose pid is now another process (here: this
    test's own), is not a head: nothing joins it and `down` signals nothing, only forgets it."""
    from pipeline.compute import cluster

    monkeypatch.setenv("RETINANET_PIPELINE_CACHE", str(tmp_path / "cache"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = cluster.head_file()
    record.parent.mkdir(parents=True)
    for pid in (gone.pid, os.getpid()):
        record.write_text(json.dumps({"pid": pid, "address": "127.0.0.1:1", "token_path": ""}))
        assert cluster.recorded_head() is not None and cluster.live_head() is None
        assert cluster.stop_head(timeout_s=1)["pid"] == pid
        assert not record.exists()
    assert cluster.stop_head() is None  # nothing recorded: nothing to do


def run_child_env(code: str, env: dict, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

