"""Side by side on one raster and one set of weights: `pipeline run` vs SAHI vs a plain loop.

    .venv/bin/pip install sahi --target /tmp/sahi-pkgs     # SAHI lives outside the venv
    .venv/bin/python bench/peer_bench.py [--size 2048] [--repeats 3] [--write bench/RESULTS_peer.md]

Weights: one torchvision ``RetinaNet`` (ResNet-50 FPN v1 head, FrozenBatchNorm2d, 3 classes,
no pretrained weights available offline: random init with the head spread so scores look
trained). Our checkpoint carries the very same state dict through
``retinanet.from_torchvision`` (mean/std scaled by 255: the pipeline feeds raw 0-255 pixels,
torchvision and SAHI feed [0, 1], so the normalised inputs are equal).

Contenders, each on a synthetic ``size``^2 RGB GeoTIFF (pipeline.tools.synth), 512-px chips
overlapping by 64 px, score threshold 0.25, torch on ``--threads`` threads:

(a) SAHI ``get_sliced_prediction`` with ``AutoDetectionModel(model_type="torchvision")``:
    the whole raster read into memory (rasterio), slices predicted one after another
    (SAHI's default batch 1), merged with SAHI's default GREEDYNMM / IOS 0.5 postprocess.
    ``perform_standard_pred=False`` (SAHI's default True would add a whole-image pass
    that the others do not do) and torchvision's ``min_size = max_size = chip`` (its
    default 800 would upsample every 512 chip 2.4x in pixels): both settings favour SAHI.
(b) Plain loop: read the whole raster, run torchvision on each chip, shift boxes to scene
    pixels, one global class-aware NMS at the end (what most user scripts do).
(c) Ours: ``run_job`` (windowed reads in Ray tasks -> predictor actor -> seam merge ->
    GeoParquet commit) at the defaults (``model.backend: auto``: OpenVINO on a CPU actor,
    bf16 kernels where the CPU has AMX/AVX512-BF16; the node's converted graph is made
    once, untimed), with backend torch (bf16 autocast, batch norm folded), with torch
    fp32 for honesty, and with ``model.backend: onnx`` (onnxruntime, fp32; the export is
    made once, untimed).
    Our wall time includes the actor start-up and checkpoint load, and the commit;
    ``ray.init`` is excluded, as is building the model for (a) and (b).

Variants run round-robin (one of each per repetition) so that a noisy neighbour slows
them alike; the figure is the median wall time. Ratios are reference / ours (> 1: ours
is faster). A sanity check runs our checkpoint and the torchvision model on one chip:
same detections, so every variant runs the same network.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402

SCORE_THRESHOLD = 0.25  # with --head-std 0.016: a few dozen detections per synthetic chip
NMS_IOU = 0.5
FP32 = "ours, pipeline run (fp32)"


def torchvision_retinanet(num_classes: int, chip: int, state_dict=None):
    """torchvision's retinanet_resnet50_fpn as built for fine-tuning, run without resizing."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes, min_size=chip, max_size=chip, score_thresh=SCORE_THRESHOLD,
                      nms_thresh=NMS_IOU)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def trained_looking_weights(num_classes: int, chip: int, head_std: float, seed: int) -> dict:
    """A random-init state dict whose head convs have a spread, so scores range ~0.05-0.6."""
    torch.manual_seed(seed)
    model = torchvision_retinanet(num_classes, chip)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * head_std)
    return model.state_dict()


def write_checkpoint(state_dict: dict, class_names: list[str], path: Path) -> None:
    """Our checkpoint from the torchvision weights, normalising raw 0-255 pixels."""
    from retinanet import from_torchvision, save_checkpoint
    from retinanet.config import IMAGENET_MEAN, IMAGENET_STD

    model = from_torchvision(state_dict, len(class_names), image_mean=tuple(255 * m for m in IMAGENET_MEAN),
                             image_std=tuple(255 * s for s in IMAGENET_STD), score_threshold=SCORE_THRESHOLD,
                             nms_threshold=NMS_IOU)
    save_checkpoint(path, model, class_names)


def read_whole(path: Path) -> np.ndarray:
    """The whole raster in memory as (H, W, 3) uint8, as SAHI and user scripts hold it."""
    import rasterio

    with rasterio.open(path) as src:
        return np.ascontiguousarray(src.read([1, 2, 3]).transpose(1, 2, 0))


def chip_starts(length: int, chip: int, overlap: int) -> list[int]:
    """Offsets of a plain sliding window: every stride, the last one moved back to the edge."""
    stride = chip - overlap
    starts = list(range(0, max(length - chip, 0) + 1, stride))
    if starts[-1] + chip < length:
        starts.append(length - chip)
    return starts


def plain_loop(path: Path, model, chip: int, overlap: int) -> torch.Tensor:
    """(b): whole raster, chip by chip through torchvision, one global NMS.

    Returns the kept detections (N, 5): x1, y1, x2, y2 scene pixels, label."""
    from torchvision.ops import batched_nms

    image = torch.from_numpy(read_whole(path)).permute(2, 0, 1).float().div_(255)
    _, height, width = image.shape
    boxes, scores, labels = [], [], []
    with torch.inference_mode():
        for y in chip_starts(height, chip, overlap):
            for x in chip_starts(width, chip, overlap):
                out = model([image[:, y:y + chip, x:x + chip]])[0]
                boxes.append(out["boxes"] + torch.tensor([x, y, x, y], dtype=torch.float32))
                scores.append(out["scores"])
                labels.append(out["labels"])
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes, scores, labels, NMS_IOU)
    return torch.cat([boxes[keep], labels[keep, None].float()], dim=1)


def sahi_model(model, class_names: list[str], sahi_path: str):
    """SAHI's wrapper around our torchvision model (SAHI imported from its own directory)."""
    if sahi_path not in sys.path:
        sys.path.append(sahi_path)  # appended: the venv's own packages win where both exist
    try:
        from sahi import AutoDetectionModel
    except ImportError as err:
        raise SystemExit(f"SAHI not found ({err}); install it with: .venv/bin/pip install sahi --target {sahi_path}")
    return AutoDetectionModel.from_pretrained(model_type="torchvision", model=model, device="cpu",
                                              confidence_threshold=SCORE_THRESHOLD,
                                              category_mapping={str(i): n for i, n in enumerate(class_names)})


def sahi_run(path: Path, detection_model, chip: int, overlap: int) -> int:
    """(a): SAHI sliced prediction over the raster held in memory. Returns detections; the
    last run's boxes and labels are kept in LAST["sahi"] for the agreement check."""
    from sahi.predict import get_sliced_prediction

    result = get_sliced_prediction(read_whole(path), detection_model, slice_height=chip, slice_width=chip,
                                   overlap_height_ratio=overlap / chip, overlap_width_ratio=overlap / chip,
                                   perform_standard_pred=False, verbose=0)
    found = result.object_prediction_list
    LAST["sahi"] = (np.array([p.bbox.to_xyxy() for p in found], dtype=np.float32).reshape(-1, 4),
                    np.array([p.category.id for p in found], dtype=np.int64))
    return len(found)


# variant -> (boxes (N, 4) XYXY scene pixels, labels) of its last run
LAST: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def table_detections(table: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (scene pixels) and label ids of a committed table, read with DuckDB."""
    import duckdb

    rows = duckdb.sql(f"SELECT px_xmin, px_ymin, px_xmax, px_ymax, label FROM read_parquet('{table}/date=*/*.parquet')"
                      ).fetchall()
    boxes = np.array([r[:4] for r in rows], dtype=np.float32).reshape(-1, 4)
    return boxes, np.array([class_names.index(r[4]) for r in rows], dtype=np.int64)


def solo_corner(scene: Path, chip: int, overlap: int) -> int:
    """Side of the scene's top-left square that only the first chip covers, in SAHI's grid
    (steps of chip - overlap) and in ours (offsets aligned to the file's blocks)."""
    import rasterio

    from pipeline.chips.tiling import chip_grid

    with rasterio.open(scene) as src:
        ours = chip_grid(src.width, src.height, chip, overlap, block_shape=src.block_shapes[0])
    second = min(min(w.col_off for w in ours if w.col_off), min(w.row_off for w in ours if w.row_off))
    return min(chip - overlap, second)


def inside(boxes: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (and their labels) that lie wholly in the scene's [0, size)² corner."""
    keep = (boxes[:, 2] <= size) & (boxes[:, 3] <= size)
    return boxes[keep], labels[keep]


def matched_fraction(boxes: np.ndarray, labels: np.ndarray, other_boxes: np.ndarray, other_labels: np.ndarray,
                     iou: float = 0.5) -> float:
    """Share of ``boxes`` that a box of ``other`` with the same label overlaps at IoU >= iou."""
    from torchvision.ops import box_iou

    if not len(boxes):
        return float("nan")
    overlaps = box_iou(torch.from_numpy(boxes), torch.from_numpy(other_boxes)).numpy()
    overlaps[labels[:, None] != other_labels[None, :]] = 0
    return float((overlaps.max(axis=1, initial=0) >= iou).mean())


def paired_ratio(reference: list[float], ours_times: list[float]) -> float:
    """Median over rounds of reference[r] / ours[r]. Example: [60, 80], [20, 20] -> 3.5."""
    return statistics.median(t / o for t, o in zip(reference, ours_times))


def job_spec(root: Path, table: str, chip: int, overlap: int, precision: str, threads: int, batch: int | None,
             backend: str = "auto"):
    from pipeline.config.spec import JobSpec

    return JobSpec.model_validate({
        "name": "peer", "inputs": {"paths": [str(root / "scenes" / "*.tif")], "bands": [1, 2, 3]},
        "tiling": {"chip_size": chip, "overlap": overlap, "min_valid_fraction": 0.0},
        "model": {"checkpoint": str(root / "model.pt"), "score_threshold": SCORE_THRESHOLD, "batch_size": batch,
                  "precision": precision, "backend": backend},
        "compute": {"actors": 1, "gpus_per_actor": 0, "cpus_per_actor": threads},
        "output": {"table": str(root / table), "crs": "EPSG:4326"},
    })


def ours(root: Path, table: str, chip: int, overlap: int, precision: str, threads: int, batch: int | None,
         backend: str = "auto") -> int:
    """(c): `pipeline run` through run_job into root/table. Returns committed detections."""
    from pipeline.run.graph import run_job

    report = run_job(job_spec(root, table, chip, overlap, precision, threads, batch, backend), force=True,
                     log=lambda m: None)
    if report["exit_code"] != 0:
        raise SystemExit(f"pipeline run failed: {report}")
    STARTUP.setdefault((precision, backend), []).append(report["startup_seconds"])
    return report["detections"]


# (precision, backend) -> seconds until our first predictions arrived, per run
STARTUP: dict[tuple[str, str], list[float]] = {}


def same_model_check(scene: Path, tv_model, checkpoint: Path, chip: int) -> tuple[int, float]:
    """Our checkpoint and the torchvision model on the scene's first chip: (detections,
    max |box difference| in pixels), or raise if the label sets differ. Our model gets raw
    0-255 pixels, torchvision [0, 1], as in the runs."""
    from retinanet import load_checkpoint

    pixels = torch.from_numpy(read_whole(scene)[:chip, :chip]).permute(2, 0, 1).float()
    ours_model, _ = load_checkpoint(checkpoint)
    with torch.inference_mode():
        theirs = tv_model([pixels / 255])[0]
        mine = ours_model(pixels[None])[0]
    if len(mine["boxes"]) != len(theirs["boxes"]) or not torch.equal(mine["labels"], theirs["labels"]):
        raise SystemExit(f"weights conversion broken: {len(mine['boxes'])} vs {len(theirs['boxes'])} detections")
    diff = float((mine["boxes"] - theirs["boxes"]).abs().max()) if len(mine["boxes"]) else 0.0
    return len(mine["boxes"]), diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None,
                        help="our model.batch_size (default null: the job's own choice, 1 chip on CPU)")
    parser.add_argument("--head-std", type=float, default=0.016,
                        help="std of the head conv weights (scores are very sensitive to it: 0.015 gives almost "
                             "none above the threshold, 0.018 hundreds per chip)")
    parser.add_argument("--sahi-path", default="/tmp/sahi-pkgs")
    parser.add_argument("--skip", default="", help="comma-separated: sahi,plain,torch,fp32,onnx to leave out")
    parser.add_argument("--write", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    skip = set(filter(None, args.skip.split(",")))

    from pipeline.compute.cluster import connect_ray
    from pipeline.tools.synth import SYNTH_CLASSES, synthesize
    from retinanet.runtime import resolve_device, resolve_precision

    torch.set_num_threads(args.threads)
    root = scratch_dir("peer-bench-")
    scene = synthesize(root / "scenes", scenes=1, size=args.size, seed=0)[0]
    names = list(SYNTH_CLASSES)
    state = trained_looking_weights(len(names), args.chip, args.head_std, seed=1)
    write_checkpoint(state, names, root / "model.pt")
    tv = torchvision_retinanet(len(names), args.chip, state)
    same_n, same_diff = same_model_check(scene, tv, root / "model.pt", args.chip)
    auto_dtype = resolve_precision("auto", resolve_device("cpu"))
    auto = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[auto_dtype]
    ray = connect_ray(None, num_cpus=args.threads)  # a local Ray of our own, as `pipeline run` starts it

    # Every variant: repetition index -> detections; tables of ours are root/<precision><rep>.
    variants = {}
    if "plain" not in skip:
        variants["plain loop + global NMS"] = lambda r: len(plain_loop(scene, tv, args.chip, args.overlap))
    if "sahi" not in skip:
        sahi = sahi_model(tv, names, args.sahi_path)
        import sahi as sahi_pkg
        variants[f"SAHI {sahi_pkg.__version__} get_sliced_prediction"] = lambda r: sahi_run(scene, sahi, args.chip,
                                                                                           args.overlap)
    from pipeline.infer.predictor import resolve_backend
    from retinanet.openvino_backend import OpenVinoDetector

    engine = resolve_backend("auto", "cpu")
    if engine == "openvino":  # the node's converted graph, made once outside the timing (as the ONNX export)
        OpenVinoDetector(root / "model.pt").prepare((args.chip, args.chip))
    auto_label = f"ours, pipeline run (defaults: backend {engine}, precision auto)"
    variants[auto_label] = lambda r: ours(root, f"auto{r}", args.chip, args.overlap, "auto", args.threads, args.batch)
    if "torch" not in skip:
        variants[f"ours, pipeline run (backend torch, auto = {auto})"] = lambda r: ours(
            root, f"torch{r}", args.chip, args.overlap, "auto", args.threads, args.batch, backend="torch")
    if "fp32" not in skip:
        variants[FP32] = lambda r: ours(root, f"fp32{r}", args.chip, args.overlap, "fp32", args.threads, args.batch,
                                        backend="torch")
    if "onnx" not in skip:
        from retinanet.export import export_checkpoint

        export_checkpoint(root / "model.pt")  # the sidecar model.pt.onnx, made once outside the timing
        variants["ours, pipeline run (backend onnx, onnxruntime CPU fp32)"] = lambda r: ours(
            root, f"onnx{r}", args.chip, args.overlap, "fp32", args.threads, args.batch, backend="onnx")

    times: dict[str, list[float]] = {k: [] for k in variants}
    load_before = os.getloadavg()[0]
    counts: dict[str, int] = {}
    for r in range(args.repeats):
        for label, fn in variants.items():
            start = time.perf_counter()
            counts[label] = fn(r)
            times[label].append(time.perf_counter() - start)
            print(f"  rep {r}: {label}: {times[label][-1]:.2f} s, {counts[label]} detections", flush=True)
    ray.shutdown()
    load_after = os.getloadavg()[0]

    from pipeline.chips.tiling import chip_grid

    chips = len(chip_grid(args.size, args.size, args.chip, args.overlap))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ours_auto = medians[auto_label]
    ours_fp32 = medians.get(FP32)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; scene {args.size}x{args.size} RGB uint8, {chips} chips of {args.chip} px "
        f"(overlap {args.overlap}), score >= {SCORE_THRESHOLD}; median of {args.repeats} runs; 1-min load "
        f"average {load_before:.1f} before, {load_after:.1f} after (other work on the machine inflates every "
        "variant; the round-robin order spreads it).",
        "",
        "| variant | median s | chips/s | detections | ref / ours(auto) | same, per round | ref / ours(fp32) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in medians.items():
        ratio_auto = f"{t / ours_auto:.2f}x"
        paired = f"{paired_ratio(times[label], times[auto_label]):.2f}x"
        ratio_fp32 = f"{t / ours_fp32:.2f}x" if ours_fp32 else "-"
        lines.append(f"| {label} | {t:.2f} | {chips / t:.2f} | {counts[label]} | {ratio_auto} | {paired} "
                     f"| {ratio_fp32} |")
    lines += ["", "Start-up of ours (run start until the first predictions reach the driver: actor process, "
                  "imports, checkpoint load, first batch), median s: "
                  + ", ".join(f"{precision}/{backend} {statistics.median(v):.1f}" for (precision, backend), v
                              in STARTUP.items()) + "."]
    if "sahi" in LAST:
        theirs, core = LAST["sahi"], solo_corner(scene, args.chip, args.overlap)
        theirs_core = inside(*theirs, core)
        lines += ["", f"Agreement with SAHI at IoU >= 0.5, same class, last run of each (SAHI: {len(theirs[0])} boxes; "
                      f"{len(theirs_core[0])} inside the first chip's {core}-px corner, which both grids predict "
                      "from the same chip; elsewhere the grids differ, see below, and a box depends on the chip it "
                      "was predicted in):"]
        for table in ("auto", "fp32", "torch", "onnx"):  # our variants that ran, by table name
            if (root / f"{table}{args.repeats - 1}").is_dir():
                mine = table_detections(root / f"{table}{args.repeats - 1}", names)
                mine_core = inside(*mine, core)
                lines.append(f"- ours ({table}): {matched_fraction(*theirs, *mine):.1%} of SAHI's boxes matched by "
                             f"ours and {matched_fraction(*mine, *theirs):.1%} of our {len(mine[0])} by SAHI's; in "
                             f"the corner {matched_fraction(*theirs_core, *mine_core):.1%} and "
                             f"{matched_fraction(*mine_core, *theirs_core):.1%} of our {len(mine_core[0])}.")
    lines += ["", "ref / ours: ratio of the medians. Same, per round: median over rounds of the ratio within "
                  "a round (neighbours in time share the load of the moment, so this one drifts less when "
                  "other work comes and goes)."]
    lines += ["", f"Same weights: on the scene's first chip our checkpoint (fp32) and the torchvision model "
                  f"give the same {same_n} detections, boxes within {same_diff:.1e} px. Detection counts differ "
                  "between variants because the chip grids differ (ours aligns chip offsets to the file's "
                  "256-px blocks where that is free, SAHI and the plain loop step by 448 px) and so do the "
                  "merges (ours: seam NMS; SAHI: GREEDYNMM on IOS; plain: one global NMS)."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.write:
        Path(args.write).write_text(text + "\n")


if __name__ == "__main__":
    main()
