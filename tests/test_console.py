"""The console filter drops Ray's native log lines written to fd 2 and forwards the rest."""
from __future__ import annotations

import os

from pipeline.compute.console import is_native_log_line, native_log_lines_hidden

RAY_LINE = (b"[2026-11-30 18:07:05,078 E 20242 20242] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(ChipPredictor))' has constructor arguments in the object store\n")


def test_native_lines_are_recognised_and_ours_are_not():
    assert is_native_log_line(RAY_LINE)
    assert is_native_log_line(b"[2026-11-30 19:01:24,400 I 17052 17052] logging.cc:303: Set ray log level\n")
    assert not is_native_log_line(b"run 20261130T180957-3dedaf: 2 scenes to run\n")
    assert not is_native_log_line(b"warning: [2026-11-30] core_worker.cc is mentioned, not a Ray line\n")


def test_the_filter_drops_native_lines_written_to_fd_2_and_keeps_ours(capfd):
    with native_log_lines_hidden():
        os.write(2, b"ours before\n" + RAY_LINE + b"ours after\n")
        os.write(2, RAY_LINE + b"a last line without its newline")
    os.write(2, b"\nafter the block\n")
    err = capfd.readouterr().err
    assert err == "ours before\nours after\na last line without its newline\nafter the block\n", err


JOINING_DRIVER = """
import json, sys, time
from pipeline.compute.cluster import connect_ray
ray = connect_ray(sys.argv[1], quiet=sys.argv[2] == "quiet")

@ray.remote(num_cpus=0)
def shout():
    print("a worker line on stderr", file=sys.stderr, flush=True)

ray.get(shout.remote())
time.sleep(6)  # the log monitor forwards worker output about once a second; slow machines lag
ray.shutdown()
print(json.dumps({"ok": True}))
"""


def test_a_driver_joining_a_cluster_keeps_the_workers_lines_off_the_console_unless_verbose(ray_session):
    """A joined cluster forwards its workers' and raylets' lines (a full /tmp on a CI machine
    put a raylet's file_system_monitor.cc line on a quiet run's console)."""
    from tests.children import run_child

    address = ray_session.get_runtime_context().gcs_address
    _, quiet_err = run_child(JOINING_DRIVER, address, "quiet", timeout=120)
    _, verbose_err = run_child(JOINING_DRIVER, address, "verbose", timeout=120)
    assert "a worker line on stderr" in verbose_err
    assert "a worker line on stderr" not in quiet_err, quiet_err


def test_head_unreachable_says_why():
    import socket

    from pipeline.compute.cluster import head_unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert head_unreachable(f"127.0.0.1:{port}") is None
        assert head_unreachable(f"ray://127.0.0.1:{port}") is None
    assert head_unreachable(f"127.0.0.1:{port}") == "Connection refused"
    assert head_unreachable(None) is None and head_unreachable("auto") is None


def test_a_run_against_an_address_where_no_head_answers_fails_at_once_and_names_it(tmp_path):
    """ray.init would retry such an address for minutes; the run says what is wrong instead."""
    import socket
    import subprocess
    import sys

    import yaml

    from pipeline.tools.synth import synthesize
    from tests.workspaces import tiny_checkpoint

    synthesize(tmp_path / "scenes", scenes=1, size=256, seed=0)
    tiny_checkpoint(tmp_path / "model.pt")
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = {"name": "dead-head", "inputs": {"paths": [str(tmp_path / "scenes" / "*.tif")]},
           "model": {"checkpoint": str(tmp_path / "model.pt")},
           "compute": {"address": f"127.0.0.1:{port}"}, "output": {"table": str(tmp_path / "table")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # cannot start: the cluster is unreachable
    assert f"error: compute.address 127.0.0.1:{port}: no Ray head answers there (Connection refused)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "table").exists() or not list((tmp_path / "table").rglob("*.parquet"))


def test_token_refused_asks_only_what_it_can(ray_session):
    from pipeline.compute.cluster import token_refused

    # This process holds the token of the Ray it started (Ray 2.60 starts one with token
    # authentication and sets RAY_AUTH_MODE here).
    assert token_refused(ray_session.get_runtime_context().gcs_address) is None
    assert token_refused(None) is None and token_refused("auto") is None
    assert token_refused("ray://127.0.0.1:1") is None


def test_a_run_whose_token_the_head_refuses_fails_at_once_and_says_what_to_set(tmp_path, ray_session):
    """Joining a head with token authentication without its token: ray.init retried for
    ~15 s, printing a native `gcs_client.cc` warning each second, before a vague error."""
    import os
    import subprocess
    import sys

    import pytest
    import yaml

    from pipeline.tools.synth import synthesize
    from tests.workspaces import tiny_checkpoint

    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("the test session's Ray runs without token authentication")
    synthesize(tmp_path / "scenes", scenes=1, size=256, seed=0)
    tiny_checkpoint(tmp_path / "model.pt")
    address = ray_session.get_runtime_context().gcs_address
    job = {"name": "no-token", "inputs": {"paths": [str(tmp_path / "scenes" / "*.tif")]},
           "model": {"checkpoint": str(tmp_path / "model.pt")},
           "compute": {"address": address, "gpus_per_actor": 0}, "output": {"table": str(tmp_path / "table")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    without_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120, env=without_token)
    assert proc.returncode == 2, proc.stderr  # cannot start: the cluster refused us
    assert (f"error: compute.address {address}: the Ray head refused this machine's authentication token "
            "(InvalidAuthToken: ") in proc.stderr
    assert "set RAY_AUTH_MODE=token" in proc.stderr
    assert "gcs_client.cc" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "table").exists() or not list((tmp_path / "table").rglob("*.parquet"))
