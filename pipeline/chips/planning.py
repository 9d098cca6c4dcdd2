"""Planning a scene: the checkpoint's facts the driver needs, the checks of a scene
against model and table, and the chip windows to read (no pixels).

Planned on the driver for the first scenes of a run and in Ray tasks for the rest
(:mod:`pipeline.run.graph`), and by the INT8 gate for its calibration chips.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config.spec import JobSpec
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.io.inputs import SceneInput
from pipeline.io.model_card import ModelCard, read_model_card
from pipeline.io.objstore import local_file
from retinanet.checkpoint import CheckpointError, file_sha256, read_checkpoint_header

if TYPE_CHECKING:  # pipeline.io.raster (rasterio) loads when a scene is planned, not with this module
    from pipeline.io.raster import SceneInfo

# Scenes per planning task of a run's chip stream (each plans them PLAN_THREADS at a time).
PLAN_BATCH = 8


@dataclass
class ScenePlan:
    scene_id: str
    path: str
    info: SceneInfo
    windows: list
    skipped_empty: int
    warnings: list = field(default_factory=list)


@dataclass(frozen=True)
class ModelFacts:
    """What planning and validation need from the checkpoint, read once on the driver."""

    location: str
    class_names: list
    in_channels: int
    image_mean: tuple
    image_std: tuple
    model_id: str
    card: ModelCard | None = None  # the model card beside the checkpoint, if it has one


def model_facts(location: str) -> ModelFacts:
    """Read ``model.checkpoint`` (local, or fetched once from s3:// / gs://) and its model
    card without building the model. Raises ConfigError naming the field when it is not a
    checkpoint, or the card when that cannot be read."""
    try:
        local = local_file(location)
        payload = read_checkpoint_header(local)  # no torch on the driver
    except (CheckpointError, PipelineError) as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    config, sha256 = payload["config"], file_sha256(local)
    return ModelFacts(location, list(payload["class_names"]), int(config["in_channels"]),
                      tuple(config["image_mean"]), tuple(config["image_std"]), sha256[:16],
                      read_model_card(location, sha256))


def eight_bit_statistics(image_mean, image_std) -> bool:
    """True when a model's input statistics describe 0-255 data: every band's mean plus one
    standard deviation within 255 (ImageNet in 0-255 units: at most 181; 16-bit imagery has
    means in the hundreds to thousands). Such a model has never seen larger values."""
    return all(m + s <= 255.0 for m, s in zip(image_mean, image_std))


def unit_statistics(image_mean, image_std) -> bool:
    """True when a model's input statistics describe values in [0, 1] (torchvision's
    convention: ImageNet mean 0.485), not pixel values: fed raw pixels it saturates."""
    return max(image_mean) <= 1.0 and max(image_std) <= 1.0


def scene_problems(info, bands, model: ModelFacts, output_crs) -> tuple[list[str], list[str]]:
    """(errors, warnings) of feeding this scene to this model into this table.

    Errors: the band selection cannot feed the model's channels; a scene without
    georeferencing into a table with a CRS (its boxes would be pixels labelled as map
    coordinates: write it to a table with ``output.crs: null``); an 8-bit scene into a
    model whose statistics need larger values; integer pixels into a model whose statistics
    are for [0, 1] inputs; what the model card rules out (:func:`card_problems`). Warning:
    a 16-bit or float scene into a model with 8-bit statistics and no card's data type
    (values above 255 saturate it, unless the file only holds 0-255).
    """
    from pipeline.chips.tiling import select_bands

    errors, warnings_ = [], []
    try:
        chosen = select_bands(info, bands, model.in_channels)
    except PipelineError as err:
        errors.append(str(err))
    else:
        errors += card_problems(info, chosen, model.card)
    if output_crs is not None and not info.georeferenced:
        errors.append(f"{info.path}: has no georeferencing (no CRS) but output.crs is {output_crs!r}; "
                      "write it to a table with output.crs: null (pixel coordinates)")
    eight_bit = eight_bit_statistics(model.image_mean, model.image_std)
    if not info.dtype.startswith("float") and unit_statistics(model.image_mean, model.image_std):
        errors.append(f"{info.path}: {info.dtype} pixel values, but the model's statistics (image_mean "
                      f"{list(model.image_mean)}) are for inputs in [0, 1]: every score would saturate. "
                      "Import the model with `pipeline import SOURCE --out MODEL.pt` (it rescales the "
                      "normalisation to pixel units; --input-range says what the source saw)")
    elif info.dtype == "uint8" and max(model.image_mean) > 255:
        errors.append(f"{info.path}: uint8 scene, but the model's image_mean {list(model.image_mean)} "
                      "is for larger values (16-bit data)")
    elif info.dtype != "uint8" and eight_bit and not (model.card and model.card.data_types):
        warnings_.append(f"{info.path}: {info.dtype} scene, but the model's statistics (image_mean "
                         f"{list(model.image_mean)}) are for 8-bit data: values above 255 saturate it; "
                         "rescale to 8-bit (gdal_translate -ot Byte -scale) or use a model trained on this data")
    return errors, warnings_


def card_problems(info, chosen_bands: list[int], card: ModelCard | None) -> list[str]:
    """What the model card rules out about a scene (none without a card): a band selection
    whose count is not the card's input bands (a single band is not replicated for a
    model whose card names several), and pixels of a data type the card does not allow."""
    if card is None:
        return []
    errors = []
    if card.band_names and len(chosen_bands) != len(card.band_names):
        plural = "s" if len(chosen_bands) != 1 else ""
        errors.append(f"{info.path}: {len(chosen_bands)} band{plural} {chosen_bands} selected, but the model card "
                      f"{card.path} takes {len(card.band_names)} bands ({', '.join(card.band_names)}); select "
                      f"{len(card.band_names)} with inputs.bands (the card rules out replicating one band)")
    if card.data_types and info.dtype not in card.data_types:
        errors.append(f"{info.path}: {info.dtype} pixels, but the model card {card.path} allows "
                      f"{' or '.join(card.data_types)} only (what the model was trained or imported for); "
                      "convert the scene (e.g. gdal_translate -ot Byte -scale for uint8) or use a model made "
                      "for this data")
    return errors


def plan_scene(scene: SceneInput, spec: JobSpec, model: ModelFacts) -> ScenePlan:
    """Chip windows of one scene worth reading; raises PipelineError when it cannot run."""
    from pipeline.chips.tiling import plan_chips

    info, windows, skipped = plan_chips(scene.location, spec.tiling.chip_size, spec.tiling.overlap,
                                        spec.tiling.min_valid_fraction, scene_id=scene.scene_id)
    errors, warnings_ = scene_problems(info, spec.inputs.bands, model, spec.output.crs)
    if errors:
        raise InputError("; ".join(errors))
    return ScenePlan(scene.scene_id, scene.location, info, windows, skipped, warnings_)


# Scenes planned at once: a plan is a header and a decimated mask read, mostly waiting on
# storage (GDAL releases the GIL), so remote scenes cost round trips in parallel, not in series.
PLAN_THREADS = 8


def plan_scenes(spec: JobSpec, scenes: list[SceneInput], model: ModelFacts) -> list[ScenePlan | dict]:
    """Plan every scene, PLAN_THREADS at a time -> one outcome per scene, in input order:
    its plan, or for a scene that cannot run a dict with its id, path and the reason."""
    def attempt(scene: SceneInput):
        try:
            return plan_scene(scene, spec, model)
        except PipelineError as err:
            return {"scene_id": scene.scene_id, "path": scene.location, "reason": str(err)}

    with ThreadPoolExecutor(max_workers=max(1, min(PLAN_THREADS, len(scenes)))) as pool:
        return list(pool.map(attempt, scenes))
