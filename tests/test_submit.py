"""`pipeline submit`: a real Ray Job on a head this test starts on loopback.

The head runs in its own session (``ray start --head --block`` with its own
``--temp-dir``, every port chosen free) with token authentication on and a token made
for the test; the client runs as ``python -m pipeline.cli`` subprocesses with the same
token. At the end only that head is stopped: SIGTERM to the ``ray start --block``
process (Ray drains and stops the processes it started), then SIGKILL to its process
group as a fallback. No ``ray stop``: that would reach other Ray instances of the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.run.submit import entrypoint, exit_code_of, local_paths, resolved_job_data

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_env(token_file: Path) -> dict:
    env = dict(os.environ)
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONPATH": str(REPO),
                # Stop at once on SIGTERM: no node drain (a test head serves nobody).
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 without a token): the server is up
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the dashboard at {url} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head(module_tmp):
    """A Ray head on loopback: yields (dashboard URL, env for clients)."""
    pytest.importorskip("aiohttp", reason="the Ray job server needs ray[default] (aiohttp)")
    base = module_tmp("head")
    temp_dir = Path("/tmp") / f"rs-{secrets.token_hex(3)}"  # short: Ray's unix socket paths are limited
    token_file = base / "token"
    token_file.write_text(secrets.token_hex(32))
    env = head_env(token_file)
    gcs, dash, client, agent, agent_grpc, rtenv, metrics, nm, om = free_ports(9)
    log = base / "ray-start.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rtenv}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}",
           "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, proc, log)
        yield url, env
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(proc: subprocess.Popen) -> None:
    """Stop exactly the head this test started: its `ray start` process, then its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is this head's session only
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def cli(args: list[str], env: dict, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(module_tmp):
    """A job with *relative* paths next to one small scene and a tiny untrained model."""
    import torch

    from pipeline.tools.synth import SYNTH_CLASSES, synthesize
    from retinanet import build_model, save_checkpoint

    root = module_tmp("job")
    synthesize(root / "scenes", scenes=1, size=256, seed=5)
    torch.manual_seed(0)
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", head_width=16, head_depth=1,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3)
    save_checkpoint(root / "model.pt", model, list(SYNTH_CLASSES))
    job = {"name": "submitted",
           "inputs": {"paths": ["scenes/*.tif"], "bands": [1, 2, 3]},
           "tiling": {"chip_size": 256, "overlap": 32},
           "model": {"checkpoint": "model.pt", "batch_size": 2, "precision": "fp32", "device": "cpu"},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1, "max_retries": 0},
           "output": {"table": "out/table", "crs": "EPSG:4326"}}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return root


def test_resolved_job_is_absolute_validated_and_joins_the_cluster(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = resolved_job_data(workspace / "job.yaml", ["output.table=here"])
    assert data["inputs"]["paths"] == [str(workspace / "scenes" / "*.tif")]
    assert data["model"]["checkpoint"] == str(workspace / "model.pt")
    assert data["output"]["table"] == str(tmp_path / "here")  # --set: against the current directory
    assert data["compute"]["address"] == "auto" and data["compute"]["actors"] == 1
    assert local_paths(data) == [str(workspace / "scenes" / "*.tif"), str(workspace / "model.pt"),
                                 str(tmp_path / "here")]
    assert local_paths({"inputs": {"paths": ["s3://b/x.tif"]}, "model": {"checkpoint": "https://h/m.pt"}}) == []
    kept = resolved_job_data(workspace / "job.yaml", ["compute.address=10.0.0.1:6379"])
    assert kept["compute"]["address"] == "10.0.0.1:6379"
    with pytest.raises(ConfigError, match="compute.actors"):
        resolved_job_data(workspace / "job.yaml", ["compute.actors=0"])


def test_entrypoint_and_exit_codes():
    assert entrypoint() == "pipeline run job.yaml"
    assert entrypoint("night 1", force=True) == "pipeline run job.yaml --run-id 'night 1' --force"
    assert exit_code_of("SUCCEEDED", None) == 0 and exit_code_of("FAILED", None) == 1
    assert exit_code_of("FAILED", 2) == 2 and exit_code_of("STOPPED", None) == 1


def test_unreachable_address_is_an_error(workspace, tmp_path):
    port = free_ports(1)[0]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    result = cli(["submit", str(workspace / "job.yaml"), "--address", f"127.0.0.1:{port}"], env, tmp_path, 60)
    assert result.returncode == 2 and f"http://127.0.0.1:{port}" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.ray  # a head started with `ray start`
@pytest.mark.timeout(240)
def test_submit_follow_runs_the_job_on_the_cluster(head, workspace, tmp_path):
    url, env = head
    # Run from another directory: the job's relative paths must still mean workspace/...
    done = cli(["submit", str(workspace / "job.yaml"), "--address", url, "--follow", "--run-id", "night-1"],
               env, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    summary = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert summary["run_id"] == "night-1" and summary["scenes_ok"] == 1 and summary["scenes_failed"] == []

    from pipeline.table.state import committed_scenes, read_committed

    # Committed into the table the job file names (relative to the job file, not to cwd).
    table = workspace / "out" / "table"
    assert committed_scenes(table)[("submitted", "synth_000")]["run_id"] == "night-1"
    assert read_committed(table).num_rows == summary["detections"]
    report = json.loads((workspace / "out" / "table" / "_reports" / "night-1.json").read_text())
    assert report["exit_code"] == 0 and report["scenes_ok"] == ["synth_000"]

    # Without --follow: the id is printed and the command returns; this job fails on the
    # cluster (no checkpoint there) and following it by id returns the driver's exit code,
    # 2 for bad configuration.
    quick = cli(["submit", str(workspace / "job.yaml"), "--address", url, "--set", "model.checkpoint=missing.pt"],
                env, tmp_path)
    assert quick.returncode == 0 and quick.stdout.strip().startswith("raysubmit_"), quick.stderr
    assert "must exist on the cluster nodes" in quick.stderr
    follow = subprocess.run([sys.executable, "-c", "import sys; from pipeline.run.submit import follow_job; "
                             f"sys.exit(follow_job({url!r}, {quick.stdout.strip()!r}))"],
                            env=env, cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert follow.returncode == 2 and "model.checkpoint: file not found" in follow.stdout, follow.stderr[-2000:]
