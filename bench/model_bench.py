"""Benchmark: our RetinaNet vs torchvision's retinanet_resnet50_fpn on identical weights.

    python bench/model_bench.py                       # 2-core CPU: 8 chips of 512x512
    python bench/model_bench.py --device cuda --batch 32

One torchvision model (ResNet-50 FPN, v1 head, 2 classes) is built as users get it when they
fine-tune from pretrained weights (FrozenBatchNorm2d, last 3 backbone stages trainable);
our model carries the very same state dict through `retinanet.from_torchvision`. The head
weights are given a spread so that scores look trained (thousands of candidates above the
score threshold per chip), which makes both models do real postprocessing work.

References, measured in the same run on the same weights and chips:
  (a) torchvision with its defaults, as users call it: min_size=800, max_size=1333, so it
      upsamples each 512 chip to 800x800 before detecting;
  (b) torchvision with min_size = max_size = chip size (no resize: the same pixels as ours).
Ours runs the chips as they are: fp32 (channels_last) and `Detector(precision="auto")`
(bf16 autocast where the CPU has bf16 matrix units, or on CUDA).

The GPU path (issue 33), printed last, each against the raw forward (the network alone:
backbone, FPN, heads) of the same batch at the Detector's precision and layout:
  network only; postprocess only (the model's decoding, NMS and top-k on head outputs
  recorded once from that very batch); model only (Detector: network + postprocess);
  training (one SGD step of ours, images/s).

    python bench/model_bench.py --device cpu --smoke   # seconds on a CPU: 2 chips of 128², ours only

Eval: chips/s of one batched forward. Train: chips/s of one SGD step (forward with targets,
backward, optimizer step). Every variant is timed round-robin (one run of each per
repetition) so a noisy neighbour slows all of them alike; the figure is the median.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet import Detector, from_torchvision
from retinanet.config import SIZE_DIVISOR
from retinanet.export import DenseRetinaNet

NUM_CLASSES = 2


def torchvision_model(state_dict, chip: int | None, score_thresh: float, trainable_layers: int):
    """retinanet_resnet50_fpn as built for fine-tuning (FrozenBatchNorm2d); chip=None: defaults."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=trainable_layers, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    sizes = {} if chip is None else {"min_size": chip, "max_size": chip}
    model = TorchvisionRetinaNet(backbone, NUM_CLASSES, score_thresh=score_thresh, **sizes)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def spread_head(model, cls_std: float, seed: int) -> None:
    """Give the head a trained-like spread of scores (torchvision's init ties them all)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * cls_std)


def make_batch(batch: int, chip: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, chip, chip, generator=gen)
    targets = []
    for _ in range(batch):
        n = 4
        wh = 24 + torch.rand(n, 2, generator=gen) * (chip / 4)
        xy = torch.rand(n, 2, generator=gen) * (chip - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen)})
    return images, targets


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds)."""
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--score-thresh", type=float, default=0.05)
    parser.add_argument("--head-std", type=float, default=0.013,
                        help="std of the head conv weights (0.013 gives scores spread over ~0.05-0.5)")
    parser.add_argument("--skip", default="", help="comma-separated: eval,train to skip a phase")
    parser.add_argument("--ours-only", action="store_true",
                        help="time ours only (no torchvision references): the GPU path's figures")
    parser.add_argument("--smoke", action="store_true",
                        help="a check that the script runs: 2 chips of 128², one repetition, ours only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.chip, args.reps, args.warmup, args.ours_only = 2, 128, 1, 1, True

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    label_a = f"torchvision (a) defaults, {args.chip}->800"
    label_b = f"torchvision (b) min=max={args.chip}"

    tv_b = torchvision_model(None, args.chip, args.score_thresh, trainable_layers=3)
    spread_head(tv_b, args.head_std, seed=1)
    state = tv_b.state_dict()
    tv_a = torchvision_model(state, None, args.score_thresh, trainable_layers=3)
    # torchvision's postprocessing defaults, spelled out for ours
    same_settings = dict(score_threshold=tv_b.score_thresh, topk_candidates=tv_b.topk_candidates,
                         nms_threshold=tv_b.nms_thresh, detections_per_image=tv_b.detections_per_img)
    ours = from_torchvision(state, NUM_CLASSES, trainable_stages=3, **same_settings)
    images, targets = make_batch(args.batch, args.chip, seed=2)
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    detector_fp32 = Detector(ours, device=str(device), precision="fp32")
    ours_nchw = from_torchvision(state, NUM_CLASSES, trainable_stages=3, **same_settings)
    detector_nchw = Detector(ours_nchw, device=str(device), precision="fp32", channels_last=False)
    detector_auto_model = from_torchvision(state, NUM_CLASSES, trainable_stages=3, **same_settings)
    detector_auto = Detector(detector_auto_model, device=str(device), precision="auto")
    label_network = f"ours network only ({detector_auto.precision}), no postprocess"
    label_post = f"ours postprocess only ({detector_auto.precision})"
    label_model = f"ours Detector(auto={detector_auto.precision})"
    tv_a.to(device).eval()
    tv_b.to(device).eval()
    image_list = list(images)

    with torch.no_grad():
        ref = tv_b(image_list)
        nchw = detector_nchw(images)
        mine = detector_fp32(images)
        features = tv_b.backbone(tv_b.transform(image_list)[0].tensors)
        logits = tv_b.head(list(features.values()))["cls_logits"]
    n_ref = sum(len(d["boxes"]) for d in ref)
    identical = all(len(a["boxes"]) == len(b["boxes"]) and torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
                    and torch.allclose(a["scores"], b["scores"], atol=1e-4) and torch.equal(a["labels"], b["labels"])
                    for a, b in zip(ref, nchw))
    # channels_last convolutions round differently (~1e-6), which reorders scores tied to 1e-6;
    # compare the score at each rank instead
    cl_gap = max((a["scores"] - b["scores"]).abs().max().item() for a, b in zip(ref, mine)
                 if len(a["scores"]) == len(b["scores"]) > 0)
    above = (logits.sigmoid() > args.score_thresh).sum().item() / args.batch
    print(f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, device {device}")
    print(f"batch {args.batch} x {args.chip}x{args.chip}, {NUM_CLASSES} classes, score_thresh {args.score_thresh}: "
          f"{above:.0f} (anchor, class) scores above threshold per chip, {n_ref} detections from tv (b); "
          f"ours NCHW identical to tv (b): {identical}; ours channels_last score-by-rank gap {cl_gap:.1e}; "
          f"ours auto precision = {detector_auto.precision}")

    def timed(fn, label, results):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        results.setdefault(label, []).append((time.perf_counter() - t0, time.process_time() - c0))

    summary = {}
    if "eval" not in skip:
        variants = {} if args.ours_only else {
            label_a: lambda: tv_a(image_list),
            label_b: lambda: tv_b(image_list),
            "ours fp32 (NCHW, no channels_last)": lambda: detector_nchw(images),
            "ours fp32 channels_last": lambda: detector_fp32(images),
        }
        variants[label_model] = lambda: detector_auto(images)
        # The network alone (backbone, FPN, heads; no decoding or NMS) at the Detector's precision
        # and layout: the difference to the line above is what postprocessing costs.
        network = DenseRetinaNet(detector_auto.model)
        images_cl = images.contiguous(memory_format=torch.channels_last)

        def network_only():
            with torch.autocast(device.type, dtype=detector_auto.autocast_dtype or torch.float32,
                                enabled=detector_auto.autocast_dtype is not None):
                return network(images_cl)
        variants[label_network] = network_only
        # Postprocessing alone: the model's own decoding, NMS and top-k on head outputs recorded
        # once from this very batch (so the candidates are the model-only variant's).
        with torch.inference_mode():
            recorded = network_only()
            feature_hws = [tuple(p.shape[-2:]) for p in network.pyramid(images_cl)]
        padded_hw = tuple(-(-side // SIZE_DIVISOR) * SIZE_DIVISOR for side in images.shape[-2:])
        model = detector_auto.model
        anchors = model.anchor_generator(padded_hw, feature_hws, device)
        level_counts = [h * w * model.anchor_generator.num_anchors_per_location for h, w in feature_hws]

        def postprocess_only():
            with torch.autocast(device.type, dtype=detector_auto.autocast_dtype or torch.float32,
                                enabled=detector_auto.autocast_dtype is not None):
                return model.postprocess(*recorded, anchors, level_counts, padded_hw)
        variants[label_post] = postprocess_only
        if detector_auto.autocast_dtype is not None and not args.ours_only:  # torchvision at the same precision
            def tv_b_autocast():
                with torch.autocast(device.type, dtype=detector_auto.autocast_dtype):
                    return tv_b(image_list)
            variants[f"{label_b} + autocast {detector_auto.precision}"] = tv_b_autocast
        times: dict[str, list[tuple[float, float]]] = {}
        with torch.inference_mode():
            for rep in range(args.warmup + args.reps):
                for label, fn in variants.items():
                    timed(fn, label, times if rep >= args.warmup else {})
        summary["eval"] = {k: medians(v) for k, v in times.items()}

    if "train" not in skip:
        ours_train = from_torchvision(state, NUM_CLASSES, trainable_stages=3, **same_settings)
        ours_train.to(device).to(memory_format=torch.channels_last).train()
        images_cl = images.contiguous(memory_format=torch.channels_last)
        models = {} if args.ours_only else {label_a: tv_a, label_b: tv_b}
        models["ours fp32 channels_last"] = ours_train
        optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                      for k, m in models.items()}
        autocast_dtype = detector_auto.autocast_dtype
        if autocast_dtype is not None:
            label_auto = f"ours autocast {detector_auto.precision}"
            models[label_auto] = ours_train
            optimizers[label_auto] = optimizers["ours fp32 channels_last"]

        def step(label):
            model, opt = models[label], optimizers[label]
            model.train()
            if label.startswith("torchvision"):
                losses = model(image_list, targets)
            elif "autocast" in label:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    losses = model(images_cl, targets)
            else:
                losses = model(images_cl, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = {}
        for rep in range(args.warmup + args.reps):
            for label in models:
                timed(lambda: step(label), label, times if rep >= args.warmup else {})
        summary["train"] = {k: medians(v) for k, v in times.items()}

    for phase, rows in summary.items():
        if args.ours_only:
            continue
        a, a_cpu = rows[label_a]
        b, b_cpu = rows[label_b]
        print(f"\n{phase}: median of {args.reps} after {args.warmup} warm-up (wall clock; CPU seconds of this "
              f"process alongside, which a busy neighbour disturbs less)")
        print(f"  {'variant':40s} {'s/batch':>8s} {'chips/s':>8s} {'vs (a)':>7s} {'vs (b)':>7s} "
              f"{'cpu-s':>7s} {'cpu vs (a)':>10s} {'cpu vs (b)':>10s}")
        for label, (t, c) in rows.items():
            print(f"  {label:40s} {t:8.3f} {args.batch / t:8.2f} {a / t:6.2f}x {b / t:6.2f}x "
                  f"{c:7.2f} {a_cpu / c:9.2f}x {b_cpu / c:9.2f}x")

    print_gpu_path(summary, args.batch, label_network, label_post, label_model, label_train(detector_auto))


def label_train(detector: Detector) -> str:
    """The training variant the GPU path reports: autocast where the Detector has it (what
    `pipeline train` runs), else fp32."""
    return f"ours autocast {detector.precision}" if detector.autocast_dtype is not None else "ours fp32 channels_last"


def gpu_path_rows(summary: dict, network: str, post: str, model: str, train: str) -> list[tuple[str, float]]:
    """(what, median seconds per batch) of the GPU path's figures that were timed: network
    only, postprocess only, model only (eval) and a training step (train)."""
    wanted = [("network only (the raw forward)", "eval", network), ("postprocess only", "eval", post),
              ("model only (network + postprocess)", "eval", model), ("training step (images/s)", "train", train)]
    return [(what, summary[phase][label][0]) for what, phase, label in wanted
            if phase in summary and label in summary[phase]]


def print_gpu_path(summary: dict, batch: int, network: str, post: str, model: str, train: str) -> None:
    rows = gpu_path_rows(summary, network, post, model, train)
    if not rows or "eval" not in summary:
        return
    raw = summary["eval"][network][0]
    print(f"\nGPU path (issue 33): each against the raw forward of the same batch of {batch} "
          f"(network only, {raw:.3f} s); ratio = chips/s / raw forward's chips/s")
    print(f"  {'stage':40s} {'s/batch':>8s} {'chips/s':>8s} {'vs raw':>7s}")
    for what, seconds in rows:
        print(f"  {what:40s} {seconds:8.3f} {batch / seconds:8.2f} {raw / seconds:6.2f}x")


if __name__ == "__main__":
    main()
