"""A moto S3 server (moto's server mode) on 127.0.0.1, started and stopped by whoever asks:
the test session's shared server (conftest.py), a second one that checks credentials, the
query-memory benchmark's own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Mapping, Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int, env: Optional[Mapping[str, str]] = None, timeout_s: float = 30) -> subprocess.Popen:
    """Start ``python -m moto.server`` on ``port`` and wait until it accepts connections.
    RuntimeError (the process killed) when it does not within ``timeout_s``."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto S3 server did not start on port {port}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server this process started (only that one)."""
    proc.terminate()
    proc.wait(timeout=10)
