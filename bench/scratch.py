"""One scratch folder per benchmark run, removed when the run ends.

The larger benchmark sizes write gigabytes (scenes, checkpoints, tables); a machine that
runs them often must not fill its disk with folders nobody reads again.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder that is deleted, with everything in it, when Python exits."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
