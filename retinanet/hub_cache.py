"""Weights in torch's hub cache, through torchvision's weights API: the file a weights enum
member downloads to, read from the cache or downloaded into it, with errors that say where
the cache is and how to fill it. Used for torchvision's COCO RetinaNets (retinanet.hub) and
ImageNet backbones (retinanet.backbones)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch


class NamedSourceError(ValueError):
    """A named model cannot be had: unknown name, a release that holds no RetinaNet, ...
    (a ValueError as retinanet.checkpoint.CheckpointError is; not one, since checkpoint
    imports the model, which imports this module)."""


class NotCachedError(NamedSourceError):
    """A named model is not in its library's cache and could not be downloaded (offline)."""


def torch_cache_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_path(weights: Any) -> Path:
    """The file torchvision's ``get_state_dict`` reads for these weights (named after the URL)."""
    return torch_cache_dir() / os.path.basename(urlparse(weights.url).path)


def torchvision_weights_state(weights: Any, what: str, offline: bool) -> dict:
    """The state dict of a torchvision weights enum member through its own API, from the
    cache or downloaded into it; NotCachedError saying how to fill the cache."""
    path = cached_weights_path(weights)
    if not path.is_file():
        how = (f"on a machine that is online run `python -c \"import torchvision; torchvision.models.get_weight("
               f"'{type(weights).__name__}.{weights.name}').get_state_dict()\"` and copy the file it writes "
               f"(~/.cache/torch/hub/checkpoints/{path.name}, or under that machine's TORCH_HOME) to {path}, or "
               f"download {weights.url} to {path}")
        if offline:
            raise NotCachedError(f"{what}: not in torch's cache ({path}; torch.hub.get_dir() = {torch.hub.get_dir()}, "
                                 f"set by TORCH_HOME) and offline: {how}")
        try:
            return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
        except Exception as err:  # urllib's URLError/HTTPError, timeouts, a bad hash: all say "not here"
            raise NotCachedError(f"{what}: not in torch's cache ({path}) and the download failed "
                                 f"({type(err).__name__}: {err}): {how}") from err
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as err:
        raise NamedSourceError(f"{what}: the cached file {path} could not be read ({type(err).__name__}: {err}); "
                               "delete it to download it again") from err
