"""Atomic file writes, content hashes and safetensors I/O (the only weight format read from users)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    Readers never see a half-written file; on an exception the temp file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> str:
    """Atomically write ``data`` and return its sha256."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> str:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomically save tensors with string metadata in the header; returns the file's sha256."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    from safetensors.torch import save

    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(payload, metadata=metadata))


class BadWeightsFile(ValueError):
    """A weights file that is not a readable safetensors file."""


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad header
        raise BadWeightsFile(f"{Path(path).name}: not a valid .safetensors file ({exc})") from exc


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata. Refuses anything that is not safetensors: pickles are never opened."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise BadWeightsFile(f"{path.name}: only .safetensors files are accepted")
    from safetensors.torch import load_file

    metadata = read_safetensors_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise BadWeightsFile(f"{path.name}: not a valid .safetensors file ({exc})") from exc
    return tensors, metadata
