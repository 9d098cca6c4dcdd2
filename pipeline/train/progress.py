"""Training progress on the driver's console, read from the metrics.csv that rank 0 writes.

Ray Train's own lines (a repr of every checkpoint and report) and the workers' output
reach the console only with ``pipeline train --verbose``; without it, the driver prints
one line per validation (each epoch end) from ``train.output_dir/metrics.csv``, which the
driver sees as the workers do (a local run, or NFS on a cluster: see pipeline.train.driver).
"""
from __future__ import annotations

import contextlib
import csv
import os
import threading
import time
from pathlib import Path

from pipeline.compute.console import eta_text

POLL_S = 2.0


def training_progress_line(row: dict, total_steps: int, steps_per_second: float) -> str:
    """One line for one metrics row (values as metrics.csv holds them, empty = not measured).

    Example: ({"epoch": "3", "step": "136", "loss": "0.7968", "val_AP50": "0.7964", ...}, 300, 0.5)
    -> '  step 136/300, epoch 3: loss 0.797, val AP50 0.796, 0.50 steps/s, ETA 5m28s'."""
    step = int(row["step"])
    parts = [f"loss {float(row['loss']):.3f}"]
    if row.get("val_AP50") not in (None, ""):
        parts.append(f"val AP50 {float(row['val_AP50']):.3f}")
    return (f"  step {step}/{total_steps}, epoch {row['epoch']}: {', '.join(parts)}, "
            f"{steps_per_second:.2f} steps/s, {eta_text(total_steps - step, steps_per_second)}")


def budget_stop_line(step: int, total_steps: int, budget_minutes: float) -> str:
    """The line that ends a run train.time_budget_minutes stopped: the last progress line's
    ETA was the rate's guess for the whole schedule, which the run will not finish.

    Example: (68, 300, 10) -> '  stopped early at step 68/300: train.time_budget_minutes (10) spent'."""
    return f"  stopped early at step {step}/{total_steps}: train.time_budget_minutes ({budget_minutes:g}) spent"


def read_metric_rows(path: Path) -> list[dict]:
    """metrics.csv's rows; none while it does not exist (it is replaced atomically, never half-written)."""
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


class RowReporter:
    """Logs each metrics row past `start_step` once, with the rate since the first row it
    logged (since it was created, for that first row). Rows that arrive together share
    the rate of the first of them rather than one over a few milliseconds."""

    def __init__(self, total_steps: int, start_step: int, log):
        self.total_steps, self.log = total_steps, log
        self.last_step = start_step
        self.reference: tuple[int, float] | None = None
        self.started = time.monotonic()
        self.rate = 0.0

    def show(self, rows: list[dict]) -> None:
        now = time.monotonic()
        for row in rows:
            step = int(row["step"])
            if step <= self.last_step:
                continue
            ref_step, ref_time = self.reference or (self.last_step, self.started)
            if now - ref_time > 1e-3:
                self.rate = (step - ref_step) / (now - ref_time)
            self.log(training_progress_line(row, self.total_steps, self.rate))
            self.last_step = step
            self.reference = self.reference or (step, now)


@contextlib.contextmanager
def progress_from_metrics(path: Path, total_steps: int, start_step: int, log, poll_s: float = POLL_S):
    """While the block runs, log a line for each metrics row past `start_step` that appears
    in `path` (see :class:`RowReporter`). A file already there is an earlier run's until it
    changes."""
    def modified() -> tuple[int, int] | None:  # each atomic write is a new file: a new inode, a new mtime
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(path)
            return info.st_ino, info.st_mtime_ns
        return None

    reporter = RowReporter(total_steps, start_step, log)
    seen = {"version": modified()}

    def show_new_rows() -> None:
        version = modified()
        if version is not None and version != seen["version"]:
            seen["version"] = version
            reporter.show(read_metric_rows(path))

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            show_new_rows()

    watcher = threading.Thread(target=watch, name="training-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        show_new_rows()  # the last epoch's row, written just before training returned
