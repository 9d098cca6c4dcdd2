"""Import weights of torchvision's retinanet_resnet50_fpn / retinanet_resnet50_fpn_v2."""
from __future__ import annotations

import re

from torch import Tensor

from retinanet.config import IMAGENET_MEAN, IMAGENET_STD, RetinaNetConfig
from retinanet.model import RetinaNet, build_model

# What torchvision's retinanet_resnet50_fpn(_v2) does after its head, unless told otherwise:
# score > 0.05, NMS IoU 0.5, the top 1000 candidates per level, 300 detections per image.
TORCHVISION_INFERENCE = {"score_threshold": 0.05, "nms_threshold": 0.5, "topk_candidates": 1000,
                         "detections_per_image": 300}
# torchvision's transform: short side to 800 px, long side at most 1333 (imports carry it;
# from_torchvision leaves chips at native size unless told).
TORCHVISION_RESIZE = {"min_size": 800, "max_size": 1333}


def torchvision_config(num_classes: int, v2: bool = False, **overrides) -> RetinaNetConfig:
    """The RetinaNetConfig equivalent to torchvision's model (inputs in [0, 1], ImageNet stats,
    torchvision's inference settings), chips at native size unless overrides say min_size/max_size."""
    base = dict(num_classes=num_classes, backbone="resnet50", in_channels=3, image_mean=IMAGENET_MEAN,
                image_std=IMAGENET_STD, frozen_bn=True, p6_from="c5" if v2 else "p5",
                head_group_norm=v2, box_loss="giou" if v2 else "l1", **TORCHVISION_INFERENCE)
    return RetinaNetConfig(**{**base, **overrides})


def _rename(key: str) -> str | None:
    """torchvision state-dict key -> ours (None to drop). Accepts pre-0.13 (unversioned) keys."""
    if key.endswith("num_batches_tracked"):
        return None  # BatchNorm2d bookkeeping; our ResNet uses FrozenBatchNorm2d
    key = key.replace("backbone.fpn.", "fpn.", 1)
    key = re.sub(r"^(fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
    key = key.replace("head.classification_head.", "cls_head.", 1)
    key = key.replace("head.regression_head.", "box_head.", 1)
    key = re.sub(r"\.(cls_logits|bbox_reg)\.", ".predictor.", key)
    old_conv = re.match(r"^(cls_head|box_head)\.conv\.(\d+)\.(weight|bias)$", key)
    if old_conv:  # old layout: conv, relu, conv, relu ... in one Sequential
        head, index, param = old_conv.groups()
        return f"{head}.tower.{int(index) // 2}.0.{param}"
    return re.sub(r"^(cls_head|box_head)\.conv\.", r"\1.tower.", key)


def convert_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RetinaNet state dict to this library's layout."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key)
        if new is not None:
            out[new] = value
    return out


def from_torchvision(state_dict: dict[str, Tensor], num_classes: int, v2: bool = False,
                     **config_overrides) -> RetinaNet:
    """A RetinaNet carrying torchvision weights, in eval mode.

    It keeps torchvision's inference settings (TORCHVISION_INFERENCE: score 0.05, NMS 0.5,
    top-1000 candidates per level, 300 detections) unless config_overrides name others. On
    chips torchvision does not resize (min_size = max_size = chip size) the detections equal
    torchvision's; pass ``**TORCHVISION_RESIZE`` for torchvision's own resize rule. Inputs are
    float tensors in [0, 1], like torchvision's.
    """
    model = build_model(torchvision_config(num_classes, v2, **config_overrides))
    converted = convert_state_dict(state_dict)
    what = f"state dict does not fit retinanet_resnet50_fpn{'_v2' if v2 else ''} with {num_classes} classes"
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shape mismatches (wrong num_classes, v1 vs v2 weights)
        raise ValueError(f"{what}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
