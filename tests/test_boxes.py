"""Box math: golden values by hand, torchvision as an outside oracle, coder round trip."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image

from retinanet.boxes import MAX_LOG_SCALE, box_area, decode, encode, pairwise_iou


def random_boxes(n, seed, scale=500.0, min_side=1.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = min_side + torch.rand(n, 2, generator=gen) * scale / 2
    return torch.cat([xy, xy + wh], dim=1)


def test_area_and_iou_golden():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0],    # overlap 5x5 = 25; union 100 + 100 - 25 = 175
                      [0.0, 0.0, 10.0, 10.0],    # identical -> 1
                      [20.0, 20.0, 30.0, 40.0],  # disjoint -> 0
                      [0.0, 0.0, 5.0, 20.0]])    # overlap 5x10 = 50; union 100 + 100 - 50 = 150
    assert box_area(b).tolist() == [100.0, 100.0, 200.0, 100.0]
    iou = pairwise_iou(a, b)
    assert iou.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[25 / 175, 1.0, 0.0, 50 / 150]]))


def test_area_of_inverted_box_is_zero():
    assert box_area(torch.tensor([[10.0, 10.0, 5.0, 20.0]])).item() == 0.0


def test_pairwise_iou_matches_torchvision_and_broadcasts_over_batch():
    a = random_boxes(37, seed=0)
    b = random_boxes(53, seed=1)
    torch.testing.assert_close(pairwise_iou(a, b), box_iou(a, b))
    batch_a = torch.stack([a, a.flip(0)])        # (2, 37, 4)
    batched = pairwise_iou(batch_a, b[None])      # (2, 37, 53)
    assert batched.shape == (2, 37, 53)
    torch.testing.assert_close(batched[1], box_iou(a.flip(0), b))


def test_iou_of_zero_area_boxes_is_finite():
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    assert pairwise_iou(point, point).item() == 0.0


def test_clip_boxes_golden():
    """The model clips decoded boxes with torchvision's clip_boxes_to_image(boxes, (H, W))."""
    boxes = torch.tensor([[-5.0, -2.0, 30.0, 50.0], [10.0, 12.0, 20.0, 22.0]])
    # width 25, height 40: x in [0, 25], y in [0, 40]
    assert clip_boxes_to_image(boxes, (40, 25)).tolist() == [[0.0, 0.0, 25.0, 40.0], [10.0, 12.0, 20.0, 22.0]]


def test_encode_golden():
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    target = torch.tensor([[5.0, 0.0, 25.0, 10.0]])     # centre (15, 5), w 20, h 10
    # dx = (15 - 5) / 10 = 1; dy = (5 - 10) / 20 = -0.25; dw = log(20 / 10); dh = log(10 / 20)
    torch.testing.assert_close(encode(reference, target),
                               torch.tensor([[1.0, -0.25, math.log(2.0), math.log(0.5)]]))
    # weights (10, 10, 5, 5) scale each delta: (10, -2.5, 5 log 2, 5 log 0.5)
    torch.testing.assert_close(encode(reference, target, (10.0, 10.0, 5.0, 5.0)),
                               torch.tensor([[10.0, -2.5, 5 * math.log(2.0), 5 * math.log(0.5)]]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip_and_torchvision_agreement(weights):
    # sides in [8, 258): every scale change is below the decode clamp 1000 / 16 = 62.5
    reference = random_boxes(2000, seed=2, min_side=8.0).double()
    target = random_boxes(2000, seed=3, min_side=8.0).double()
    deltas = encode(reference, target, weights)
    # decode works in float32 by design; the round trip holds to float32 precision
    torch.testing.assert_close(decode(deltas, reference, weights), target.float(), atol=2e-3, rtol=1e-5)
    coder = BoxCoder(weights)
    torch.testing.assert_close(deltas.float(), coder.encode_single(target.float(), reference.float()),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode(deltas.float(), reference.float(), weights),
                               coder.decode_single(deltas.float(), reference.float()), atol=1e-3, rtol=1e-5)


def test_round_trip_leading_dimensions():
    reference = random_boxes(24, seed=4, min_side=8.0).reshape(2, 3, 4, 4)
    target = random_boxes(24, seed=5, min_side=8.0).reshape(2, 3, 4, 4)
    out = decode(encode(reference, target), reference)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-5)


def test_decode_clamps_scale_deltas():
    reference = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # centre (8, 8), 16 x 16
    deltas = torch.tensor([[0.0, 0.0, 50.0, 1e4]])       # exp(50) would be ~5e21; exp(1e4) = inf
    out = decode(deltas, reference)
    assert torch.isfinite(out).all()
    # clamped at log(1000/16): width = 16 * 1000 / 16 = 1000 -> x from 8 - 500 to 8 + 500
    torch.testing.assert_close(out, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    assert MAX_LOG_SCALE == pytest.approx(math.log(1000 / 16))
    # shrinking is not clamped: dw = -log 2 halves the width
    small = decode(torch.tensor([[0.0, 0.0, -math.log(2.0), 0.0]]), reference)
    torch.testing.assert_close(small, torch.tensor([[4.0, 0.0, 12.0, 16.0]]))


def test_decode_runs_in_float32_for_half_inputs():
    reference = random_boxes(10, seed=6)
    deltas = torch.randn(10, 4, generator=torch.Generator().manual_seed(7)) * 0.2
    out = decode(deltas.bfloat16(), reference.bfloat16())
    assert out.dtype == torch.float32
    expected = decode(deltas.bfloat16().float(), reference.bfloat16().float())
    torch.testing.assert_close(out, expected)
