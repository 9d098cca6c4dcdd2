"""Benchmark: the chip-reading stage alone (no model), with 1, 2, ... worker processes.

    python bench/read_bench.py                    # 8192² synthetic GeoTIFF, 512² chips, overlap 64
    python bench/read_bench.py --size 4096 --workers 1 2

The scene is planned as `pipeline run` plans it (`pipeline.chips.tiling.plan_chips`) and its
chip rows (`pipeline.chips.stream.scene_rows`) are read in runs of `MIN_READ_BATCH` by the
pipeline's own read task, `pipeline.chips.stream.read_chip_batch` (windowed reads, one open
per scene and batch, validity masks, the transport dtype), in N processes at once. Printed:
chips/s per worker count, and the cores a node needs to feed a target rate (default 1,500
chips/s, one H200's end-to-end target) at the measured per-core rate.

The first pass over the file warms the page cache and is not timed: a nightly job reads
from object storage or a cold disk, so these are upper bounds of decoding, not of I/O.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402
from pipeline.chips.planning import ScenePlan  # noqa: E402
from pipeline.chips.stream import read_chip_batch, rows_to_batch, scene_rows  # noqa: E402
from pipeline.chips.tiling import plan_chips  # noqa: E402
from pipeline.run.graph import MIN_READ_BATCH  # noqa: E402
from pipeline.tools.synth import synthesize  # noqa: E402


def batches_of(rows: list[dict], size: int) -> list[dict]:
    """Chip rows cut into the column batches a read task receives."""
    return [rows_to_batch(rows[start:start + size]) for start in range(0, len(rows), size)]


def read_all(batches: list[dict], chip: int) -> int:
    read = 0
    for batch in batches:
        out = read_chip_batch(batch, [1, 2, 3], chip, 3)
        read += int((out["status"] == "ok").sum())
    return read


def timed_read(batches: list[dict], chip: int, workers: int) -> float:
    """chips/s of reading every batch once with `workers` processes."""
    shares = [batches[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(read_all, [[b] for b in batches[:workers]], [chip] * workers))  # start-up, untimed
        start = time.perf_counter()
        read = sum(pool.map(read_all, shares, [chip] * workers))
        return read / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--target", type=float, default=1500.0, help="chips/s a GPU node must be fed")
    args = parser.parse_args()
    root = scratch_dir("read-bench-")
    scene = synthesize(root, scenes=1, size=args.size, seed=0)[0]
    info, windows, _ = plan_chips(str(scene), args.chip, args.overlap, 0.0, scene_id="s")
    rows = scene_rows(ScenePlan("s", str(scene), info, windows, 0, []))
    batches = batches_of(rows, MIN_READ_BATCH)
    read_all(batches, args.chip)  # page cache warm
    rates = {w: [] for w in args.workers}
    for _ in range(args.reps):
        for w in args.workers:  # interleaved
            rates[w].append(timed_read(batches, args.chip, w))
    print(f"load average {open('/proc/loadavg').read().split()[:3]}; {args.size}² uint8 RGB, "
          f"{len(rows)} chips of "
          f"{args.chip}² (overlap {args.overlap}), runs of {MIN_READ_BATCH}, medians of {args.reps}")
    for w in args.workers:
        median = statistics.median(rates[w])
        print(f"{w} worker(s): {median:8.1f} chips/s  ({median / w:.1f} per worker)")
    per_core = statistics.median(rates[min(args.workers)]) / min(args.workers)
    print(f"cores to feed {args.target:.0f} chips/s at {per_core:.1f} chips/s per core: "
          f"{math.ceil(args.target / per_core)}")


if __name__ == "__main__":
    main()
