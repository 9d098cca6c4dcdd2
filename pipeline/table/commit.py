"""Committing one scene's rows into the detection table.

Stage the files, count them, claim the next sequence of the log by creating
``_manifests/<sequence>.json`` exclusively (the commit point; on conflict look again and
take the next), move the files into place, settle the scene. The order of commits is the
store's, never a clock's. ``docs/table-protocol.md`` states the protocol, what a crash at
each step leaves and what recovers it (:func:`pipeline.table.maintenance.recover`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import CommitError
from pipeline.table.compaction import regroup
from pipeline.table.schema import SCHEMA_VERSION, detection_schema, geoparquet_bytes
from pipeline.table.state import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MANIFESTS,
    SCENE_STATUSES,
    STAGED_SUFFIX,
    STAGING,
    TABLE_FORMAT,
    TABLE_INFO,
    by_sequence,
    current_groups,
    latest_snapshot,
    manifest_name,
    manifest_state,
    manifests_after,
    move_into_place,
    next_sequence,
    read_table_info,
    remember_manifest,
    write_snapshot,
)
from pipeline.table.store import LocalStore, Store, open_store

# A commit folds the manifests into a new snapshot once this many are not in one yet.
SNAPSHOT_EVERY = 200
# Claims of a sequence that another writer took first before a commit gives up: each
# lost claim means another commit went in, so only a table under constant contention
# from many writers gets there.
CLAIM_ATTEMPTS = 100
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_part(text: str, limit: int = 80) -> str:
    """A scene id as a file-name fragment (the real id is kept in rows and manifest)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:limit] or "scene"


def check_id(value: str, what: str) -> None:
    """CommitError unless ``value`` can name a file (run ids name manifests' files and reports)."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        raise CommitError(f"{what} must be 1-128 letters, digits, '.', '_' or '-' (it names files), got {value!r}")


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


def _ensure_table_info(store: Store, crs: Optional[str]) -> None:
    """Create ``_table.json`` on first commit; afterwards refuse a different CRS, so one
    table never mixes coordinate systems (readers attach a single CRS)."""
    existing = read_table_info(store)
    if not existing:
        info = {"format": TABLE_FORMAT, "schema_version": SCHEMA_VERSION, "crs": crs}
        try:
            store.create(TABLE_INFO, json.dumps(info, indent=2).encode())
            return
        except FileExistsError:  # a concurrent writer created it first: compare with theirs
            existing = read_table_info(store)
    if existing.get("crs") != crs:
        raise CommitError(f"{store.url}: table holds crs {existing.get('crs')!r}; this run writes crs {crs!r}")


def _check_rows(table: pa.Table, run: RunInfo, scene_id: str) -> None:
    """The rows must have the table's columns and belong to this run and scene."""
    want = detection_schema()
    if not table.schema.remove_metadata().equals(want):
        raise CommitError(f"scene {scene_id}: rows do not have the detection schema:\n{table.schema}")
    for column, value in (("run_id", run.run_id), ("job_name", run.job_name), ("scene_id", scene_id),
                          ("model_id", run.model_id), ("job_hash", run.job_hash)):
        if table.num_rows and not pc.all(pc.equal(table[column], value)).as_py():
            raise CommitError(f"scene {scene_id}: column {column} holds values other than {value!r}")


@dataclass
class Claim:
    """The manifest a commit is publishing: the key and bytes of its latest create."""

    key: Optional[str] = None
    data: bytes = b""
    etag: Optional[str] = None
    snapshot: Optional[dict] = None  # the latest snapshot when the claim was made


def publish_manifest(store: Store, manifest: dict, claim: Claim, attempts: int = CLAIM_ATTEMPTS) -> str:
    """The commit point: claim the next sequence of the log by creating
    ``_manifests/<sequence>.json`` exclusively with the manifest; when another writer took
    that sequence first, look again and claim the next. Returns the manifest's name.

    A create answered "exists" whose object holds exactly these bytes was this create
    (an object store's client retried a PUT whose answer was lost): published.
    """
    for _ in range(attempts):
        claim.snapshot = latest_snapshot(store)
        manifest["sequence"] = next_sequence(store.keys(MANIFESTS), claim.snapshot)
        name = manifest_name(manifest["sequence"])
        claim.key, claim.data = f"{MANIFESTS}/{name}", json.dumps(manifest, indent=2, sort_keys=True).encode()
        try:
            claim.etag = store.create(claim.key, claim.data)
            return name
        except FileExistsError:
            if _holds(store, claim):
                return name
    raise CommitError(f"{store.url}: {attempts} other commits claimed the next sequence first; try again later")


def _holds(store: Store, claim: Claim) -> bool:
    """Whether the claimed key holds this claim's manifest (False when absent)."""
    if claim.key is None:
        return False
    try:
        return store.read(claim.key) == claim.data
    except FileNotFoundError:
        return False


def _maybe_published(store: Store, claim: Claim) -> bool:
    """After a failure while publishing: True unless the manifest is known not to be ours."""
    try:
        return _holds(store, claim)
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
    """Commit one scene's rows atomically; return its manifest (see docs/table-protocol.md).

    status: ``complete`` (every planned chip was predicted), ``partial`` (rows of the
    chips that were; ``missing_chips`` lists the others as ``{chip_id, status, reason}``)
    or ``failed`` (no chip predicted, no rows; ``reason`` says why). Only a complete
    scene counts as done for incremental runs (:func:`pipeline.table.state.is_current`).

    table: rows from :func:`pipeline.table.schema.build_detection_table` for this run and scene (may be
    empty: the scene is then recorded as done with no detections).
    scene_key: JSON-serialisable identity of the scene's content, e.g.
    ``{"sha256": ...}`` or ``{"etag": ..., "size": ..., "mtime": ...}``; stored as given
    and returned by :func:`pipeline.table.state.committed_scenes` so later runs can skip unchanged scenes.
    The commit supersedes earlier manifests of ``(run.job_name, scene_id)``: every commit
    published after it in the log, whatever the writers' clocks say.
    Raises CommitError; on error nothing of this scene becomes visible.
    """
    store = open_store(table_root)
    check_id(run.run_id, "run_id")
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
    claim = Claim()
    try:
        _ensure_table_info(store, run.crs)
        files = []
        for day in sorted(set(table["date"].to_pylist())):
            part = table.filter(pc.equal(table["date"], day)).drop_columns(["date"])  # the folder says it
            name = f"{run.run_id}-{_safe_part(scene_id)}-{uuid.uuid4().hex[:12]}.parquet"
            staged = f"{staging}/{name}{STAGED_SUFFIX}"
            data = geoparquet_bytes(part, run.crs, name)
            store.write(staged, data)
            files.append({"path": f"date={day}/{name}", "staged": staged, "rows": part.num_rows, "bytes": len(data)})
        paths_in_rows = sorted({p for p in table["scene_path"].to_pylist() if p is not None})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
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
        manifest["manifest"] = publish_manifest(store, manifest, claim)
    except BaseException as err:
        if not _maybe_published(store, claim):
            store.delete_prefix(staging)  # not published: nothing to take back
            outcome = "nothing published"
        else:  # the staged files stay for recover(); vacuum removes them if no manifest lists them
            outcome = "the manifest was published; the next run or vacuum finishes the commit"
        if isinstance(err, (OSError, pa.ArrowException)) or type(err).__module__.startswith("obstore"):
            raise CommitError(f"scene {scene_id}: commit into {store.url} failed, {outcome}: {err}") from err
        raise
    # Published from here on: a failure below leaves work for recover(), never a wrong row.
    remember_manifest(store, claim.key or "", manifest, claim.etag)
    move_into_place(store, manifest, known_staged=True)
    if isinstance(store, LocalStore):  # the emptied folder (an object store has none: the moves took the objects)
        store.delete_prefix(staging)
    manifests = manifests_after(store, claim.snapshot)
    settle_scene(table_root, run.job_name, scene_id, manifests)
    if len(manifests) - len(claim.snapshot["entries"] if claim.snapshot else []) >= SNAPSHOT_EVERY:
        write_snapshot(table_root)
    return dict(manifest)


def settle_scene(table_root: os.PathLike | str, job_name: str, scene_id: str,
                 manifests: Optional[Sequence[dict]] = None,
                 groups: Optional[Mapping[str, Mapping]] = None) -> list[str]:
    """The last step: delete the data files of every superseded manifest of ``(job_name,
    scene_id)`` that no current manifest lists, and cut the scene's superseded rows out of
    compacted files. Every writer settles after moving its own files, so whichever of two
    concurrent writers of one scene finishes last removes the loser's. ``manifests``: the
    table's (or the scene's), oldest first, listed after this writer's move; ``groups``:
    the compaction generations by date (each read here when not given; a partition
    rewritten since is looked at again by :func:`pipeline.table.compaction.regroup`)."""
    store = open_store(table_root)
    key = (job_name, scene_id)
    known = manifest_state(store) if manifests is None else manifests
    mine = by_sequence([m for m in known if (m["job_name"], m["scene_id"]) == key])
    if not mine:
        return []
    current = mine[-1]
    live = {f["path"] for f in current["files"]}  # data files are never shared between scenes
    removed = []
    for m in mine[:-1]:
        for f in m["files"]:
            if f["path"] not in live and store.stat(f["path"]) is not None:
                store.delete(f["path"])
                removed.append(f["path"])
    # The scene's old rows inside compacted files: rewrite those partitions without them.
    for day, group in (current_groups(store) if groups is None else groups).items():
        if group["member_of"].get(key, current["manifest"]) != current["manifest"]:
            regroup(store, day, take_loose=False)
    return removed
