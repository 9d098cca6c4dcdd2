"""Benchmark: inference engines for CPU actors, on the same weights and chips.

    python bench/engine_bench.py                 # R50-FPN, 3 classes, 512² chips, 2 threads
    python bench/engine_bench.py --reps 15 --backbone resnet18

Variants, each one chip per call over all the threads (OpenVINO with ``streams=1``, its
latency hint: one chip on parallel streams would run on one stream's threads), timed round-robin (one call
of each per repetition, so a noisy neighbour slows all alike); figures are medians:

- torch bf16:         `Detector(precision="auto")` on the model as loaded (the old default);
- torch bf16 folded:  the same after `fold_batch_norm` (the torch path now);
- openvino auto:      `OpenVinoDetector(precision="auto")` (bf16 AMX kernels where present);
- openvino f32:       OpenVINO forced to f32;
- openvino int8:      the graph quantised by NNCF (`OpenVinoDetector.quantize`), calibrated on
                      8 chips like the timed ones (speed only: accuracy needs labelled data,
                      see pipeline.infer.int8 and BENCHMARKS.md).

Streams: OpenVINO runs a CPU actor's calls (runs of `--run` chips) as one infer request per
chip on parallel streams (its throughput hint); timed here against the same runs as one
request at a time over all the threads (its latency hint, what the actors did before), both
at precision auto, interleaved.

Also: postprocessing alone (dense outputs in, detections out) per chip, numpy (OpenVINO
actors) and torch, and how many of torch
fp32's top boxes each variant keeps (IoU > 0.9). Ratios are against torch bf16 in the same
process. The head gets a seeded spread so postprocessing sees realistic candidate counts.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from torchvision.ops import box_iou

from retinanet import Detector, build_model, save_checkpoint
from retinanet.config import logit_bound
from retinanet.export import detect_with_dense, skeleton_model
from retinanet.numpy_postprocess import Geometry, Nms, postprocess
from retinanet.openvino_backend import OpenVinoDetector
from retinanet.runtime import fold_batch_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--run", type=int, default=8, help="chips per call in the streams comparison")
    parser.add_argument("--cls-bias", type=float, default=1.6,
                        help="added to the class logits' bias: how many candidates pass the score threshold")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone=args.backbone, image_mean=(120.0,) * 3, image_std=(60.0,) * 3).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.cls_head.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.cls_head.predictor.bias += args.cls_bias  # some candidates above the 0.05 threshold
    chips = [torch.rand(1, 3, args.chip, args.chip, generator=gen) * 255 for _ in range(args.reps)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "m.pt")
        save_checkpoint(checkpoint, model, ["a", "b", "c"])
        started = time.perf_counter()
        ov_auto = OpenVinoDetector(checkpoint, precision="auto", num_threads=args.threads, cache_dir=tmp, streams=1)
        ov_auto.prepare((args.chip, args.chip))
        convert_s = time.perf_counter() - started
        started = time.perf_counter()
        ov_f32 = OpenVinoDetector(checkpoint, precision="fp32", num_threads=args.threads, cache_dir=tmp, streams=1)
        ov_f32.prepare((args.chip, args.chip))
        cached_s = time.perf_counter() - started
        started = time.perf_counter()
        ov_f32.quantize((args.chip, args.chip), torch.cat(chips[:8]).numpy(), "bench")
        quantize_s = time.perf_counter() - started
        ov_int8 = OpenVinoDetector(checkpoint, precision="int8", num_threads=args.threads, cache_dir=tmp,
                                   int8_key="bench", streams=1)
        variants = {
            "torch bf16": Detector(copy.deepcopy(model), device="cpu", precision="auto"),
            "torch bf16 folded": Detector(fold_batch_norm(model), device="cpu", precision="auto"),
            "openvino auto": ov_auto,
            "openvino f32": ov_f32,
            "openvino int8": ov_int8,
        }
        reference = Detector(copy.deepcopy(model), device="cpu", precision="fp32")
        times = {name: [] for name in variants}
        kept = {name: [] for name in variants}
        for name, detector in variants.items():  # warm-up
            detector(chips[0])
        for chip in chips:
            expected = reference(chip)[0]["boxes"][:100]
            for name, detector in variants.items():
                t = time.perf_counter()
                got = detector(chip)[0]
                times[name].append(time.perf_counter() - t)
                if len(expected) and len(got["boxes"]):
                    kept[name].append(float((box_iou(expected, got["boxes"]).max(dim=1).values > 0.9).float().mean()))
        # postprocessing alone: the dense outputs of one chip, through the numpy postprocessing
        # the OpenVINO actors run and through the torch model's (GPU actors, ONNX)
        hw = (args.chip, args.chip)
        geometry, nms = Geometry.load(ov_f32.geometry_path(hw)), Nms()
        skeleton, anchors_cache = skeleton_model(model.config), {}
        post, post_torch, candidates = [], [], []
        for chip in [chips[0], *chips]:  # the first is a warm-up (anchors, kernels)
            cls_logits, box_deltas = (a.copy() for a in ov_f32.dense(chip.numpy()))
            t = time.perf_counter()
            postprocess(cls_logits, box_deltas, geometry, ov_f32.config, nms)
            post.append(time.perf_counter() - t)
            dense = (torch.from_numpy(cls_logits), torch.from_numpy(box_deltas))
            t = time.perf_counter()
            detect_with_dense(skeleton, chip, lambda _, d=dense: d, anchors_cache, "bench")
            post_torch.append(time.perf_counter() - t)
            candidates.append(int((cls_logits > logit_bound(ov_f32.config.score_threshold)).sum()))
        post, post_torch, candidates = post[1:], post_torch[1:], candidates[1:]
        streams = time_streams(checkpoint, tmp, args, torch.cat(chips[:args.run]).numpy())
    base = statistics.median(times["torch bf16"])
    print(f"load average {open('/proc/loadavg').read().split()[:3]}; {args.backbone}, {args.chip}² chips, "
          f"{args.threads} threads, {args.reps} reps; openvino convert+compile {convert_s:.1f} s, "
          f"from cache {cached_s:.2f} s, int8 quantisation {quantize_s:.1f} s; openvino auto runs {ov_auto.precision}")
    print(f"{'variant':<20}{'s/chip':>9}{'vs torch bf16':>15}{'top boxes kept':>16}")
    for name in variants:
        median = statistics.median(times[name])
        print(f"{name:<20}{median:>9.3f}{base / median:>14.2f}x{statistics.mean(kept[name] or [0]):>15.1%}")
    post_s = statistics.median(post)
    print(f"postprocessing alone ({statistics.median(candidates)} scores above the threshold per chip): "
          f"numpy + OpenVINO NMS {post_s * 1000:.1f} ms/chip = "
          f"{post_s / statistics.median(times['openvino auto']):.0%} of an openvino auto chip; "
          f"torch {statistics.median(post_torch) * 1000:.1f} ms/chip")
    one, parallel = (statistics.median(streams[name]) for name in ("one request", "streams"))
    print(f"runs of {args.run} chips per call, openvino auto: one request at a time over {args.threads} threads "
          f"{one:.3f} s/chip, {streams['count']} parallel streams {parallel:.3f} s/chip: {one / parallel:.2f}x")


def time_streams(checkpoint: str, cache: str, args, run) -> dict:
    """Seconds per chip of runs of chips, one request at a time vs on parallel streams
    (round-robin, one warm-up each); asserts both give the same detections."""
    variants = {name: OpenVinoDetector(checkpoint, num_threads=args.threads, cache_dir=cache, streams=streams)
                for name, streams in (("one request", 1), ("streams", None))}
    first = {name: detector.detect(run) for name, detector in variants.items()}
    for a, b in zip(first["one request"], first["streams"]):
        assert len(a["scores"]) == len(b["scores"]), "streams changed the detections"
    times: dict = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, detector in variants.items():
            t = time.perf_counter()
            detector.detect(run)
            times[name].append((time.perf_counter() - t) / len(run))
    return {**times, "count": variants["streams"].streams}


if __name__ == "__main__":
    main()
