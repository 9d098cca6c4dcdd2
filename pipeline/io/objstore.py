"""Object storage (s3://, gs://): listing, object metadata and downloads through obstore.

Why obstore: one maintained client (Rust ``object_store``, the one DataFusion and
delta-rs use) that lists prefixes, returns each object's ETag / size / last-modified in
one HEAD, downloads, and supports conditional writes, for S3-compatible stores and GCS
alike, and reads the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ``GOOGLE_APPLICATION_CREDENTIALS``...).

Pixels are still read through GDAL's ``/vsis3/`` and ``/vsigs/`` (ranged reads of the
windows only), and the table's Parquet files through pyarrow's S3/GCS filesystems
(:func:`arrow_filesystem`: ranged reads of the columns and row groups a query needs).
GDAL and pyarrow have their own names for a custom S3 endpoint, so :func:`s3_endpoint`
reads ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` once and all three clients get it:
one setting serves MinIO, Ceph, moto, .... An ``http://`` endpoint is that store's
choice of plain HTTP, so it is allowed for obstore too (it refuses http unless
``AWS_ALLOW_HTTP=true``), and GDAL gets ``AWS_HTTPS=NO``.

Store failures are :class:`ObjectStoreError`: the URL (bucket and key) and the store's
own first line of the cause, never a client's traceback.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from functools import lru_cache
from pathlib import Path

from pipeline.errors import InputError
from retinanet.files import write_atomically

OBJECT_SCHEMES = ("s3://", "gs://")


class ObjectStoreError(InputError, OSError):
    """A request to an object store failed (missing bucket, refused credentials, endpoint
    not reachable, ...). Also an OSError: callers that roll back on I/O failures (a
    commit) treat it as one."""


def is_object_url(location: str) -> bool:
    """True for ``s3://`` and ``gs://`` URLs (listable object stores)."""
    return str(location).startswith(OBJECT_SCHEMES)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.tif`` -> (``s3://bucket``, ``a/b.tif``)."""
    parsed = urllib.parse.urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}", parsed.path.lstrip("/")


def s3_endpoint() -> urllib.parse.ParseResult | None:
    """The custom S3 endpoint (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``), parsed; None for AWS."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return urllib.parse.urlparse(endpoint) if endpoint else None


def _plain_http(endpoint: urllib.parse.ParseResult | None) -> bool:
    return endpoint is not None and endpoint.scheme == "http"


@lru_cache(maxsize=32)
def store_for(bucket_url: str):
    """The obstore client of one bucket (``s3://bucket``), made once per process."""
    from obstore.store import from_url

    if bucket_url.startswith("s3://") and _plain_http(s3_endpoint()):
        return from_url(bucket_url, client_options={"allow_http": True})
    return from_url(bucket_url)


def arrow_filesystem(url: str):
    """(pyarrow filesystem, path) for an ``s3://`` or ``gs://`` URL: the same endpoint,
    region and credentials (the standard environment) as :func:`store_for`."""
    import pyarrow.fs

    bucket, key = split_url(url)
    path = f"{bucket.split('://', 1)[1]}/{key}".rstrip("/")
    if url.startswith("gs://"):
        return pyarrow.fs.GcsFileSystem(), path
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint is None:
        return pyarrow.fs.S3FileSystem(region=region), path
    return pyarrow.fs.S3FileSystem(region=region, endpoint_override=endpoint.netloc, scheme=endpoint.scheme), path


def _fail(url: str, err: Exception) -> ObjectStoreError:
    """The named error of a failed request: the URL, the client's first line (without the
    XML body it quotes) and the store's own error code and message when it sent them."""
    full = str(err).strip()
    text = full.splitlines()[0].split("<?xml", 1)[0].rstrip(" :") if full else type(err).__name__
    code, message = re.search(r"<Code>(.*?)</Code>", full), re.search(r"<Message>(.*?)</Message>", full)
    if code:
        text += f" ({code.group(1)}{': ' + message.group(1) if message else ''})"
    return ObjectStoreError(f"{url}: object store request failed: {text}")


def store_error(url: str, err: Exception) -> Exception:
    """What a failed store request raises: FileNotFoundError / FileExistsError as they are
    (the commit protocol branches on them), an ObjectStoreError naming ``url`` otherwise."""
    if "NoSuchBucket" in str(err):  # S3 answers 404 for a missing bucket too: not a missing key
        return ObjectStoreError(f"{url}: bucket {split_url(url)[0]} does not exist (the store answered NoSuchBucket)")
    if isinstance(err, (FileNotFoundError, FileExistsError, ObjectStoreError)):
        return err
    return _fail(url, err)


def list_objects(prefix_url: str) -> list[str]:
    """URLs of every object under ``prefix_url`` (recursive), sorted."""
    bucket, prefix = split_url(prefix_url)
    try:
        import obstore

        keys = [meta["path"] for chunk in obstore.list(store_for(bucket), prefix=prefix or None) for meta in chunk]
    except Exception as err:  # obstore raises its own hierarchy; any failure names the URL
        raise _fail(prefix_url, err) from err
    return sorted(f"{bucket}/{key}" for key in keys)


def head(url: str) -> dict:
    """What the store says about one object: ``etag``, ``size``, ``last_modified`` (ISO 8601).

    Raises InputError naming the URL when it does not exist or cannot be reached.
    """
    bucket, key = split_url(url)
    try:
        import obstore

        meta = obstore.head(store_for(bucket), key)
    except FileNotFoundError:
        raise InputError(f"{url}: object not found") from None
    except Exception as err:
        raise _fail(url, err) from err
    modified = meta.get("last_modified")
    return {"etag": meta.get("e_tag"), "size": int(meta["size"]),
            "last_modified": modified.isoformat() if modified is not None else None}


def download(url: str, dest: str | os.PathLike) -> Path:
    """Copy one object to ``dest`` (written under a temporary name, then renamed)."""
    bucket, key = split_url(url)
    dest = Path(dest)
    try:
        import obstore

        data = obstore.get(store_for(bucket), key).bytes()
        write_atomically(dest, lambda tmp: tmp.write_bytes(bytes(data)))
    except FileNotFoundError:
        raise InputError(f"{url}: object not found") from None
    except Exception as err:
        if isinstance(err, InputError):
            raise
        raise _fail(url, err) from err
    return dest


# URL scheme -> GDAL virtual file system prefix. /vsicurl keeps the scheme in the path.
_VSI_PREFIX = {
    "s3://": "/vsis3/",
    "gs://": "/vsigs/",
}
_VSICURL_SCHEMES = ("https://", "http://")


def gdal_path(path: str | Path) -> str:
    """Map a local path or an s3/gs/http(s) URL onto what GDAL opens."""
    text = str(path)
    for scheme, prefix in _VSI_PREFIX.items():
        if text.startswith(scheme):
            return prefix + text[len(scheme):]
    if text.startswith(_VSICURL_SCHEMES):
        return "/vsicurl/" + text
    return text


def gdal_options(location: str) -> dict[str, str]:
    """GDAL config for reading ``location``.

    Remote files are not kept in GDAL's process-wide /vsicurl cache: Ray workers live
    across runs, and a cached header or tile of an object overwritten since would mix
    the old image into the new one's chips (within one open, GDAL's block cache still
    serves shared tiles). With ``AWS_ENDPOINT_URL`` set, GDAL is pointed at that custom
    S3 endpoint (it wants host:port, the scheme and path-style addressing separately).
    """
    text = str(location)
    vsi = gdal_path(text)
    if not vsi.startswith(("/vsis3/", "/vsigs/", "/vsicurl/")):
        return {}
    options = {"CPL_VSIL_CURL_NON_CACHED": vsi}
    endpoint = s3_endpoint()
    if endpoint is not None and vsi.startswith("/vsis3/"):
        options.update({"AWS_S3_ENDPOINT": endpoint.netloc, "AWS_HTTPS": "NO" if _plain_http(endpoint) else "YES",
                        "AWS_VIRTUAL_HOSTING": "FALSE"})
    return options


def cache_dir() -> Path:
    """Where downloaded objects are kept: ``$RETINANET_PIPELINE_CACHE``, else
    ``~/.cache/retinanet-pipeline``."""
    return Path(os.environ.get("RETINANET_PIPELINE_CACHE") or Path.home() / ".cache" / "retinanet-pipeline")


def local_file(location: str) -> str:
    """A local path holding ``location``'s bytes: local paths as they are; ``s3://`` and
    ``gs://`` objects downloaded once per node into :func:`cache_dir`, keyed by URL and
    ETag, so an overwritten object is fetched again and an unchanged one never is."""
    if not is_object_url(location):
        return str(location)

    meta = head(location)
    key = hashlib.sha256(f"{location}\n{meta['etag']}\n{meta['size']}".encode()).hexdigest()[:16]
    dest = cache_dir() / "objects" / f"{key}-{location.rsplit('/', 1)[-1]}"
    if not dest.is_file() or dest.stat().st_size != meta["size"]:
        download(location, dest)
    return str(dest)
