"""The choices a caller makes about running a model, named once. No torch here: the
pipeline's job spec and CLI validate against these without loading torch."""
from __future__ import annotations

from typing import Literal, get_args

# Numeric precision of inference or training: auto picks bf16/fp16 autocast where the
# device has fast units for it (AMX CPUs, CUDA), else fp32 (retinanet.runtime).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# The engine that runs the network: auto is OpenVINO on CPU actors, torch on GPU actors.
Backend = Literal["auto", "torch", "openvino", "onnx"]
BACKENDS: tuple[str, ...] = get_args(Backend)
