"""Scene inputs: the one expander of input patterns, scene ids, and content keys.

Every command that takes scenes (validate, run, train, eval-checkpoint, submit) expands
them here, so they all see the same scenes under the same ids.

Patterns (``inputs.paths``, ``train.scenes``, ``--scenes``):

- a glob: ``*`` and ``?`` stay within one folder, ``**`` spans any number of folders,
  including none (``data/**/*.tif`` also matches ``data/x.tif``);
- a directory (local, or an object-store prefix ending in ``/``): the rasters directly
  in it (suffixes in :data:`RASTER_SUFFIXES`); use ``dir/**/*.tif`` to recurse;
- a file or URL, taken as given;
- ``s3://`` and ``gs://`` globs and prefixes are listed through the store's own API
  (:mod:`pipeline.io.objstore`) with the same matching rules as local globs.

Scene ids: the location relative to its pattern's *root*, without the file suffix, with
``/`` between folders. The root is the part of the pattern before the first folder that
holds a wildcard; for a plain file it is the file's folder, for a directory the directory::

    data/scenes/*.tif          data/scenes/tile_07.tif            -> tile_07
    archive/**/TCI.tif         archive/S2A_T32TQM_20260101/TCI.tif -> S2A_T32TQM_20260101/TCI
    s3://b/s2/*/visual.tif     s3://b/s2/item_9/visual.tif         -> item_9/visual
    /data/a/scene.tif          (a plain file)                      -> scene

STAC items are their item id. The id depends only on the pattern and the location, so it
is stable from night to night and incremental skipping works. Two inputs with one id
(``a/scene.tif`` and ``b/scene.tif`` given as two plain files) are refused before
anything runs, naming both: give them as one pattern (``*/scene.tif``) instead.

Content keys (:func:`scene_key`): what says a scene is unchanged since it was committed.
Local files: size and mtime. ``s3://`` / ``gs://``: the store's ETag, size and
last-modified. ``http(s)://``: the same from a HEAD request. An overwritten object gets a
new key and is processed again.
"""
from __future__ import annotations

import datetime as dt
import glob
import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterable, Optional, Sequence

from pipeline.config.locations import has_url_scheme, is_remote
from pipeline.errors import ConfigError, InputError
from pipeline.io.objstore import head, is_object_url, list_objects
from pipeline.io.stac import StacSelection, select_stac

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".img", ".vrt", ".ntf")
_WILDCARD = re.compile(r"[*?\[]")


def has_wildcard(pattern: str) -> bool:
    return bool(_WILDCARD.search(pattern))


@dataclass(frozen=True)
class SceneInput:
    """One scene to process: where it is, its id, and the pattern (or STAC source) it came from.

    acquired_at: when it was imaged, as its STAC item says (aware UTC), else None (the
    raster's own tags are read when it is planned, :func:`pipeline.io.raster.acquisition_time`).
    """

    location: str
    scene_id: str
    source: str
    acquired_at: Optional[dt.datetime] = None


@dataclass
class InputSet:
    """The scenes of a job. ``unmatched``: the patterns that matched nothing, as written."""

    scenes: list[SceneInput] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def locations(self) -> list[str]:
        return [s.location for s in self.scenes]


def pattern_root(pattern: str) -> str:
    """The folder a pattern's scene ids are relative to: its leading folders without
    wildcards (``data/**/x/*.tif`` -> ``data``; ``a/b.tif`` -> ``a``; ``x.tif`` -> ``""``)."""
    lead: list[str] = []
    for part in pattern.rstrip("/").split("/")[:-1]:
        if has_wildcard(part):
            break
        lead.append(part)
    root = "/".join(lead)
    return "/" if not root and pattern.startswith("/") else root


def scene_id_for(location: str, root: Optional[str] = None) -> str:
    """Scene id of ``location`` under ``root`` (default: its own folder, i.e. the file stem).

    Examples: (``data/a/x.tif``, ``data``) -> ``a/x``; (``s3://b/k/t.tif?sig=1``) -> ``t``.
    """
    text = str(location)
    if has_url_scheme(text):
        text = text.split("?", 1)[0]  # signed URLs, tokens
    text = text.rstrip("/")
    prefix = None if root is None else (root if root.endswith("/") or not root else root + "/")
    relative = text[len(prefix):] if prefix is not None and text.startswith(prefix) else text.rsplit("/", 1)[-1]
    path = PurePosixPath(relative)
    return str(path.with_suffix("")) if path.suffix else str(path)


def glob_regex(pattern: str) -> re.Pattern:
    """A compiled regex matching what ``glob.glob(pattern, recursive=True)`` matches, for
    object keys (which have no real folders): ``**`` as a whole component spans zero or
    more folders, ``*``/``?``/``[...]`` stay within one component."""
    out, i, n = "", 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern.startswith("**", i) and i + 2 == n and (i == 0 or pattern[i - 1] == "/"):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out, i = out + "[" + body.replace("\\", "\\\\") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _is_raster_name(location: str) -> bool:
    return location.lower().endswith(RASTER_SUFFIXES)


def _expand_object_store(pattern: str) -> tuple[list[str], str]:
    """Objects matching an ``s3://``/``gs://`` pattern -> (URLs, root)."""
    if pattern.endswith("/"):  # a prefix: the rasters directly in it
        root = pattern.rstrip("/")
        found = [u for u in list_objects(root + "/") if "/" not in u[len(root) + 1:] and _is_raster_name(u)]
        return found, root
    if not has_wildcard(pattern):
        try:
            head(pattern)
        except InputError:
            return [], pattern_root(pattern)
        return [pattern], pattern_root(pattern)
    root = pattern_root(pattern)
    wanted = glob_regex(pattern)
    return [u for u in list_objects(root + "/") if wanted.match(u)], root


def _expand_local(pattern: str) -> tuple[list[str], str]:
    """Files matching a local pattern -> (paths, root)."""
    if os.path.isdir(pattern):
        root = pattern.rstrip("/") or "/"
        names = sorted(os.listdir(pattern))
        return [os.path.join(root, n) for n in names
                if _is_raster_name(n) and os.path.isfile(os.path.join(root, n))], root
    if has_wildcard(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)), pattern_root(pattern)
    return ([pattern] if os.path.isfile(pattern) else []), pattern_root(pattern)


def expand_patterns(patterns: Sequence[str]) -> InputSet:
    """Every scene of ``patterns`` with its id, in pattern order then sorted; a location
    matched by two patterns is listed once (under the first). Never raises for a pattern
    that matches nothing: it is listed in ``unmatched`` (see :func:`require_scenes`)."""
    out = InputSet()
    seen: set[str] = set()
    for pattern in patterns:
        if is_object_url(pattern):
            found, root = _expand_object_store(pattern)
        elif is_remote(pattern):  # http(s) and /vsi paths cannot be listed: taken as given
            found, root = [pattern], pattern_root(pattern)
        else:
            found, root = _expand_local(pattern)
        if not found:
            out.unmatched.append(pattern)
        for location in found:
            if location not in seen:
                seen.add(location)
                out.scenes.append(SceneInput(location, scene_id_for(location, root), pattern))
    return out


def id_collisions(scenes: Iterable[SceneInput]) -> list[str]:
    """One message per scene id that two different inputs would share."""
    first: dict[str, SceneInput] = {}
    problems = []
    for s in scenes:
        other = first.setdefault(s.scene_id, s)
        if other is not s:
            problems.append(f"scene id {s.scene_id!r} is given by two inputs: {other.location} (from "
                            f"{other.source!r}) and {s.location} (from {s.source!r}); give both through one "
                            "pattern over their common folder (e.g. 'data/*/scene.tif') so their ids differ")
    return problems


def require_scenes(inputs: InputSet, field_name: str, source: str = "job") -> None:
    """Refuse an input set that cannot run: id collisions, or no scene at all.

    A pattern that matches nothing while others match is not an error here (a nightly
    folder may be empty tonight); callers report it as a warning.
    """
    problems = [f"{source}: {field_name}: {p}" for p in id_collisions(inputs.scenes)]
    if not inputs.scenes:
        problems.append(f"{source}: {field_name}: no scene found: "
                        + ", ".join(repr(p) for p in inputs.unmatched) + " matched nothing")
    if problems:
        raise ConfigError("\n".join(problems))


def job_inputs(spec, since: Optional[dt.datetime] = None) -> tuple[InputSet, Optional[StacSelection]]:
    """The scenes of a job's ``inputs`` section -> (InputSet, StacSelection or None).

    STAC scenes take the item id as their scene id; ``since`` is the STAC selection's
    inclusive lower time bound, the high-water mark of ``since_last_success`` that the run
    reads from its table (:func:`pipeline.run.runbook.stac_since`).
    """
    stac = spec.inputs.stac
    if stac is None:
        return expand_patterns(spec.inputs.paths), None

    selection = select_stac(stac, since)
    scenes = [SceneInput(href, item_id, stac.source, when)
              for href, item_id, when in zip(selection.paths, selection.item_ids, selection.acquired_at, strict=True)]
    return InputSet(scenes, [] if scenes else [stac.source]), selection


def scene_key(location: str) -> dict:
    """Identity of a scene's content, stored in its manifest to skip unchanged scenes."""
    if is_object_url(location):
        return head(location)
    if location.startswith(("http://", "https://")):
        request = urllib.request.Request(location, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return {"etag": resp.headers.get("ETag"), "size": resp.headers.get("Content-Length"),
                        "last_modified": resp.headers.get("Last-Modified")}
        except OSError as err:
            raise InputError(f"{location}: HEAD request failed: {err}") from None
    if is_remote(location):  # a /vsi path: GDAL's business; the location alone
        return {"location": location}
    try:
        st = os.stat(location)
    except OSError as err:
        raise InputError(f"{location}: {err.strerror}") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def match_label_images(label_ids: Iterable[str], scene_ids: Sequence[str], source: str = "labels") -> dict[str, str]:
    """Map the images named in a label file to scene ids -> {label id: scene id}.

    A label image (its name as written, without suffix, see :func:`label_image_id`)
    matches the scene whose id is the same, else the one scene whose id and the label
    path end in the same folders and name (``scene`` or ``/data/a/scene`` match ``a/scene``).
    Label images that match no scene are left out; one that matches two scenes raises
    InputError naming both.
    """
    exact = set(scene_ids)
    out: dict[str, str] = {}
    for label in label_ids:
        if label in exact:
            out[label] = label
            continue
        parts = label.split("/")
        hits = [s for s in scene_ids if _suffix_match(parts, s.split("/"))]
        if len(hits) > 1:
            raise InputError(f"{source}: image {label!r} matches scenes {hits[0]!r} and {hits[1]!r}; "
                             "name it by its path relative to the scenes' folder")
        if hits:
            out[label] = hits[0]
    return out


def _suffix_match(a: list[str], b: list[str]) -> bool:
    k = min(len(a), len(b))
    return a[-k:] == b[-k:]


def label_image_id(image: str) -> str:
    """The id of an image named in a label file: its path as written, without suffix,
    with ``/`` separators and no leading ``./`` (``./a\\\\x.tif`` -> ``a/x``)."""
    text = image.replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return scene_id_for(text, "")
