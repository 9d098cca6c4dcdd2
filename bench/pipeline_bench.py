"""End-to-end `pipeline run` throughput vs the raw model forward, and memory vs scene size.

    python bench/pipeline_bench.py [--size 8192] [--backbone resnet18] [--repeats 3] [--memory]

1. Throughput: chips/s of run_job (read -> predictor actor -> merge -> GeoParquet commit)
   on a synthetic scene, against the model's own forward over the same number of chips of
   the same size and batch in this process (same checkpoint, precision and threads; the
   reference is timed after a warm-up forward). Target >= 0.9 on a 2-core machine.
   Also printed: the last run's stage seconds and bottleneck (the run report's), the
   start-up (time until the first predictions reach the driver: actor
   process, imports, model load, first batch), which is paid once per run whatever its
   size, and the steady ratio after it.
2. Memory: peak RSS of the whole process tree (driver + Ray workers) for a 4096^2 and a
   16384^2 scene; target ratio <= 1.2 (memory flat in scene size).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402


def make_checkpoint(path: Path, backbone: str) -> None:
    import torch

    from pipeline.tools.synth import SYNTH_CLASSES
    from retinanet import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone=backbone, head_width=64, head_depth=2,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3)
    save_checkpoint(path, model, list(SYNTH_CLASSES))


def job(root: Path, scenes: str, table: str, batch: int, actors: int, threads: int, backend: str = "auto",
        gpus_per_actor: float = 0):
    from pipeline.config.spec import JobSpec

    return JobSpec.model_validate({
        "name": "bench", "inputs": {"paths": [scenes], "bands": [1, 2, 3]},
        "tiling": {"chip_size": 512, "overlap": 64, "min_valid_fraction": 0.0},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": batch,
                  "backend": backend},
        "compute": {"actors": actors, "gpus_per_actor": gpus_per_actor, "cpus_per_actor": threads},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    })


def raw_forward_chips_per_s(root: Path, n_chips: int, batch: int, threads: int, backend: str = "auto") -> float:
    """The model alone on the engine the pipeline's actors use (same backend rule)."""
    import torch

    from pipeline.infer.predictor import resolve_backend
    from pipeline.run.graph import MIN_READ_BATCH
    from retinanet import Detector, load_checkpoint
    from retinanet.openvino_backend import OpenVinoDetector
    from retinanet.runtime import fold_batch_norm

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if resolve_backend(backend, device) == "openvino":
        # as its actors run it: a run of chips per call, forward passes of `batch` on its streams
        ov = OpenVinoDetector(root / "model.pt", num_threads=threads)
        run = max(batch, MIN_READ_BATCH)
        forward, per_call = (lambda images: ov.detect(images.numpy(), chips_per_request=batch)), run
    else:
        forward, per_call = Detector(fold_batch_norm(load_checkpoint(root / "model.pt")[0]), device=device,
                                     precision="auto"), batch
    images = torch.rand(per_call, 3, 512, 512) * 255
    forward(images)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n_chips:
        forward(images)
        done += per_call
    return done / (time.perf_counter() - start)


def throughput(args) -> dict:
    from pipeline.compute.cluster import connect_ray
    from pipeline.run.graph import run_job, transport_batch
    from pipeline.tools.synth import synthesize

    root = scratch_dir("pipeline-bench-")
    synthesize(root / "scenes", scenes=1, size=args.size, seed=0)
    make_checkpoint(root / "model.pt", args.backbone)
    ray = connect_ray(None)  # as `pipeline run` starts it
    pipe, steady, startup, raw = [], [], [], []
    for r in range(args.repeats):
        report = run_job(job(root, str(root / "scenes" / "*.tif"), f"t{r}", args.batch, 1, args.threads, args.backend,
                                 args.gpus_per_actor),
                         force=True, log=lambda m: None)
        chips = report["chips_read"]
        pipe.append(chips / report["wall_seconds"])
        startup.append(report["startup_seconds"])
        # after the first output arrived (one predictor call: a run of transport_batch chips):
        # what a long nightly run sees once the actors are up
        first = transport_batch(args.batch, chips, 1, 1 if args.gpus_per_actor else args.threads)
        steady.append((chips - first) / (report["wall_seconds"] - report["startup_seconds"]))
        raw.append(raw_forward_chips_per_s(root, chips, args.batch, args.threads, args.backend))
    ray.shutdown()
    p, s, m = statistics.median(pipe), statistics.median(steady), statistics.median(raw)
    return {"chips": chips, "pipeline_chips_per_s": round(p, 3), "raw_forward_chips_per_s": round(m, 3),
            "ratio": round(p / m, 3), "startup_seconds": round(statistics.median(startup), 2),
            "steady_chips_per_s": round(s, 3), "steady_ratio": round(s / m, 3),
            # the last run's report: seconds per stage, how busy each pool was, which stage the others waited on
            "last_run_stages": report["stages"], "last_run_bottleneck": report["bottleneck"]}


def process_role(proc, root_pid: int) -> str:
    """What a process of a run's tree is: the driver, a Ray daemon or a Ray worker by its title."""
    if proc.pid == root_pid:
        return "driver (pipeline run)"
    cmdline = " ".join(proc.cmdline())
    for daemon in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env", "monitor.py"):
        if daemon in cmdline:
            return f"ray daemon: {daemon}"
    title = proc.name() if proc.name().startswith("ray::") else cmdline.split(" ")[0]
    return title.split(".")[0] if title.startswith("ray::") else title


def tree_processes(pid: int) -> list:
    """A process and all its descendants (psutil handles; empty once it has exited)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> dict[str, int]:
    """RSS of a process and all its descendants, summed per role (see process_role)."""
    import psutil

    roles: dict[str, int] = {}
    for p in tree_processes(pid):
        try:
            role = process_role(p, pid)
            roles[role] = roles.get(role, 0) + p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return roles


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) that a process and its live descendants have used so far,
    summed per role (see process_role); a process that has exited no longer counts."""
    import psutil

    roles: dict[str, float] = {}
    for p in tree_processes(pid):
        try:
            role, times = process_role(p, pid), p.cpu_times()
            roles[role] = roles.get(role, 0.0) + times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return roles


def tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants: each page shared by n processes counts 1/n
    in each, so the sum is what the tree occupies in RAM (an RSS sum counts a shared page,
    a library every Ray worker maps, once per process). Milliseconds per process to read."""
    import psutil

    total = 0
    for p in tree_processes(pid):
        try:
            total += p.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class PeakMemory:
    """A process tree's peak RSS (summed over processes sampled at one moment), the RSS per
    role at that moment, and the tree's PSS read right after that sample."""

    rss: int = 0
    rss_by_role: dict = field(default_factory=dict)
    pss_at_peak: int = 0


def peak_memory_until_exit(proc: subprocess.Popen, every_s: float = 0.2, cpu_trace: list | None = None) -> PeakMemory:
    """Sample the RSS of proc's process tree until it exits -> its peak (see PeakMemory).
    PSS is read only when the RSS reaches a new peak: reading it costs the measured run
    ~50 ms of CPU per sample of a Ray tree, too much to take five times a second.
    With a `cpu_trace` list, each sample also appends (seconds since sampling began,
    :func:`tree_cpu`)."""
    peak = PeakMemory()
    began = time.time()
    while proc.poll() is None:
        roles = tree_rss(proc.pid)
        if sum(roles.values()) > peak.rss:
            peak = PeakMemory(sum(roles.values()), roles, tree_pss(proc.pid))
        if cpu_trace is not None:
            cpu_trace.append((time.time() - began, tree_cpu(proc.pid)))
        time.sleep(every_s)
    return peak


def peak_memory_of_run(size: int, backbone: str) -> PeakMemory:
    """Run one scene of size^2 in a child process; sample its process tree's memory."""
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from pipeline.tools.synth import synthesize
from pipeline.compute.cluster import connect_ray
from pipeline.run.graph import run_job
import bench.pipeline_bench as b
root = Path(sys.argv[1])
ray = connect_ray(None, num_cpus=2)
run_job(b.job(root, str(root / "s{size}" / "*.tif"), "m{size}", 4, 1, 2), force=True, log=lambda m: None)
ray.shutdown()
"""
    root = Path(tempfile.mkdtemp(prefix="pipeline-mem-"))
    from pipeline.tools.synth import synthesize

    synthesize(root / f"s{size}", scenes=1, size=size, seed=1)
    make_checkpoint(root / "model.pt", backbone)
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)])
    try:
        peak = peak_memory_until_exit(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a scene, a checkpoint and a table per call
    if proc.returncode:
        raise SystemExit(f"memory run for {size}^2 failed with exit code {proc.returncode}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also run the 4k^2 vs 16k^2 memory comparison")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "onnx"])
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args()
    result = {"throughput": throughput(args)}
    print(json.dumps(result, indent=2), flush=True)
    if args.memory:
        small, large = peak_memory_of_run(4096, args.backbone), peak_memory_of_run(16384, args.backbone)
        result["memory"] = {"peak_rss_4096_mb": round(small.rss / 2**20), "peak_rss_16384_mb": round(large.rss / 2**20),
                            "ratio": round(large.rss / small.rss, 3),
                            "pss_at_peak_4096_mb": round(small.pss_at_peak / 2**20),
                            "pss_at_peak_16384_mb": round(large.pss_at_peak / 2**20),
                            "at_peak_4096_mb": {r: round(b / 2**20) for r, b in sorted(small.rss_by_role.items())}}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
