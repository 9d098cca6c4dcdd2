"""Benchmark: does the detection table's cost stay flat as its history grows?

    python bench/table_bench.py                       # N = 1,000 and 10,000 commits
    python bench/table_bench.py --sizes 1000 10000 100000
    python bench/table_bench.py --sizes 1000 --compact   # and again after `pipeline compact`

A nightly table: ``--scenes`` scenes (default 500) re-run every night, so N commits are
N / scenes nights of history while the current state stays one version per scene. Rows
per scene follow a log-normal distribution (median 150, a long tail to a few thousand),
as detection counts over mixed scenes do. Each table is built with the real commit path
(``pipeline.table.commit.commit_scene``: Parquet, manifest, move, settle, snapshots).

Measured on each table once all are built, ``--reps`` rounds interleaved, medians:

  commit   one more scene commit;
  scenes   listing the current scenes (``committed_scenes``: what every run starts with);
  count    ``SELECT count(*) FROM detections`` through ``pipeline query``.

Printed as seconds per table and as the ratio largest N / smallest N (target <= 1.5x).
The machine's load average is printed beside them: measure when it is quiet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.query import run_query  # noqa: E402
from pipeline.table import schema  # noqa: E402
from pipeline.table import state as table_state  # noqa: E402
from pipeline.table.commit import RunInfo, commit_scene  # noqa: E402
from pipeline.table.maintenance import compact  # noqa: E402
from pipeline.table.state import MANIFESTS, committed_scenes  # noqa: E402

CLASSES = ["vehicle", "building", "tank"]


def scene_rows(run: RunInfo, scene: str, n: int, rng: np.random.Generator):
    xy = rng.uniform(0, 10000, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, size=(n, 2))], axis=1)
    corners = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [2, 3]], boxes[:, [0, 3]]], axis=1) + 500000.0
    return schema.build_detection_table(corners, boxes, rng.uniform(0.3, 1, n), rng.integers(0, 3, n), CLASSES,
                                   run_id=run.run_id, job_name=run.job_name, scene_id=scene,
                                   scene_path=f"/scenes/{scene}.tif", model_id=run.model_id, job_hash=run.job_hash)


def build(root: Path, commits: int, scenes: int, seed: int = 0) -> None:
    # History built in seconds stands for months of nights: the grace that protects readers
    # in flight from a folded manifest's removal (10 min) would otherwise keep every manifest.
    table_state.SNAPSHOT_GRACE_S = 0.0
    rng = np.random.default_rng(seed)
    done = 0
    night = 0
    while done < commits:
        run = RunInfo(f"night{night:05d}", "nightly", "h", "m", "EPSG:32633")
        for s in range(min(scenes, commits - done)):
            n = int(min(5000, max(1, rng.lognormal(np.log(150), 1.0))))
            commit_scene(root, run, f"scene_{s:05d}", night, scene_rows(run, f"scene_{s:05d}", n, rng))
            done += 1
        night += 1


def measure_once(root: Path, rep: int, rng: np.random.Generator) -> dict[str, float]:
    run = RunInfo(f"bench{rep:03d}", "nightly", "h", "m", "EPSG:32633")
    rows = scene_rows(run, "scene_00000", 150, rng)
    t0 = time.perf_counter()
    commit_scene(root, run, "scene_00000", f"b{rep}", rows)
    t1 = time.perf_counter()
    committed_scenes(root)
    t2 = time.perf_counter()
    run_query(root, "SELECT count(*) FROM detections")
    t3 = time.perf_counter()
    return {"commit": t1 - t0, "scenes": t2 - t1, "count": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--compact", action="store_true", help="also measure each table after `pipeline compact`")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="table-bench-") as tmp:
        roots = {n: Path(tmp) / f"t{n}" for n in args.sizes}
        for n, root in roots.items():
            t0 = time.perf_counter()
            build(root, n, args.scenes)
            built = time.perf_counter() - t0
            print(f"N={n:>7}: built in {built:7.1f} s ({built / n * 1000:.1f} ms/commit), load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        # Interleaved: one repetition of every size per round, so load from other tenants
        # falls on all sizes alike.
        samples: dict[int, list[dict[str, float]]] = {n: [] for n in roots}
        for rep in range(args.reps):
            for n, root in roots.items():
                samples[n].append(measure_once(root, rep, rng))
        results = {n: {k: statistics.median(s[k] for s in samples[n]) for k in samples[n][0]} for n in roots}
        for n, root in roots.items():
            manifests = len(list((root / MANIFESTS).glob("*.json")))
            files = len(list(root.glob("date=*/*.parquet")))
            print(f"N={n:>7}: {manifests} manifests and {files} data files on disk; "
                  + "; ".join(f"{k} {v * 1000:.1f} ms" for k, v in results[n].items()), flush=True)
        if args.compact:  # the same tables after `pipeline compact`: one file per date partition
            for n, root in roots.items():
                t0 = time.perf_counter()
                compact(root)
                took = time.perf_counter() - t0
                after = [measure_once(root, args.reps + rep, rng) for rep in range(args.reps)]
                files = len(list(root.glob("date=*/*.parquet")))
                # The first commit re-commits a compacted scene: it rewrites the partition's file.
                print(f"N={n:>7} compacted in {took:.1f} s to {files} data files; re-committing a compacted "
                      f"scene {after[0]['commit'] * 1000:.1f} ms; then "
                      + "; ".join(f"{k} {statistics.median(s[k] for s in after) * 1000:.1f} ms" for k in after[0]),
                      flush=True)
    print(f"load average after measuring: {os.getloadavg()[0]:.2f}")
    small, large = min(results), max(results)
    print(f"ratio N={large} / N={small}: "
          + ", ".join(f"{k} {results[large][k] / results[small][k]:.2f}x" for k in results[small])
          + " (target <= 1.5x)")


if __name__ == "__main__":
    main()
