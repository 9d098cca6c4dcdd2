"""The choices a caller makes about running a model, named once. No torch here: the
pipeline's job spec and CLI validate against these without loading torch."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

# Numeric precision of inference or training: auto picks bf16/fp16 autocast where the
# device has fast units for it (AMX CPUs, CUDA), else fp32 (retinanet.runtime).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# Chips per forward on a CPU (retinanet.runtime.auto_batch_size; the pipeline's batch_size:
# null). One chip at a time is the fastest per chip there: a batch's activations outgrow
# the caches (R50-FPN, 512 px, bf16 on a 2-core AMX CPU: 0.19 s per chip at batch 1, 0.23
# at 2, 0.29 at 4, 0.31 at 8; fp32 0.35 -> 0.49).
CPU_BATCH_SIZE = 1

# The engine that runs the network: auto is OpenVINO on CPU actors, torch on GPU actors.
Backend = Literal["auto", "torch", "openvino", "onnx"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# Trunks that retinanet.backbones can build (torchvision models cut at C3, C4, C5).
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large",
                              "efficientnet_b0", "efficientnet_b3", "vgg16")

# How box regression is scored: on deltas (l1, smooth_l1) or on decoded boxes (giou).
BoxLoss = Literal["l1", "smooth_l1", "giou"]
BOX_LOSSES: tuple[str, ...] = get_args(BoxLoss)


@dataclass(frozen=True)
class TrainableDefaults:
    """RetinaNet's shape and loss settings that a training job may change, at the paper's
    values: the one source of both retinanet.model.RetinaNetConfig's defaults and the
    defaults of a job's ``train:`` section (which hands them to the model unchanged)."""

    backbone: str = "resnet50"
    fpn_channels: int = 256
    head_width: int = 256
    head_depth: int = 4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: BoxLoss = "l1"


TRAINABLE = TrainableDefaults()
TRAINABLE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainableDefaults))
