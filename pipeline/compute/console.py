"""Keeping the console to our own lines: Ray's native log lines of this process, filtered.

Ray's C++ core writes some lines straight to this process's file descriptor 2, past
Python's logging: on every run an error-level ``core_worker.cc`` line saying that actors
with constructor arguments in the object store may not restart (ray-project/ray#53727;
Ray Data puts every actor pool's constructor there), and setting
RAY_BACKEND_LOG_LEVEL only trades it for a line announcing the level. Around the stream,
:func:`native_log_lines_hidden` passes fd 2 through a pipe that drops lines in Ray's
native format and forwards everything else unchanged.

Install it after Ray has started: processes started before inherit the real stderr, so
only this process writes into the pipe and the pipe closes when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# "[2026-11-30 18:07:05,078 E 20242 20242] core_worker.cc:2465: ..."
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.cc:\d+: ")


def console_line(message: str) -> None:
    """A progress or status line for the user: stderr, flushed (stdout carries the summary JSON)."""
    print(message, file=sys.stderr, flush=True)


def eta_text(units_left: float, units_per_second: float) -> str:
    """The time left at a rate, for progress lines. Examples: (280, 2.0) -> 'ETA 2m20s';
    (99990, 1.0) -> 'ETA 27h46m'; (5, 0.0) -> 'ETA unknown'."""
    if units_per_second <= 0:
        return "ETA unknown"
    left = round(units_left / units_per_second)
    return f"ETA {left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"ETA {left // 60}m{left % 60:02d}s"


def is_native_log_line(line: bytes) -> bool:
    return NATIVE_LOG_LINE.match(line) is not None


@contextlib.contextmanager
def native_log_lines_hidden():
    """Within the block, lines in Ray's native log format written to fd 2 are dropped."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not is_native_log_line(line):
                    os.write(real, line)

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the forwarder reads to the end
        forwarder.join(timeout=5)
        os.close(real)
