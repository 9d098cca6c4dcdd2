"""The model card: a STAC Item with the Machine Learning Model (MLM) extension beside a checkpoint.

``pipeline import`` and ``pipeline train`` write ``<checkpoint>.stac-item.json`` next to each
checkpoint they write (``models/retinanet.pt`` -> ``models/retinanet.pt.stac-item.json``).
It says, in the vocabulary STAC catalogs and ``stac-browser`` read: the input bands and the
scene data type the model expects, its normalisation (z-score per band, in pixel units),
the chip size and resize rule, the classes, the inference thresholds, architecture,
backbone, framework and version, where the weights came from (imported, or trained by
which job) and training's validation AP where known. The checkpoint is the card's
``model`` asset by relative href (``./retinanet.pt``) with its SHA-256 (``file:checksum``),
so a card copied or moved with its checkpoint still names it, and a card left beside a
different file is recognised as someone else's.

Planning reads a card with :func:`read_model_card` (plain JSON: no pystac, no torch) and
refuses scenes whose band count or data type it rules out; a checkpoint without a card
runs as before. Writing builds the item through pystac's MLM extension (``pystac-ext-mlm``,
MLM v1.4.0), whose constructors check each object's required fields (a z-score scaling
without its stddev is refused); nothing is fetched. ``item.validate()`` (pystac) checks a
card against the published STAC and extension JSON schemas, which it downloads when called.
The tests validate every card they write offline with the STAC item schema pystac ships and
``stac-model``, the MLM extension's reference (pydantic) models.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from pipeline.errors import ConfigError, InputError
from pipeline.io.objstore import is_object_url, local_file
from retinanet.checkpoint import file_sha256, read_checkpoint_header
from retinanet.files import write_atomically

if TYPE_CHECKING:
    import pystac

CARD_SUFFIX = ".stac-item.json"
MODEL_ASSET = "model"
# Multihash prefix of a SHA-256 digest (code 0x12, 32 bytes): what file:checksum holds.
SHA256_MULTIHASH = "1220"
# Band names of an imported torchvision / DeepForest model: both saw RGB photographs.
RGB = ("red", "green", "blue")
# rasterio colour interpretations that name a band well enough to put on a card.
NAMED_COLOURS = {"red", "green", "blue", "alpha", "cyan", "magenta", "yellow", "black", "hue", "saturation",
                 "lightness"}


def card_location(checkpoint: str | os.PathLike) -> str:
    """Where the card of ``checkpoint`` lives: beside it, its name + ``.stac-item.json``."""
    return f"{checkpoint}{CARD_SUFFIX}"


# ------------------------------------------------------------------ reading (planning)


@dataclass(frozen=True)
class ModelCard:
    """What a card rules about the scenes its model may read.

    Attributes:
        path: the card's location.
        band_names: the model's input bands, in order (their count is what a scene's band
            selection must give).
        data_types: the scene data types the card allows (numpy names); empty: any.
    """

    path: str
    band_names: tuple[str, ...]
    data_types: tuple[str, ...]


def read_model_card(checkpoint: str, checkpoint_sha256: str) -> Optional[ModelCard]:
    """The card beside ``checkpoint`` (a local path or an s3:// / gs:// URL), or None when
    there is none (checkpoints from before cards) or it describes another file (its model
    asset's checksum is not ``checkpoint_sha256``, e.g. a checkpoint copied over an older
    one without its card). Raises ConfigError naming the card when it cannot be read."""
    location = card_location(checkpoint)
    if is_object_url(location):
        try:
            local = local_file(location)
        except InputError:  # no such object (the store answered for the checkpoint just now)
            return None
    elif os.path.isfile(location):
        local = location
    else:
        return None
    try:
        card = json.loads(Path(local).read_text())
        return card_rules(location, card, checkpoint_sha256)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(f"{location}: not a readable model card ({type(err).__name__}: {err}); "
                          "delete it to run without one, or write it again with pipeline import") from None


def card_rules(location: str, card: dict, checkpoint_sha256: str) -> Optional[ModelCard]:
    """A card's JSON -> its rules (None when its model asset is another file)."""
    asset = model_asset(card)
    if asset.get("file:checksum", SHA256_MULTIHASH + checkpoint_sha256) != SHA256_MULTIHASH + checkpoint_sha256:
        return None
    model_input = card["properties"]["mlm:input"][0]
    names = tuple(b if isinstance(b, str) else b["name"] for b in model_input["bands"])
    bands = asset.get("raster:bands") or []
    types = [b.get("data_type") for b in bands]
    # A type is ruled only when every band states it (a card of mixed training data states none).
    allowed = tuple(sorted(set(types))) if types and all(types) else ()
    return ModelCard(location, names, allowed)


def model_asset(card: dict) -> dict:
    """The card's asset with the ``mlm:model`` role (KeyError without one)."""
    for asset in card["assets"].values():
        if "mlm:model" in (asset.get("roles") or []):
            return asset
    raise KeyError("no asset with the mlm:model role")


# ------------------------------------------------------------------ writing


def band_names(colorinterp: Sequence[str], bands: Sequence[int]) -> tuple[str, ...]:
    """Names of the 1-based ``bands`` of a scene: their colour interpretation where it
    names them distinctly (red, green, blue, ...), else ``band1``, ``band2``, ..."""
    colours = [colorinterp[b - 1] if 0 < b <= len(colorinterp) else "" for b in bands]
    if all(c in NAMED_COLOURS for c in colours) and len(set(colours)) == len(colours):
        return tuple(colours)
    return tuple(f"band{b}" for b in bands)


def common_data_type(dtypes: Sequence[str]) -> Optional[str]:
    """The one data type of a model's training scenes, or None when they differ (the card
    then rules none out)."""
    unique = set(dtypes)
    return unique.pop() if len(unique) == 1 else None


def imported_data_type(pixel_max: float) -> Optional[str]:
    """The scene data type an imported model expects, from the pixel value it was told
    is the top of its input range (``pipeline import --pixel-max``): 255 -> uint8, up to
    65535 (12- or 16-bit imagery) -> uint16; None for anything else (float scenes)."""
    if pixel_max > 1 and float(pixel_max).is_integer():
        if pixel_max <= 255:
            return "uint8"
        if pixel_max <= 65535:
            return "uint16"
    return None


@dataclass(frozen=True)
class TrainingFacts:
    """What ``pipeline train`` knows of a model that its checkpoint does not hold."""

    job: str
    band_names: tuple[str, ...]
    data_type: Optional[str]
    chip_size: int
    pretrained_source: Optional[str]  # init checkpoint or backbone weights; None: from scratch
    train_chips: int
    val_chips: int
    ray_run: Optional[str] = None


def write_model_card(checkpoint: str | os.PathLike, training: Optional[TrainingFacts] = None) -> Path:
    """Write the card of a local ``checkpoint`` beside it (atomically) -> its path.

    What the checkpoint holds (config, classes, what ``pipeline import`` read from the
    source, training's metadata and validation AP) comes from its header; ``training``
    adds what only the training job knows."""
    checkpoint = Path(checkpoint)
    header = read_checkpoint_header(checkpoint)  # no torch: the header is plain values
    item = model_card_item(checkpoint, header, file_sha256(checkpoint), training)
    text = json.dumps(item.to_dict(include_self_link=False), indent=2) + "\n"
    return write_atomically(card_location(checkpoint), lambda tmp: tmp.write_text(text))


def model_card_item(checkpoint: Path, header: dict, sha256: str,
                    training: Optional[TrainingFacts] = None) -> pystac.Item:
    """The card as a ``pystac.Item`` with the MLM, raster and file extensions."""
    import pystac
    from pystac.extensions.classification import Classification
    from pystac.extensions.file import FileExtension
    from pystac.extensions.mlm import (
        AssetGeneralMLMExtension,
        Hyperparameters,
        InputStructure,
        MLMExtension,
        ModelInput,
        ModelOutput,
        ResultStructure,
        TaskType,
        ValueScaling,
        ValueScalingType,
    )
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    config, metadata = header["config"], header.get("metadata") or {}
    imported = metadata.get("imported_from")
    channels = int(config["in_channels"])
    if training is not None:
        names, data_type, chip = training.band_names, training.data_type, training.chip_size
    elif imported:
        names = RGB if channels == 3 else tuple(f"band{i}" for i in range(1, channels + 1))
        data_type, chip = imported_data_type(float(imported.get("pixel_max", 255.0))), None
    else:
        names, data_type, chip = tuple(f"band{i}" for i in range(1, channels + 1)), None, None
    if len(names) != channels:
        raise ValueError(f"{checkpoint}: {len(names)} band names {list(names)} for a model of {channels} channels")
    source, pretrained_source = provenance(header, training)
    validation = validation_figures(metadata, training)

    modified = datetime.datetime.fromtimestamp(checkpoint.stat().st_mtime, tz=datetime.timezone.utc)
    stem = re.sub(r"[^a-zA-Z0-9_.\-]+", "-", checkpoint.stem).strip("-_.") or "model"
    item = pystac.Item(id=f"{stem}-{sha256[:16]}", geometry=None, bbox=None, datetime=modified, properties={
        "title": f"RetinaNet {checkpoint.name}",
        "description": describe(config, header["class_names"], names, data_type, chip, source, validation),
        "pipeline:source": source,
    })
    if validation:
        item.properties["pipeline:validation"] = validation

    asset = pystac.Asset(f"./{checkpoint.name}", title="RetinaNet checkpoint (retinanet-pipeline format)",
                         media_type="application/octet-stream; application=pytorch",
                         roles=["mlm:model", "mlm:weights"])
    item.add_asset(MODEL_ASSET, asset)
    AssetGeneralMLMExtension.ext(asset, add_if_missing=True).apply(artifact_type="torch.save")
    FileExtension.ext(asset, add_if_missing=True).apply(checksum=SHA256_MULTIHASH + sha256,
                                                        size=checkpoint.stat().st_size)
    raster_bands = []
    for name in names:
        band = RasterBand.create(data_type=DataType(data_type) if data_type else None)
        band.properties["name"] = name  # MLM names the bands its input refers to
        raster_bands.append(band)
    RasterExtension.ext(asset, add_if_missing=True).bands = raster_bands

    model_input = ModelInput.create(
        name="image", bands=list(names),
        # height and width: any (the model pads to 32); the training chip size is a hyperparameter
        input=InputStructure.create(shape=[-1, channels, -1, -1],
                                    dim_order=["batch", "channel", "height", "width"], data_type=DataType.FLOAT32),
        description=("raw pixel values of the bands in order, as float32 (not scaled to [0, 1]); the model "
                     "normalises each band as (x - mean) / stddev and pads to a multiple of 32. "
                     + resize_rule(config)))
    # Set through the object's properties: pystac-ext-mlm 1.4.1's setter writes one ValueScaling
    # object and its ResizeType enum spells "interpolate-linear", where the MLM schema (v1.4.0)
    # and stac-model's models want a list (one per band) and "interpolation-linear".
    model_input.properties["value_scaling"] = [
        ValueScaling.create(ValueScalingType.Z_SCORE, mean=float(m), stddev=float(s)).to_dict()
        for m, s in zip(config["image_mean"], config["image_std"])]
    model_input.properties["resize_type"] = "interpolation-linear" if config.get("min_size") else None

    classes = [Classification.create(value=i, name=str(n), description=str(n))
               for i, n in enumerate(header["class_names"])]
    output = ModelOutput.create(
        name="detections", tasks=[TaskType.OBJECT_DETECTION], classes=classes,
        result=ResultStructure.create(shape=[-1, -1, 6], dim_order=["batch", "detection", "box_score_class"],
                                      data_type=DataType.FLOAT32),
        description=(f"per image up to {config['detections_per_image']} boxes (xmin, ymin, xmax, ymax in input "
                     f"pixels), their score (> {config['score_threshold']}) and class index, after per-class "
                     f"NMS at IoU {config['nms_threshold']}"))
    hyper = {k: config.get(k) for k in ("backbone", "fpn_channels", "p6_from", "head_width", "head_depth",
                                         "score_threshold", "nms_threshold", "detections_per_image",
                                         "topk_candidates", "min_size", "max_size", "anchor_sizes",
                                         "aspect_ratios")}
    hyper["chip_size"] = chip
    MLMExtension.ext(item, add_if_missing=True).apply(
        name=f"RetinaNet {stem}", architecture="RetinaNet", tasks=[TaskType.OBJECT_DETECTION],
        input=[model_input], output=[output], framework="PyTorch", framework_version=torch_version(),
        pretrained=pretrained_source is not None, pretrained_source=pretrained_source,
        hyperparameters=Hyperparameters.create(**hyper))
    return item


def torch_version() -> str:
    """torch's own version string, with its build tag (``2.14.1+cu130``: a CUDA 13.0 build);
    the package metadata omits the tag. Import and training have torch loaded already."""
    import torch

    return str(torch.__version__)


def resize_rule(config: dict) -> str:
    """The chip resize rule in words (torchvision's GeneralizedRCNNTransform)."""
    if not config.get("min_size"):
        return "Chips run at their native size (no resizing)."
    cap = f" unless the long side would pass {config['max_size']} px" if config.get("max_size") else ""
    return f"Each chip is resized (bilinear) so its short side is {config['min_size']} px{cap}."


def provenance(header: dict, training: Optional[TrainingFacts]) -> tuple[dict, Optional[str]]:
    """(the card's ``pipeline:source``, ``mlm:pretrained_source``) of a checkpoint."""
    metadata = header.get("metadata") or {}
    imported = metadata.get("imported_from")
    if imported:
        # what pipeline import recorded: path and sha256 of a file, or the name (and revision)
        # of a named source; the card's mlm:input already holds the statistics and settings
        source = {"kind": "imported", "from": imported.get("kind"),
                  **{k: v for k, v in imported.items() if k not in ("kind", "source_mean", "source_std", "inference")}}
        return source, imported.get("name") or f"{imported.get('kind')} {imported.get('architecture')} weights"
    if training is not None:
        source = {"kind": "trained", "job": training.job, "ray_run": training.ray_run,
                  "step": metadata.get("step"), "epoch": metadata.get("epoch"),
                  "train_chips": training.train_chips, "val_chips": training.val_chips}
        return source, training.pretrained_source
    return {"kind": "unknown"}, None


def validation_figures(metadata: dict, training: Optional[TrainingFacts]) -> Optional[dict]:
    """Training's validation AP of this checkpoint (COCO AP and AP50 on the validation
    chips), when it was measured."""
    row = metadata.get("val") or {}
    if row.get("val_AP") is None and row.get("val_AP50") is None:
        return None
    return {"AP": row.get("val_AP"), "AP50": row.get("val_AP50"), "step": row.get("step"),
            "epoch": row.get("epoch"), "chips": training.val_chips if training is not None else None}


def describe(config: dict, class_names: Sequence[str], names: Sequence[str], data_type: Optional[str],
             chip: Optional[int], source: dict, validation: Optional[dict]) -> str:
    """The card's description: what a person reading it in a catalog needs first."""
    made = (f"imported from a {source['from']} {source['form']} ({source['architecture']})"
            if source["kind"] == "imported" else
            f"trained by pipeline train ({source['job']})" if source["kind"] == "trained" else "of unknown origin")
    scenes = f"{data_type} scenes" if data_type else "scenes of any data type"
    text = (f"RetinaNet ({config['backbone']} FPN) detecting {', '.join(class_names)}; {made}. "
            f"Input: {len(names)} bands ({', '.join(names)}) of {scenes}"
            + (f", trained on {chip}-px chips" if chip else "") + f". {resize_rule(config)}")
    if validation and validation.get("AP50") is not None:
        text += f" Validation AP50 {validation['AP50']:.3f}, AP {validation['AP']:.3f}."
    return text

