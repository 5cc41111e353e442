"""Durable file writes: temp file in the same directory, fsync, rename, fsync the directory.

A process killed at any instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir", "remove_leftovers"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly.

    On an exception the temp file is removed and ``path`` is left exactly as it was.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_write(path, mode=mode) as handle:
        handle.write(data)


def remove_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete what a killed writer left in ``directory``; return what was removed.

    Temp files of :func:`atomic_write` (``.NAME.*.tmp``) and staging directories of an
    interrupted install (``.NAME.*.partial``) are never the real state — that only ever appears
    by rename — so removing them at start-up is always safe.
    """
    removed: list[Path] = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith("."):
            continue
        if path.name.endswith(".tmp") and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
        elif path.name.endswith(".partial") and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
