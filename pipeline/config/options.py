"""The choices a job makes that the pipeline owns, named once, without pydantic: the job
model (pipeline.config.spec) types its fields with them and the code that acts on a choice
(pipeline.infer.merge) checks against the same names. The model's own choices (precision,
backend, backbones) are retinanet.options'."""
from __future__ import annotations

from typing import Literal, get_args

# Seam merge methods (pipeline.infer.merge): greedy NMS, or weighted box fusion of each cluster.
MergeMethod = Literal["nms", "wbf"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)
