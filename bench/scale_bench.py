"""Benchmark: how a run's fixed costs grow with the number of scenes.

    python bench/scale_bench.py                   # N = 100 and 1,000 small scenes
    python bench/scale_bench.py --scenes 100 1000 10000

Each N: N synthetic 256² scenes (one chip each) and a model small enough that the model is
not what is measured (ResNet-18 trunk, 16-channel FPN and heads), one `pipeline run` in a
child process on a local Ray (2 CPUs, one predictor actor). Printed per N, and as ratios
between the largest and the smallest N:

- time to the first committed scene (the earliest manifest's ``committed_at`` minus the
  run's start): what a nightly job waits before any result exists;
- the driver's peak RSS (the child process alone, sampled every 0.1 s; Ray's processes
  are not counted);
- per-scene overhead: (wall time - model time) / N, where model time is N chips at the
  rate the same engine runs this model alone in this process.

Targets (scale-out issue): time to first commit and driver RSS <= 1.5x from 100 to 10,000
scenes; per-scene overhead <= 50 ms.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pipeline.config.spec import JobSpec
from pipeline.compute.cluster import connect_ray
from pipeline.run.graph import run_job
root = sys.argv[1]
spec = JobSpec.model_validate(json.loads(sys.argv[2]))
connect_ray(None, num_cpus=2)  # as `pipeline run` starts it
started = time.time()
report = run_job(spec, force=True, log=lambda m: None)
print(json.dumps({{"started": started, "ended": time.time(), "wall": report["wall_seconds"],
                  "scenes": len(report["scenes_ok"]), "chips": report["chips_read"]}}))
"""


def make_model(path: Path) -> None:
    import torch

    from pipeline.tools.synth import SYNTH_CLASSES
    from retinanet import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", fpn_channels=16, head_width=16,
                        head_depth=1, image_mean=(128.0,) * 3, image_std=(64.0,) * 3)
    save_checkpoint(path, model, list(SYNTH_CLASSES))


def model_chips_per_s(checkpoint: Path, chips: int = 40) -> float:
    """The model alone on the engine CPU actors use, one 256² chip per call."""
    import torch

    from pipeline.infer.predictor import resolve_backend
    from retinanet import Detector, load_checkpoint
    from retinanet.openvino_backend import OpenVinoDetector

    if resolve_backend("auto", "cpu") == "openvino":
        detector = OpenVinoDetector(checkpoint, num_threads=1)
    else:
        detector = Detector(load_checkpoint(checkpoint)[0], device="cpu")
    chip = torch.rand(1, 3, 256, 256) * 255
    detector(chip)
    start = time.perf_counter()
    for _ in range(chips):
        detector(chip)
    return chips / (time.perf_counter() - start)


def run_once(root: Path, n: int) -> dict:
    import psutil

    job = {"name": "scale", "inputs": {"paths": [str(root / f"s{n}" / "*.tif")], "bands": [1, 2, 3]},
           "tiling": {"chip_size": 256, "overlap": 0, "min_valid_fraction": 0.0},
           "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.5},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 1},
           "output": {"table": str(root / f"t{n}"), "crs": None}}
    code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"run of {n} scenes failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    manifests = [json.loads(p.read_text()) for p in (root / f"t{n}" / "_manifests").glob("*.json")]
    snapshots = [json.loads(p.read_text()) for p in (root / f"t{n}" / "_snapshots").glob("*.json")]
    committed = [m["committed_at"] for m in manifests] + [e["committed_at"] for s in snapshots for e in s["entries"]]
    first = min(dt.datetime.fromisoformat(c).timestamp() for c in committed)
    # times from the call of run_job (its imports included) to its return
    return {"first_commit_s": first - result["started"], "driver_peak_mb": peak / 2**20,
            "wall_s": result["ended"] - result["started"],
            "scenes": result["scenes"], "chips": result["chips"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    from pipeline.tools.synth import synthesize

    root = scratch_dir("scale-bench-")
    make_model(root / "model.pt")
    rate = model_chips_per_s(root / "model.pt")
    rows = {}
    for n in args.scenes:
        synthesize(root / f"s{n}", scenes=n, size=256, seed=n)
        r = run_once(root, n)
        r["overhead_ms"] = 1000 * (r["wall_s"] - r["chips"] / rate) / n
        rows[n] = r
    print(f"load average {open('/proc/loadavg').read().split()[:3]}; model alone {rate:.1f} chips/s (256², one actor)")
    print(f"{'scenes':>7}{'first commit':>14}{'driver peak':>13}{'wall':>9}{'overhead/scene':>16}")
    for n, r in rows.items():
        print(f"{n:>7}{r['first_commit_s']:>13.1f}s{r['driver_peak_mb']:>10.0f} MB{r['wall_s']:>8.1f}s"
              f"{r['overhead_ms']:>13.1f} ms")
    small, large = rows[min(rows)], rows[max(rows)]
    print(f"ratio {max(rows)} / {min(rows)}: first commit {large['first_commit_s'] / small['first_commit_s']:.2f}x, "
          f"driver peak {large['driver_peak_mb'] / small['driver_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
