"""Start-up and memory of a whole `pipeline run`, as a user starts it (issue 15's targets:
first predictions within 5 s of the command, peak memory of the process tree within 2.5 GB).

Each run is a fresh `pipeline run JOB --force` process with a table of its own; variants
(lists of ``--set`` overrides) are interleaved, so the load of the shared machine falls on
all of them alike. While a run goes, the RSS of its whole process tree (the driver, Ray's
daemons, every Ray worker) is sampled every 0.2 s. Printed per variant, medians over the
repeats: the report's ``startup_seconds`` (run start to the first predictions reaching
the driver), the same counted from the command's launch (the CLI's imports included: the
target's measure), the run's wall, the process wall (imports and Ray's shutdown included) and
the peak RSS, with the tree's RSS per process role at the peak of the median run, and the
CPU seconds each role had used when the median run's first predictions arrived (where the
start-up's CPU went: on a machine with few cores, every process that boots meanwhile
delays them; see :func:`cpu_at_first_predictions`).

    python bench/startup_bench.py jobs/satellite.yaml --repeats 3 \\
        --variant "" --variant "compute.actors=1 compute.cpus_per_actor=2" \
        --variant "tree:/tmp/older-checkout"

A variant holding the word ``join`` joins the local head that `pipeline ray up` keeps
(the bench starts one, in a cache folder of its own, and stops it with `pipeline ray down`;
the job's ``compute.address`` stays null, as a user's runs join it): the start-up a run sees
when Ray is already up. Every other variant is a cold local run (a Ray of its own, started
by the command). Both kinds share one OpenVINO graph cache, filled by one unmeasured run
first. A joined run needs ``compute.gpus_per_actor=0`` where the job asks for GPUs and the
head has none. The first joined run also creates Ray Data's helper actors, which the later
runs find running. The head's processes are not in a run's tree, so their memory is not
counted; while the head is up, its idle daemons share the machine with the other variants.

``demo`` as the job: the bench writes the demo job's workspace itself (2 synthetic scenes
of 2048², an untrained R18 checkpoint; ``jobs/satellite.yaml``'s other settings).

RSS counts pages that processes share once per process, as `ps` does; the peak is a sum
over processes sampled at the same moment. The tree's PSS, read right after the sample that
set the peak, counts each shared page once in all: what the run occupies in RAM.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_bench import peak_memory_until_exit  # noqa: E402
from bench.scratch import scratch_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(job: str, overrides: list[str], table: Path) -> dict:
    """One `pipeline run` in a fresh process -> its summary, process wall and peak RSS.

    An override ``env:NAME=VALUE`` sets an environment variable of the run instead, and
    ``tree:DIR`` runs the code of another checkout (a git worktree of an older commit)."""
    command = [sys.executable, "-m", "pipeline.cli", "run", str(Path(job).resolve()), "--force",
               "--set", f"output.table={table}"]
    env, tree = dict(os.environ), REPO
    for item in overrides:
        if item.startswith("env:"):
            name, _, value = item[4:].partition("=")
            env[name] = value
        elif item.startswith("tree:"):
            tree = Path(item[5:]).resolve()
        else:
            command += ["--set", item]
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=tree)
    trace: list = []
    peak = peak_memory_until_exit(proc, cpu_trace=trace)
    wall = time.time() - started
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode not in (0, 1):
        raise SystemExit(f"pipeline run {' '.join(overrides)} exited with {proc.returncode}")
    summary = json.loads(out[out.index("{"):])
    cpu = cpu_at_first_predictions(trace, summary["wall_seconds"], summary["startup_seconds"])
    return {"startup_seconds": summary["startup_seconds"],
            "command_to_first_predictions_seconds": command_to_first_predictions(summary, started),
            "run_wall_seconds": summary["wall_seconds"],
            "process_wall_seconds": round(wall, 2), "peak_rss_mb": round(peak.rss / 2**20),
            "pss_at_peak_mb": round(peak.pss_at_peak / 2**20),
            "rss_by_role_mb": {k: round(v / 2**20) for k, v in sorted(peak.rss_by_role.items(), key=lambda kv: -kv[1])},
            "cpu_s_by_role_at_first_predictions": {k: round(v, 2)
                                                   for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}}


def median_known(values) -> float | None:
    """The median of the values that are not None; None when none is known."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def command_to_first_predictions(summary: dict, launched: float) -> float | None:
    """Seconds from launching `pipeline run` to its first predictions: the report's
    ``started_at`` (when run_job began, after the CLI's imports) plus ``startup_seconds``,
    less the launch time. None for a checkout whose reports lack ``started_at``."""
    report = json.loads(Path(summary["report_path"]).read_text())
    if not report.get("started_at") or summary["startup_seconds"] is None:
        return None
    began = datetime.datetime.fromisoformat(report["started_at"]).timestamp()
    return round(began + summary["startup_seconds"] - launched, 3)


def cpu_at_first_predictions(trace: list, run_wall: float, startup: float | None) -> dict[str, float]:
    """CPU seconds per role of a run's tree when its first predictions reached the driver,
    from a :func:`peak_memory_until_exit` trace. That moment is placed from the end of the
    predictor actor (the last sample it is in, where the run's stream ended), less the run's
    time after its start-up (``wall_seconds - startup_seconds``): to within a sample and
    the last scene's commit. Empty when no sample saw the predictor."""
    with_predictor = [t for t, roles in trace if any("ChipPredictor" in role for role in roles)]
    if not with_predictor or startup is None:
        return {}
    moment = with_predictor[-1] - (run_wall - startup)
    return min(trace, key=lambda sample: abs(sample[0] - moment))[1]


def pipeline_cli(*args: str, env: dict) -> str:
    """`pipeline ARGS` in this checkout -> its stdout; exits the bench when it fails."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=180)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(args)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def start_head(cache: Path, cpus: int) -> dict:
    """`pipeline ray up` with `cache` as the cache folder (the bench's own head, apart from
    any the user keeps), stopped by `pipeline ray down` when the bench exits -> the
    environment a run needs to join it (that cache folder)."""
    env = dict(os.environ, RETINANET_PIPELINE_CACHE=str(cache))
    print("#", pipeline_cli("ray", "up", "--num-cpus", str(cpus), "--num-gpus", "0", env=env).strip(), flush=True)
    atexit.register(pipeline_cli, "ray", "down", env=env)
    # An outer `timeout` ends the bench with SIGTERM, which skips atexit: exit normally instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return env


def demo_job(root: Path) -> str:
    """The demo job's workspace under `root` -> its job file: 2 synthetic scenes of 2048² and
    an untrained R18 checkpoint, with jobs/satellite.yaml's other settings."""
    import torch
    import yaml

    from pipeline.tools.synth import SYNTH_CLASSES, synthesize
    from retinanet.checkpoint import save_checkpoint
    from retinanet.model import build_model

    synthesize(root / "scenes", scenes=2, size=2048, seed=0)
    torch.manual_seed(0)
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", image_mean=(128.0,) * 3,
                        image_std=(64.0,) * 3)
    save_checkpoint(root / "model.pt", model, list(SYNTH_CLASSES))
    job = yaml.safe_load((REPO / "jobs" / "satellite.yaml").read_text())
    job["inputs"]["paths"] = [str(root / "scenes" / "*.tif")]
    job["model"]["checkpoint"] = str(root / "model.pt")
    (root / "demo.yaml").write_text(yaml.safe_dump(job))
    return str(root / "demo.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="a job file, or demo (the demo job, written by the bench)")
    parser.add_argument("--variant", action="append", default=None,
                        help="space-separated SECTION.KEY=VALUE overrides, env:NAME=VALUE settings, "
                             "tree:DIR (another checkout's code) or join (run on the bench's Ray head); "
                             "'' = the job as it is; repeatable")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="the CPUs of the head `join` joins (pipeline ray up --num-cpus)")
    args = parser.parse_args()
    variants = args.variant or [""]
    root = scratch_dir("startup-bench-")
    job = demo_job(root / "demo") if args.job == "demo" else args.job
    # Cold runs and joined runs each have a cache folder (the head's record is in one), sharing
    # one OpenVINO graph cache, filled by a first run that is not counted.
    caches = {"cold": root / "cache-cold", "join": root / "cache-join"}
    (caches["join"] / "openvino").mkdir(parents=True)
    caches["cold"].mkdir()
    (caches["cold"] / "openvino").symlink_to(caches["join"] / "openvino")
    cold = [f"env:RETINANET_PIPELINE_CACHE={caches['cold']}"]
    one_run(job, cold, root / "table-warm-up")
    join: list[str] = []
    if any("join" in v.split() for v in variants):
        start_head(caches["join"], args.cpus)
        join = [f"env:RETINANET_PIPELINE_CACHE={caches['join']}"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    load_before = os.getloadavg()[0]
    for rep in range(args.repeats):
        for i, variant in enumerate(variants):
            items = variant.split()
            overrides = join + [x for x in items if x != "join"] if "join" in items else cold + items
            result = one_run(job, overrides, root / f"table-{i}-{rep}")
            runs[variant].append(result)
            brief = {k: v for k, v in result.items() if "_by_role" not in k}
            print(f"# {variant or '(job as is)'}: {json.dumps(brief)}", flush=True)
    for variant, results in runs.items():
        by_startup = sorted(results, key=lambda r: r["startup_seconds"])
        median_run = by_startup[len(by_startup) // 2]
        print(json.dumps({
            "variant": variant or "(job as is)",
            "startup_seconds": statistics.median(r["startup_seconds"] for r in results),
            "command_to_first_predictions_seconds": median_known(r["command_to_first_predictions_seconds"]
                                                                 for r in results),
            "run_wall_seconds": statistics.median(r["run_wall_seconds"] for r in results),
            "process_wall_seconds": statistics.median(r["process_wall_seconds"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "pss_at_peak_mb": statistics.median(r["pss_at_peak_mb"] for r in results),
            "rss_by_role_mb (median run)": median_run["rss_by_role_mb"],
            "cpu_s_by_role_at_first_predictions (median run)": median_run["cpu_s_by_role_at_first_predictions"],
        }, indent=1))
    print(f"load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
