"""Files: atomic writes, and the row stores inside a training checkpoint (exported adapters: :mod:`meft_ds.export`).

Every directory is written atomically: into a temporary sibling first, flushed to disk, then renamed into place,
so a process killed mid-write leaves the previous version intact and never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.sparse_adam import SparseRowAdam
from meft_ds.store import CheckpointError  # noqa: F401 (imported from here by meft_ds.training)

STORE_OPTIMIZER = "optimizer.json"


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
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(path) as tmp:`` write files into ``tmp``; on success it becomes ``path``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)


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


# --------------------------------------------------------------------------- row stores (training checkpoints)
def save_stores(
    directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam, *, rank: int = 0
) -> None:
    """Every adapter's rows and Adam moments (each store writes its files: a replicated store on rank 0 only, a
    sharded one on every rank) and, on rank 0, the sparse optimizer's state."""
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in model_adapters:
        if rank == 0 or adapter.store.is_shard:
            adapter.store.save(directory, adapter.layer_index)
    if rank == 0:
        state = optimizer.state_dict()
        payload = {"global_step": state["global_step"], "param_groups": state["param_groups"]}
        (directory / STORE_OPTIMIZER).write_text(json.dumps(payload, indent=2))


def load_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam) -> None:
    """Restore what :func:`save_stores` wrote; every mismatch is a :class:`CheckpointError` before any copy."""
    for adapter in model_adapters:
        adapter.store.check_saved(directory, adapter.layer_index)
    state = json.loads((directory / STORE_OPTIMIZER).read_text())
    for adapter in model_adapters:
        adapter.store.load(directory, adapter.layer_index)
        adapter.drop_row_grads()
        adapter.rows_changed()
    optimizer.load_state_dict({"state": {}, **state})


# --------------------------------------------------------------------------- exported adapters (inference)
def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config of an exported adapter: :func:`meft_ds.export_load.read_adapter_config` (kept here for callers)."""
    from meft_ds.export_load import read_adapter_config as read  # meft_ds.export imports this module

    return read(directory)
