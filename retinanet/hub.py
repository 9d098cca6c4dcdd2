"""Models to start from, by name: torchvision's COCO RetinaNets and DeepForest's releases on
the Hugging Face hub, fetched through their owners' own libraries into their usual caches.

Names:

- ``torchvision:retinanet_resnet50_fpn`` and ``torchvision:retinanet_resnet50_fpn_v2``: the
  COCO_V1 weights through torchvision's weights API, cached under ``torch.hub.get_dir()``
  (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``) in ``checkpoints/<file of the URL>``.
  Classes: the weights' ``meta["categories"]``, all 91 of them, so that a detection's label
  id stays its COCO category id (0 is ``__background__``; the ids COCO left unused are named
  ``N/A <id>`` to keep names unique).
- ``hf:<owner>/<repo>`` (``@<revision>`` optional, default ``main``): a DeepForest RetinaNet
  release, e.g. ``hf:weecology/deepforest-tree``, through ``huggingface_hub`` into its cache
  (``$HF_HUB_CACHE``, default ``$HF_HOME/hub`` = ``~/.cache/huggingface/hub``). DeepForest's
  layout: ``config.json`` (``label_dict``, ``num_classes``, ...) beside ``model.safetensors``
  (or ``pytorch_model.bin``) with torchvision's keys, prefixed ``model.`` in releases of
  DeepForest 1.x. Labels come from ``label_dict``; resize rule and thresholds are those
  DeepForest runs it with (its config's score 0.1, NMS 0.05, 300 detections, torchvision's
  800/1333 resize), which it passes over the ones in ``config.json``.

Offline (``offline=True``, or ``HF_HUB_OFFLINE=1`` for the hub) only the caches are read; a
name not cached there gives :class:`NotCachedError` saying where the cache is and how to fill
it. huggingface_hub and safetensors are imported only for ``hf:`` names.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torchvision.models import get_weight

from retinanet.checkpoint import CheckpointError
from retinanet.hub_cache import NamedSourceError, NotCachedError, cached_weights_path, torchvision_weights_state
from retinanet.imports import (
    DEEPFOREST_SETTINGS,
    TORCHVISION_SETTINGS,
    ImportedModel,
    SourceFacts,
    build_imported,
    deepforest_facts,
    torchvision_layout,
)

# torchvision's weights, by the builder's name (its weights API's enum member).
TORCHVISION_WEIGHTS = {
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
    "retinanet_resnet50_fpn_v2": "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
}
# DeepForest's RetinaNet releases (any hub repo in their layout is read alike).
DEEPFOREST_RELEASES = ("weecology/deepforest-tree", "weecology/deepforest-bird", "weecology/deepforest-livestock",
                       "weecology/everglades-nest-detection")
KNOWN_NAMES = tuple(f"torchvision:{n}" for n in TORCHVISION_WEIGHTS) + tuple(f"hf:{r}" for r in DEEPFOREST_RELEASES)
# DeepForest's hub files (huggingface_hub's PyTorchModelHubMixin names; safetensors first, as it loads them)
HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*):(?!//)(.+)$")


class MissingHubFile(NamedSourceError):
    """The repo (at that revision) has no file of this name."""


def is_named_source(text: str) -> bool:
    """``scheme:rest`` that is not an existing file (``torchvision:...``, ``hf:...``, or an
    unknown scheme, refused with the known names) and not a URL."""
    return bool(_SCHEME.match(text)) and not os.path.exists(text)


def import_named(name: str, class_names: Optional[Sequence[str]] = None, input_range: str = "0-1",
                 pixel_max: float = 255.0, offline: bool = False, hub_cache: Optional[str] = None,
                 **overrides) -> ImportedModel:
    """The RetinaNet a named source describes (see module doc), downloaded when not cached
    unless ``offline``. hub_cache: a Hugging Face cache folder other than huggingface_hub's
    (HF_HUB_CACHE). Raises NamedSourceError / NotCachedError naming the source."""
    match = _SCHEME.match(name)
    scheme, rest = (match.group(1), match.group(2)) if match else ("", name)
    if scheme == "torchvision":
        facts, provenance = torchvision_facts(rest, offline)
    elif scheme == "hf":
        facts, provenance = hub_facts(rest, offline, hub_cache)
    else:
        raise NamedSourceError(f"{name}: unknown model name; known: {', '.join(KNOWN_NAMES)} "
                               "(hf:<owner>/<repo>[@revision] for any DeepForest release on the Hugging Face hub), "
                               "or a file")
    return build_imported(facts, name, {"name": name, **provenance}, class_names, input_range, pixel_max,
                          **overrides)


# ------------------------------------------------------------------ torchvision


def coco_class_names(categories: Sequence[str]) -> list[str]:
    """torchvision's COCO categories, index = COCO category id, with the unused ids' ``N/A``
    placeholders named ``N/A <id>`` (unique names; the ids, and so the labels, unchanged)."""
    return [f"{c} {i}" if c == "N/A" else str(c) for i, c in enumerate(categories)]


def torchvision_facts(builder: str, offline: bool) -> tuple[SourceFacts, dict]:
    """torchvision's COCO RetinaNet ``builder`` with its settings and categories."""
    what = f"torchvision:{builder}"
    if builder not in TORCHVISION_WEIGHTS:
        raise NamedSourceError(f"{what}: unknown torchvision RetinaNet; known: {', '.join(KNOWN_NAMES)}")
    weights = get_weight(TORCHVISION_WEIGHTS[builder])
    state = torchvision_weights_state(weights, what, offline)
    names = coco_class_names(weights.meta["categories"])
    facts = SourceFacts(state, "torchvision", f"{weights.name} weights", dict(TORCHVISION_SETTINGS), names=names)
    return facts, {"weights": TORCHVISION_WEIGHTS[builder], "url": weights.url,
                   "file": str(cached_weights_path(weights))}


# ------------------------------------------------------------------ Hugging Face hub (DeepForest)


def hub_facts(spec: str, offline: bool, cache: Optional[str] = None) -> tuple[SourceFacts, dict]:
    """A DeepForest release on the hub: ``owner/repo[@revision]``."""
    repo, _, revision = spec.partition("@")
    revision = revision or "main"
    what = f"hf:{spec}"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise NamedSourceError(f"{what}: a hub name is hf:<owner>/<repo>[@revision], e.g. hf:weecology/deepforest-tree")
    config_path = hub_file(repo, HUB_CONFIG, revision, what, offline, cache)
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as err:
        raise NamedSourceError(f"{what}: {HUB_CONFIG} is not readable JSON ({err})") from err
    label_dict = config.get("label_dict") if isinstance(config, dict) else None
    if not isinstance(label_dict, dict) or not label_dict:
        keys = sorted(config)[:8] if isinstance(config, dict) else type(config).__name__
        raise NamedSourceError(f"{what}: not a DeepForest RetinaNet release: its {HUB_CONFIG} has no label_dict "
                               f"(keys: {keys})")
    weights_path = None
    for filename in HUB_WEIGHTS:
        try:
            weights_path = hub_file(repo, filename, revision, what, offline, cache)
            break
        except MissingHubFile:
            continue
    if weights_path is None:
        raise NamedSourceError(f"{what}: holds no weights file ({' or '.join(HUB_WEIGHTS)}), so no RetinaNet")
    weights = read_hub_weights(Path(weights_path), what)
    try:
        torchvision_layout(_without_prefix(weights))
        facts = deepforest_facts(weights, label_dict, dict(DEEPFOREST_SETTINGS),
                                 f"hub release ({Path(weights_path).name})", what)
    except CheckpointError as err:
        raise NamedSourceError(f"{what}: holds no RetinaNet ({err})") from None
    snapshot = Path(weights_path).parent.name  # the snapshot folder is the commit's sha
    return facts, {"repo": repo, "revision": revision, "commit": snapshot,
                   "files": [HUB_CONFIG, Path(weights_path).name]}


def hub_cache_dir(cache: Optional[str] = None) -> str:
    """The Hugging Face cache folder in use (``cache``, else HF_HUB_CACHE / HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(cache or constants.HF_HUB_CACHE)


def hub_file(repo: str, filename: str, revision: str, what: str, offline: bool, cache: Optional[str] = None) -> str:
    """One file of a hub repo through huggingface_hub's cache (downloaded unless offline)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise NamedSourceError(f"{what}: hf: names need huggingface_hub and safetensors: "
                               "pip install huggingface_hub safetensors") from err
    try:
        return hf_hub_download(repo, filename, revision=revision, local_files_only=offline, cache_dir=cache)
    except RepositoryNotFoundError as err:
        raise NamedSourceError(f"{what}: no such repository on the Hugging Face hub (or it is private: "
                               "log in with `hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise NamedSourceError(f"{what}: the repository has no revision {revision!r}") from err
    except LocalEntryNotFoundError as err:
        if filename != HUB_CONFIG and _cached_revision(repo, revision, cache):
            # the release is cached (its config was read): this weights file is not among its files
            raise MissingHubFile(f"{what}: no {filename} in the cached release") from err
        folder = Path(hub_cache_dir(cache)) / f"models--{repo.replace('/', '--')}"
        raise NotCachedError(
            f"{what}: not in the Hugging Face cache ({folder}; the cache is HF_HUB_CACHE, default HF_HOME/hub) "
            f"and it could not be downloaded ({'offline' if offline else str(err).splitlines()[0]}): on a machine that "
            f"is online run `hf download {repo} --revision {revision}` (or `pipeline import hf:{repo}`) and copy "
            f"its {folder.name} folder into this machine's {hub_cache_dir(cache)}") from err
    except EntryNotFoundError as err:  # online: the repo answered that the file is not there
        raise MissingHubFile(f"{what}: no {filename} in the repository") from err


def _cached_revision(repo: str, revision: str, cache: Optional[str]) -> bool:
    """Whether the cache holds this revision's snapshot of the repo (its config was found)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, HUB_CONFIG, cache_dir=cache, revision=revision)
    return isinstance(found, str)


def _without_prefix(weights: dict) -> dict:
    """DeepForest 1.x releases key the network's weights model.* (its Lightning module's)."""
    return {k.removeprefix("model."): v for k, v in weights.items()}


def read_hub_weights(path: Path, what: str) -> dict:
    """model.safetensors (safetensors) or pytorch_model.bin (torch, weights only) as a dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as err:
        raise NamedSourceError(f"{what}: reading {path.name} needs safetensors: pip install safetensors") from err
    except Exception as err:
        raise NamedSourceError(f"{what}: {path} is not readable ({type(err).__name__}: {err})") from err
