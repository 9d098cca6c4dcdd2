"""The detection table: GeoParquet 1.1 files published atomically through manifests.

Layout of a table root (``output.table``: a local folder, or an ``s3://`` / ``gs://``
prefix through :mod:`pipeline.table.store`, with the same protocol)::

    date=2024-05-01/<run_id>-<scene>-<uuid>.parquet   data files (hive partition `date`)
    _manifests/<sequence>-<run_id>-<uuid>.json         one per committed scene
    _manifests/.tmp-*                                  manifests being written (ignored)
    _snapshots/<sequence>-<uuid>.json                  the current manifests, folded
    date=2024-05-01/compact-<generation>-<uuid>.parquet  a compacted partition's files
    _compactions/<date>/<generation>.json              what a compaction holds (see below)
    _staging/<run_id>-<uuid>/*.parquet.tmp             files of a commit in progress
    _reports/<run_id>.json                             run reports
    _table.json                                        created once: format and CRS

The data files are plain GeoParquet under hive ``date=`` folders and hold no ``date``
column (it comes from the folder), so DuckDB's ``read_parquet('T/**/*.parquet',
hive_partitioning = true)``, ``pyarrow.dataset.dataset(T, partitioning="hive")``,
``geopandas.read_parquet(T)`` and :func:`read_committed` see the same rows. Staged files
live under ``_staging`` (skipped by pyarrow and GeoPandas, whose readers ignore ``_``
folders) and end in ``.tmp``, so no ``*.parquet`` glob reaches them either.

Commit protocol (:func:`commit_scene`, one call per scene, so a crashed run keeps the
scenes it finished and a rerun can skip them):

1. write the scene's rows as Parquet under ``_staging/<run_id>-<uuid>/`` and fsync;
2. count: the row count in each file's footer must equal the rows handed in;
3. publish the manifest (the commit point): write ``_manifests/.tmp-<uuid>``, fsync,
   then ``os.link`` it to its final name. ``link`` is atomic and fails if the name exists
   (O_EXCL semantics), so a manifest is either absent or complete, never overwritten;
4. move each staged file to its final hive path with ``os.replace``;
5. settle the scene: delete the files of its superseded manifests (see
   :func:`settle_scene`), so plain readers never see a scene twice at rest.

A failure before step 3 publishes nothing and leaves nothing a reader can see. A crash
between 3 and 4 leaves a published manifest whose files are still staged: our readers
read them from ``_staging`` (:func:`committed_files`), plain readers still see the
scene's previous rows, and :func:`recover` (run by every ``pipeline run`` and by
``pipeline vacuum``) finishes the move and settles the scene. A reader that lists the
folder *during* a commit can see, for the milliseconds between steps 4 and 5, both the
old and the new rows of that one scene, or find that a file it listed was just removed
(retry the read).

Supersede rule: a manifest describes one scene of one job, keyed by
``(job_name, scene_id)``. Among the manifests of one key the one with the highest
``sequence`` (then file name) is current; older ones, and their files, are no longer
visible. So running a scene again (same run id, or a new run) replaces exactly that
scene's rows, and every other scene and job is untouched. Keep scene ids unique per
acquisition if the table should keep history of a place.

Snapshots (:func:`write_snapshot`): every ``SNAPSHOT_EVERY`` commits (and at each
vacuum) the current manifests are folded into one snapshot file, as Delta Lake
checkpoints its log; a folded manifest is removed SNAPSHOT_GRACE_S after it was folded.
Reading the state is then the latest snapshot plus the manifests published since, so its
cost follows the number of current scenes, not the length of the history.

Compaction (:func:`compact`, ``pipeline compact``): a partition's files are rewritten
into few large ones, published as one generation created exclusively (the section
"compaction" below). A scene committed again after its partition was compacted has its
old rows removed from the compacted file by its commit's step 5 (copy on write); until
then our readers hide them.

Concurrency: writers share no mutable file. Data files and manifests have unique names
(uuid4), manifests are created exclusively (a hard link locally, a conditional PUT with
``If-None-Match: *`` in an object store), so any number of processes or machines can
commit into one table at once. ``sequence`` is the commit
time in ns, raised above every sequence already published, so on one machine a later
commit of a scene always wins; two machines committing the *same* scene at the same
moment are ordered by their clocks.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import CommitError, InputError
from pipeline.io.objstore import arrow_filesystem
from pipeline.table.schema import SCHEMA_VERSION, current_file_rows, detection_schema, geo_metadata
from pipeline.table.store import LocalStore, open_store
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
# A commit folds the manifests into a new snapshot once this many are not in one yet, and
# removes manifests folded more than SNAPSHOT_GRACE_S ago (readers in flight are safe).
SNAPSHOT_EVERY = 200
SNAPSHOT_GRACE_S = 600.0
STAGED_SUFFIX = ".tmp"  # staged data files: no *.parquet glob matches them
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---------------------------------------------------------------- names


def _safe_part(text: str, limit: int = 80) -> str:
    """A scene id as a file-name fragment (the real id is kept in rows and manifest)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:limit] or "scene"


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        raise CommitError(f"{what} must be 1-128 letters, digits, '.', '_' or '-' (it names files), got {value!r}")


# ---------------------------------------------------------------- committing


@dataclass(frozen=True)
class RunInfo:
    """What identifies a run's output: written into every manifest it publishes.

    run_id: unique per run (file-name safe); job_name: the job's ``name``;
    job_hash: :func:`pipeline.config.spec.job_hash`; model_id: checkpoint content hash;
    crs: ``output.crs`` (None for pixel coordinates).
    """

    run_id: str
    job_name: str
    job_hash: str
    model_id: str
    crs: Optional[str] = "EPSG:4326"


def new_run_id(now: Optional[dt.datetime] = None) -> str:
    """A sortable unique run id: ``YYYYMMDDTHHMMSSZ-<8 hex>`` (UTC)."""
    when = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    return f"{when:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _ensure_table_info(store, crs: Optional[str]) -> None:
    """Create ``_table.json`` on first commit; afterwards refuse a different CRS, so one
    table never mixes coordinate systems (readers attach a single CRS)."""
    info = {"format": TABLE_FORMAT, "schema_version": SCHEMA_VERSION, "crs": crs}
    if store.stat(TABLE_INFO) is None:
        try:
            store.create(TABLE_INFO, json.dumps(info, indent=2).encode())
            return
        except FileExistsError:
            pass  # a concurrent writer created it first: compare with theirs
    existing = _read_table_info(store)
    if existing.get("crs") != crs:
        raise CommitError(f"{store.url}: table holds crs {existing.get('crs')!r}; this run writes crs {crs!r}")


def require_table(table_root: os.PathLike | str) -> Any:
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


def _read_table_info(store) -> dict:
    try:
        info = json.loads(store.read(TABLE_INFO))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CommitError(f"{store.url}/{TABLE_INFO}: unreadable table info: {err}") from None
    if info.get("format") != TABLE_FORMAT or info.get("schema_version") != SCHEMA_VERSION:
        raise CommitError(f"{store.url}/{TABLE_INFO}: not a detection table of schema version {SCHEMA_VERSION}")
    return info


def _check_rows(table: pa.Table, run: RunInfo, scene_id: str) -> None:
    """The rows must have the table's columns and belong to this run and scene."""
    want = detection_schema()
    if not table.schema.remove_metadata().equals(want):
        raise CommitError(f"scene {scene_id}: rows do not have the detection schema:\n{table.schema}")
    for column, value in (("run_id", run.run_id), ("job_name", run.job_name), ("scene_id", scene_id),
                          ("model_id", run.model_id), ("job_hash", run.job_hash)):
        if table.num_rows and not pc.all(pc.equal(table[column], value)).as_py():
            raise CommitError(f"scene {scene_id}: column {column} holds values other than {value!r}")


def _geometry_bbox(table: pa.Table) -> Optional[list[float]]:
    bbox = table["bbox"]
    if bbox.null_count == len(bbox):
        return None
    flat = pc.struct_field
    return [pc.min(flat(bbox, "xmin")).as_py(), pc.min(flat(bbox, "ymin")).as_py(),
            pc.max(flat(bbox, "xmax")).as_py(), pc.max(flat(bbox, "ymax")).as_py()]


def _parquet_bytes(part: pa.Table, crs: Optional[str], name: str) -> bytes:
    """One GeoParquet file with its ``geo`` metadata, its footer's row count checked."""
    meta = {b"geo": json.dumps(geo_metadata(crs, _geometry_bbox(part))).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(part.replace_schema_metadata(meta), sink, compression="zstd")
    data = sink.getvalue()
    counted = pq.read_metadata(pa.BufferReader(data)).num_rows
    if counted != part.num_rows:
        raise CommitError(f"{name}: wrote {part.num_rows} rows but the file holds {counted}")
    return data.to_pybytes()


def _next_sequence(names: Sequence[str]) -> int:
    """Commit time in ns, above every published sequence (clock steps cannot reorder)."""
    latest = max((int(h) for h in (n.rsplit("/", 1)[-1].split("-", 1)[0] for n in names) if h.isdigit()),
                 default=0)
    return max(time.time_ns(), latest + 1)


def _scene_tag(job_name: str, scene_id: str) -> str:
    """A short hash of the scene's key in its manifest's name: a commit finds the
    manifests of its own scene by name, without reading every other one."""
    return "s" + hashlib.sha1(f"{job_name}\0{scene_id}".encode()).hexdigest()[:10]


def _name_tag(key: str) -> Optional[str]:
    """The scene tag of a manifest name; None for names written before tags existed."""
    parts = key.rsplit("/", 1)[-1].removesuffix(".json").rsplit("-", 2)
    tag = parts[1] if len(parts) == 3 else ""
    return tag if len(tag) == 11 and tag[0] == "s" and all(c in "0123456789abcdef" for c in tag[1:]) else None


def _manifest_name(manifest: Mapping) -> str:
    tag = _scene_tag(manifest["job_name"], manifest["scene_id"])
    return f"{manifest['sequence']:020d}-{manifest['run_id']}-{tag}-{uuid.uuid4().hex[:12]}.json"


def _publish_manifest(store, name: str, manifest: dict) -> None:
    """Step 3 of the protocol, the commit point: create the manifest exclusively. The name
    is unique (uuid), so finding it taken means an earlier attempt of this very create
    succeeded (an object store's retried PUT): published."""
    try:
        store.create(f"{MANIFESTS}/{name}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    except FileExistsError:
        pass


def _maybe_published(store, name: Optional[str]) -> bool:
    """After a failure in step 3: True unless the manifest is known to be absent."""
    if name is None:
        return False
    try:
        return store.stat(f"{MANIFESTS}/{name}") is not None
    except Exception:  # cannot tell (store unreachable): keep what recover() may need
        return True


def commit_scene(
    table_root: os.PathLike | str,
    run: RunInfo,
    scene_id: str,
    scene_key: Any,
    table: pa.Table,
    scene_path: Optional[str] = None,
    status: str = "complete",
    missing_chips: Sequence[Mapping[str, str]] = (),
    reason: Optional[str] = None,
) -> dict:
    """Commit one scene's rows atomically; return its manifest (see module doc).

    status: ``complete`` (every planned chip was predicted), ``partial`` (rows of the
    chips that were; ``missing_chips`` lists the others as ``{chip_id, status, reason}``)
    or ``failed`` (no chip predicted, no rows; ``reason`` says why). Only a complete
    scene counts as done for incremental runs (:func:`is_current`).

    table: rows from :func:`pipeline.table.schema.build_detection_table` for this run and scene (may be
    empty: the scene is then recorded as done with no detections).
    scene_key: JSON-serialisable identity of the scene's content, e.g.
    ``{"sha256": ...}`` or ``{"etag": ..., "size": ..., "mtime": ...}``; stored as given
    and returned by :func:`committed_scenes` so later runs can skip unchanged scenes.
    The commit supersedes earlier manifests of ``(run.job_name, scene_id)``.
    Raises CommitError; on error nothing of this scene becomes visible.
    """
    store = open_store(table_root)
    _check_id(run.run_id, "run_id")
    _check_rows(table, run, scene_id)
    if status not in SCENE_STATUSES:
        raise CommitError(f"scene {scene_id}: status must be one of {SCENE_STATUSES}, got {status!r}")
    if status == "failed" and table.num_rows:
        raise CommitError(f"scene {scene_id}: a failed scene has no rows, got {table.num_rows}")
    try:
        json.dumps(scene_key)
    except (TypeError, ValueError) as err:
        raise CommitError(f"scene {scene_id}: scene_key is not JSON-serialisable: {err}") from None
    staging = f"{STAGING}/{run.run_id}-{uuid.uuid4().hex}"
    manifest_name = None
    try:
        _ensure_table_info(store, run.crs)
        files = []
        for day in sorted(set(table["date"].to_pylist())):
            part = table.filter(pc.equal(table["date"], day)).drop_columns(["date"])  # the folder says it
            name = f"{run.run_id}-{_safe_part(scene_id)}-{uuid.uuid4().hex[:12]}.parquet"
            staged = f"{staging}/{name}{STAGED_SUFFIX}"
            data = _parquet_bytes(part, run.crs, name)
            store.write(staged, data)
            files.append({"path": f"date={day}/{name}", "staged": staged, "rows": part.num_rows, "bytes": len(data)})
        paths_in_rows = sorted({p for p in table["scene_path"].to_pylist() if p is not None})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "sequence": _next_sequence(store.keys(MANIFESTS) + store.keys(SNAPSHOTS)),
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            **asdict(run),
            "scene_id": scene_id,
            "scene_path": scene_path if scene_path is not None else (paths_in_rows[0] if paths_in_rows else None),
            "scene_key": scene_key,
            "rows": table.num_rows,
            "files": files,
            "status": status,
            "missing_chips": [dict(m) for m in missing_chips],
            "reason": reason,
        }
        manifest_name = _manifest_name(manifest)
        _publish_manifest(store, manifest_name, manifest)
        manifest["manifest"] = manifest_name
    except BaseException as err:
        if not _maybe_published(store, manifest_name):
            store.delete_prefix(staging)  # not published: nothing to take back
            outcome = "nothing published"
        else:  # the staged files stay for recover(); vacuum removes them if no manifest lists them
            outcome = "the manifest was published; the next run or vacuum finishes the commit"
        if isinstance(err, (OSError, pa.ArrowException)) or type(err).__module__.startswith("obstore"):
            raise CommitError(f"scene {scene_id}: commit into {store.url} failed, {outcome}: {err}") from err
        raise
    # Published from here on: a failure below leaves work for recover(), never a wrong row.
    _move_into_place(store, manifest)
    store.delete_prefix(staging)
    settle_scene(table_root, run.job_name, scene_id)
    if len(_loose_keys(store, _latest_snapshot(store))) >= SNAPSHOT_EVERY:
        write_snapshot(table_root)
    return manifest


def _move_into_place(store, manifest: Mapping) -> None:
    """Step 4: staged files of a published manifest to their hive paths (idempotent)."""
    for f in manifest["files"]:
        staged = f.get("staged")
        if staged and store.stat(f["path"]) is None and store.stat(staged) is not None:
            try:
                store.move(staged, f["path"])
            except FileNotFoundError:  # another writer or recover() moved it first
                if store.stat(f["path"]) is None:
                    raise


def settle_scene(table_root: os.PathLike | str, job_name: str, scene_id: str) -> list[str]:
    """Step 5: delete the data files of every superseded manifest of ``(job_name, scene_id)``
    that no current manifest lists. Every writer settles after moving its own files, so
    whichever of two concurrent writers of one scene finishes last removes the loser's."""
    store = open_store(table_root)
    key = (job_name, scene_id)
    snap, loose = _manifest_state(store, key)
    manifests = sorted([m for m in (snap["entries"] if snap else []) + loose if (m["job_name"], m["scene_id"]) == key],
                       key=lambda m: (m["sequence"], m["manifest"]))
    if not manifests:
        return []
    current = manifests[-1]
    live = {f["path"] for f in current["files"]}  # data files are never shared between scenes
    removed = []
    for m in manifests[:-1]:
        for f in m["files"]:
            if f["path"] not in live and store.stat(f["path"]) is not None:
                store.delete(f["path"])
                removed.append(f["path"])
    # The scene's old rows inside compacted files: rewrite those partitions without them.
    for day, group in _current_groups(store).items():
        if group["member_of"].get(key, current["manifest"]) != current["manifest"]:
            _regroup(store, day, take_loose=False)
    return removed


def recover(table_root: os.PathLike | str) -> dict:
    """Finish what crashed commits published: move the staged files of current manifests
    into place and settle their scenes. Idempotent; safe beside running writers (their
    files are moved by whoever gets there first). Returns what it did."""
    store = open_store(table_root)
    on_disk = {e.key for e in store.list() if e.key.startswith("date=")}
    moved, removed = [], []
    for (job, scene), m in _current(all_manifests(table_root)).items():
        missing = [f["path"] for f in m["files"] if f["path"] not in on_disk]
        if missing:
            _move_into_place(store, m)
            moved += [p for p in missing if store.stat(p) is not None]
        removed += settle_scene(table_root, job, scene)
    current = _current(all_manifests(table_root))
    for group in _current_groups(store).values():
        removed += _settle_group(store, group, current)
    return {"moved": moved, "removed": removed}


# ---------------------------------------------------------------- compaction
#
# A nightly table gets one small file per scene per run. ``compact`` rewrites the files of
# a date partition into few large ones, published as one *generation* of that partition's
# compaction: ``_compactions/<date>/<generation>.json`` lists its files and its members,
# the scene manifests (by name) whose rows of that date it holds. A generation is created
# exclusively under a name that counts up, so two processes that rewrite one partition
# at once cannot both publish: the loser looks again (optimistic, per-partition locking).
#
# A member is live while its manifest is still its scene's current one; the scene's own
# file of that date is then dead (deleted once the generation is published). When the
# scene is committed again, its old rows sit inside a compacted file that other scenes
# share: the commit's settle step writes the next generation without them (copy on
# write), and until then our readers hide those rows (:func:`visible_parts`).


def _file_day(f: Mapping) -> str:
    return f["path"].split("/", 1)[0].removeprefix("date=")


# Parsed generations by (table, key): a generation is created once and never rewritten.
_parsed_generations: dict[tuple[str, str], dict] = {}


def _current_groups(store) -> dict[str, dict]:
    """{date: the partition's latest compaction generation}."""
    latest: dict[str, str] = {}
    for key in store.keys(COMPACTIONS):
        day, _, name = key.removeprefix(f"{COMPACTIONS}/").partition("/")
        if name.endswith(".json") and not name.startswith(TMP_PREFIX):
            latest[day] = max(latest.get(day, key), key)
    groups = {}
    for day, key in latest.items():
        group = _parsed_generations.get((store.url, key))
        if group is None:
            group = _read_document(store, key, COMPACTION_FORMAT, "compaction generation")
            _remember_generation(store, key, group)
        groups[day] = group
    return groups


def _remember_generation(store, key: str, group: dict) -> None:
    group["key"] = key
    group["member_of"] = {(m["job_name"], m["scene_id"]): m["manifest"] for m in group["members"]}
    _parsed_generations[(store.url, key)] = group


def _group_split(group: Mapping, current: Mapping[tuple[str, str], Mapping]) -> tuple[list[dict], list[dict]]:
    """(members whose manifest is still their scene's current one, members superseded since)."""
    live, stale = [], []
    for m in group["members"]:
        entry = current.get((m["job_name"], m["scene_id"]))
        (live if entry is not None and entry["manifest"] == m["manifest"] else stale).append(m)
    return live, stale


def _hidden_rows(scenes: Sequence[tuple[str, str]]) -> Optional[ds.Expression]:
    """Rows of these (job_name, scene_id) pairs, or None for no pair."""
    expr = None
    for job, scene in scenes:
        one = (ds.field("job_name") == job) & (ds.field("scene_id") == scene)
        expr = one if expr is None else expr | one
    return expr


@dataclass(frozen=True)
class VisiblePart:
    """One data file our readers read: its key (the staged key while an interrupted commit
    is not moved yet), its date partition, and the scenes whose rows in it are superseded
    (only in compacted files, only until the commit that superseded them settles)."""

    key: str
    day: str
    hidden: tuple[tuple[str, str], ...] = ()
    owner: str = ""  # the manifest or generation that lists it


def _visible_files(current: Mapping[tuple[str, str], Mapping],
                   groups: Mapping[str, Mapping]) -> list[tuple[dict, VisiblePart]]:
    """(file record, part) of every file that holds current rows: each current scene's own
    files, except those of a date where a compaction holds its rows instead."""
    compacted = set()
    out = []
    for day, group in sorted(groups.items()):
        live, stale = _group_split(group, current)
        if not live:
            continue
        compacted |= {(m["manifest"], day) for m in live}
        hidden = tuple(sorted({(m["job_name"], m["scene_id"]) for m in stale}))
        out += [(f, VisiblePart(f["path"], day, hidden, group["key"])) for f in group["files"]]
    for entry in current.values():
        out += [(f, VisiblePart(f["path"], _file_day(f), (), entry["manifest"])) for f in entry["files"]
                if (entry["manifest"], _file_day(f)) not in compacted]
    return out


def _generation_of(key: str) -> Optional[int]:
    """The generation in a compacted file's name (``compact-<generation>-<uuid>.parquet``)."""
    name = key.rsplit("/", 1)[-1]
    number = name.removeprefix("compact-").split("-", 1)[0]
    return int(number) if name.startswith("compact-") and number.isdigit() else None


def _read_rows(store, f: Mapping) -> pa.Table:
    """A data file's rows (from its staged key while a commit was interrupted before the move)."""
    key = f["path"] if store.stat(f["path"]) is not None else f.get("staged") or f["path"]
    rows = pq.read_table(pa.BufferReader(store.read(key)))  # FileNotFoundError: see _regroup
    # Files written under an earlier schema (a date column, no acquired_at) read as the current columns.
    return current_file_rows(rows)


@dataclass
class RegroupPlan:
    """What the next generation of a partition would take (see :func:`_regroup_plan`)."""

    live: list[dict]  # members of the current generation still current
    stale: list[dict]  # members superseded since: their rows must go
    loose: list[tuple[dict, dict]]  # (manifest, file) of current scene files not compacted yet
    kept: list[dict]  # compacted files carried over unchanged
    rewrite: list[dict]  # compacted files read and written again

    def needed(self, min_files: int) -> bool:
        return bool(self.stale) or len(self.loose) + len(self.rewrite) >= min_files

    def files_after(self, max_rows: int) -> int:
        rows = sum(f["rows"] for f in self.rewrite) + sum(f["rows"] for _, f in self.loose)
        return len(self.kept) + -(-rows // max_rows)


def _regroup_plan(group: Optional[Mapping], current: Mapping[tuple[str, str], Mapping], day: str,
                  take_loose: bool, max_rows: int) -> RegroupPlan:
    """The one decision of what a partition's next generation takes, for compacting and
    for the dry run alike. A file without superseded rows is carried over as it is,
    unless it is not full and loose files are being merged anyway."""
    live, stale = _group_split(group, current) if group else ([], [])
    live_names = {m["manifest"] for m in live}
    loose = [(entry, f) for entry in current.values() if entry["manifest"] not in live_names
             for f in entry["files"] if _file_day(f) == day] if take_loose else []
    stale_keys = {(m["job_name"], m["scene_id"]) for m in stale}
    kept, rewrite = [], []
    for f in group["files"] if group and live else []:
        if {tuple(k) for k in f["scenes"]} & stale_keys or (take_loose and f["rows"] < max_rows):
            rewrite.append(f)
        else:
            kept.append(f)
    return RegroupPlan(live, stale, loose, kept, rewrite)


def _regroup(store, day: str, take_loose: bool, max_rows: int = 1_000_000, min_files: int = 2,
             attempts: int = 8) -> Optional[dict]:
    """Publish the next compaction generation of partition ``day``: the live rows of the
    current one, without superseded members, plus (``take_loose``) every current scene
    file of that date not compacted yet, written as files of at most ``max_rows`` rows.
    Files holding no superseded row are carried over unchanged, so cutting one scene out
    rewrites only the file that holds it. Returns the new generation, or None when there
    was nothing to do (no superseded member, and fewer than ``min_files`` files to merge)."""
    for _ in range(attempts):
        current = _current(all_manifests(store.url))
        group = _current_groups(store).get(day)
        plan = _regroup_plan(group, current, day, take_loose, max_rows)
        if not plan.needed(min_files):
            return None
        live, stale, loose, kept, rewrite = plan.live, plan.stale, plan.loose, plan.kept, plan.rewrite
        stale_keys = {(m["job_name"], m["scene_id"]) for m in stale}
        parts = []
        try:
            hidden = _hidden_rows(sorted(stale_keys))
            for f in rewrite:
                rows = _read_rows(store, f)
                parts.append(rows.filter(~hidden) if hidden is not None else rows)
            parts += [_read_rows(store, f) for _, f in loose]
        except FileNotFoundError:  # a concurrent commit superseded a scene and removed its file: look again
            continue
        members = [dict(m) for m in live] + [
            {"job_name": e["job_name"], "scene_id": e["scene_id"], "manifest": e["manifest"], "rows": f["rows"]}
            for e, f in loose]
        expected = sum(m["rows"] for m in members)
        rows = (pa.concat_tables(parts).sort_by([("job_name", "ascending"), ("scene_id", "ascending")])
                if parts else detection_schema().empty_table().drop_columns(["date"]))
        found = rows.num_rows + sum(f["rows"] for f in kept)
        if found != expected:
            raise CommitError(f"{store.url}/date={day}: compacting found {found} rows, the manifests list {expected}")
        generation = group["generation"] + 1 if group else 0
        crs = _read_table_info(store).get("crs")
        staging = f"{STAGING}/compact-{uuid.uuid4().hex}"
        files = [dict(f) for f in kept]
        for start in range(0, rows.num_rows, max_rows):
            name = f"compact-{generation:08d}-{uuid.uuid4().hex[:12]}.parquet"
            part = rows.slice(start, max_rows)
            data = _parquet_bytes(part, crs, name)
            staged = f"{staging}/{name}{STAGED_SUFFIX}"
            store.write(staged, data)
            scenes = sorted(set(zip(part["job_name"].to_pylist(), part["scene_id"].to_pylist())))
            files.append({"path": f"date={day}/{name}", "staged": staged, "rows": part.num_rows, "bytes": len(data),
                          "scenes": [list(k) for k in scenes]})
        manifest = {"format": COMPACTION_FORMAT, "version": 1, "date": day, "generation": generation,
                    "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), "members": members,
                    "rows": expected, "files": files}
        key = f"{COMPACTIONS}/{day}/{generation:08d}.json"
        try:
            store.create(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
        except FileExistsError:  # another process published this generation first: look again
            store.delete_prefix(staging)
            continue
        except BaseException:
            if store.stat(key) is None:
                store.delete_prefix(staging)
            raise
        _remember_generation(store, key, manifest)
        _settle_group(store, manifest, _current(all_manifests(store.url)))
        store.delete_prefix(staging)
        return manifest
    raise CommitError(f"{store.url}/date={day}: {attempts} compactions of this partition raced this one; "
                      "try again later")


def _settle_group(store, group: Mapping, current: Mapping[tuple[str, str], Mapping]) -> list[str]:
    """After a generation is published (or found by recover()): move its staged files into
    place, delete what it replaced (the files of earlier generations and its members' own
    files of that date) and the generation before the previous one, then rewrite it
    without members that were superseded meanwhile. Idempotent. Returns the deleted keys."""
    day = group["date"]
    _move_into_place(store, group)
    keep = {f["path"] for f in group["files"]}
    names = {m["manifest"] for m in group["members"]}
    dead = set()
    for entry in current.values():
        if entry["manifest"] in names:
            dead |= {f["path"] for f in entry["files"] if _file_day(f) == day}
    generations = sorted(k for k in store.keys(f"{COMPACTIONS}/{day}") if k.endswith(".json")
                         and not k.rsplit("/", 1)[-1].startswith(TMP_PREFIX))
    on_disk = set(store.keys(f"date={day}"))
    dead |= {k for k in on_disk if _generation_of(k) is not None and _generation_of(k) < group["generation"]}
    removed = sorted(k for k in dead - keep if k in on_disk)
    for k in removed:
        store.delete(k)
    for older in generations[:-2]:  # the previous generation stays for readers that just listed it
        store.delete(older)
    if _group_split(group, current)[1]:
        _regroup(store, day, take_loose=False)
    return removed


def compact(table_root: os.PathLike | str, days: Optional[Sequence[str]] = None, min_files: int = 2,
            max_rows: int = 1_000_000, dry_run: bool = False) -> list[dict]:
    """Rewrite each date partition's small files into few files of at most ``max_rows``
    rows, one atomic generation per partition (see the compaction notes above).

    days: the partitions (``YYYY-MM-DD``) to compact, default every one; a partition is
    rewritten only when it has at least ``min_files`` files to merge (full compacted
    files are not counted) or superseded rows to cut out.
    Returns one summary per partition looked at: ``{date, files_before, files_after,
    rows, needed, compacted}``; ``dry_run`` plans without writing.
    """
    store = require_table(table_root)
    if not dry_run:
        recover(table_root)
    current, groups = _current(all_manifests(table_root)), _current_groups(store)
    by_day: dict[str, list[dict]] = {}
    for f, part in _visible_files(current, groups):
        by_day.setdefault(part.day, []).append(f)
    summaries = []
    for day in sorted(days if days is not None else by_day):
        files = by_day.get(day, [])
        plan = _regroup_plan(groups.get(day), current, day, True, max_rows)
        summary = {"date": day, "files_before": len(files), "files_after": len(files),
                   "rows": sum(f["rows"] for f in files), "compacted": False, "needed": plan.needed(min_files)}
        if summary["needed"]:
            summary["files_after"] = plan.files_after(max_rows)
            if not dry_run:
                group = _regroup(store, day, take_loose=True, max_rows=max_rows, min_files=min_files)
                if group is not None:
                    summary.update(files_after=len(group["files"]), rows=group["rows"], compacted=True)
        summaries.append(summary)
    return summaries


# ---------------------------------------------------------------- reading


def _load_manifest(store, key: str) -> dict:
    try:
        m = json.loads(store.read(key))
    except (OSError, ValueError) as err:
        # Published manifests are complete by construction: damage here is loud.
        raise CommitError(f"{store.url}/{key}: unreadable manifest: {err}") from None
    required = ("sequence", "run_id", "job_name", "scene_id", "scene_key", "model_id", "job_hash", "rows", "files")
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION or any(k not in m for k in required):
        raise CommitError(f"{store.url}/{key}: not a version {MANIFEST_VERSION} scene manifest")
    m["manifest"] = key.rsplit("/", 1)[-1]
    return m


def _read_document(store, key: str, fmt: str, what: str) -> dict:
    """A JSON document of the table's own (snapshot, compaction generation); damage is loud."""
    try:
        doc = json.loads(store.read(key))
    except (OSError, ValueError) as err:
        raise CommitError(f"{store.url}/{key}: unreadable {what}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CommitError(f"{store.url}/{key}: not a {what}")
    return doc


# The last snapshot this process parsed, by (table, key): snapshots are created once and
# never rewritten, and one holds every current scene (megabytes of JSON at 10,000s of
# scenes), so a writer committing scene after scene parses each snapshot once, not per commit.
_parsed_snapshot: dict[tuple[str, str], dict] = {}


def _latest_snapshot(store) -> Optional[dict]:
    """The newest snapshot of the current manifests, or None (see :func:`write_snapshot`).
    Read-only: the dict may be shared with later calls."""
    keys = [k for k in store.keys(SNAPSHOTS) if k.endswith(".json")]
    if not keys:
        return None
    key = max(keys)  # names start with the zero-padded sequence
    cached = _parsed_snapshot.get((store.url, key))
    if cached is not None:
        return cached
    snap = _read_document(store, key, SNAPSHOT_FORMAT, "manifest snapshot")
    snap["key"] = key
    snap["folded_names"] = frozenset(snap["folded"])
    _parsed_snapshot.clear()
    _parsed_snapshot[(store.url, key)] = snap
    return snap


def _loose_keys(store, snap: Optional[dict]) -> list[str]:
    """Keys of the manifests published but not folded into ``snap``."""
    folded = snap["folded_names"] if snap else frozenset()
    names = ((k, k.rsplit("/", 1)[-1]) for k in store.keys(MANIFESTS) if k.endswith(".json"))
    return [k for k, name in names if not name.startswith(TMP_PREFIX) and name not in folded]


def _manifest_state(store, scene: Optional[tuple[str, str]] = None) -> tuple[Optional[dict], list[dict]]:
    """(latest snapshot, manifests published but not folded into it); with ``scene``
    (job_name, scene_id), only that scene's loose manifests are read."""
    snap = _latest_snapshot(store)
    keys = _loose_keys(store, snap)
    if scene is not None:
        tag = _scene_tag(*scene)
        keys = [k for k in keys if _name_tag(k) in (tag, None)]
    return snap, [_load_manifest(store, k) for k in keys]


def all_manifests(table_root: os.PathLike | str) -> list[dict]:
    """The manifests that can still matter, oldest first: the current ones folded into the
    latest snapshot, and every one published since (superseded ones included)."""
    snap, loose = _manifest_state(open_store(table_root))
    manifests = (snap["entries"] if snap else []) + loose
    return sorted(manifests, key=lambda m: (m["sequence"], m["manifest"]))


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
    ``folded`` list, so readers still apply it; the supersede rule orders the two by sequence.
    """
    store = open_store(table_root)
    previous, loose = _manifest_state(store)
    now = time.time()
    cutoff = now - (SNAPSHOT_GRACE_S if grace_s is None else grace_s)
    snapshots = sorted((e for e in store.list(SNAPSHOTS) if e.key.endswith(".json")), key=lambda e: e.key)
    folded_at = _folded_at(previous, {e.key: e.mtime for e in snapshots})
    for name in [n for n, t in folded_at.items() if t < cutoff]:
        store.delete(f"{MANIFESTS}/{name}")
        del folded_at[name]
    for older, successor in zip(snapshots, snapshots[1:]):
        if successor.mtime < cutoff:
            store.delete(older.key)
    merged = sorted((previous["entries"] if previous else []) + loose, key=lambda m: (m["sequence"], m["manifest"]))
    current = _current(merged)
    entries = sorted(current.values(), key=lambda m: (m["sequence"], m["manifest"]))
    # A superseded manifest whose files are still on disk (its scene not settled yet: a
    # writer between move and settle, or a crash there) stays loose, so settle_scene and
    # recover() can still find and delete those files.
    current_names = {m["manifest"] for m in entries}
    for m in loose:
        if m["manifest"] in current_names or not any(store.stat(f["path"]) is not None for f in m["files"]):
            folded_at[m["manifest"]] = now
    sequence = max([m["sequence"] for m in entries], default=0)
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


def committed_scenes(table_root: os.PathLike | str) -> dict[tuple[str, str], dict]:
    """Current manifest per ``(job_name, scene_id)`` (the supersede rule applied).

    Each entry holds scene_key, scene_path, model_id, job_hash, run_id, rows, files
    (paths relative to the root), sequence, committed_at and the manifest file name.
    """
    return _current(all_manifests(table_root))


def _current(manifests: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """The supersede rule over manifests sorted oldest first: later ones overwrite."""
    current: dict[tuple[str, str], dict] = {}
    for m in manifests:
        current[(m["job_name"], m["scene_id"])] = m
    return current


def scene_status(entry: Mapping) -> str:
    """A manifest's status; manifests written before statuses existed count as complete."""
    return entry.get("status", "complete")


def is_current(entry: Optional[Mapping], scene_key: Any, model_id: str, job_hash: str) -> bool:
    """True when a committed entry already holds this scene content, model and job hash,
    complete: partial and failed scenes are always processed again."""
    return (bool(entry) and scene_status(entry) == "complete" and entry["scene_key"] == scene_key
            and entry["model_id"] == model_id and entry["job_hash"] == job_hash)


def visible_parts(table_root: os.PathLike | str) -> list[VisiblePart]:
    """Every data file our readers read, sorted by key (see :class:`VisiblePart`).

    A current manifest whose commit was interrupted after publishing (step 4 not done)
    is read from its staged files, so our readers always see every committed scene.
    Raises CommitError if a current manifest lists a file that is missing or has a
    different size (the table was damaged from outside).
    """
    store = open_store(table_root)
    sizes = {e.key: e.size for e in store.list() if e.key.startswith(("date=", STAGING))}
    out = []
    for f, part in _visible_files(committed_scenes(table_root), _current_groups(store)):
        key = f["path"]
        if key not in sizes and f.get("staged") in sizes:
            key = f["staged"]
        if key not in sizes:
            raise CommitError(f"{store.url}/{key}: listed by {part.owner} but missing")
        if sizes[key] != f["bytes"]:
            raise CommitError(f"{store.url}/{key}: {sizes[key]} bytes, {part.owner} says {f['bytes']}")
        out.append(VisiblePart(key, part.day, part.hidden, part.owner))
    return sorted(out, key=lambda p: p.key)


def part_location(store, key: str) -> str:
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


def table_crs(table_root: os.PathLike | str) -> Optional[str]:
    """The CRS the table's geometries are in (``_table.json``); None for pixel coordinates
    or a table nothing was committed to yet."""
    return _read_table_info(open_store(table_root)).get("crs")


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
    import pyarrow.fs

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
        if isinstance(store, LocalStore):
            filesystem, base = pyarrow.fs.LocalFileSystem(), str(store.root)
        else:  # ranged reads of the columns and row groups asked for, not whole files
            filesystem, base = arrow_filesystem(store.url)
        dataset = ds.FileSystemDataset.from_paths(
            [f"{base}/{p.key}" for p in group], schema=schema, format=ds.ParquetFileFormat(),
            filesystem=filesystem, partitions=partitions)
        keep = _hidden_rows(hidden)
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
    info = _read_table_info(store)
    if "geometry" in result.column_names:
        result = result.replace_schema_metadata({b"geo": json.dumps(geo_metadata(info.get("crs", None))).encode()})
    return result


# ---------------------------------------------------------------- housekeeping


def vacuum(table_root: os.PathLike | str, grace_s: float = 3600, dry_run: bool = False) -> dict[str, list[str]]:
    """Remove what no reader may see: returns the removed keys (relative to the root) by kind.

    First :func:`recover` finishes interrupted commits (not in a dry run). Then, for
    anything older than ``grace_s`` seconds (so commits in flight and readers that just
    listed the folder are safe):

    - ``superseded``: data files that only superseded manifests list (a crash between a
      commit's move and its settle), and those superseded manifests themselves, once
      none of their files is left (they only slow every read down);
    - ``orphans``: data files under ``date=*`` that no manifest lists (written by older
      versions that moved files before publishing, or by hand);
    - ``staging``: staged files and temporary manifests of commits that never published;

    and compaction generations that a newer one replaced (also ``superseded``).

    ``dry_run``: list, delete nothing.
    """
    store = require_table(table_root)
    if not dry_run:
        recover(table_root)
    cutoff = time.time() - grace_s
    entries = {e.key: e for e in store.list()}
    young = {k for k, e in entries.items() if e.mtime >= cutoff}
    manifests = all_manifests(table_root)
    current = _current(manifests)
    groups = _current_groups(store)
    visible = [f for f, _ in _visible_files(current, groups)]
    live = {f["path"] for f in visible}
    listed = {f["path"] for m in manifests for f in m["files"]} | live
    staged_live = {f["staged"] for f in visible if f.get("staged") and f["path"] not in entries}
    found: dict[str, list[str]] = {"superseded": [], "orphans": [], "staging": []}
    current_names = {m["manifest"] for m in current.values()}
    for m in manifests:
        if m["manifest"] in current_names:
            continue
        dead = [f["path"] for f in m["files"] if f["path"] not in live and f["path"] in entries]
        found["superseded"] += [p for p in dead if p not in young]
        key = f"{MANIFESTS}/{m['manifest']}"
        if not dead and key not in young:
            found["superseded"].append(key)
    current_generations = {g["key"] for g in groups.values()}
    found["superseded"] += [k for k in entries if k.startswith(f"{COMPACTIONS}/") and k.endswith(".json")
                            and k not in current_generations and k not in young
                            and not k.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    for key in sorted(entries):
        name = key.rsplit("/", 1)[-1]
        if key.startswith("date=") and key.endswith(".parquet") and key not in listed and key not in young:
            found["orphans"].append(key)
        elif (key.startswith(f"{STAGING}/") and key not in staged_live or name.startswith(TMP_PREFIX)) \
                and key not in young:
            found["staging"].append(key)
    if not dry_run:
        for key in (k for kind in found.values() for k in kind):
            store.delete(key)
        write_snapshot(table_root, grace_s)
        if isinstance(store, LocalStore):  # folders left empty by the deletes
            for folder in sorted(store.root.glob(f"{STAGING}/*"), reverse=True):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    return found


def write_run_report(table_root: os.PathLike | str, run_id: str, report: Mapping[str, Any]) -> Path | str:
    """Write ``_reports/<run_id>.json`` atomically (a rerun replaces it); return its path
    (a URL for a table in an object store)."""
    _check_id(run_id, "run_id")
    store = open_store(table_root)
    key = f"{REPORTS}/{run_id}.json"
    store.write(key, json.dumps(dict(report), indent=2, sort_keys=True, default=str).encode())
    return store.path(key) if isinstance(store, LocalStore) else f"{store.url}/{key}"
