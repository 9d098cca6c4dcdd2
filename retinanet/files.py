"""Writing a file so that readers find the old content or the new, never a part of one."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable

TMP_PREFIX = ".tmp-"  # temporary siblings; table listings skip (and vacuum removes) these names


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new link) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the content to a temporary sibling of ``path``; the file is then
    fsynced, renamed over ``path`` (atomic on POSIX) and the folder fsynced, so a crash or a
    power cut leaves the old file or the new one. The temporary file never outlives a
    failure. Its name keeps ``path``'s suffix (writers such as matplotlib go by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def default_cache_dir(engine: str = "onnx") -> Path:
    """Per-node cache of graphs converted for an engine: $TMPDIR/retinanet-<engine>
    (the pipeline passes its own cache folder instead)."""
    return Path(tempfile.gettempdir()) / f"retinanet-{engine}"
