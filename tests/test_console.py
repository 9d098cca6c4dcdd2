"""The console filter drops Ray's native log lines written to fd 2 and forwards the rest."""
from __future__ import annotations

import os

from pipeline.run.console import is_native_log_line, native_log_lines_hidden

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
from pipeline.run.graph import connect_ray
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
