"""Training augmentation for overhead imagery: the boxes move with the pixels.

Overhead scenes have no "up": objects appear in every orientation, so horizontal and
vertical flips and 90-degree rotations are label-preserving. Brightness/contrast
jitter imitates sun angle and sensor gain; scale jitter imitates a different ground
sample distance.

Conventions (the same as :mod:`pipeline.chips.tiling` and :mod:`pipeline.io.labels`):

- ``pixels``: (C, H, W) float32 array in raw units (not normalised).
- ``valid``: (H, W) bool, True on valid scene pixels (False on padding/nodata).
- ``boxes``: (N, 4) float32 XYXY in pixel EDGE coordinates: a box (x1, y1, x2, y2)
  with integer corners covers pixel columns x1 .. x2 - 1 and rows y1 .. y2 - 1.
  With edge coordinates every geometric transform below is exact: the transformed box
  covers exactly the transformed pixels (tested by drawing boxes of ones).

Each transform is a pure function ``f(pixels, valid, boxes, ...) -> (pixels, valid, boxes)``
that never modifies its inputs; :func:`random_augment` composes them with a numpy
``Generator`` so that a seed fixes every choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A box keeps its label after scale jitter when at least this share of its area is still
# inside the chip (the same rule, and default, as pipeline.io.labels.chip_labels).
DEFAULT_MIN_INSIDE_FRACTION = 0.5


def _check(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray) -> None:
    if pixels.ndim != 3:
        raise ValueError(f"pixels must be (C, H, W), got shape {pixels.shape}")
    if valid.shape != pixels.shape[1:]:
        raise ValueError(f"valid must be (H, W) = {pixels.shape[1:]}, got {valid.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {boxes.shape}")


def hflip(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray):
    """Mirror left-right. Column c goes to W - 1 - c, so edge x goes to W - x:
    (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)."""
    _check(pixels, valid, boxes)
    width = pixels.shape[2]
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return np.ascontiguousarray(pixels[:, :, ::-1]), np.ascontiguousarray(valid[:, ::-1]), out


def vflip(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray):
    """Mirror top-bottom: (x1, y1, x2, y2) -> (x1, H - y2, x2, H - y1)."""
    _check(pixels, valid, boxes)
    height = pixels.shape[1]
    out = boxes.copy()
    out[:, 1] = height - boxes[:, 3]
    out[:, 3] = height - boxes[:, 1]
    return np.ascontiguousarray(pixels[:, ::-1, :]), np.ascontiguousarray(valid[::-1, :]), out


def rot90(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray, k: int = 1):
    """Rotate by k x 90 degrees counter-clockwise (as ``np.rot90`` on the (H, W) axes).

    One quarter turn maps pixel (row r, col c) of an H x W image to (row W - 1 - c,
    col r) of the W x H result, so in edge coordinates
    (x1, y1, x2, y2) -> (y1, W - x2, y2, W - x1). k is taken modulo 4; k < 0 turns
    clockwise. Non-square chips swap H and W.
    """
    _check(pixels, valid, boxes)
    k = int(k) % 4
    out_pixels, out_valid, out_boxes = pixels, valid, boxes.copy()
    for _ in range(k):
        width = out_pixels.shape[2]
        turned = out_boxes.copy()
        turned[:, 0] = out_boxes[:, 1]
        turned[:, 1] = width - out_boxes[:, 2]
        turned[:, 2] = out_boxes[:, 3]
        turned[:, 3] = width - out_boxes[:, 0]
        out_pixels = np.rot90(out_pixels, 1, axes=(1, 2))
        out_valid = np.rot90(out_valid, 1, axes=(0, 1))
        out_boxes = turned
    return np.ascontiguousarray(out_pixels), np.ascontiguousarray(out_valid), out_boxes


def brightness_contrast(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray,
                        brightness: float, contrast: float, mean, std):
    """Photometric jitter in the units of the dataset, band by band.

    out = (x - mean) * contrast + mean + brightness * std, on valid pixels only
    (padding keeps its value, so it still looks like padding to the model).

    Args:
        brightness: shift in multiples of the band's std (0: none; 0.2: +0.2 std).
        contrast: factor around the band mean (1: none).
        mean, std: (C,) per-band statistics of the dataset (raw units), the same as the
            model's image_mean / image_std.
    Boxes are returned unchanged (a copy).
    """
    _check(pixels, valid, boxes)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if mean.shape[0] != pixels.shape[0] or std.shape[0] != pixels.shape[0]:
        raise ValueError(f"mean/std need {pixels.shape[0]} values (one per band), "
                         f"got {mean.shape[0]} and {std.shape[0]}")
    jittered = (pixels - mean) * np.float32(contrast) + mean + np.float32(brightness) * std
    out = np.where(valid[None], jittered, pixels).astype(np.float32, copy=False)
    return out, valid.copy(), boxes.copy()


def _resize(array: np.ndarray, out_hw: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a (C, H, W) array with torch's interpolate (align_corners=False, which maps
    edge coordinate x to x * out / in exactly)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(tensor, size=out_hw, mode=mode, **kwargs)[0].numpy()


def scale(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray, factor: float,
          offset: tuple[int, int] = (0, 0), labels: np.ndarray | None = None,
          min_inside_fraction: float = DEFAULT_MIN_INSIDE_FRACTION, mode: str = "bilinear"):
    """Zoom by ``factor`` and cut/pad back to the input size (scale jitter).

    The image is resized to (round(H * factor), round(W * factor)) = (H', W'); boxes are
    scaled by the exact ratios W'/W and H'/H. Then a window of the input size is taken
    with its upper-left corner at ``offset`` = (dx, dy) in the resized image:

    - zoom in (H' >= H): dx in [0, W' - W], dy in [0, H' - H]: a crop;
    - zoom out (H' < H): dx in [W' - W, 0]: the resized image is pasted at (-dx, -dy)
      and the rest is padding (value 0, valid False).

    Boxes are shifted by -offset, clipped to the chip, and kept when at least
    ``min_inside_fraction`` of their (scaled) area is inside.

    Returns:
        (pixels, valid, boxes) or, when ``labels`` (N,) is given, (pixels, valid, boxes,
        labels) with the labels of the kept boxes.
    """
    _check(pixels, valid, boxes)
    channels, height, width = pixels.shape
    new_h, new_w = max(1, int(round(height * factor))), max(1, int(round(width * factor)))
    dx, dy = int(offset[0]), int(offset[1])
    if not (min(0, new_w - width) <= dx <= max(0, new_w - width)
            and min(0, new_h - height) <= dy <= max(0, new_h - height)):
        raise ValueError(f"offset {offset} outside the allowed range for a {new_w}x{new_h} "
                         f"image cut to {width}x{height}")
    resized = _resize(pixels, (new_h, new_w), mode)
    resized_valid = _resize(valid[None].astype(np.float32), (new_h, new_w), "nearest")[0] > 0.5

    out = np.zeros((channels, height, width), dtype=np.float32)
    out_valid = np.zeros((height, width), dtype=bool)
    # Overlap of the output window [dx, dx + W) with the resized image [0, W').
    src_x0, src_y0 = max(dx, 0), max(dy, 0)
    src_x1, src_y1 = min(dx + width, new_w), min(dy + height, new_h)
    dst_x0, dst_y0 = src_x0 - dx, src_y0 - dy
    out[:, dst_y0:dst_y0 + src_y1 - src_y0, dst_x0:dst_x0 + src_x1 - src_x0] = \
        resized[:, src_y0:src_y1, src_x0:src_x1]
    out_valid[dst_y0:dst_y0 + src_y1 - src_y0, dst_x0:dst_x0 + src_x1 - src_x0] = \
        resized_valid[src_y0:src_y1, src_x0:src_x1]

    ratio = np.array([new_w / width, new_h / height, new_w / width, new_h / height], dtype=np.float64)
    moved = boxes.astype(np.float64) * ratio - np.array([dx, dy, dx, dy], dtype=np.float64)
    clipped = moved.copy()
    clipped[:, [0, 2]] = np.clip(moved[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(moved[:, [1, 3]], 0, height)
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (area > 0) & (inside > 0) & (inside >= min_inside_fraction * area)
    out_boxes = clipped[keep].astype(np.float32)
    if labels is None:
        return out, out_valid, out_boxes
    return out, out_valid, out_boxes, np.asarray(labels)[keep]


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to draw and how strong they are.

    brightness: max |shift| in band std units; contrast: max |factor - 1|;
    scale_range: (min, max) zoom factor, drawn log-uniformly.
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    brightness_contrast: bool = True
    scale_jitter: bool = False
    brightness: float = 0.2
    contrast: float = 0.2
    scale_range: tuple[float, float] = (0.8, 1.25)
    min_inside_fraction: float = DEFAULT_MIN_INSIDE_FRACTION


def random_augment(pixels: np.ndarray, valid: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   config: AugmentConfig, rng: np.random.Generator, mean, std):
    """Apply a random draw of the enabled augmentations; the same ``rng`` state gives the
    same result (the training loop seeds it from seed, epoch and sample index).

    Order: scale jitter, flips, rotation, brightness/contrast. Every enabled flip/rotation
    is drawn with probability 1/2 (rotation: k uniform in 0..3).

    Returns:
        (pixels (C, H, W) float32, valid (H, W) bool, boxes (M, 4) float32, labels (M,)).
    """
    labels = np.asarray(labels)
    if config.scale_jitter:
        low, high = config.scale_range
        factor = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        height, width = pixels.shape[1:]
        new_w, new_h = max(1, int(round(width * factor))), max(1, int(round(height * factor)))
        dx = int(rng.integers(min(0, new_w - width), max(0, new_w - width) + 1))
        dy = int(rng.integers(min(0, new_h - height), max(0, new_h - height) + 1))
        pixels, valid, boxes, labels = scale(pixels, valid, boxes, factor, (dx, dy), labels,
                                             config.min_inside_fraction)
    if config.hflip and rng.random() < 0.5:
        pixels, valid, boxes = hflip(pixels, valid, boxes)
    if config.vflip and rng.random() < 0.5:
        pixels, valid, boxes = vflip(pixels, valid, boxes)
    if config.rot90:
        k = int(rng.integers(0, 4))
        if k:
            pixels, valid, boxes = rot90(pixels, valid, boxes, k)
    if config.brightness_contrast:
        shift = float(rng.uniform(-config.brightness, config.brightness))
        factor = float(rng.uniform(1 - config.contrast, 1 + config.contrast))
        pixels, valid, boxes = brightness_contrast(pixels, valid, boxes, shift, factor, mean, std)
    return pixels, valid, boxes.astype(np.float32), labels
