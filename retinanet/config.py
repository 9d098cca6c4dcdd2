"""A RetinaNet's configuration and its resize rule, without torch.

Processes that only need a model's facts (the pipeline's driver, an OpenVINO actor whose
graph is cached) import this module and numpy, not torch (~0.6 GB and ~2 s per process).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from retinanet.options import TRAINABLE

# The paper's anchors: areas 32^2..512^2 on P3..P7, three octave scales, three ratios.
# Sizes are truncated to integers as torchvision does, so imported weights see identical anchors.
DEFAULT_SIZES = tuple(tuple(int(base * 2 ** (octave / 3)) for octave in range(3)) for base in (32, 64, 128, 256, 512))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISOR = 32  # every level down to P5 must tile the padded input exactly
# Largest log-scale change a decoded box may have (detectron2/torchvision use the same);
# stops exp() overflowing when an untrained head emits large deltas.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def resize_factor(height: int, width: int, min_size: int | None, max_size: int | None) -> float:
    """torchvision's resize rule: the factor that brings the short side to ``min_size``
    without the long side passing ``max_size`` (1.0 without a rule). Example: a 400-px chip
    with min_size 800, max_size 1333 -> 2.0; 1000x400 -> 1.333 (the long side caps it)."""
    if min_size is None:
        return 1.0
    factor = min_size / min(height, width)
    return min(factor, max_size / max(height, width)) if max_size is not None else factor


def padded_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of SIZE_DIVISOR (32), as the model pads its input.

    Example: (250, 256) -> (256, 256).
    """
    return height + (-height % SIZE_DIVISOR), width + (-width % SIZE_DIVISOR)


def logit_bound(score_threshold: float) -> float:
    """A logit below which no score passes ``score_threshold`` (score > t  <=>  logit >
    log(t / (1 - t))), a small margin lower: the sigmoid's float rounding decides right at
    the bound. Lets postprocessing compare raw logits and take the sigmoid of survivors only."""
    t = score_threshold
    return math.log(t / (1 - t)) - 1e-3 if 0 < t < 1 else (-math.inf if t <= 0 else math.inf)


@dataclass
class RetinaNetConfig:
    """Everything that defines a RetinaNet; stored in checkpoints as a plain dict.

    image_mean / image_std are per band, in the units of the input tensor (e.g. 0-255 for
    uint8 scenes, raw DN for 16-bit): the model normalises its own input, so the statistics
    travel with the weights.
    """

    num_classes: int
    backbone: str = TRAINABLE.backbone
    in_channels: int = 3
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    backbone_weights: str | None = None  # local ImageNet state dict; never stored in checkpoints
    frozen_bn: bool = True
    trainable_stages: int | None = None
    fpn_channels: int = TRAINABLE.fpn_channels
    p6_from: str = "c5"  # the paper builds P6 from C5; torchvision's v1 from P5
    head_width: int = TRAINABLE.head_width
    head_depth: int = TRAINABLE.head_depth
    head_group_norm: bool = False
    prior_probability: float = 0.01
    anchor_sizes: tuple[tuple[float, ...], ...] = DEFAULT_SIZES
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    fg_iou_threshold: float = 0.5
    bg_iou_threshold: float = 0.4
    allow_low_quality_matches: bool = True
    focal_alpha: float = TRAINABLE.focal_alpha
    focal_gamma: float = TRAINABLE.focal_gamma
    box_loss: str = TRAINABLE.box_loss
    smooth_l1_beta: float = 0.1
    score_threshold: float = 0.05
    topk_candidates: int = 1000
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    # Chip resize rule (torchvision's GeneralizedRCNNTransform): scale each input so its
    # short side is min_size, unless that makes its long side exceed max_size; boxes are
    # mapped back to input pixels. None: no resizing (models trained here).
    min_size: int | None = None
    max_size: int | None = None

    def __post_init__(self):
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.anchor_sizes = tuple(tuple(float(s) for s in level) for level in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            raise ValueError(f"image_mean/image_std need {self.in_channels} values (one per band), "
                             f"got {len(self.image_mean)} and {len(self.image_std)}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {self.p6_from!r}")
        if self.max_size is not None and self.min_size is None:
            raise ValueError("max_size needs min_size (the resize rule scales the short side to min_size)")
        if any(v is not None and v < 1 for v in (self.min_size, self.max_size)):
            raise ValueError(f"min_size/max_size must be positive, got {self.min_size}/{self.max_size}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one tuple per level P3-P7 (5), got {len(self.anchor_sizes)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("backbone_weights")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RetinaNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RetinaNetConfig fields: {sorted(unknown)}")
        return cls(**d)
