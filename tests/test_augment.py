"""Augmentations move boxes with the pixels: draw boxes of ones, transform, compare."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.train.augment import (
    AugmentConfig,
    brightness_contrast,
    hflip,
    random_augment,
    rot90,
    scale,
    vflip,
)


def draw(shape_hw, boxes, channels=2):
    """A (C, H, W) image that is 1 inside each integer XYXY edge box and 0 elsewhere."""
    h, w = shape_hw
    img = np.zeros((channels, h, w), dtype=np.float32)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=int):
        img[:, y1:y2, x1:x2] = 1.0
    return img


def box_of_ones(mask: np.ndarray) -> list[float]:
    """Tight XYXY edge box around the True cells of a (H, W) mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def assert_box_covers(img: np.ndarray, box, threshold=0.5):
    """The ones of a one-box image are exactly the pixels inside `box`."""
    ones = img[0] > threshold
    assert box_of_ones(ones) == pytest.approx(list(box))
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    assert ones[y1:y2, x1:x2].all() and ones.sum() == (x2 - x1) * (y2 - y1)


# Non-square on purpose: a transform that mixes up H and W fails here.
SHAPE = (40, 64)
BOXES = np.array([[3, 5, 11, 9], [0, 0, 4, 40], [50, 30, 64, 37]], dtype=np.float32)


@pytest.mark.parametrize("transform", [hflip, vflip, lambda p, v, b: rot90(p, v, b, 1),
                                       lambda p, v, b: rot90(p, v, b, 2),
                                       lambda p, v, b: rot90(p, v, b, 3),
                                       lambda p, v, b: rot90(p, v, b, -1)],
                         ids=["hflip", "vflip", "rot90", "rot180", "rot270", "rot-90"])
def test_geometric_transforms_move_boxes_with_pixels(transform):
    for box in BOXES:
        img = draw(SHAPE, [box])
        valid = np.ones(SHAPE, dtype=bool)
        out, out_valid, out_boxes = transform(img, valid, box[None])
        assert out.shape[0] == img.shape[0] and out_valid.shape == out.shape[1:]
        assert_box_covers(out, out_boxes[0])


def test_hand_worked_flip_and_rotation():
    # W = 64, H = 40. hflip: x -> 64 - x, so (3, 5, 11, 9) -> (53, 5, 61, 9).
    box = BOXES[:1]
    img = draw(SHAPE, box)
    valid = np.ones(SHAPE, dtype=bool)
    assert hflip(img, valid, box)[2].tolist() == [[53, 5, 61, 9]]
    # vflip: y -> 40 - y: (3, 31, 11, 35).
    assert vflip(img, valid, box)[2].tolist() == [[3, 31, 11, 35]]
    # quarter turn counter-clockwise: (y1, W - x2, y2, W - x1) = (5, 53, 9, 61); shape 64 x 40.
    out, _, turned = rot90(img, valid, box, 1)
    assert out.shape == (2, 64, 40) and turned.tolist() == [[5, 53, 9, 61]]


def test_four_quarter_turns_are_identity_and_inputs_untouched():
    img = draw(SHAPE, BOXES)
    valid = np.ones(SHAPE, dtype=bool)
    valid[:, :7] = False
    before = (img.copy(), valid.copy(), BOXES.copy())
    out, out_valid, out_boxes = rot90(img, valid, BOXES, 4)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(out_valid, valid)
    np.testing.assert_array_equal(out_boxes, BOXES)
    _, turned_valid, _ = rot90(img, valid, BOXES, 1)
    assert turned_valid[-7:, :].sum() == 0 and turned_valid[:-7].all()  # left strip -> bottom
    np.testing.assert_array_equal(img, before[0])
    np.testing.assert_array_equal(valid, before[1])
    np.testing.assert_array_equal(BOXES, before[2])


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("factor,offset", [(2.0, (0, 0)), (2.0, (20, 6)), (0.5, (0, 0)), (0.5, (-16, -10))])
def test_scale_moves_boxes_with_pixels(factor, offset, mode):
    # Even corners so that a 0.5 zoom lands on whole pixels; bilinear edges cross 0.5
    # exactly at the scaled edges (worked out: at 2x, output pixel 2*x1 samples x1 - 0.25).
    box = np.array([[10, 6, 22, 18]], dtype=np.float32)
    img = draw(SHAPE, box)
    valid = np.ones(SHAPE, dtype=bool)
    out, out_valid, out_boxes = scale(img, valid, box, factor, offset, mode=mode)
    assert out.shape == img.shape
    expected = box[0] * factor - np.array([offset[0], offset[1]] * 2)
    assert out_boxes[0].tolist() == pytest.approx(expected.tolist())
    assert_box_covers(out, out_boxes[0])
    if factor < 1:  # the pasted image occupies [-dx, -dx + W/2) x [-dy, -dy + H/2)
        dx, dy = -offset[0], -offset[1]
        assert out_valid[dy:dy + 20, dx:dx + 32].all() and out_valid.sum() == 20 * 32


def test_scale_drops_boxes_cut_below_the_inside_fraction():
    # Zoom 2x with the crop at (0, 0) of a 128 x 80 image cut to 64 x 40: a box at
    # x 28..36 (scaled 56..72) keeps 8 of 16 px inside -> kept at 0.5, dropped at 0.6;
    # a box at 40..48 (80..96) is entirely outside -> dropped.
    boxes = np.array([[28, 2, 36, 6], [40, 2, 48, 6]], dtype=np.float32)
    img = draw(SHAPE, boxes)
    valid = np.ones(SHAPE, dtype=bool)
    _, _, kept, labels = scale(img, valid, boxes, 2.0, (0, 0), labels=np.array([7, 8]))
    assert kept.tolist() == [[56, 4, 64, 12]] and labels.tolist() == [7]
    _, _, kept, labels = scale(img, valid, boxes, 2.0, (0, 0), labels=np.array([7, 8]),
                               min_inside_fraction=0.6)
    assert kept.shape == (0, 4) and labels.tolist() == []


def test_scale_rejects_offsets_outside_the_image():
    img = draw(SHAPE, BOXES)
    with pytest.raises(ValueError, match="offset"):
        scale(img, np.ones(SHAPE, bool), BOXES, 2.0, (65, 0))
    with pytest.raises(ValueError, match="offset"):
        scale(img, np.ones(SHAPE, bool), BOXES, 0.5, (5, 0))


def test_brightness_contrast_in_std_units_and_padding_untouched():
    img = np.full((2, 4, 4), 10.0, dtype=np.float32)
    img[:, 0, 0] = 14.0
    valid = np.ones((4, 4), dtype=bool)
    valid[3, 3] = False
    img[:, 3, 3] = 0.0
    mean, std = [10.0, 12.0], [2.0, 4.0]
    out, _, boxes = brightness_contrast(img, valid, BOXES, 0.5, 2.0, mean, std)
    # band 0: (14 - 10) * 2 + 10 + 0.5 * 2 = 19; (10 - 10) * 2 + 10 + 1 = 11
    # band 1: (14 - 12) * 2 + 12 + 0.5 * 4 = 18; (10 - 12) * 2 + 12 + 2 = 10
    assert out[0, 0, 0] == 19 and out[0, 1, 1] == 11
    assert out[1, 0, 0] == 18 and out[1, 1, 1] == 10
    assert out[0, 3, 3] == 0 and out[1, 3, 3] == 0  # padding keeps its value
    np.testing.assert_array_equal(boxes, BOXES)


def test_random_augment_is_deterministic_and_keeps_boxes_on_pixels():
    # Fractional zooms blur box edges (bilinear), so the tight box of the pixels > 0.5
    # must match the returned box to within one pixel; the 90-degree and flip parts
    # are exact (tested above).
    config = AugmentConfig(scale_jitter=True, brightness_contrast=False, scale_range=(0.5, 2.0))
    mean, std = [0.5, 0.5], [0.5, 0.5]
    kept_counts = set()
    for seed in range(40):
        for box in np.array([[8, 8, 16, 14], [30, 20, 44, 28]], dtype=np.float32):
            img = draw((48, 48), [box])
            valid = np.ones((48, 48), dtype=bool)
            a = random_augment(img, valid, box[None], np.array([2]), config,
                               np.random.default_rng(seed), mean, std)
            b = random_augment(img, valid, box[None], np.array([2]), config,
                               np.random.default_rng(seed), mean, std)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
            out, _, out_boxes, out_labels = a
            kept_counts.add(len(out_boxes))
            assert out_labels.tolist() == [2] * len(out_boxes)
            if len(out_boxes):
                np.testing.assert_allclose(box_of_ones(out[0] > 0.5), out_boxes[0], atol=1.0)
    assert kept_counts == {0, 1}  # some draws crop the box away, others keep it
