"""Postprocessing a batch runs ONE class-aware NMS, whatever the box count (issue 33, item 1).

torchvision's batched_nms switches to one NMS call per group above 4,000 (CPU) / 100,000
(CUDA) coordinates; a batch of 64 two-class chips then costs 128 synchronising calls. Oracle:
torchvision.ops.nms applied group by group in plain Python, and torchvision.ops.batched_nms
per image (the path the model used before).
"""
import pytest
import torch
import torchvision.ops
from torchvision.ops import batched_nms, nms

import retinanet.boxes as box_ops
from retinanet import build_model


def random_boxes(n, groups, seed=0, extent=512.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * extent
    wh = 4 + torch.rand(n, 2, generator=gen) * 60
    boxes = torch.cat([xy, (xy + wh).clamp(max=extent)], dim=1)
    # quantised scores give exact ties across groups too
    scores = torch.randint(0, 1000, (n,), generator=gen).float() / 1000 + 0.0005
    return boxes, scores, torch.randint(0, groups, (n,), generator=gen)


def per_group_oracle(boxes, scores, groups, iou):
    kept = []
    for g in groups.unique().tolist():
        index = (groups == g).nonzero().flatten()
        kept.append(index[nms(boxes[index], scores[index], iou)])
    return torch.cat(kept) if kept else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("n,groups", [(0, 1), (7, 3), (3000, 16), (20000, 128)])
def test_grouped_nms_keeps_what_per_group_nms_keeps(n, groups):
    boxes, scores, group = random_boxes(n, groups, seed=n)
    kept = box_ops.grouped_nms(boxes, scores, group, 0.5)
    assert sorted(kept.tolist()) == sorted(per_group_oracle(boxes, scores, group, 0.5).tolist())
    # by decreasing score, as batched_nms returns them
    assert torch.all(scores[kept][:-1] >= scores[kept][1:])


def test_grouped_nms_is_exact_for_far_groups():
    """Two boxes at IoU just above the threshold, in group 10,000: float32 offsets of that
    size would round their coordinates (1/128 px at 65,536) and could flip the decision."""
    a = torch.tensor([[100.25, 100.25, 200.5, 200.5], [100.25, 110.0, 200.5, 210.5]])
    iou = float(torchvision.ops.box_iou(a[:1], a[1:]))
    scores = torch.tensor([0.9, 0.8])
    for threshold in (iou - 1e-6, iou + 1e-6):
        expected = nms(a, scores, threshold).tolist()
        assert box_ops.grouped_nms(a, scores, torch.tensor([10_000, 10_000]), threshold).tolist() == expected


def busy_model():
    """Random weights with class logits biased up: thousands of candidates per chip."""
    torch.manual_seed(0)
    model = build_model(num_classes=2, backbone="resnet18", fpn_channels=32, head_width=32, head_depth=1,
                        image_mean=(0.5,) * 3, image_std=(0.25,) * 3, score_threshold=0.05,
                        detections_per_image=300, topk_candidates=1000).eval()
    with torch.no_grad():
        # sigmoid(-1) = 0.27 > 0.05: every anchor is a candidate; spread weights make scores distinct
        model.cls_head.predictor.bias.fill_(-1.0)
        model.cls_head.predictor.weight.normal_(0, 0.05)
    return model


def test_a_batch_of_busy_chips_runs_one_nms_and_matches_per_image_batched_nms(monkeypatch):
    model = busy_model()
    images = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    calls, seen = [], {}

    def counting_nms(boxes, scores, iou_threshold):
        calls.append(len(boxes))
        return nms(boxes, scores, iou_threshold)

    postprocess = model.postprocess

    def recording_postprocess(*args):
        seen["args"] = args
        return postprocess(*args)

    monkeypatch.setattr(box_ops, "nms", counting_nms)
    monkeypatch.setattr(model, "postprocess", recording_postprocess)
    with torch.no_grad():
        detections = model(images)
    assert len(calls) == 1, f"{len(calls)} NMS calls for one batch"
    assert calls[0] * 4 > 4000  # well above torchvision's switch to one call per group on the CPU

    # The path before: torchvision's batched_nms on each image's candidates.
    cfg = model.config
    cls_logits, box_deltas, anchors, level_counts, hw = seen["args"]
    for i, det in enumerate(detections):
        _, anchor_index, labels, scores = model._candidates(cls_logits[i:i + 1], level_counts)
        boxes = torchvision.ops.clip_boxes_to_image(
            box_ops.decode(box_deltas[i][anchor_index], anchors[anchor_index]), hw)
        keep = batched_nms(boxes, scores, labels, cfg.nms_threshold)[:cfg.detections_per_image]
        assert len(det["boxes"]) == len(keep) > 100
        torch.testing.assert_close(det["scores"], scores[keep], rtol=0, atol=0)
        assert sorted(map(tuple, det["boxes"].tolist())) == sorted(map(tuple, boxes[keep].tolist()))
        assert det["labels"].bincount(minlength=2).tolist() == labels[keep].bincount(minlength=2).tolist()
