"""Benchmark: does `pipeline query` on an object-store table keep its memory flat as the table grows?

    python bench/query_memory_bench.py                      # 100k and 1M rows
    python bench/query_memory_bench.py --sizes 100000 1000000 --reps 2
    python bench/query_memory_bench.py --code /path/to/other/checkout   # the same on another version

A moto S3 server is started on 127.0.0.1 by the bench (and stopped at the end); each table
is ``rows / --scene-rows`` scenes committed with the real commit path
(``pipeline.table.commit.commit_scene``) into ``s3://bench/<rows>``. Each query runs
``--reps`` times as its own ``pipeline query`` process (``python -m pipeline.cli``), and
the process's peak RSS is read from the kernel when it exits (``os.wait4``: ru_maxrss):

  count   ``SELECT count(*) FROM detections``
  scene   one scene's rows: ``SELECT label, count(*), avg(score) ... WHERE scene_id = <one scene>``
  start   ``SELECT 1`` (the process, DuckDB with its spatial extension, pyarrow: the floor)

Printed: peak RSS (MiB, the largest of the reps) and wall seconds (median) per table, and
the ratio largest table / smallest table (flat: ~1.0x). The machine's load average is
printed beside them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.table import schema  # noqa: E402
from pipeline.table.commit import RunInfo, commit_scene  # noqa: E402
from tests.moto_server import free_port, start_moto, stop  # noqa: E402

CLASSES = ["vehicle", "building", "tank"]
BUCKET = "bench"


def scene_rows(run: RunInfo, scene: str, n: int, rng: np.random.Generator):
    xy = rng.uniform(0, 10000, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, size=(n, 2))], axis=1)
    corners = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [2, 3]], boxes[:, [0, 3]]], axis=1) + 500000.0
    return schema.build_detection_table(
        corners, boxes, rng.uniform(0.3, 1, n), rng.integers(0, 3, n), CLASSES, run_id=run.run_id,
        job_name=run.job_name, scene_id=scene, scene_path=f"/scenes/{scene}.tif", model_id=run.model_id,
        job_hash=run.job_hash, date=f"2026-01-{1 + int(scene[1:]) % 28:02d}")


def build(url: str, rows: int, scene_rows_n: int) -> int:
    run = RunInfo("r1", "bench", "h", "m", "EPSG:32633")
    rng = np.random.default_rng(0)
    scenes = rows // scene_rows_n
    for i in range(scenes):
        commit_scene(url, run, f"s{i:05d}", {"k": i}, scene_rows(run, f"s{i:05d}", scene_rows_n, rng))
    return scenes


def measure(url: str, sql: str, code: Path) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one `pipeline query` process."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "query", url, sql, "--format", "csv"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=code)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen.wait would reap it first)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"query failed: {sql}\n{err.read().decode()}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--scene-rows", type=int, default=20_000, help="rows per committed scene")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose `pipeline query` is measured")
    args = parser.parse_args()

    port = free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_ALLOW_HTTP": "true"})  # older checkouts (--code) need it; this one does not
    moto = start_moto(port)
    try:
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        queries = {
            "start": "SELECT 1 AS one",
            "count": "SELECT count(*) AS n FROM detections",
            "scene": "SELECT label, count(*) AS n, avg(score) AS s FROM detections WHERE scene_id = 's00003' "
                     "GROUP BY ALL ORDER BY ALL",
        }
        results: dict[int, dict[str, tuple[float, float]]] = {}
        for rows in args.sizes:
            url = f"s3://{BUCKET}/t{rows}"
            t0 = time.perf_counter()
            scenes = build(url, rows, args.scene_rows)
            print(f"built {url}: {rows:,} rows in {scenes} scenes, {time.perf_counter() - t0:.0f} s", flush=True)
            results[rows] = {}
            for name, sql in queries.items():
                runs = [measure(url, sql, args.code) for _ in range(args.reps)]
                results[rows][name] = (max(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"\nload average: {os.getloadavg()}; code: {args.code}")
        print(f"{'rows':>10}  " + "  ".join(f"{q + ' MiB':>10} {q + ' s':>8}" for q in queries))
        for rows, res in results.items():
            print(f"{rows:>10,}  " + "  ".join(f"{res[q][0]:>10.0f} {res[q][1]:>8.2f}" for q in queries))
        small, large = min(results), max(results)
        print(f"ratio {large:,} / {small:,} rows: " + ", ".join(
            f"{q} {results[large][q][0] / results[small][q][0]:.2f}x RSS" for q in queries))
    finally:
        stop(moto)


if __name__ == "__main__":
    main()
