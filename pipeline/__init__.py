"""RetinaNet over very large imagery, at scale on Ray (`pipeline run`), or from Python
without Ray: ``pipeline.predict_scene(path, checkpoint)`` and
``pipeline.predict_image(array, checkpoint)`` (:mod:`pipeline.run.predict`).

Those two are imported on first use, so that ``import pipeline`` (the CLI's start-up)
loads neither torch nor rasterio.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {"predict_scene": "pipeline.run.predict", "predict_image": "pipeline.run.predict"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
