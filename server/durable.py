"""Crash-safe file primitives shared by the artifacts, the event log, snapshots and rollout."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


def fsync_dir(directory: Path, fsync: Callable[[int], None] = os.fsync) -> None:
    """Fsync a directory so a created, renamed or removed file name survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterable[bytes | memoryview]) -> Path:
    """Replace ``path`` with ``data`` (or its pieces, in order) so a crash leaves old or new;
    a failed write leaves no temporary file to hold disk space the event log may need."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        with tmp.open("wb") as handle:
            for piece in (data,) if isinstance(data, bytes) else data:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def temporary(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path`` (a crash mid-write can leave it behind)."""
    return path.with_name(path.name + ".tmp")
