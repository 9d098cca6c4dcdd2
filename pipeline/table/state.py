"""The detection table's state: what is published, what is current, and reading it.

The log (``_manifests/<sequence>.json``, sequences claimed by exclusive creates), the
snapshots that fold it, the compaction generations that hold rows of several scenes, the
supersede rule over them, and the files and rows readers see. The protocol is stated in
``docs/table-protocol.md``; writing is :mod:`pipeline.table.commit`.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs

from pipeline.errors import CommitError, InputError
from pipeline.io.objstore import arrow_filesystem
from pipeline.table.schema import SCHEMA_VERSION, detection_schema, geo_metadata
from pipeline.table.store import Entry, LocalStore, Store, open_store
from retinanet.files import TMP_PREFIX

MANIFEST_FORMAT = "retinanet-pipeline/scene-manifest"
TABLE_FORMAT = "retinanet-pipeline/detections"
MANIFEST_VERSION = 1
SCENE_STATUSES = ("complete", "partial", "failed")

STAGING, MANIFESTS, REPORTS, TABLE_INFO = "_staging", "_manifests", "_reports", "_table.json"
SNAPSHOTS = "_snapshots"
COMPACTIONS = "_compactions"
COMPACTION_FORMAT = "retinanet-pipeline/compaction"
SNAPSHOT_FORMAT = "retinanet-pipeline/manifest-snapshot"
# A manifest folded into a snapshot is removed this long after it was folded (readers in flight are safe).
SNAPSHOT_GRACE_S = 600.0
STAGED_SUFFIX = ".tmp"  # staged data files: no *.parquet glob matches them


# ---------------------------------------------------------------- the log's names


def manifest_name(sequence: int) -> str:
    """The log entry of ``sequence``: the name holds the sequence and nothing else, so an
    exclusive create of it is the claim of that place in the order."""
    return f"{sequence:020d}.json"


def name_sequence(key: str) -> Optional[int]:
    """The sequence a manifest or snapshot name starts with (``<sequence>.json``, and the
    ``<sequence>-...json`` names of manifests written before the log and of snapshots)."""
    head = key.rsplit("/", 1)[-1].removesuffix(".json").split("-", 1)[0]
    return int(head) if head.isdigit() else None


def next_sequence(manifest_keys: Sequence[str], snapshot: Optional[Mapping]) -> int:
    """One above every sequence published: the manifests listed and the latest snapshot's
    (it records the highest sequence it folded, whose manifests may be removed since)."""
    listed = (name_sequence(k) for k in manifest_keys)
    latest = max((s for s in listed if s is not None), default=0)
    return max(latest, snapshot["sequence"] if snapshot else 0) + 1


# ---------------------------------------------------------------- the table's identity


def require_table(table_root: os.PathLike | str) -> Store:
    """The store of the detection table at ``table_root``, or InputError when none is there:
    a typo must not read as "no rows". A local table is its folder (an empty one is a
    table with no commit yet); an object-store prefix exists only through its objects, so
    it must hold ``_table.json``. The one check behind query, eval, render, vacuum and compact."""
    store = open_store(table_root)
    if isinstance(store, LocalStore):
        if not store.exists():
            raise InputError(f"{table_root}: no detection table here (directory not found)")
    elif store.stat(TABLE_INFO) is None:
        store.list(TABLE_INFO)  # S3 answers a HEAD in a missing bucket with a bare 404; a listing names the bucket
        raise InputError(f"{table_root}: no detection table here ({TABLE_INFO} not found)")
    return store


def read_table_info(store: Store) -> dict:
    """``_table.json`` ({} before the first commit); CommitError if it is not ours."""
    try:
        info = json.loads(store.read(TABLE_INFO))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CommitError(f"{store.url}/{TABLE_INFO}: unreadable table info: {err}") from None
    if info.get("format") != TABLE_FORMAT or info.get("schema_version") != SCHEMA_VERSION:
        raise CommitError(f"{store.url}/{TABLE_INFO}: not a detection table of schema version {SCHEMA_VERSION}")
    return info


def table_crs(table_root: os.PathLike | str) -> Optional[str]:
    """The CRS the table's geometries are in (``_table.json``); None for pixel coordinates
    or a table nothing was committed to yet."""
    return read_table_info(open_store(table_root)).get("crs")


# ---------------------------------------------------------------- manifests and snapshots


def read_document(store: Store, key: str, fmt: str, what: str) -> dict:
    """A JSON document of the table's own (snapshot, compaction generation); damage is
    loud: published documents are complete by construction."""
    try:
        doc = json.loads(store.read(key))
    except (OSError, ValueError) as err:
        raise CommitError(f"{store.url}/{key}: unreadable {what}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CommitError(f"{store.url}/{key}: not a {what}")
    return doc


def read_manifest(store: Store, key: str) -> dict:
    """A published manifest with its file name as ``manifest``; CommitError if it is not one."""
    try:
        m = json.loads(store.read(key))
    except (OSError, ValueError) as err:
        raise CommitError(f"{store.url}/{key}: unreadable manifest: {err}") from None
    required = ("sequence", "run_id", "job_name", "scene_id", "scene_key", "model_id", "job_hash", "rows", "files")
    if (not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION
            or any(k not in m for k in required)):
        raise CommitError(f"{store.url}/{key}: not a version {MANIFEST_VERSION} scene manifest")
    m["manifest"] = key.rsplit("/", 1)[-1]
    return m


# Parsed manifests by (table, key), with the version they were read at (ETag, or size and
# mtime): a published manifest is never rewritten, so a writer committing scene after
# scene reads each once. Kept to the keys of the latest listing of each table.
_parsed_manifests: dict[str, dict[str, tuple[object, dict]]] = {}


def _version(e: Entry) -> object:
    return e.etag if e.etag else (e.size, e.mtime)


def remember_manifest(store: Store, key: str, manifest: dict, etag: Optional[str]) -> None:
    """A manifest this process just published (``etag``: what the create answered), so
    settling its scene need not read it back."""
    entry = Entry(key, 0, 0.0, etag) if etag else store.stat(key)
    if entry is not None:
        _parsed_manifests.setdefault(store.url, {})[key] = (_version(entry), manifest)


def load_manifests(store: Store, entries: Sequence[Entry]) -> list[dict]:
    """The manifests of ``entries`` (a listing), each read once per process."""
    known = _parsed_manifests.get(store.url, {})
    fresh: dict[str, tuple[object, dict]] = {}
    out = []
    for e in entries:
        hit = known.get(e.key)
        if hit is not None and hit[0] == _version(e):
            m = hit[1]
        else:
            m = read_manifest(store, e.key)
        fresh[e.key] = (_version(e), m)
        out.append(m)
    _parsed_manifests[store.url] = fresh
    return out


# The last snapshot this process parsed, by (table, key): snapshots are created once and
# never rewritten, and one holds every current scene (megabytes of JSON at 10,000s of
# scenes), so a writer committing scene after scene parses each snapshot once, not per commit.
_parsed_snapshot: dict[tuple[str, str], dict] = {}


def latest_snapshot(store: Store) -> Optional[dict]:
    """The newest snapshot of the current manifests, or None (see :func:`write_snapshot`).
    Read-only: the dict may be shared with later calls."""
    keys = [k for k in store.keys(SNAPSHOTS) if k.endswith(".json") and not k.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    if not keys:
        return None
    key = max(keys)  # names start with the zero-padded sequence
    cached = _parsed_snapshot.get((store.url, key))
    if cached is not None:
        return cached
    snap = read_document(store, key, SNAPSHOT_FORMAT, "manifest snapshot")
    snap["key"] = key
    snap["folded_names"] = frozenset(snap["folded"])
    _parsed_snapshot.clear()
    _parsed_snapshot[(store.url, key)] = snap
    return snap


def loose_entries(store: Store, snap: Optional[Mapping]) -> list[Entry]:
    """The manifests published but not folded into ``snap`` (one listing; locally a stat of
    each loose one only: folded ones wait for their grace in the same folder)."""
    folded = snap["folded_names"] if snap else frozenset()

    def loose(key: str) -> bool:
        name = key.rsplit("/", 1)[-1]
        return key.endswith(".json") and not name.startswith(TMP_PREFIX) and name not in folded

    if isinstance(store, LocalStore):
        return [e for e in (store.stat(k) for k in store.keys(MANIFESTS) if loose(k)) if e is not None]
    return [e for e in store.list(MANIFESTS) if loose(e.key)]


def by_sequence(manifests: Sequence[dict]) -> list[dict]:
    """Oldest first: the order of the log (names break ties of tables written by clocks)."""
    return sorted(manifests, key=lambda m: (m["sequence"], m["manifest"]))


def manifests_after(store: Store, snap: Optional[Mapping]) -> list[dict]:
    """The entries of ``snap`` (a snapshot just listed; None: there was none) and every
    manifest published but not folded into it, oldest first."""
    loose = load_manifests(store, loose_entries(store, snap))
    return by_sequence((snap["entries"] if snap else []) + loose)


def manifest_state(store: Store) -> list[dict]:
    """The manifests that can still matter, oldest first: the current ones folded into the
    latest snapshot, and every one published since (superseded ones included)."""
    return manifests_after(store, latest_snapshot(store))


def all_manifests(table_root: os.PathLike | str) -> list[dict]:
    """:func:`manifest_state` of the table at ``table_root``."""
    return manifest_state(open_store(table_root))


def current_manifests(manifests: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """The supersede rule over manifests sorted oldest first: later ones overwrite."""
    current: dict[tuple[str, str], dict] = {}
    for m in manifests:
        current[(m["job_name"], m["scene_id"])] = m
    return current


def committed_scenes(table_root: os.PathLike | str) -> dict[tuple[str, str], dict]:
    """Current manifest per ``(job_name, scene_id)`` (the supersede rule applied).

    Each entry holds scene_key, scene_path, model_id, job_hash, run_id, rows, files
    (paths relative to the root), sequence, committed_at and the manifest file name.
    """
    return current_manifests(all_manifests(table_root))


def scene_status(entry: Mapping) -> str:
    """A manifest's status; manifests written before statuses existed count as complete."""
    return entry.get("status", "complete")


def is_current(entry: Optional[Mapping], scene_key: Any, model_id: str, job_hash: str) -> bool:
    """True when a committed entry already holds this scene content, model and job hash,
    complete: partial and failed scenes are always processed again."""
    return (entry is not None and bool(entry) and scene_status(entry) == "complete"
            and entry["scene_key"] == scene_key and entry["model_id"] == model_id and entry["job_hash"] == job_hash)


def write_snapshot(table_root: os.PathLike | str, grace_s: Optional[float] = None) -> Optional[str]:
    """Fold the current manifests into one snapshot (as Delta Lake checkpoints its log), so
    reading the table's state costs the current scenes, not its whole history. Returns the
    new snapshot's key (None when a concurrent writer created that name first).

    Clean-up, first: each folded manifest is removed ``grace_s`` after the snapshot that
    first folded it (the snapshot records when, per name), and each older snapshot
    ``grace_s`` after its successor took over: a reader that listed them before may still
    be reading them. Per name, not per snapshot, so a long burst of commits (a snapshot
    every SNAPSHOT_EVERY commits, each younger than the grace) still drains the folder.

    Safe beside writers: a manifest published while the snapshot is written is not in its
    ``folded`` list, so readers still apply it; the supersede rule orders the two by
    sequence. The snapshot records the highest sequence it saw, so sequences stay above
    those of the manifests it lets go.
    """
    store = open_store(table_root)
    previous = latest_snapshot(store)
    loose = load_manifests(store, loose_entries(store, previous))
    now = time.time()
    cutoff = now - (SNAPSHOT_GRACE_S if grace_s is None else grace_s)
    snapshots = sorted((e for e in store.list(SNAPSHOTS) if e.key.endswith(".json")
                        and not e.key.rsplit("/", 1)[-1].startswith(TMP_PREFIX)), key=lambda e: e.key)
    folded_at = _folded_at(previous, {e.key: e.mtime for e in snapshots})
    for name in [n for n, t in folded_at.items() if t < cutoff]:
        store.delete(f"{MANIFESTS}/{name}")
        del folded_at[name]
    for older, successor in zip(snapshots, snapshots[1:]):
        if successor.mtime < cutoff:
            store.delete(older.key)
    merged = by_sequence((previous["entries"] if previous else []) + loose)
    entries = by_sequence(list(current_manifests(merged).values()))
    # A superseded manifest whose files are still on disk (its scene not settled yet: a
    # writer between move and settle, or a crash there) stays loose, so settle_scene and
    # recover() can still find and delete those files.
    current_names = {m["manifest"] for m in entries}
    for m in loose:
        if m["manifest"] in current_names or not any(store.stat(f["path"]) is not None for f in m["files"]):
            folded_at[m["manifest"]] = now
    sequence = max([m["sequence"] for m in merged] + [previous["sequence"] if previous else 0])
    snap = {"format": SNAPSHOT_FORMAT, "version": 1, "sequence": sequence, "entries": entries,
            "folded": sorted(folded_at), "folded_at": folded_at}
    key = f"{SNAPSHOTS}/{sequence:020d}-{uuid.uuid4().hex[:12]}.json"
    try:
        store.create(key, json.dumps(snap, sort_keys=True).encode())
    except FileExistsError:
        return None
    return key


def _folded_at(snap: Optional[dict], snapshot_mtimes: Mapping[str, float]) -> dict[str, float]:
    """{manifest name: when a snapshot first folded it} of a snapshot; snapshots written
    before the times were recorded count every name from the snapshot's own time."""
    if snap is None:
        return {}
    if "folded_at" in snap:
        return dict(snap["folded_at"])
    written = snapshot_mtimes.get(snap["key"], time.time())
    return {name: written for name in snap["folded"]}


# ---------------------------------------------------------------- compaction generations


def file_day(f: Mapping) -> str:
    """The date partition of a file record (its path's ``date=`` folder)."""
    return f["path"].split("/", 1)[0].removeprefix("date=")


# Parsed generations by (table, key): a generation is created once and never rewritten.
_parsed_generations: dict[tuple[str, str], dict] = {}


def generation_keys(store: Store, day: str = "") -> list[str]:
    """The keys of the compaction generations (of one partition), sorted."""
    prefix = f"{COMPACTIONS}/{day}" if day else COMPACTIONS
    return sorted(k for k in store.keys(prefix) if k.endswith(".json")
                  and not k.rsplit("/", 1)[-1].startswith(TMP_PREFIX))


def current_groups(store: Store) -> dict[str, dict]:
    """{date: the partition's latest compaction generation}."""
    latest: dict[str, str] = {}
    for key in generation_keys(store):
        day = key.removeprefix(f"{COMPACTIONS}/").partition("/")[0]
        latest[day] = max(latest.get(day, key), key)
    groups = {}
    for day, key in latest.items():
        group = _parsed_generations.get((store.url, key))
        if group is None:
            group = read_document(store, key, COMPACTION_FORMAT, "compaction generation")
            remember_generation(store, key, group)
        groups[day] = group
    return groups


def remember_generation(store: Store, key: str, group: dict) -> None:
    """A generation read or just published, with its key and its members by scene."""
    group["key"] = key
    group["member_of"] = {(m["job_name"], m["scene_id"]): m["manifest"] for m in group["members"]}
    _parsed_generations[(store.url, key)] = group


def group_split(group: Mapping, current: Mapping[tuple[str, str], Mapping]) -> tuple[list[dict], list[dict]]:
    """(members whose manifest is still their scene's current one, members superseded since)."""
    live: list[dict] = []
    stale: list[dict] = []
    for m in group["members"]:
        entry = current.get((m["job_name"], m["scene_id"]))
        (live if entry is not None and entry["manifest"] == m["manifest"] else stale).append(m)
    return live, stale


def hidden_rows(scenes: Sequence[tuple[str, str]]) -> Optional[ds.Expression]:
    """Rows of these (job_name, scene_id) pairs, or None for no pair."""
    expr = None
    for job, scene in scenes:
        one = (ds.field("job_name") == job) & (ds.field("scene_id") == scene)
        expr = one if expr is None else expr | one
    return expr


# ---------------------------------------------------------------- what readers read


@dataclass(frozen=True)
class VisiblePart:
    """One data file our readers read: its key (the staged key while an interrupted commit
    is not moved yet), its date partition, and the scenes whose rows in it are superseded
    (only in compacted files, only until the commit that superseded them settles)."""

    key: str
    day: str
    hidden: tuple[tuple[str, str], ...] = ()
    owner: str = ""  # the manifest or generation that lists it


def visible_files(current: Mapping[tuple[str, str], Mapping],
                  groups: Mapping[str, Mapping]) -> list[tuple[dict, VisiblePart]]:
    """(file record, part) of every file that holds current rows: each current scene's own
    files, except those of a date where a compaction holds its rows instead."""
    compacted = set()
    out = []
    for day, group in sorted(groups.items()):
        live, stale = group_split(group, current)
        if not live:
            continue
        compacted |= {(m["manifest"], day) for m in live}
        hidden = tuple(sorted({(m["job_name"], m["scene_id"]) for m in stale}))
        out += [(f, VisiblePart(f["path"], day, hidden, group["key"])) for f in group["files"]]
    for entry in current.values():
        out += [(f, VisiblePart(f["path"], file_day(f), (), entry["manifest"])) for f in entry["files"]
                if (entry["manifest"], file_day(f)) not in compacted]
    return out


def visible_parts(table_root: os.PathLike | str) -> list[VisiblePart]:
    """Every data file our readers read, sorted by key (see :class:`VisiblePart`).

    A current manifest whose commit was interrupted after publishing (the move not done)
    is read from its staged files, so our readers always see every committed scene.
    Raises CommitError if a current manifest lists a file that is missing or has a
    different size (the table was damaged from outside).
    """
    store = open_store(table_root)
    sizes = {e.key: e.size for e in store.list() if e.key.startswith(("date=", STAGING))}
    out = []
    for f, part in visible_files(committed_scenes(table_root), current_groups(store)):
        key = f["path"]
        if key not in sizes and f.get("staged") in sizes:
            key = f["staged"]
        if key not in sizes:
            raise CommitError(f"{store.url}/{key}: listed by {part.owner} but missing")
        if sizes[key] != f["bytes"]:
            raise CommitError(f"{store.url}/{key}: {sizes[key]} bytes, {part.owner} says {f['bytes']}")
        out.append(VisiblePart(key, part.day, part.hidden, part.owner))
    return sorted(out, key=lambda p: p.key)


def part_location(store: Store, key: str) -> str:
    """Where a reader finds a key: an absolute path for a local table, a URL otherwise."""
    return str(store.path(key)) if isinstance(store, LocalStore) else f"{store.url}/{key}"


def committed_parts(table_root: os.PathLike | str) -> list[tuple[str, str]]:
    """(location, date partition) of every data file readers may see, sorted (see
    :func:`visible_parts`; a compacted file may hold superseded rows it hides)."""
    store = open_store(table_root)
    return [(part_location(store, p.key), p.day) for p in visible_parts(table_root)]


def committed_files(table_root: os.PathLike | str) -> list[str]:
    """The locations of :func:`committed_parts`, sorted."""
    return [path for path, _ in committed_parts(table_root)]


def read_committed(
    table_root: os.PathLike | str,
    columns: Optional[list[str]] = None,
    filters: Optional[ds.Expression] = None,
) -> pa.Table:
    """The committed rows: a pyarrow dataset over exactly :func:`committed_parts`.

    columns: names to read (default all); filters: a ``pyarrow.dataset`` expression,
    e.g. ``ds.field("date") == "2024-05-01"`` (the date partition prunes files).
    The result's schema carries the table's ``geo`` metadata (without a bbox).
    An object-store table is read in place through pyarrow's S3/GCS filesystem.
    """
    store = open_store(table_root)
    parts = visible_parts(table_root)
    schema = detection_schema()
    # One dataset per set of hidden scenes (normally one: none hidden), each filtered.
    by_hidden: dict[tuple, list[VisiblePart]] = {}
    for part in parts:
        by_hidden.setdefault(part.hidden, []).append(part)
    tables = []
    for hidden, group in by_hidden.items():
        # The date comes from each file's partition (staged files of an interrupted commit
        # are not under a date= folder yet), given per file rather than parsed from paths.
        partitions = [ds.field("date") == p.day for p in group]
        filesystem: pyarrow.fs.FileSystem
        if isinstance(store, LocalStore):
            filesystem, base = pyarrow.fs.LocalFileSystem(), str(store.root)
        else:  # ranged reads of the columns and row groups asked for, not whole files
            filesystem, base = arrow_filesystem(store.url)
        dataset = ds.FileSystemDataset.from_paths(
            [f"{base}/{p.key}" for p in group], schema=schema, format=ds.ParquetFileFormat(),
            filesystem=filesystem, partitions=partitions)
        keep = hidden_rows(hidden)
        where = filters if keep is None else (~keep if filters is None else filters & ~keep)
        tables.append(dataset.to_table(columns=columns, filter=where))
    if tables:
        result = pa.concat_tables(tables)
    else:
        result = schema.empty_table()
        if filters is not None:
            result = result.filter(filters)
        if columns is not None:
            result = result.select(columns)
    info = read_table_info(store)
    if "geometry" in result.column_names:
        result = result.replace_schema_metadata({b"geo": json.dumps(geo_metadata(info.get("crs", None))).encode()})
    return result


# ---------------------------------------------------------------- finishing what is published


def move_into_place(store: Store, doc: Mapping, known_staged: bool = False) -> None:
    """The staged files of a published manifest or generation to their hive paths
    (idempotent). ``known_staged``: the caller staged them and nobody moved them yet that
    it knows of (its own commit), so no HEAD is asked before each move."""
    for f in doc["files"]:
        staged = f.get("staged")
        if not staged:
            continue
        if not known_staged and (store.stat(f["path"]) is not None or store.stat(staged) is None):
            continue
        try:
            store.move(staged, f["path"])
        except FileNotFoundError:  # another writer or recover() moved it first
            if store.stat(f["path"]) is None:
                raise
