"""JSON files (atomic, numpy- and dataclass-aware) and the stable input hashes records carry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import InputError
from stages.core.io.atomic import write_text


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, keys in insertion order, numpy values converted) atomically."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is an InputError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); rewrite or delete it") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON text file (not UTF-8); rewrite or delete it") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder where a JSON file was expected") from None


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, Paths and tuples -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_inputs(*parts: Any) -> str:
    """A short stable hash (sha256, 16 hex) of JSON-able parts, file paths hashed by content."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(hash_file(part).encode())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(to_jsonable(part), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
