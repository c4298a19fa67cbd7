"""Atomic file writes: every output is written to a temporary name and renamed when complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def output_folder(path: str | os.PathLike, key: str) -> Path:
    """Create the output folder that config key `key` names (and its parents); a file in the way is a ConfigError
    naming the key, not a traceback."""
    from mpm.core.errors import ConfigError

    path = Path(path)
    blocking = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{key} {str(path)!r}: {str(blocking)!r} is a file, not a folder; choose another path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete leftovers of writes a killed run did not finish (`.NAME.*.tmp`). Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed
