"""Compaction generations: a date partition's files rewritten into few large ones.

A nightly table gets one small file per scene per run. A partition's files are rewritten
into few large ones, published as one *generation* of that partition's compaction:
``_compactions/<date>/<generation>.json`` lists its files and its members, the scene
manifests (by name) whose rows of that date it holds. Generations are created exclusively
under names that count up, so two processes that rewrite one partition at once cannot both
publish: the loser looks again. A scene committed again after its partition was compacted
has its old rows cut out of the compacted file by its commit's settle step (copy on
write); until then readers hide them. ``docs/table-protocol.md`` states the protocol;
``pipeline compact`` is :func:`pipeline.table.maintenance.compact`.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import CommitError
from pipeline.table.schema import current_file_rows, detection_schema, geoparquet_bytes
from pipeline.table.state import (
    COMPACTION_FORMAT,
    COMPACTIONS,
    STAGED_SUFFIX,
    STAGING,
    all_manifests,
    current_groups,
    current_manifests,
    file_day,
    generation_keys,
    group_split,
    hidden_rows,
    move_into_place,
    read_table_info,
    remember_generation,
)
from pipeline.table.store import Store


def generation_of(key: str) -> Optional[int]:
    """The generation in a compacted file's name (``compact-<generation>-<uuid>.parquet``)."""
    name = key.rsplit("/", 1)[-1]
    number = name.removeprefix("compact-").split("-", 1)[0]
    return int(number) if name.startswith("compact-") and number.isdigit() else None


def _read_rows(store: Store, f: Mapping) -> pa.Table:
    """A data file's rows (from its staged key while a commit was interrupted before the move)."""
    key = f["path"] if store.stat(f["path"]) is not None else f.get("staged") or f["path"]
    rows = pq.read_table(pa.BufferReader(store.read(key)))  # FileNotFoundError: see regroup
    # Files written under an earlier schema (a date column, no acquired_at) read as the current columns.
    return current_file_rows(rows)


@dataclass
class RegroupPlan:
    """What the next generation of a partition would take (see :func:`regroup_plan`)."""

    live: list[dict]  # members of the current generation still current
    stale: list[dict]  # members superseded since: their rows must go
    loose: list[tuple[Mapping, dict]]  # (manifest, file) of current scene files not compacted yet
    kept: list[dict]  # compacted files carried over unchanged
    rewrite: list[dict]  # compacted files read and written again

    def needed(self, min_files: int) -> bool:
        return bool(self.stale) or len(self.loose) + len(self.rewrite) >= min_files

    def files_after(self, max_rows: int) -> int:
        rows = sum(f["rows"] for f in self.rewrite) + sum(f["rows"] for _, f in self.loose)
        return len(self.kept) + -(-rows // max_rows)


def regroup_plan(group: Optional[Mapping], current: Mapping[tuple[str, str], Mapping], day: str,
                 take_loose: bool, max_rows: int) -> RegroupPlan:
    """The one decision of what a partition's next generation takes, for compacting and
    for the dry run alike. A file without superseded rows is carried over as it is,
    unless it is not full and loose files are being merged anyway."""
    live, stale = group_split(group, current) if group else ([], [])
    live_names = {m["manifest"] for m in live}
    loose = [(entry, f) for entry in current.values() if entry["manifest"] not in live_names
             for f in entry["files"] if file_day(f) == day] if take_loose else []
    stale_keys = {(m["job_name"], m["scene_id"]) for m in stale}
    kept, rewrite = [], []
    for f in group["files"] if group and live else []:
        if {tuple(k) for k in f["scenes"]} & stale_keys or (take_loose and f["rows"] < max_rows):
            rewrite.append(f)
        else:
            kept.append(f)
    return RegroupPlan(live, stale, loose, kept, rewrite)


def regroup(store: Store, day: str, take_loose: bool, max_rows: int = 1_000_000, min_files: int = 2,
            attempts: int = 8) -> Optional[dict]:
    """Publish the next compaction generation of partition ``day``: the live rows of the
    current one, without superseded members, plus (``take_loose``) every current scene
    file of that date not compacted yet, written as files of at most ``max_rows`` rows.
    Files holding no superseded row are carried over unchanged, so cutting one scene out
    rewrites only the file that holds it. Returns the new generation, or None when there
    was nothing to do (no superseded member, and fewer than ``min_files`` files to merge)."""
    for _ in range(attempts):
        current = current_manifests(all_manifests(store.url))
        group = current_groups(store).get(day)
        plan = regroup_plan(group, current, day, take_loose, max_rows)
        if not plan.needed(min_files):
            return None
        live, stale, loose, kept, rewrite = plan.live, plan.stale, plan.loose, plan.kept, plan.rewrite
        stale_keys = {(m["job_name"], m["scene_id"]) for m in stale}
        parts = []
        try:
            hidden = hidden_rows(sorted(stale_keys))
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
        crs = read_table_info(store).get("crs")
        staging = f"{STAGING}/compact-{uuid.uuid4().hex}"
        files = [dict(f) for f in kept]
        for start in range(0, rows.num_rows, max_rows):
            name = f"compact-{generation:08d}-{uuid.uuid4().hex[:12]}.parquet"
            part = rows.slice(start, max_rows)
            data = geoparquet_bytes(part, crs, name)
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
        remember_generation(store, key, manifest)
        settle_group(store, manifest, current_manifests(all_manifests(store.url)))
        store.delete_prefix(staging)
        return manifest
    raise CommitError(f"{store.url}/date={day}: {attempts} compactions of this partition raced this one; "
                      "try again later")


def settle_group(store: Store, group: Mapping, current: Mapping[tuple[str, str], Mapping]) -> list[str]:
    """After a generation is published (or found by recover()): move its staged files into
    place, delete what it replaced (the files of earlier generations and its members' own
    files of that date) and the generation before the previous one, then rewrite it
    without members that were superseded meanwhile. Idempotent. Returns the deleted keys."""
    day = group["date"]
    move_into_place(store, group)
    keep = {f["path"] for f in group["files"]}
    names = {m["manifest"] for m in group["members"]}
    dead = set()
    for entry in current.values():
        if entry["manifest"] in names:
            dead |= {f["path"] for f in entry["files"] if file_day(f) == day}
    generations = generation_keys(store, day)
    on_disk = set(store.keys(f"date={day}"))
    dead |= {k for k in on_disk if (g := generation_of(k)) is not None and g < group["generation"]}
    removed = sorted(k for k in dead - keep if k in on_disk)
    for k in removed:
        store.delete(k)
    for older in generations[:-2]:  # the previous generation stays for readers that just listed it
        store.delete(older)
    if group_split(group, current)[1]:
        regroup(store, day, take_loose=False)
    return removed
