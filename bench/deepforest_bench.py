"""DeepForest's ``predict_tile`` vs our ``pipeline run``: same raster, same weights, fresh processes.

    python3 -m venv /tmp/dfenv && /tmp/dfenv/bin/pip install deepforest==2.1.0 'torchvision>=0.29'
    .venv/bin/python bench/deepforest_bench.py [--repeats 3] [--size 2048] \
        [--deepforest-python /tmp/dfenv/bin/python]

DeepForest (2.x) lives in its own venv; this script runs it there in a child process
(this same file with ``--deepforest-child``), so nothing of DeepForest is imported here.

Weights: one torchvision ``retinanet_resnet50_fpn`` with one class ("Tree", as DeepForest's
tree model), ``weights=None, weights_backbone=None`` (nothing can be downloaded here), random
init with the head convs spread and the class bias shifted so that scores look trained
(about a hundred boxes per 400-px patch, scores 0.1-0.3). It is saved once as a DeepForest
Lightning checkpoint (``model.*`` keys, ``label_dict``, nms 0.05 / score 0.1 in
``hyper_parameters``). Ours: ``pipeline import`` of that file. DeepForest: its own
``main.deepforest`` built from config (``model.name: null``, label_dict {"Tree": 0}), then
``load_state_dict`` of the checkpoint's ``state_dict``, as Lightning's load_from_checkpoint does.

Building DeepForest's model offline: with ``model.name: null`` DeepForest's
``models/retinanet.py`` ``Model.create_model`` builds ``RetinaNetHub(backbone_weights="COCO_V1")``
and ``RetinaNetHub.__init__`` calls ``torchvision.models.detection.retinanet_resnet50_fpn(
weights=backbone_weights)``, whose ``weights_backbone`` defaults to ImageNet: both download,
and no config value avoids it. So while DeepForest builds its model the child swaps that one
torchvision builder for one that passes ``weights=None, weights_backbone=None``; everything
else (RetinaNetHub, thresholds from config, labels, trainer, predict_tile) is DeepForest's.

Settings, both sides: the synthetic ``size``^2 RGB uint8 GeoTIFF of ``pipeline.tools.synth``
(256-px tiles, zstd); 400-px patches overlapping by 20 px (DeepForest's ``predict_tile``
defaults: patch_size 400, patch_overlap 0.05, mosaic NMS iou_threshold 0.15, dataloader
"single", config batch_size 1); patches resized to 800 by torchvision's transform (DeepForest
runs torchvision's; our import carries the rule); score >= 0.1, within-patch NMS 0.05;
2 threads (DeepForest: OMP/MKL_NUM_THREADS=2 + torch.set_num_threads(2); ours: one actor
with compute.cpus_per_actor 2). Ours otherwise at the job defaults (backend auto, precision
auto), tiling {chip_size: 400, overlap: 20}, seam merge NMS at IoU 0.15 (DeepForest's
mosaic threshold).

Measured, one run of each per repetition, interleaved, median of ``--repeats``:
(a) wall time of a fresh process as a user sees it: DeepForest: interpreter start,
    ``import deepforest``, model build, weight load, ``predict_tile``; ours: a fresh
    ``pipeline run JOB --force`` CLI process (Ray start, actor start, commit included);
(b) prediction alone: DeepForest's ``predict_tile`` call; ours the run report's
    ``wall_seconds`` (run_job from start to commit), with its ``startup_seconds`` (until
    the first predictions reach the driver);
(c) peak RSS of the process tree (psutil, every 0.2 s; Ray's daemons and workers included);
(d) agreement: the share of DeepForest's boxes matched by one of ours at IoU >= 0.5, and
    vice versa; also on the boxes inside a single DeepForest patch (no overlap strip).
One untimed warm-up of each comes first (page cache; our per-node OpenVINO graph cache).
Two untimed runs of ours at precision fp32 then separate the causes of disagreement: one
on the same file, one on a strip-organised copy of it (same pixels) on which our chip grid
is DeepForest's (on the tiled file ours aligns chip offsets to the 256-px tiles).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEEPFOREST_PYTHON = "/tmp/dfenv/bin/python"
# DeepForest 2.x: config.yaml (score_thresh, nms_thresh) and predict_tile's defaults.
SCORE_THRESHOLD, NMS_THRESHOLD = 0.1, 0.05
PATCH_SIZE, PATCH_OVERLAP, MOSAIC_IOU = 400, 0.05, 0.15
MATCH_IOU = 0.5
MIB = 2 ** 20


# ------------------------------------------------------------------ DeepForest side (child)


def deepforest_child(checkpoint: str, scene: str, out: str, threads: int) -> None:
    """In DeepForest's venv: build, load, predict_tile. Boxes -> out.npy; timings, settings
    and DeepForest's own patch windows -> out.json."""
    started = time.perf_counter()
    from unittest import mock

    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(threads)
    from deepforest import main as df_main
    from deepforest.preprocess import compute_windows

    imported = time.perf_counter()
    real_builder = torchvision.models.detection.retinanet_resnet50_fpn

    def weight_free(*args, weights=None, weights_backbone=None, **kwargs):
        return real_builder(*args, weights=None, weights_backbone=None, **kwargs)

    config = {"model": {"name": None}, "label_dict": {"Tree": 0}, "num_classes": 1,
              "score_thresh": SCORE_THRESHOLD, "nms_thresh": NMS_THRESHOLD, "log_root": str(Path(out).parent)}
    with mock.patch("torchvision.models.detection.retinanet_resnet50_fpn", weight_free):
        model = df_main.deepforest(config_args=config)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    built = time.perf_counter()
    result = model.predict_tile(path=scene, patch_size=PATCH_SIZE, patch_overlap=PATCH_OVERLAP,
                                iou_threshold=MOSAIC_IOU)
    predicted = time.perf_counter()

    boxes = np.zeros((0, 5)) if result is None else result[["xmin", "ymin", "xmax", "ymax", "score"]].to_numpy(float)
    np.save(out + ".npy", boxes)
    from PIL import Image

    width, height = Image.open(scene).size
    windows = compute_windows(np.broadcast_to(np.uint8(0), (3, height, width)), PATCH_SIZE, PATCH_OVERLAP)
    Path(out + ".json").write_text(json.dumps({
        "import_s": imported - started, "build_load_s": built - imported, "predict_s": predicted - built,
        "detections": len(boxes), "windows": [[int(v) for v in w.getRect()] for w in windows],
        "deepforest": __import__("deepforest").__version__, "torch": torch.__version__,
        "model": type(model.model).__name__, "score_thresh": model.model.score_thresh,
        "nms_thresh": model.model.nms_thresh, "min_size": list(model.model.transform.min_size),
        "max_size": model.model.transform.max_size}))


# ------------------------------------------------------------------ setup (this venv)


def check_deepforest_python(python: str) -> str:
    """DeepForest's version in that interpreter, or exit saying what is missing."""
    if not Path(python).is_file():
        raise SystemExit(f"DeepForest's python not found: {python} (pass --deepforest-python PATH, the python "
                         "of a venv with deepforest installed)")
    probe = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('deepforest'))"],
                           capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"{python} has no deepforest:\n{probe.stderr.strip()[-2000:]}")
    return probe.stdout.strip()


def deepforest_layout_checkpoint(path: Path, head_std: float, cls_bias: float) -> None:
    """One set of weights, saved as DeepForest's Lightning module saves its checkpoint."""
    import torch
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * head_std)
        model.head.classification_head.cls_logits.bias += cls_bias
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "label_dict": {"Tree": 0},
                "hyper_parameters": {"label_dict": {"Tree": 0}, "num_classes": 1,
                                     "config": {"nms_thresh": NMS_THRESHOLD, "score_thresh": SCORE_THRESHOLD,
                                                "batch_size": 1}}}, path)


def pipeline_cli() -> str:
    return str(Path(sys.executable).with_name("pipeline"))


def import_checkpoint(source: Path, out: Path) -> None:
    done = subprocess.run([pipeline_cli(), "import", str(source), "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pipeline import failed:\n{done.stdout}{done.stderr}")


def write_job(root: Path, scene: Path, threads: int) -> Path:
    import yaml

    job = {"name": "deepforest-bench", "inputs": {"paths": [str(scene)], "bands": [1, 2, 3]},
           "tiling": {"chip_size": PATCH_SIZE, "overlap": int(PATCH_SIZE * PATCH_OVERLAP), "min_valid_fraction": 0.0},
           "model": {"checkpoint": str(root / "trees.pt"), "score_threshold": None, "nms_threshold": None},
           "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": threads},
           "merge": {"method": "nms", "iou_threshold": MOSAIC_IOU},
           "output": {"table": str(root / "table"), "crs": "EPSG:4326"}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def strip_organised_copy(scene: Path, out_dir: Path) -> Path:
    """Same pixels and georeferencing, one row per strip: no tiles for our grid to align to."""
    import rasterio

    out_dir.mkdir(exist_ok=True)
    with rasterio.open(scene) as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("blockxsize", "blockysize", "tiled")}
        with rasterio.open(out_dir / scene.name, "w", **{**profile, "tiled": False, "blockysize": 1}) as dst:
            dst.write(src.read())
    return out_dir / scene.name


def our_windows(scene: Path, size: int) -> list[list[int]]:
    """Our chip windows on this file, as [x, y, w, h] (DeepForest's getRect order)."""
    import rasterio

    from pipeline.chips.tiling import chip_grid

    with rasterio.open(scene) as src:
        grid = chip_grid(size, size, PATCH_SIZE, int(PATCH_SIZE * PATCH_OVERLAP), src.block_shapes[0])
    return sorted([c.col_off, c.row_off, c.width, c.height] for c in grid)


# ------------------------------------------------------------------ runs


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd to completion: wall seconds, peak RSS of its process tree (and per role at the
    peak, roles as bench/pipeline_bench.py names them), stdout."""
    from bench.pipeline_bench import peak_memory_until_exit

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        peak = peak_memory_until_exit(proc)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss": peak.rss, "pss_at_peak": peak.pss_at_peak, "at_peak": peak.rss_by_role,
            "stdout": stdout}


def run_deepforest(python: str, checkpoint: Path, scene: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [python, str(Path(__file__).resolve()), "--deepforest-child", str(checkpoint), str(scene), str(out),
           "--threads", str(threads)]
    measured = run_measured(cmd, env=env, cwd=out.parent)
    return {**measured, **json.loads(Path(str(out) + ".json").read_text()), "out": out}


def run_ours(job: Path, table: Path, precision: str = "auto", scene: Path | None = None) -> dict:
    cmd = [pipeline_cli(), "run", str(job), "--force", "--set", f"output.table={table}",
           "--set", f"model.precision={precision}"]
    if scene is not None:
        cmd += ["--set", f"inputs.paths=[{scene}]"]
    measured = run_measured(cmd)
    stdout = measured["stdout"]
    summary = json.loads(stdout[stdout.index("{"):])
    return {**measured, "predict_s": summary["wall_seconds"], "startup_s": summary["startup_seconds"],
            "detections": summary["detections"], "chips": summary["chips_read"], "table": table}


# ------------------------------------------------------------------ agreement


def our_boxes(table: Path):
    import numpy as np

    from pipeline.table.state import read_committed

    t = read_committed(table, columns=["px_xmin", "px_ymin", "px_xmax", "px_ymax"])
    return np.stack([t[c].to_numpy() for c in t.column_names], axis=1).astype(float)


def in_one_window(boxes, windows):
    """(N,) bool: the box meets exactly one of the windows ([x, y, w, h]): no overlap strip."""
    import numpy as np

    w = np.asarray(windows, float)
    x1, y1, x2, y2 = w[:, 0], w[:, 1], w[:, 0] + w[:, 2], w[:, 1] + w[:, 3]
    meets = ((boxes[:, None, 2] > x1) & (boxes[:, None, 0] < x2) & (boxes[:, None, 3] > y1)
             & (boxes[:, None, 1] < y2))
    return meets.sum(axis=1) == 1


def agreement(df_run: dict, table: Path) -> dict:
    """Shares matched at IoU >= MATCH_IOU, both ways, over all boxes and over the boxes inside
    a single DeepForest patch; and DeepForest's zero-area boxes (we drop those)."""
    import numpy as np

    from pipeline.eval.metrics import pairwise_iou_np

    theirs, ours = np.load(str(df_run["out"]) + ".npy")[:, :4], our_boxes(table)
    iou = pairwise_iou_np(theirs, ours) if len(theirs) and len(ours) else np.zeros((len(theirs), len(ours)))
    df_hit, our_hit = iou.max(axis=1, initial=0) >= MATCH_IOU, iou.max(axis=0, initial=0) >= MATCH_IOU
    df_in, our_in = in_one_window(theirs, df_run["windows"]), in_one_window(ours, df_run["windows"])

    def share(hit, mask) -> tuple[float, int]:
        return float(hit[mask].mean()) if mask.any() else float("nan"), int(mask.sum())

    return {"df": share(df_hit, np.ones(len(theirs), bool)), "ours": share(our_hit, np.ones(len(ours), bool)),
            "df_in": share(df_hit, df_in), "ours_in": share(our_hit, our_in),
            "df_zero_area": int(((theirs[:, 2] <= theirs[:, 0]) | (theirs[:, 3] <= theirs[:, 1])).sum())}


def agreement_line(label: str, a: dict) -> str:
    def pct(pair) -> str:
        return f"{pair[0]:.1%} of {pair[1]}"

    return (f"| {label} | {pct(a['df'])} | {pct(a['ours'])} | {pct(a['df_in'])} | {pct(a['ours_in'])} |")


# ------------------------------------------------------------------ report


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def timing_table(df_runs: list[dict], our_runs: list[dict]) -> str:
    df_version = df_runs[0]["deepforest"]
    rows = [
        "| | wall, fresh process (s) | prediction alone (s) | start-up (s) | peak RSS (MiB) | PSS at that peak (MiB)"
        " | detections |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| DeepForest {df_version} predict_tile | {median(df_runs, 'wall_s'):.1f} | {median(df_runs, 'predict_s'):.1f}"
        f" | import {median(df_runs, 'import_s'):.1f} + build/load {median(df_runs, 'build_load_s'):.1f}"
        f" | {median(df_runs, 'peak_rss') / MIB:.0f} | {median(df_runs, 'pss_at_peak') / MIB:.0f}"
        f" | {df_runs[-1]['detections']} |",
        f"| ours, pipeline run | {median(our_runs, 'wall_s'):.1f} | {median(our_runs, 'predict_s'):.1f}"
        f" | {median(our_runs, 'startup_s'):.1f} (startup_seconds) | {median(our_runs, 'peak_rss') / MIB:.0f}"
        f" | {median(our_runs, 'pss_at_peak') / MIB:.0f} | {our_runs[-1]['detections']} |",
    ]
    ratio = statistics.median(d["wall_s"] / o["wall_s"] for d, o in zip(df_runs, our_runs))
    rows += ["", "Per run, wall s (DeepForest / ours): "
             + "; ".join(f"{d['wall_s']:.1f} / {o['wall_s']:.1f}" for d, o in zip(df_runs, our_runs))
             + f". DeepForest / ours, median of the per-round ratios: {ratio:.2f}x.",
             "Ours at its peak RSS (last run), MiB: "
             + ", ".join(f"{role} {b / MIB:.0f}" for role, b in sorted(our_runs[-1]["at_peak"].items(),
                                                                   key=lambda kv: -kv[1]))]
    return "\n".join(rows)


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deepforest-python", default=DEFAULT_DEEPFOREST_PYTHON)
    parser.add_argument("--head-std", type=float, default=0.013, help="std of the head conv weights")
    parser.add_argument("--cls-bias", type=float, default=2.6,
                        help="added to the class logit bias (2.6: ~110 boxes per 400-px patch, scores 0.1-0.26)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the two untimed fp32 runs of ours")
    parser.add_argument("--deepforest-child", nargs=3, metavar=("CKPT", "SCENE", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.deepforest_child:  # in DeepForest's venv: nothing of this project is imported
        return deepforest_child(*args.deepforest_child, threads=args.threads)
    df_version = check_deepforest_python(args.deepforest_python)
    sys.path.insert(0, str(REPO))
    from bench.scratch import scratch_dir
    from pipeline.tools.synth import synthesize

    root = scratch_dir("deepforest-bench-")
    scene = synthesize(root / "scenes", scenes=1, size=args.size, seed=0)[0]
    deepforest_layout_checkpoint(root / "deepforest.ckpt", args.head_std, args.cls_bias)
    import_checkpoint(root / "deepforest.ckpt", root / "trees.pt")
    job = write_job(root, scene, args.threads)
    print(f"work folder {root}; DeepForest {df_version} at {args.deepforest_python}", flush=True)

    def deepforest(name: str) -> dict:
        return run_deepforest(args.deepforest_python, root / "deepforest.ckpt", scene, root / name, args.threads)

    if not args.no_warmup:
        w_df, w_ours = deepforest("df_warmup"), run_ours(job, root / "table_warmup")
        print(f"  warm-up (untimed): DeepForest {w_df['wall_s']:.1f} s, ours {w_ours['wall_s']:.1f} s", flush=True)
    load_before = os.getloadavg()
    df_runs, our_runs = [], []
    for r in range(args.repeats):
        df_runs.append(deepforest(f"df{r}"))
        our_runs.append(run_ours(job, root / f"table{r}"))
        print(f"  rep {r}: DeepForest {df_runs[-1]['wall_s']:.1f} s ({df_runs[-1]['detections']} boxes), "
              f"ours {our_runs[-1]['wall_s']:.1f} s ({our_runs[-1]['detections']} boxes)", flush=True)
    load_after = os.getloadavg()

    df_last = df_runs[-1]
    print("\n" + timing_table(df_runs, our_runs))
    print(f"\nDeepForest: {df_last['model']} (torch {df_last['torch']}), score_thresh {df_last['score_thresh']}, "
          f"nms_thresh {df_last['nms_thresh']}, resize min_size {df_last['min_size']} max_size {df_last['max_size']}, "
          f"{len(df_last['windows'])} patches; ours: {our_runs[-1]['chips']} chips.")
    print(f"Load average (1, 5, 15 min): before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} cores.")

    rows = [agreement_line("ours at the defaults (timed runs)", agreement(df_last, our_runs[-1]["table"]))]
    if not args.no_diagnosis:
        fp32 = run_ours(job, root / "table_fp32", precision="fp32")
        rows.append(agreement_line(f"ours fp32 ({fp32['detections']} boxes)", agreement(df_last, fp32["table"])))
        striped = strip_organised_copy(scene, root / "striped")
        same_grid = our_windows(striped, args.size) == sorted(df_last["windows"])
        fp32_grid = run_ours(job, root / "table_fp32_grid", precision="fp32", scene=striped)
        rows.append(agreement_line(f"ours fp32, strip-organised copy, grid {'=' if same_grid else '!='} DeepForest's "
                                   f"({fp32_grid['detections']} boxes)", agreement(df_last, fp32_grid["table"])))
    print(f"\nAgreement at IoU >= {MATCH_IOU} (DeepForest's {df_last['detections']} boxes include "
          f"{agreement(df_last, our_runs[-1]['table'])['df_zero_area']} of zero area; 'inside one patch': boxes "
          "that meet a single DeepForest patch):\n")
    print("| ours | DeepForest's matched | ours matched | DF's inside one patch matched "
          "| ours inside one patch matched |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
