"""Where a detection table lives: a local folder or an object-store prefix, behind the few
operations the commit protocol needs (``docs/table-protocol.md``).

Keys are paths relative to the table root with ``/`` separators. Two backends:

- :class:`LocalStore`: POSIX files. Exclusive creates are a hard link of a fully written
  and fsynced temporary file (atomic, fails if the name exists); overwrites and moves
  are ``os.replace``; folders are fsynced after each change, so a power cut cannot lose
  a published manifest.
- :class:`ObjectStore`: ``s3://bucket/prefix`` or ``gs://bucket/prefix`` through obstore.
  Exclusive creates are a conditional PUT (``If-None-Match: *``), so two writers can
  never both publish one name; a PUT is atomic per object; a move is a server-side copy
  then a delete. There are no folders. A failed request raises
  :class:`pipeline.io.objstore.ObjectStoreError` naming the bucket and key and the
  store's cause (FileNotFoundError and FileExistsError stay as they are: the protocol
  branches on them).
"""
from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from pipeline.io.objstore import is_object_url, split_url, store_error, store_for
from retinanet.files import TMP_PREFIX, fsync_dir, write_atomically


@dataclass(frozen=True)
class Entry:
    """One stored object: its key, size in bytes, last-modified time (epoch seconds) and,
    in an object store, its ETag (a new one for every write of the key)."""

    key: str
    size: int
    mtime: float
    etag: Optional[str] = None


def open_store(root: str | os.PathLike) -> Store:
    """The store of a table root: an object store for s3:// and gs:// URLs, else local."""
    text = str(root)
    return ObjectStore(text) if is_object_url(text) else LocalStore(text)


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self) -> bool:
        return self.root.is_dir()

    def stat(self, key: str) -> Optional[Entry]:
        try:
            st = self.path(key).stat()
        except FileNotFoundError:
            return None
        return Entry(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> list[Entry]:
        """Every file under ``prefix`` (a folder key, '' for all), recursively."""
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out: builtins.list[Entry] = []
        for folder, _, names in os.walk(base):
            for name in names:
                full = Path(folder) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue  # removed while listing
                out.append(Entry(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.key)

    def keys(self, prefix: str = "") -> builtins.list[str]:
        """The keys :meth:`list` gives, without a stat per file (manifest folders hold
        thousands of files and every commit lists them)."""
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out: builtins.list[str] = []
        for folder, _, names in os.walk(base):  # plain strings: pathlib costs more than the listing
            rel = os.path.relpath(folder, self.root).replace(os.sep, "/")
            head = "" if rel == "." else rel + "/"
            out.extend(head + name for name in names)
        return sorted(out)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def _write_synced(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write(self, key: str, data: bytes) -> None:
        """Readers see the old or the new content, never a mix."""
        write_atomically(self.path(key), lambda tmp: tmp.write_bytes(data))

    def create(self, key: str, data: bytes) -> Optional[str]:
        """Create ``key`` with ``data`` atomically; FileExistsError if it exists. Returns
        the new object's ETag where the store has them (None here)."""
        final = self.path(key)
        tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        self._write_synced(tmp, data)
        try:
            os.link(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return None

    def move(self, src: str, dst: str) -> None:
        target = self.path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(src), target)
        fsync_dir(target.parent)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class ObjectStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        bucket, prefix = split_url(self.url)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.store = store_for(bucket)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _request(self, key: str) -> Iterator[None]:
        """Failures of the requests inside name ``<url>/<key>`` (see :func:`store_error`)."""
        try:
            yield
        except Exception as err:  # obstore raises its own hierarchy
            raised = store_error(f"{self.url}/{key}" if key else self.url, err)
            if raised is err:
                raise
            raise raised from err

    def exists(self) -> bool:
        return True  # object stores have no folders: an empty table reads as empty

    def stat(self, key: str) -> Optional[Entry]:
        import obstore

        try:
            with self._request(key):
                meta = obstore.head(self.store, self._key(key))
        except FileNotFoundError:
            return None
        return Entry(key, int(meta["size"]), meta["last_modified"].timestamp(), meta.get("e_tag"))

    def list(self, prefix: str = "") -> list[Entry]:
        import obstore

        base = self._key(prefix.rstrip("/")) if prefix else self.prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        with self._request(prefix):
            out = [Entry(m["path"][cut:], int(m["size"]), m["last_modified"].timestamp(), m.get("e_tag"))
                   for chunk in obstore.list(self.store, prefix=(base + "/") if base else None) for m in chunk]
        return sorted(out, key=lambda e: e.key)

    def keys(self, prefix: str = "") -> builtins.list[str]:
        return [e.key for e in self.list(prefix)]  # one listing call either way

    def read(self, key: str) -> bytes:
        import obstore

        with self._request(key):
            return bytes(obstore.get(self.store, self._key(key)).bytes())

    def write(self, key: str, data: bytes) -> None:
        import obstore

        with self._request(key):
            obstore.put(self.store, self._key(key), data)

    def create(self, key: str, data: bytes) -> Optional[str]:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        with self._request(key):
            try:
                result = obstore.put(self.store, self._key(key), data, mode="create")  # If-None-Match: *
            except AlreadyExistsError:
                raise FileExistsError(f"{self.url}/{key}") from None
        return result.get("e_tag")

    def move(self, src: str, dst: str) -> None:
        import obstore

        with self._request(src):
            obstore.rename(self.store, self._key(src), self._key(dst))

    def delete(self, key: str) -> None:
        import obstore

        try:
            with self._request(key):
                obstore.delete(self.store, self._key(key))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        import obstore

        keys = [self._key(e.key) for e in self.list(prefix)]
        if keys:
            with self._request(prefix):
                obstore.delete(self.store, keys)


Store = Union[LocalStore, ObjectStore]
