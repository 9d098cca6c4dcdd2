"""Bring your own RetinaNet: read a torchvision or DeepForest model file and build the
equivalent RetinaNet with the source's input scale, resize rule and inference settings.

Sources (``kind``):

- ``torchvision``: a ``retinanet_resnet50_fpn`` / ``_v2`` state dict (any class count; v1
  or v2 and the class count are read from the tensor shapes), or a whole model saved
  with ``torch.save(model)``. A whole model is read with ``weights_only=True`` and only
  torch.nn / torchvision classes allowed, so nothing else in the file can run; its
  transform and thresholds are read from the model itself. A state dict carries no
  settings: torchvision's defaults apply (min_size 800, max_size 1333, score 0.05,
  NMS 0.5, 300 detections), as ``retinanet_resnet50_fpn(num_classes=N)`` would use.
- ``deepforest``: a Lightning checkpoint (``state_dict`` keys prefixed ``model.``, labels
  in ``label_dict``), or a bare state dict. DeepForest's model is torchvision's v1 with
  its settings: min_size 800, max_size 1333, NMS 0.05, score 0.1 (or those found in the
  checkpoint's ``hyper_parameters``).

Input scale: torchvision and DeepForest feed images as floats in [0, 1] (8-bit pixels
divided by 255), so their normalisation is rescaled to pixel units: our pipeline feeds raw
pixel values. ``input_range="0-255"`` says the source saw raw values instead.
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from retinanet.checkpoint import FORMAT_NAME, CheckpointError, file_sha256
from retinanet.config import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, IMAGENET_MEAN, IMAGENET_STD
from retinanet.convert import TORCHVISION_INFERENCE, TORCHVISION_RESIZE, from_torchvision
from retinanet.model import RetinaNet

KINDS = ("auto", "torchvision", "deepforest")
# What each source does at inference when its file does not say otherwise.
TORCHVISION_SETTINGS = {**TORCHVISION_RESIZE, **TORCHVISION_INFERENCE}
DEEPFOREST_SETTINGS = {**TORCHVISION_SETTINGS, "score_threshold": 0.1, "nms_threshold": 0.05}
DEEPFOREST_LABELS = {"Tree": 0}
# Classes a whole pickled torchvision model may instantiate when read (nothing else runs).
_SAFE_MODULE_PREFIXES = ("torch.nn.modules.", "torchvision.models.", "torchvision.ops.")
_SAVE_STATE_DICT = "save its weights instead: torch.save(model.state_dict(), 'weights.pt')"


@dataclass
class ImportedModel:
    """A model ready for :func:`retinanet.save_checkpoint`: the network, its class names,
    and what was read from the source (recorded in the checkpoint's metadata)."""

    model: RetinaNet
    class_names: list[str]
    metadata: dict = field(default_factory=dict)


def parse_input_range(text: str) -> float:
    """``"0-1"`` -> 1.0, ``"0-255"`` -> 255.0: the upper end of the values the source saw."""
    match = re.fullmatch(r"\s*0\s*-\s*([0-9]+(?:\.[0-9]*)?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"input range must look like 0-1 or 0-255 (the values the source model saw), got {text!r}")
    return float(match.group(1))


def pixel_statistics(mean: Sequence[float], std: Sequence[float], input_high: float,
                     pixel_max: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation in pixel units. A source that saw [0, input_high] where the scenes
    hold [0, pixel_max] had its pixels scaled by input_high / pixel_max first, so its
    mean and std grow by the inverse. Example: ImageNet mean 0.485 of a [0, 1] model on
    8-bit scenes -> 123.675."""
    scale = pixel_max / input_high
    return tuple(m * scale for m in mean), tuple(s * scale for s in std)


def torchvision_layout(state_dict: Mapping[str, Tensor]) -> tuple[int, bool]:
    """(num_classes, v2) of a torchvision RetinaNet state dict, from its tensor shapes:
    v2 builds P6 from C5 (2048 input channels) and has GroupNorm in its heads."""
    logits = state_dict.get("head.classification_head.cls_logits.weight")
    p6 = state_dict.get("backbone.fpn.extra_blocks.p6.weight")
    if logits is None or p6 is None:
        raise CheckpointError("not a torchvision RetinaNet state dict (no head.classification_head.cls_logits "
                              "or backbone.fpn.extra_blocks.p6 weights)")
    anchors = state_dict["head.regression_head.bbox_reg.weight"].shape[0] // 4
    return logits.shape[0] // anchors, p6.shape[1] != 256


def _safe_classes(path: Path) -> list[type]:
    """The classes a whole-model pickle needs, if every one is a torch.nn or torchvision
    class; else CheckpointError naming the others."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed: list[type] = []
    refused: list[str] = []
    for name in names:
        module, _, attr = name.rpartition(".")
        obj = None
        if name.startswith(_SAFE_MODULE_PREFIXES):
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                obj = None
        if isinstance(obj, type):
            allowed.append(obj)
        else:
            refused.append(name)
    if refused:
        deepforest = any(n.split(".")[0] in ("deepforest", "omegaconf", "pytorch_lightning", "lightning")
                         for n in refused)
        how = ("in DeepForest, save the weights and labels instead: torch.save({'state_dict': "
               "m.model.state_dict(), 'label_dict': m.label_dict}, 'deepforest_weights.pt')"
               if deepforest else _SAVE_STATE_DICT)
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than torch and torchvision "
                              f"classes ({', '.join(sorted(refused)[:5])}), so reading it could run code; {how}")
    return allowed


def read_source(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; a whole torchvision model is let through with
    exactly the torch.nn / torchvision classes it names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as err:  # zip/pickle corruption surfaces as many exception types
        raise CheckpointError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from err
    # safe_globals' list: callables or (callable, name) pairs; classes are callables
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = list(_safe_classes(path))
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: could not be read safely ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0]}); {_SAVE_STATE_DICT}") from err


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _names_from_label_dict(label_dict: Mapping[str, int], num_classes: int, where: str) -> list[str]:
    """DeepForest's ``{"Tree": 0}`` -> ["Tree"], ordered by id."""
    ids = sorted(label_dict.values())
    if ids != list(range(num_classes)):
        raise CheckpointError(f"{where}: label_dict {dict(label_dict)} does not number the model's "
                              f"{num_classes} classes 0..{num_classes - 1}")
    by_id = {int(v): str(k) for k, v in label_dict.items()}
    return [by_id[i] for i in range(num_classes)]


def _deepforest_settings(payload: Mapping) -> dict:
    """DeepForest's inference settings, overridden by those its checkpoint records."""
    settings = dict(DEEPFOREST_SETTINGS)
    hyper = payload.get("hyper_parameters") or {}
    config = hyper.get("config") if isinstance(hyper.get("config"), Mapping) else hyper
    if isinstance(config, Mapping):
        given = config.get("retinanet")
        retina = given if isinstance(given, Mapping) else {}
        for ours, theirs in (("nms_threshold", "nms_thresh"), ("score_threshold", "score_thresh"),
                             ("detections_per_image", "detections_per_img"), ("topk_candidates", "topk_candidates")):
            value = config.get(theirs, retina.get(theirs))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                settings[ours] = type(settings[ours])(value)
    return settings


def _whole_model_facts(model: nn.Module, where: str) -> tuple[dict[str, Tensor], dict, tuple, tuple]:
    """(state dict, settings, mean, std) of a torchvision RetinaNet object."""
    from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet

    if not isinstance(model, TorchvisionRetinaNet):
        raise CheckpointError(f"{where}: holds a {type(model).__name__}, not a torchvision RetinaNet")
    transform, anchors = model.transform, model.anchor_generator
    ratios = {tuple(float(r) for r in level) for level in anchors.aspect_ratios}
    sizes = tuple(tuple(float(s) for s in level) for level in anchors.sizes)
    if len(ratios) != 1 or len(sizes) != 5:
        raise CheckpointError(f"{where}: anchors with per-level aspect ratios or not five levels are not supported")
    if getattr(transform, "fixed_size", None):
        raise CheckpointError(f"{where}: a transform with fixed_size is not supported (use min_size/max_size)")
    # several min_size values are a training-time multi-scale setting; inference uses the last
    settings: dict[str, Any] = {
        "min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size),
        "score_threshold": float(model.score_thresh), "nms_threshold": float(model.nms_thresh),
        "detections_per_image": int(model.detections_per_img), "topk_candidates": int(model.topk_candidates)}
    if sizes != tuple(tuple(float(s) for s in level) for level in DEFAULT_SIZES) \
            or ratios != {tuple(float(r) for r in DEFAULT_ASPECT_RATIOS)}:
        settings.update(anchor_sizes=sizes, aspect_ratios=next(iter(ratios)))
    return model.state_dict(), settings, tuple(transform.image_mean), tuple(transform.image_std)


@dataclass
class SourceFacts:
    """What a source says, whatever its format: weights in torchvision's layout, which
    library made them (``kind``), in what form, its inference settings and input statistics,
    and its class names when it names them."""

    state: dict[str, Tensor]
    kind: str
    form: str
    settings: dict
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    names: Optional[list[str]] = None


def deepforest_facts(weights: Mapping[str, Any], label_dict: Optional[Mapping[str, int]], settings: dict,
                     form: str, where: str) -> SourceFacts:
    """A DeepForest RetinaNet from its weights (keys ``model.*`` as its Lightning module
    saves them, or the network's own) and its ``label_dict``; one reader for its Lightning
    checkpoints and its Hugging Face releases."""
    # Lightning saves the module's keys (model.*); the recipe in our refusal message and
    # DeepForest 2's hub releases save the network's own (no prefix)
    state = _strip_prefix(weights, "model.") or _strip_prefix(weights, "")
    if not state:
        raise CheckpointError(f"{where}: holds no weights")
    names = None
    if label_dict:
        try:
            num_classes = torchvision_layout(state)[0]
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from None
        names = _names_from_label_dict(label_dict, num_classes, where)
    return SourceFacts(state, "deepforest", form, settings, names=names)


def read_facts(path: Path, kind: str) -> SourceFacts:
    """The facts of one torchvision or DeepForest file (see module doc)."""
    payload = read_source(path)
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT_NAME:
        raise CheckpointError(f"{path}: already a {FORMAT_NAME} file: use it as model.checkpoint directly")
    if isinstance(payload, nn.Module):
        if kind == "deepforest":
            raise CheckpointError(f"{path}: a whole pickled model; DeepForest checkpoints are Lightning .ckpt "
                                  "files or state dicts")
        state, settings, mean, std = _whole_model_facts(payload, str(path))
        return SourceFacts(state, "torchvision", "whole model", settings, mean, std)
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):  # Lightning
        hyper = payload.get("hyper_parameters") or {}
        label_dict = payload.get("label_dict") or (hyper.get("label_dict") if isinstance(hyper, Mapping) else None)
        if kind == "torchvision":
            facts = deepforest_facts(payload["state_dict"], label_dict, dict(TORCHVISION_SETTINGS),
                                     "lightning checkpoint", str(path))
            facts.kind = "torchvision"
            return facts
        return deepforest_facts(payload["state_dict"], label_dict, _deepforest_settings(payload),
                                "lightning checkpoint", str(path))
    if isinstance(payload, Mapping) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        prefixed = any(k.startswith("model.") for k in payload)
        state = _strip_prefix(payload, "model.") if prefixed else dict(payload)
        source = "deepforest" if kind == "deepforest" or (kind == "auto" and prefixed) else "torchvision"
        settings = dict(DEEPFOREST_SETTINGS if source == "deepforest" else TORCHVISION_SETTINGS)
        return SourceFacts(state, source, "state dict", settings)
    raise CheckpointError(f"{path}: not a torchvision or DeepForest RetinaNet (expected a state dict, a "
                          f"Lightning checkpoint or a whole torchvision model, found {type(payload).__name__})")


def build_imported(facts: SourceFacts, where: str, provenance: dict, class_names: Optional[Sequence[str]] = None,
                   input_range: str = "0-1", pixel_max: float = 255.0, **overrides) -> ImportedModel:
    """The RetinaNet a source's facts describe, with its provenance (path or name, hash or
    revision) in the checkpoint's metadata. ``where`` names the source in errors."""
    input_high = parse_input_range(input_range)
    try:
        num_classes, v2 = torchvision_layout(facts.state)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    if facts.kind == "deepforest" and v2:
        raise CheckpointError(f"{where}: v2 weights (P6 from C5, GroupNorm heads), but DeepForest's RetinaNet is v1")
    names = facts.names
    if class_names:
        names = [str(n) for n in class_names]
    elif names is None and facts.kind == "deepforest" and num_classes == len(DEEPFOREST_LABELS):
        names = list(DEEPFOREST_LABELS)
    if names is None:
        raise CheckpointError(f"{where}: the model has {num_classes} classes but the file names none: "
                              f"pass their names (--classes name1,name2,...)")
    if len(names) != num_classes:
        raise CheckpointError(f"{where}: {len(names)} class names for a model with {num_classes} classes")
    image_mean, image_std = pixel_statistics(facts.mean, facts.std, input_high, pixel_max)
    config = {**facts.settings, "image_mean": image_mean, "image_std": image_std, **overrides}
    try:
        model = from_torchvision(facts.state, num_classes, v2=v2, **config)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    inference = {k: getattr(model.config, k) for k in TORCHVISION_SETTINGS}
    metadata = {"imported_from": {**provenance, "kind": facts.kind, "form": facts.form,
                                  "architecture": "retinanet_resnet50_fpn" + ("_v2" if v2 else ""),
                                  "input_range": f"0-{input_high:g}", "pixel_max": pixel_max,
                                  "source_mean": list(facts.mean), "source_std": list(facts.std),
                                  "inference": inference}}
    return ImportedModel(model, names, metadata)


def import_model(path: str | os.PathLike, kind: str = "auto", class_names: Optional[Sequence[str]] = None,
                 input_range: str = "0-1", pixel_max: float = 255.0, **overrides) -> ImportedModel:
    """Build the RetinaNet a torchvision or DeepForest file describes (see module doc).

    class_names: required when the source has none (a torchvision state dict), else
    they replace the source's. overrides: RetinaNetConfig fields that replace what the
    source says (e.g. ``min_size=None`` to switch the resize rule off).
    Raises CheckpointError naming the file and the reason.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    parse_input_range(input_range)  # a bad range is refused before the file is read
    facts = read_facts(path, kind)
    return build_imported(facts, str(path), {"path": str(path), "sha256": file_sha256(path)}, class_names,
                          input_range, pixel_max, **overrides)
