"""Anchors: golden values worked out by hand, torchvision's generator as an outside oracle."""
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet.anchors import AnchorGenerator, cell_anchors, grid_anchors
from retinanet.config import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES


def test_default_sizes_golden():
    # int(base * 2^(k/3)) with 2^(1/3) = 1.25992, 2^(2/3) = 1.58740:
    # 32 -> 32, 40.3, 50.8; 64 -> 64, 80.6, 101.6; 128 -> 128, 161.3, 203.2;
    # 256 -> 256, 322.5, 406.4; 512 -> 512, 645.1, 812.7 (truncated)
    assert DEFAULT_SIZES == ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    assert DEFAULT_ASPECT_RATIOS == (0.5, 1.0, 2.0)


def test_cell_anchors_golden():
    # ratio r = h / w at constant area: h = s * sqrt(r), w = s / sqrt(r); box = (-w/2, -h/2, w/2, h/2), rounded.
    # s = 32: r = 0.5 -> w = 45.25, h = 22.63 -> half 22.63, 11.31 -> (-23, -11, 23, 11)
    #         r = 1   -> (-16, -16, 16, 16)
    #         r = 2   -> w = 22.63, h = 45.25 -> (-11, -23, 11, 23)
    # s = 40: r = 0.5 -> w = 56.57, h = 28.28 -> half 28.28, 14.14 -> (-28, -14, 28, 14)
    #         r = 1   -> (-20, -20, 20, 20);  r = 2 -> (-14, -28, 14, 28)
    # s = 50: r = 0.5 -> w = 70.71, h = 35.36 -> half 35.36, 17.68 -> (-35, -18, 35, 18)
    #         r = 1   -> (-25, -25, 25, 25);  r = 2 -> (-18, -35, 18, 35)
    # order: ratio-major, size-minor
    expected = torch.tensor([
        [-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18],
        [-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25],
        [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35],
    ], dtype=torch.float32)
    assert torch.equal(cell_anchors((32, 40, 50), (0.5, 1.0, 2.0)), expected)


def test_grid_anchors_golden():
    base = torch.tensor([[-16.0, -16.0, 16.0, 16.0], [-8.0, -4.0, 8.0, 4.0]])
    out = grid_anchors(base, grid_hw=(2, 3), stride_hw=(8, 10))
    # cell (i, j) is centred on (x, y) = (10 j, 8 i); row-major over cells, anchors inside a cell
    centres = [(0, 0), (10, 0), (20, 0), (0, 8), (10, 8), (20, 8)]
    expected = []
    for x, y in centres:
        expected.append([x - 16, y - 16, x + 16, y + 16])
        expected.append([x - 8, y - 4, x + 8, y + 4])
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float32))


def test_generator_golden_small_image():
    gen = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(1.0,))
    # 64 x 64 image, P3..P7 grids 8x8, 4x4, 2x2, 1x1, 1x1 -> strides 8, 16, 32, 64, 64
    anchors = gen((64, 64), [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], "cpu")
    assert anchors.shape == (64 + 16 + 4 + 1 + 1, 4)
    assert anchors[0].tolist() == [-16, -16, 16, 16]          # P3 cell (0, 0)
    assert anchors[9].tolist() == [8 - 16, 8 - 16, 8 + 16, 8 + 16]   # P3 cell (1, 1): centre (8, 8)
    assert anchors[64].tolist() == [-32, -32, 32, 32]         # P4 cell (0, 0)
    assert anchors[64 + 5].tolist() == [16 - 32, 16 - 32, 16 + 32, 16 + 32]  # P4 cell (1, 1)
    assert anchors[-1].tolist() == [-256, -256, 256, 256]     # P7, one cell at the origin
    assert gen.num_anchors_per_location == 1


def test_generator_matches_torchvision_default_anchors():
    gen = AnchorGenerator()
    image_hw = (416, 416)  # a 400 chip padded to a multiple of 32
    feature_hws = [(52, 52), (26, 26), (13, 13), (7, 7), (4, 4)]
    ours = gen(image_hw, feature_hws, "cpu")
    tv = TorchvisionAnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3)))
                                          for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    features = [torch.zeros(1, 8, h, w) for h, w in feature_hws]
    expected = tv(images, features)[0]
    assert gen.num_anchors_per_location == 9
    assert ours.shape == expected.shape == (9 * sum(h * w for h, w in feature_hws), 4)
    assert torch.equal(ours, expected)


def test_generator_caches_per_shape_and_device():
    gen = AnchorGenerator()
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    first = gen((64, 64), shapes, "cpu")
    assert gen((64, 64), shapes, torch.device("cpu")) is first
    other = gen((96, 96), [(12, 12), (6, 6), (3, 3), (2, 2), (1, 1)], "cpu")
    assert other is not first and other.shape[0] == 9 * (144 + 36 + 9 + 4 + 1)
    assert len(gen._cache) == 2


def test_generator_rejects_wrong_number_of_levels():
    gen = AnchorGenerator()
    with pytest.raises(ValueError, match="2 feature maps but anchor sizes for 5 levels"):
        gen((64, 64), [(8, 8), (4, 4)], "cpu")
