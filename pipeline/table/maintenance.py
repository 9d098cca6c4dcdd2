"""Looking after a detection table: finishing interrupted commits (:func:`recover`, run by
every ``pipeline run``), removing what no reader may see (:func:`vacuum`), compacting
partitions (:func:`compact`) and run reports. ``docs/table-protocol.md`` states the protocol.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.table.commit import check_id, settle_scene
from pipeline.table.compaction import regroup, regroup_plan, settle_group
from pipeline.table.state import (
    COMPACTIONS,
    MANIFESTS,
    REPORTS,
    STAGING,
    all_manifests,
    current_groups,
    current_manifests,
    move_into_place,
    require_table,
    visible_files,
    write_snapshot,
)
from pipeline.table.store import LocalStore, open_store
from retinanet.files import TMP_PREFIX


def recover(table_root: os.PathLike | str) -> dict:
    """Finish what crashed commits published: move the staged files of current manifests
    into place and settle their scenes. Idempotent; safe beside running writers (their
    files are moved by whoever gets there first). Returns what it did."""
    store = open_store(table_root)
    on_disk = {e.key for e in store.list() if e.key.startswith("date=")}
    moved, removed = [], []
    groups = current_groups(store)  # one listing, not one per scene
    by_scene: dict[tuple[str, str], list[dict]] = {}
    for m in all_manifests(table_root):
        by_scene.setdefault((m["job_name"], m["scene_id"]), []).append(m)
    for (job, scene), history in by_scene.items():
        m = history[-1]  # oldest first: the current one
        missing = [f["path"] for f in m["files"] if f["path"] not in on_disk]
        if missing:
            move_into_place(store, m)
            moved += [p for p in missing if store.stat(p) is not None]
        removed += settle_scene(table_root, job, scene, history, groups)
    current = current_manifests(all_manifests(table_root))
    for group in current_groups(store).values():
        removed += settle_group(store, group, current)
    return {"moved": moved, "removed": removed}


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
    current = current_manifests(manifests)
    groups = current_groups(store)
    visible = [f for f, _ in visible_files(current, groups)]
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


def compact(table_root: os.PathLike | str, days: Optional[Sequence[str]] = None, min_files: int = 2,
            max_rows: int = 1_000_000, dry_run: bool = False) -> list[dict]:
    """Rewrite each date partition's small files into few files of at most ``max_rows``
    rows, one atomic generation per partition (see :mod:`pipeline.table.compaction`).

    days: the partitions (``YYYY-MM-DD``) to compact, default every one; a partition is
    rewritten only when it has at least ``min_files`` files to merge (full compacted
    files are not counted) or superseded rows to cut out.
    Returns one summary per partition looked at: ``{date, files_before, files_after,
    rows, needed, compacted}``; ``dry_run`` plans without writing.
    """
    store = require_table(table_root)
    if not dry_run:
        recover(table_root)
    current, groups = current_manifests(all_manifests(table_root)), current_groups(store)
    by_day: dict[str, list[dict]] = {}
    for f, part in visible_files(current, groups):
        by_day.setdefault(part.day, []).append(f)
    summaries = []
    for day in sorted(days if days is not None else by_day):
        files = by_day.get(day, [])
        plan = regroup_plan(groups.get(day), current, day, True, max_rows)
        summary = {"date": day, "files_before": len(files), "files_after": len(files),
                   "rows": sum(f["rows"] for f in files), "compacted": False, "needed": plan.needed(min_files)}
        if summary["needed"]:
            summary["files_after"] = plan.files_after(max_rows)
            if not dry_run:
                group = regroup(store, day, take_loose=True, max_rows=max_rows, min_files=min_files)
                if group is not None:
                    summary.update(files_after=len(group["files"]), rows=group["rows"], compacted=True)
        summaries.append(summary)
    return summaries


def write_run_report(table_root: os.PathLike | str, run_id: str, report: Mapping[str, Any]) -> Path | str:
    """Write ``_reports/<run_id>.json`` atomically (a rerun replaces it); return its path
    (a URL for a table in an object store)."""
    check_id(run_id, "run_id")
    store = open_store(table_root)
    key = f"{REPORTS}/{run_id}.json"
    store.write(key, json.dumps(dict(report), indent=2, sort_keys=True, default=str).encode())
    return store.path(key) if isinstance(store, LocalStore) else f"{store.url}/{key}"
