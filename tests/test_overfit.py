"""A tiny RetinaNet learns two synthetic images by heart: AP50 = 1.0 (pycocotools) in bounded steps."""
import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet import build_model

SIZE = 128
MAX_STEPS = 100
EVAL_EVERY = 10
# class 0: reddish rectangles, class 1: greenish ones, on a dark background
COLOURS = {0: (1.0, 0.2, 0.2), 1: (0.2, 1.0, 0.2)}


def synthetic_pair():
    boxes = [torch.tensor([[10.0, 12.0, 50.0, 44.0], [70.0, 60.0, 118.0, 110.0]]),
             torch.tensor([[20.0, 70.0, 60.0, 120.0], [64.0, 8.0, 120.0, 40.0], [30.0, 20.0, 60.0, 50.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([1, 0, 0])]
    images = torch.full((2, 3, SIZE, SIZE), 0.1)
    for i in range(2):
        for box, label in zip(boxes[i], labels[i]):
            x1, y1, x2, y2 = box.int().tolist()
            images[i, :, y1:y2, x1:x2] = torch.tensor(COLOURS[int(label)])[:, None, None]
    return images, [{"boxes": b, "labels": label} for b, label in zip(boxes, labels)]


def coco_ap50(detections, targets):
    """AP at IoU 0.5 over both classes, as pycocotools computes it (COCO boxes are x, y, w, h)."""
    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    images, annotations, results = [], [], []
    for i, (det, tgt) in enumerate(zip(detections, targets), start=1):
        images.append({"id": i, "width": SIZE, "height": SIZE})
        for box, label in zip(tgt["boxes"].tolist(), tgt["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label + 1,
                                "bbox": xywh(box), "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": i, "category_id": label + 1, "bbox": xywh(box), "score": score})
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])


def test_coco_ap50_helper_on_perfect_and_wrong_detections():
    _, targets = synthetic_pair()
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in targets]
    assert coco_ap50(perfect, targets) == 1.0
    swapped = [{**d, "labels": 1 - d["labels"]} for d in perfect]
    assert coco_ap50(swapped, targets) == 0.0


@pytest.mark.slow  # training: up to 100 steps
def test_tiny_model_overfits_two_images():
    torch.manual_seed(0)
    # trainable BatchNorm: a randomly initialised trunk with frozen statistics trains far slower
    model = build_model(num_classes=2, backbone="resnet18", head_width=64, head_depth=2, fpn_channels=64,
                        frozen_bn=False)
    images, targets = synthetic_pair()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        start_ap = coco_ap50(model(images), targets)
    assert start_ap < 0.5
    history = []
    for step in range(1, MAX_STEPS + 1):
        model.train()
        losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                ap = coco_ap50(model(images), targets)
            if ap == 1.0:
                break
    assert ap == 1.0, f"AP50 {ap:.3f} after {MAX_STEPS} steps (losses {history[::10]})"
    assert history[-1] < 0.5 * history[0]
