"""Matcher on hand-made IoU matrices, and torchvision's Matcher as an outside oracle."""
import pytest
import torch
from torchvision.models.detection._utils import Matcher

from retinanet.matcher import BACKGROUND, IGNORE, match, match_batch, pad_targets

POS0, POS1 = 0, 1


def hand_iou():
    """(B=2, G=3, A=6). Image 0 has two boxes and one padding row, image 1 three boxes."""
    image0 = [
        [0.70, 0.45, 0.10, 0.00, 0.30, 0.00],  # gt 0
        [0.20, 0.30, 0.35, 0.00, 0.00, 0.60],  # gt 1
        [0.90, 0.90, 0.90, 0.90, 0.90, 0.90],  # padding: must be invisible
    ]
    image1 = [
        [0.45, 0.45, 0.10, 0.00, 0.00, 0.00],  # gt 0: best 0.45, tied on anchors 0 and 1
        [0.00, 0.48, 0.42, 0.00, 0.00, 0.00],  # gt 1: best 0.48 on anchor 1
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # gt 2: overlaps no anchor at all
    ]
    valid = torch.tensor([[True, True, False], [True, True, True]])
    return torch.tensor([image0, image1]), valid


def test_constants():
    # torchvision's Matcher uses the same numbers; the oracle test below relies on it
    assert (BACKGROUND, IGNORE) == (Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS) == (-1, -2)


def test_hand_matrix_without_low_quality_rule():
    iou, valid = hand_iou()
    out = match(iou, valid, high=0.5, low=0.4, allow_low_quality=False)
    # image 0, per anchor best over the two real boxes:
    #   a0 0.70 (gt0) >= 0.5 -> gt0;  a1 0.45 in [0.4, 0.5) -> IGNORE;  a2 0.35 < 0.4 -> BACKGROUND
    #   a3 0.00 -> BACKGROUND;       a4 0.30 -> BACKGROUND;            a5 0.60 (gt1) -> gt1
    #   (the padding row's 0.9 would have made every anchor positive)
    # image 1: a0 0.45 -> IGNORE, a1 0.48 -> IGNORE, a2 0.42 -> IGNORE, a3..a5 0 -> BACKGROUND
    assert out.dtype == torch.int64
    assert out.tolist() == [
        [POS0, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND, POS1],
        [IGNORE, IGNORE, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND],
    ]


def test_hand_matrix_with_low_quality_rule():
    iou, valid = hand_iou()
    out = match(iou, valid, high=0.5, low=0.4, allow_low_quality=True)
    # image 0: both boxes already own their best anchor (a0, a5): nothing changes.
    # image 1: gt0's best IoU 0.45 is reached by a0 and a1 -> both promoted, each to ITS OWN best box:
    #   a0's best box is gt0 (0.45) -> gt0;  a1's best box is gt1 (0.48 > 0.45) -> gt1.
    #   gt1's best 0.48 is on a1 -> gt1 (already). a2 (0.42) stays IGNORE.
    #   gt2 has best IoU 0 -> recruits nothing (torchvision would promote every zero-IoU anchor).
    assert out.tolist() == [
        [POS0, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND, POS1],
        [POS0, POS1, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND],
    ]


def test_thresholds_are_inclusive_at_high_and_exclusive_at_low():
    iou = torch.tensor([[[0.5, 0.4, 0.3999, 0.4999]]])
    valid = torch.tensor([[True]])
    out = match(iou, valid, high=0.5, low=0.4, allow_low_quality=False)
    assert out.tolist() == [[0, IGNORE, BACKGROUND, IGNORE]]


def test_equal_thresholds_have_no_ignore_band():
    iou = torch.tensor([[[0.6, 0.5, 0.45, 0.2]]])
    out = match(iou, torch.tensor([[True]]), high=0.5, low=0.5, allow_low_quality=False)
    assert out.tolist() == [[0, 0, BACKGROUND, BACKGROUND]]


def test_low_above_high_is_rejected():
    iou, valid = hand_iou()
    with pytest.raises(ValueError, match="low threshold 0.6 must not exceed high threshold 0.5"):
        match(iou, valid, high=0.5, low=0.6)


def test_no_boxes_all_background():
    out = match(torch.zeros(2, 0, 7), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 7) and (out == BACKGROUND).all()


def test_image_with_only_padding_is_background():
    iou = torch.rand(2, 2, 5) * 0.3 + 0.6  # all above `high`
    valid = torch.tensor([[True, True], [False, False]])
    out = match(iou, valid)
    assert (out[0] >= 0).all()
    assert (out[1] == BACKGROUND).all()


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_torchvision_matcher(seed):
    gen = torch.Generator().manual_seed(seed)
    B, G, A = 3, 6, 400
    # sparse-ish IoUs (most zero, some high) so every state occurs; each box overlaps something
    iou = torch.rand(B, G, A, generator=gen) * (torch.rand(B, G, A, generator=gen) < 0.3)
    iou = iou * 0.8
    n_valid = [6, 3, 1]
    valid = torch.zeros(B, G, dtype=torch.bool)
    for b, n in enumerate(n_valid):
        valid[b, :n] = True
    for low_quality in (False, True):
        ours = match(iou, valid, high=0.5, low=0.4, allow_low_quality=low_quality)
        oracle = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
        for b, n in enumerate(n_valid):
            assert torch.equal(ours[b], oracle(iou[b, :n])), (b, low_quality)
        states = set(ours.unique().tolist())
        assert {BACKGROUND, IGNORE} <= states and max(states) >= 0


def test_pad_targets():
    targets = [
        {"boxes": torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=torch.float64), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int32)},
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([2], dtype=torch.int32)},
    ]
    boxes, labels, valid = pad_targets(targets, "cpu")
    assert boxes.shape == (3, 2, 4) and boxes.dtype == torch.float32
    assert labels.dtype == torch.int64 and valid.dtype == torch.bool
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert boxes[0].tolist() == [[0, 0, 10, 10], [5, 5, 20, 20]]
    assert boxes[2, 0].tolist() == [1, 2, 3, 4] and labels[2, 0].item() == 2
    assert labels[0].tolist() == [1, 0]


def test_match_batch_on_real_boxes_with_an_empty_image():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0],
                            [40.0, 40.0, 50.0, 50.0]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [12.0, 0.0, 22.0, 10.0]]),
                "labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    boxes, _, valid = pad_targets(targets, "cpu")
    out = match_batch(anchors, boxes, valid, 0.5, 0.4, True)
    # gt0 == anchor 0 (IoU 1). gt1 vs anchor 1: overlap 8 x 10 = 80, union 100 + 100 - 80 = 120 -> 0.667
    # anchor 2 touches gt0 only along an edge (IoU 0); anchor 3 is far away.
    assert out.tolist() == [[0, 1, BACKGROUND, BACKGROUND], [BACKGROUND] * 4]
    none = pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], "cpu")
    assert match_batch(anchors, none[0], none[2], 0.5, 0.4, True).tolist() == [[BACKGROUND] * 4]
