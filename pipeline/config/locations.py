"""Where a location written in a job points: a local path, or somewhere else (a URL, a GDAL
virtual path). Plain string checks, no I/O: the job model resolves local paths against the
job file with them, and every reader (pipeline.io) asks the same question the same way."""
from __future__ import annotations

import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def has_url_scheme(location: str) -> bool:
    """True for ``scheme://...`` (``s3://``, ``https://``, ``file://``...)."""
    return bool(_SCHEME.match(str(location)))


def is_remote(location: str) -> bool:
    """True for URLs (``s3://``, ``https://``...) and GDAL virtual paths (``/vsi...``):
    anything that is not a plain local path."""
    text = str(location)
    return has_url_scheme(text) or text.startswith("/vsi")
