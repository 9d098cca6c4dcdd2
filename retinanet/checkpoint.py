"""One-file checkpoints: weights, model config, class names, metadata and a format version.

Loaded with torch.load(weights_only=True): a checkpoint can hold tensors and plain Python
values only, so opening an untrusted file cannot run code. :func:`read_checkpoint_header`
reads everything but the tensors without torch, for a driver that plans a run (importing
torch costs 1.5 s and ~600 MB of resident memory that the driver has no other use for):
torch is imported inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from retinanet.files import write_atomically

if TYPE_CHECKING:
    from retinanet.model import RetinaNet

FORMAT_NAME = "retinanet-pipeline/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names the file and the reason."""


def save_checkpoint(path: str | os.PathLike, model: RetinaNet, class_names: list[str],
                    metadata: dict | None = None) -> Path:
    """Write `model` to `path` atomically (temp file + rename) and return the path."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    import torch

    # Through memory: torch.save names the archive inside the file after the file it writes
    # (a temporary name here), and the same weights must give the same bytes (model_id,
    # caches keyed by checkpoint hash).
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomically(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint's payload without building the model."""
    import torch

    path = Path(path)
    with read_errors(path):
        payload = torch.load(path, map_location="cpu", weights_only=True)
    return checked_payload(path, payload)


@contextlib.contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Reading a checkpoint file: whatever goes wrong becomes a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than tensors and "
                              f"plain values (untrusted pickle?): {str(err).splitlines()[0]}") from err
    except Exception as err:  # zip/pickle corruption surfaces as many exception types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err


def checked_payload(path: Path, payload: Any) -> dict:
    """The payload when it is this library's checkpoint format and version, else CheckpointError."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} file (a bare state dict? use "
                              "retinanet.from_torchvision or save_checkpoint first)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this library reads {FORMAT_VERSION}")
    return payload


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles torch.save's ``data.pkl`` with every tensor read as None: torch's tensor
    rebuilders and storage types become a stand-in that builds nothing, OrderedDict is
    itself, and any other global is refused (plain values need no global)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _no_tensor
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid: Any) -> None:  # a tensor's storage: not read
        return None


def _no_tensor(*args: Any, **kwargs: Any) -> None:
    return None


def read_checkpoint_header(path: str | os.PathLike) -> dict:
    """A checkpoint's payload with each tensor read as None, without importing torch:
    format, config, class names and metadata, validated as :func:`read_checkpoint` does.

    torch.save writes a zip whose ``<name>/data.pkl`` pickles the payload and refers to
    each tensor's bytes by a persistent id; those bytes are never read here."""
    path = Path(path)
    with read_errors(path), zipfile.ZipFile(path) as archive:
        pickled = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickled) != 1:
            raise CheckpointError(f"{path}: not a readable checkpoint (no torch.save archive inside)")
        with archive.open(pickled[0]) as data:
            payload = _HeaderUnpickler(data).load()
    return checked_payload(path, payload)


def load_checkpoint(path: str | os.PathLike) -> tuple[RetinaNet, dict]:
    """Build the model stored in `path` -> (model in eval mode, info).

    info: {"class_names", "metadata", "config"}.
    """
    # Here, not at the top: read_checkpoint (the driver's preflight) needs torch only, and
    # the model pulls in torchvision (1.2 s of imports, a third of the driver's start-up).
    from retinanet.config import RetinaNetConfig
    from retinanet.model import build_model

    payload = read_checkpoint(path)
    try:
        config = RetinaNetConfig.from_dict(payload["config"])
        model = build_model(config)
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {err}") from err
    info = {"class_names": list(payload["class_names"]), "metadata": payload["metadata"],
            "config": config}
    return model.eval(), info


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the model id the pipeline records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
