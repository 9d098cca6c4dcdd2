"""Tests that need a Ray of their own (a multi-node ``ray.cluster_utils.Cluster`` has its
own head, apart from the test session's local Ray) run a child Python process that
prints its result as one JSON line last."""
from __future__ import annotations

import json
import subprocess
import sys


def run_child(code: str, *args, timeout: int = 400) -> tuple[dict, str]:
    """Run ``code`` with ``args`` in a child process -> (its last stdout line as JSON, its stderr)."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
