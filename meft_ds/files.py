"""Durable files: flushed to disk and published atomically.

Every directory is written atomically: into a temporary sibling first, flushed to disk, then renamed into place,
so a process killed mid-write leaves the previous version intact and never a half-written one. Training checkpoints
(:mod:`meft_ds.plugin`, :mod:`meft_ds.checkpoint`) and exported adapters (:mod:`meft_ds.export`) are written this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for directory in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def publish_directory(staging: Path, final: Path) -> None:
    """Flush ``staging`` to disk and rename it to ``final``, replacing an older ``final`` only after the new one is
    complete: at every instant one complete version exists under ``final`` or ``final.old``."""
    fsync_tree(staging)
    previous = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover_directory(final: Path) -> None:
    """Finish a :func:`publish_directory` that was killed between its two renames (``final`` gone, ``final.old``
    complete): the previous version goes back in place."""
    previous = final.with_name(final.name + ".old")
    if not final.exists() and previous.is_dir():
        os.replace(previous, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp``; on success it is flushed and renamed to ``path``."""
    final = Path(final)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        fsync_dir(final.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))
