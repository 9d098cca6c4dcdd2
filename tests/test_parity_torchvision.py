"""Same weights, same chips: our detections equal torchvision's retinanet_resnet50_fpn (and _v2).

torchvision's default head init gives every anchor nearly the same score, and float noise then
reorders the ties; the head weights get a spread first so that hundreds of distinct scores are
compared. torchvision is told not to resize (min_size = max_size = chip size) and to keep 300
detections; ours keeps 300 too.
"""
import re

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from retinanet import from_torchvision

NUM_CLASSES = 3
DETECTIONS = 300


def spread(tv_model, std, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tv_model.head.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return tv_model


@pytest.fixture(scope="module")
def v1_pair():
    torch.manual_seed(0)
    # std 0.013: top scores ~0.1-0.5 (0.01 leaves nothing above 0.05, 0.02 saturates at 1.0,
    # because v1's FPN features from a randomly initialised ResNet are large)
    tv = spread(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                       min_size=512, max_size=512, detections_per_img=DETECTIONS), 0.013, 1).eval()
    ours = from_torchvision(tv.state_dict(), NUM_CLASSES, detections_per_image=DETECTIONS)
    return tv, ours


@pytest.fixture(scope="module")
def v2_pair():
    torch.manual_seed(0)
    tv = spread(retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                          min_size=512, max_size=512, detections_per_img=DETECTIONS), 0.05, 2).eval()
    ours = from_torchvision(tv.state_dict(), NUM_CLASSES, v2=True, detections_per_image=DETECTIONS)
    return tv, ours


def assert_same_detections(tv, ours, images, min_boxes, every_class=True):
    with torch.no_grad():
        expected = tv(list(images))
        got = ours(images)
    compared = 0
    for e, g in zip(expected, got):
        assert len(g["boxes"]) == len(e["boxes"])
        # distinct scores: otherwise the comparison below would depend on how ties fall
        assert e["scores"].unique().numel() == len(e["scores"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])
        compared += len(e["boxes"])
    assert compared >= min_boxes
    assert not every_class or len(set(torch.cat([e["labels"] for e in expected]).tolist())) == NUM_CLASSES


@pytest.mark.slow  # full-size ResNet-50 RetinaNets on 512+ px chips
def test_v1_parity_512(v1_pair):
    tv, ours = v1_pair
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(10))
    assert_same_detections(tv, ours, images, min_boxes=2 * DETECTIONS)


@pytest.mark.slow  # full-size ResNet-50 RetinaNets on 512+ px chips
def test_v2_parity_512(v2_pair):
    tv, ours = v2_pair
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(11))
    assert_same_detections(tv, ours, images, min_boxes=2 * DETECTIONS)


@pytest.mark.slow  # full-size ResNet-50 RetinaNets on 512+ px chips
def test_v1_parity_chip_not_divisible_by_32(v1_pair):
    tv, ours = v1_pair
    # torchvision pads 400 to 416 (size_divisible=32) with zeros after normalising; so do we
    tv.transform.min_size, tv.transform.max_size = (400,), 400
    try:
        images = torch.rand(2, 3, 400, 400, generator=torch.Generator().manual_seed(12))
        assert_same_detections(tv, ours, images, min_boxes=2 * DETECTIONS)
    finally:
        tv.transform.min_size, tv.transform.max_size = (512,), 512


def to_pre_013_layout(state_dict):
    """torchvision < 0.13 key names: plain Conv2d in the FPN blocks, conv/ReLU pairs in the heads."""
    old = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        head = re.match(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.0\.(weight|bias)$", key)
        if head:
            key = f"{head.group(1)}.{2 * int(head.group(2))}.{head.group(3)}"
        old[key] = value
    return old


def test_pre_013_key_layout_loads(v1_pair):
    tv, ours = v1_pair
    old = to_pre_013_layout(tv.state_dict())
    # the shape of the old layout, as torchvision 0.12 saved it
    assert "head.classification_head.conv.0.weight" in old and "head.classification_head.conv.2.weight" in old
    assert "head.regression_head.conv.6.bias" in old and "backbone.fpn.inner_blocks.0.weight" in old
    assert "backbone.fpn.layer_blocks.2.bias" in old
    assert not any(".conv.1." in k or ".conv.0.0." in k for k in old)
    converted = from_torchvision(old, NUM_CLASSES, detections_per_image=DETECTIONS)
    reference = ours.state_dict()
    loaded = converted.state_dict()
    assert loaded.keys() == reference.keys()
    for key in reference:
        assert torch.equal(loaded[key], reference[key]), key


def test_state_dict_that_does_not_fit_is_refused(v1_pair, v2_pair):
    tv1, _ = v1_pair
    tv2, _ = v2_pair
    state = tv1.state_dict()
    head_less = {k: v for k, v in state.items() if not k.startswith("head.regression_head")}
    with pytest.raises(ValueError, match=r"does not fit retinanet_resnet50_fpn with 3 classes: missing \['box_head"):
        from_torchvision(head_less, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"(?s)does not fit retinanet_resnet50_fpn with 5 classes"
                                         r".*size mismatch for cls_head\.predictor"):
        from_torchvision(state, 5)
    # v2 weights (GroupNorm heads, P6 from C5) into the v1 layout
    with pytest.raises(ValueError, match=r"does not fit retinanet_resnet50_fpn with 3 classes"):
        from_torchvision(tv2.state_dict(), NUM_CLASSES)


@pytest.mark.slow  # full-size ResNet-50 RetinaNets on 512+ px chips
def test_default_settings_are_torchvisions_on_a_busy_chip():
    """No overrides: from_torchvision keeps what torchvision keeps (score 0.05, NMS 0.5, top-1000
    candidates per level, 300 detections). Class logits biased up give thousands of candidates
    over the threshold, so a cap of 100 would drop two thirds of torchvision's detections."""
    torch.manual_seed(0)
    tv = spread(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                       min_size=512, max_size=512), 0.013, 3).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias += 2.0
    assert (tv.score_thresh, tv.nms_thresh, tv.detections_per_img, tv.topk_candidates) == (0.05, 0.5, 300, 1000)
    ours = from_torchvision(tv.state_dict(), NUM_CLASSES)
    cfg = ours.config
    assert (cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image, cfg.topk_candidates) == \
        (0.05, 0.5, 300, 1000)
    images = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        features = list(tv.backbone(tv.transform(list(images))[0].tensors).values())
        head = tv.head(features)
    candidates = int((head["cls_logits"].sigmoid() > tv.score_thresh).sum())
    assert candidates > 3000  # a busy chip: far more than either cap
    assert_same_detections(tv, ours, images, min_boxes=DETECTIONS, every_class=False)
