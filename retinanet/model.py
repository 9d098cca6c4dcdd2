"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017) for fixed-size chips."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

import retinanet.boxes as box_ops
from retinanet.anchors import AnchorGenerator
from retinanet.backbones import build_backbone
from retinanet.config import SIZE_DIVISOR, RetinaNetConfig, logit_bound, resize_factor
from retinanet.heads import Subnet, prior_logit
from retinanet.losses import box_regression_loss, sigmoid_focal_loss
from retinanet.matcher import IGNORE, match_batch, pad_targets


class RetinaNet(nn.Module):
    """Backbone + FPN (P3-P7) + shared subnets, with focal-loss training and batched inference.

    Train mode: model(images, targets) -> {"classification": loss, "bbox_regression": loss}.
    Eval mode:  model(images) -> [{"boxes": (N, 4) float32 XYXY chip pixels, "scores": (N,),
    "labels": (N,) int64 in [0, num_classes)} per image].
    images: (B, C, H, W) floating tensor in the units of config.image_mean; resized by the
    config's rule (min_size/max_size) when it has one, boxes always in input pixels.
    targets: one dict per image with "boxes" (N, 4) XYXY pixels and "labels" (N,) int64.
    """

    image_mean: Tensor  # (1, C, 1, 1) buffers, registered in __init__
    image_std: Tensor

    def __init__(self, config: RetinaNetConfig, backbone: nn.Module, fpn: nn.Module,
                 anchor_generator: AnchorGenerator, cls_head: Subnet, box_head: Subnet):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.fpn = fpn
        self.anchor_generator = anchor_generator
        self.cls_head = cls_head
        self.box_head = box_head
        c = config.in_channels
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, c, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, images: Tensor, targets: list[dict] | None = None):
        self._check_images(images)
        if self.training:  # validate targets before spending a forward pass on them
            if targets is None:
                raise ValueError("training mode needs targets: model(images, targets)")
            self._check_targets(targets, len(images))
        input_hw = (images.shape[-2], images.shape[-1])
        # Normalise, then resize: torchvision's order (equal in exact arithmetic, closer in float).
        x, targets = self.resize_input((images - self.image_mean) / self.image_std, targets)
        height, width = x.shape[-2:]
        pad_h = -height % SIZE_DIVISOR
        pad_w = -width % SIZE_DIVISOR
        if pad_h or pad_w:  # pad after normalising: padding is "mean colour", like torchvision
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.backbone(x)
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        cls_logits = self.cls_head(pyramid)
        box_deltas = self.box_head(pyramid)
        feature_hws = [tuple(p.shape[-2:]) for p in pyramid]
        anchors = self.anchor_generator(tuple(x.shape[-2:]), feature_hws, x.device)
        if self.training:
            assert targets is not None  # checked above; resize_input keeps them
            return self.compute_loss(cls_logits, box_deltas, anchors, targets)
        level_counts = [h * w * self.anchor_generator.num_anchors_per_location for h, w in feature_hws]
        detections = self.postprocess(cls_logits, box_deltas, anchors, level_counts, (height, width))
        return self.boxes_to_input(detections, (height, width), input_hw)

    # -- the resize rule (config.min_size / max_size) --------------------------------------
    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the network sees for an input of height x width (torchvision's rounding)."""
        factor = resize_factor(height, width, self.config.min_size, self.config.max_size)
        return (height, width) if factor == 1.0 else (math.floor(height * factor), math.floor(width * factor))

    def resize_input(self, images: Tensor, targets: list[dict] | None = None) -> tuple[Tensor, list[dict] | None]:
        """Resize a batch by the config's rule (bilinear, as torchvision), and the targets'
        boxes with it; unchanged without a rule. Done in float32 whatever the autocast."""
        height, width = images.shape[-2:]
        factor = resize_factor(height, width, self.config.min_size, self.config.max_size)
        if factor == 1.0:
            return images, targets
        resized = F.interpolate(images.float(), scale_factor=factor, mode="bilinear", recompute_scale_factor=True,
                                align_corners=False)
        if targets is not None:
            ratio = box_ratios((height, width), (resized.shape[-2], resized.shape[-1]), images.device)
            targets = [{**t, "boxes": t["boxes"] * ratio} for t in targets]
        return resized, targets

    def boxes_to_input(self, detections: list[dict[str, Tensor]], network_hw: tuple[int, int],
                       input_hw: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Map detections from the network's (resized) pixels back to the input's."""
        if tuple(network_hw) == tuple(input_hw):
            return detections
        ratio = box_ratios(network_hw, input_hw, detections[0]["boxes"].device if detections else None)
        return [{**d, "boxes": d["boxes"] * ratio} for d in detections]

    # -- training --------------------------------------------------------------------------
    def compute_loss(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                     targets: list[dict]) -> dict[str, Tensor]:
        """Focal loss over all non-ignored anchors and box loss over positives, each summed
        over the whole batch and divided by the batch's number of positive anchors."""
        cfg = self.config
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, anchors.device)
        matches = match_batch(anchors, gt_boxes, gt_valid, cfg.fg_iou_threshold, cfg.bg_iou_threshold,
                              cfg.allow_low_quality_matches)
        foreground = matches >= 0
        num_foreground = foreground.sum().clamp(min=1).float()
        gt_index = matches.clamp(min=0)

        cls_target = torch.zeros_like(cls_logits, dtype=torch.float32)
        # A batch without any box (G = 0) has no foreground; gather would index an empty dim.
        fg_labels = (torch.gather(gt_labels, 1, gt_index)[foreground] if gt_labels.shape[1]
                     else gt_labels.new_zeros(0))
        cls_target[foreground] = F.one_hot(fg_labels, cfg.num_classes).float()
        counted = matches != IGNORE
        cls_loss = sigmoid_focal_loss(cls_logits[counted], cls_target[counted], cfg.focal_alpha,
                                      cfg.focal_gamma).sum() / num_foreground

        fg_batch, fg_anchor = foreground.nonzero(as_tuple=True)
        fg_anchors = anchors[fg_anchor]
        fg_gt = gt_boxes[fg_batch, gt_index[fg_batch, fg_anchor]]
        fg_deltas = box_deltas[fg_batch, fg_anchor].float()
        if cfg.box_loss == "giou":
            box_loss = box_regression_loss("giou", fg_deltas, None, box_ops.decode(fg_deltas, fg_anchors), fg_gt)
        else:
            box_loss = box_regression_loss(cfg.box_loss, fg_deltas, box_ops.encode(fg_anchors, fg_gt),
                                           beta=cfg.smooth_l1_beta)
        return {"classification": cls_loss, "bbox_regression": box_loss / num_foreground}

    # -- inference -------------------------------------------------------------------------
    def postprocess(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                    level_counts: list[int], image_hw: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Scores > threshold, at most topk_candidates per image and level; decode in float32;
        class-aware NMS per image; keep the best detections_per_image. Vectorised over the
        batch and the levels (no Python loop): images are told apart in NMS by folding the
        image index into the class index."""
        cfg = self.config
        batch, _, num_classes = cls_logits.shape
        image_index, anchor_index, labels, scores = self._candidates(cls_logits, level_counts)
        deltas = box_deltas[image_index, anchor_index]
        boxes = clip_boxes_to_image(box_ops.decode(deltas, anchors[anchor_index]), image_hw)

        kept = box_ops.grouped_nms(boxes, scores, image_index * num_classes + labels, cfg.nms_threshold)
        # kept is sorted by score; group by image (stable) and cap each image's count.
        kept = kept[torch.sort(image_index[kept], stable=True).indices]
        per_image = torch.bincount(image_index[kept], minlength=batch)
        kept = kept[_rank_in_groups(image_index[kept], per_image) < cfg.detections_per_image]
        counts = per_image.clamp(max=cfg.detections_per_image).tolist()
        return [
            {"boxes": b, "scores": s, "labels": c}
            for b, s, c in zip(boxes[kept].split(counts), scores[kept].split(counts), labels[kept].split(counts))
        ]

    def _candidates(self, cls_logits: Tensor, level_counts: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image index, anchor index, label, score) of every score above the threshold, at
        most topk_candidates per image and pyramid level (the highest, as torchvision keeps).

        One comparison on the raw logits (score > t  <=>  logit > log(t / (1 - t))) finds the
        candidates, and the sigmoid runs on those only: a trained model lets a few hundred of
        the ~150k anchor-class scores of a 512-px chip through."""
        cfg = self.config
        batch, _, num_classes = cls_logits.shape
        device = cls_logits.device
        flat = cls_logits.reshape(batch, -1)
        image_index, flat_index = (flat > logit_bound(cfg.score_threshold)).nonzero(as_tuple=True)
        scores = torch.sigmoid(flat[image_index, flat_index].float())
        keep = scores > cfg.score_threshold
        image_index, flat_index, scores = image_index[keep], flat_index[keep], scores[keep]
        anchor_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        level_ends = torch.tensor(level_counts, device=device).cumsum(0)
        group = image_index * len(level_counts) + torch.bucketize(anchor_index, level_ends, right=True)
        per_group = torch.bincount(group, minlength=batch * len(level_counts))
        if len(group) and int(per_group.max()) > cfg.topk_candidates:
            # More candidates than top-k on some level (an untrained or miscalibrated head):
            # per level top-k on the dense scores, which beats sorting thousands of survivors.
            return self._dense_candidates(cls_logits, level_counts)
        return image_index, anchor_index, labels, scores

    def _dense_candidates(self, cls_logits: Tensor, level_counts: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_candidates` by a top-k per level over all scores (the same selection)."""
        cfg = self.config
        batch, _, num_classes = cls_logits.shape
        parts, start = [], 0
        for count in level_counts:
            scores = torch.sigmoid(cls_logits[:, start:start + count].float()).reshape(batch, -1)
            top_scores, top_index = scores.topk(min(cfg.topk_candidates, scores.shape[1]), dim=1)
            parts.append((top_scores, top_index // num_classes + start, top_index % num_classes))
            start += count
        scores, anchor_index, labels = (torch.cat(p, dim=1) for p in zip(*parts))
        image_index = torch.arange(batch, device=cls_logits.device)[:, None].expand_as(scores)
        keep = scores > cfg.score_threshold
        return image_index[keep], anchor_index[keep], labels[keep], scores[keep]

    # -- input checks ----------------------------------------------------------------------
    def _check_images(self, images) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a (B, C, H, W) tensor, got {type(images).__name__} "
                            "(stack fixed-size chips into one batch)")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating tensor in the units of image_mean, got {images.dtype} "
                            "(convert with images.float())")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(f"model expects {self.config.in_channels} bands, images have {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")

    def _check_targets(self, targets: list[dict], batch: int) -> None:
        if len(targets) != batch:
            raise ValueError(f"{batch} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if boxes is None or labels is None:
                raise ValueError(f"target {i} needs 'boxes' and 'labels'")
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
                raise ValueError(f"target {i}: boxes must be (N, 4) with N labels, got {tuple(boxes.shape)} "
                                 f"and {len(labels)} labels")
            if len(boxes) == 0:
                continue
            bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bad.any():
                j = int(bad.nonzero()[0])
                raise ValueError(f"target {i}, box {j}: {boxes[j].tolist()} is degenerate or not finite "
                                 "(need finite XYXY with x2 > x1 and y2 > y1)")
            if labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"target {i}: labels must be integers in [0, {self.num_classes}), "
                                 f"got {labels.tolist()[:10]}")


def _rank_in_groups(sorted_groups: Tensor, counts: Tensor) -> Tensor:
    """Position of each element within its group, for group ids sorted ascending.
    Example: groups [0, 0, 2, 2, 2] with counts [2, 0, 3] -> [0, 1, 0, 1, 2]."""
    offsets = torch.cumsum(counts, 0) - counts
    return torch.arange(len(sorted_groups), device=sorted_groups.device) - offsets[sorted_groups]


def box_ratios(from_hw: tuple[int, int], to_hw: tuple[int, int], device) -> Tensor:
    """(4,) XYXY multipliers from one image size to another, in float32 as torchvision
    computes them (to_size / from_size per axis)."""
    ratio_h = torch.tensor(to_hw[0], dtype=torch.float32) / torch.tensor(from_hw[0], dtype=torch.float32)
    ratio_w = torch.tensor(to_hw[1], dtype=torch.float32) / torch.tensor(from_hw[1], dtype=torch.float32)
    return torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(device)


def build_model(config: RetinaNetConfig | None = None, **overrides) -> RetinaNet:
    """The one factory: a config (or keyword fields of RetinaNetConfig) -> RetinaNet."""
    if config is None:
        config = RetinaNetConfig(**overrides)
    elif overrides:
        config = RetinaNetConfig(**{**asdict(config), **overrides})
    backbone = build_backbone(config.backbone, config.in_channels, config.backbone_weights, config.frozen_bn,
                              config.trainable_stages)
    c5 = backbone.out_channels[-1]
    p6_in = config.fpn_channels if config.p6_from == "p5" else c5
    if config.p6_from == "c5" and c5 == config.fpn_channels:
        raise ValueError("p6_from='c5' is ambiguous when C5 has fpn_channels channels")
    fpn = FeaturePyramidNetwork(backbone.out_channels, config.fpn_channels,
                                extra_blocks=LastLevelP6P7(p6_in, config.fpn_channels))
    anchors = AnchorGenerator(config.anchor_sizes, config.aspect_ratios)
    a = anchors.num_anchors_per_location
    cls_head = Subnet(config.fpn_channels, a, config.num_classes, config.head_width, config.head_depth,
                      config.head_group_norm, prior_logit(config.prior_probability))
    box_head = Subnet(config.fpn_channels, a, 4, config.head_width, config.head_depth, config.head_group_norm)
    return RetinaNet(config, backbone, fpn, anchors, cls_head, box_head)
