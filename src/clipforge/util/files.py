"""Atomic, durable file writes: the one way clipforge replaces a file.

A file is written under a temporary name in its own folder, flushed to disk, renamed over the target, and the
folder is flushed too, so that a crash or a kill at any moment leaves either the old file or the new one, never
a torn one, and a power cut after the call returns cannot take the new file back. Temporary files are named
``.NAME.XXXXXXXX.tmp``: hidden, and easy for a resumed job to recognise and remove.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "commit_file"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Replace `path` with what `write` writes into the binary file object it is given; returns `path`.

    A writer that only takes a file name (safetensors, say) writes to `handle.name`, the temporary file's path.
    The folder is created if needed. If `write` raises, `path` is left as it was and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        commit_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as UTF-8 JSON (non-ASCII characters kept as they are) with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def commit_file(written: str | Path, path: str | Path) -> Path:
    """Make a finished file durable and move it over `path` (same folder): fsync the file, rename it, fsync the
    folder. For writers that produce the file themselves (a resumable download's ``.part`` file, a library
    that only writes to a file name)."""
    with open(written, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(written, path)
    _sync_folder(Path(path).parent)
    return Path(path)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)
