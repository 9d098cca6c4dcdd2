"""RetinaNet (Lin et al., 2017) as a small, fast torch library. torch + torchvision only.

The names below load their module on first use, so importing a light submodule
(``retinanet.files``, used by the pipeline's table store and downloads) does not import
torch and torchvision (~0.5 GB and ~2 s in every process that touches a table).
"""
from importlib import import_module

_HOME = {
    "BACKBONES": "retinanet.backbones",
    "CheckpointError": "retinanet.checkpoint",
    "load_checkpoint": "retinanet.checkpoint",
    "save_checkpoint": "retinanet.checkpoint",
    "from_torchvision": "retinanet.convert",
    "RetinaNet": "retinanet.model",
    "RetinaNetConfig": "retinanet.config",
    "build_model": "retinanet.model",
    "Detector": "retinanet.runtime",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'retinanet' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
