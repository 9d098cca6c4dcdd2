"""The model the pipeline tests run: an untrained ResNet-18 RetinaNet over the synthetic
classes, seeded, whose head lets many boxes through (prior probability 0.3), so that every
stage after it (merge, georeference, commit) has work to do."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.tools.synth import SYNTH_CLASSES
from retinanet import build_model, save_checkpoint


def tiny_checkpoint(path: Path, head_width: int = 32, fpn_channels: int | None = None) -> Path:
    """Write the tiny model's checkpoint to ``path`` (the same bytes on every call)."""
    torch.manual_seed(0)
    sizes = {} if fpn_channels is None else {"fpn_channels": fpn_channels}
    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", head_width=head_width, head_depth=1,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3, **sizes)
    return save_checkpoint(path, model, list(SYNTH_CLASSES))
