"""Safetensors and atomic file IO: the only ways fedmoe writes or reads tensors.

Nothing here unpickles: tensors travel and rest as safetensors (bytes or files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}, expected one of {sorted(_DTYPES)}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> bytes:
    prepared = {
        k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous().cpu()
        for k, v in tensors.items()
    }
    return st_save(prepared)


def tensors_from_bytes(data: bytes, *, source: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; any malformation becomes a ValueError naming `source`."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{source}: not a valid safetensors payload ({first})") from None


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, tensors_to_bytes(tensors))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return tensors_from_bytes(path.read_bytes(), source=str(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
