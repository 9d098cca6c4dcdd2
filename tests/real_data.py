"""Where the shared real test rasters live, and a marker that skips without them.

The files are read in place (never copied into the repo). Default location:
``<repo>/../shared/data/real``; override with the environment variable
``PIPELINE_REAL_DATA``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("PIPELINE_REAL_DATA")
                 or Path(__file__).resolve().parents[2] / "shared/data/real")

requires_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(),
    reason=f"real test data not found at {REAL_DATA} (set PIPELINE_REAL_DATA to its folder)")


def real(name: str) -> Path:
    """Path of one shared real file; skips the calling test when it is missing."""
    path = REAL_DATA / name
    if not path.exists():
        pytest.skip(f"real test file {path} not found (set PIPELINE_REAL_DATA)")
    return path


def real_rasters() -> list[str]:
    """File names of every raster in the shared folder (empty when it is absent)."""
    if not REAL_DATA.is_dir():
        return []
    return sorted(p.name for p in REAL_DATA.iterdir()
                  if p.suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".jpeg"))


def peak_rss_mb_snippet() -> str:
    """Python source defining ``peak_rss_mb()`` for a child process.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` survives fork+exec on Linux, so a child of a
    big pytest process would report the parent's size; ``VmHWM`` in /proc belongs to
    the child's own address space. getrusage is the fallback off Linux.
    """
    return (
        "def peak_rss_mb():\n"
        "    try:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith('VmHWM:'):\n"
        "                return int(line.split()[1]) / 1024\n"
        "    except OSError:\n"
        "        pass\n"
        "    import resource\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    )
