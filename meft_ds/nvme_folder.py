"""The NVMe tier's folder: its layout (blocks of rows, one file per layer and tensor) and the checks made before a
store is created there: writable, room for every store of the node, held by one process, its files used by no other
store alive in this process (:mod:`meft_ds.swap` holds the store itself)."""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import weakref
from pathlib import Path
from typing import IO

from meft_ds.config import MeftConfigError

FP32 = 4
MOMENTS = ("exp_avg", "exp_avg_sq")
FILES = ("values", *MOMENTS)
ALIGNMENT = 512  # O_DIRECT: offsets and sizes must be multiples of the logical block size
BLOCK_BYTES = 4096  # values per block: at least this many bytes (one NVMe page)

# the stores alive in this process, by their values file (:class:`meft_ds.swap.NvmeRowStore` registers itself)
LIVE_STORES: weakref.WeakValueDictionary[Path, object] = weakref.WeakValueDictionary()


def block_rows(dim: int) -> int:
    """Rows per block of I/O: the fewest whose fp32 values fill ``BLOCK_BYTES`` and are a multiple of ``ALIGNMENT``."""
    row = dim * FP32
    rows = max(1, -(-BLOCK_BYTES // row))
    while (rows * row) % ALIGNMENT:
        rows += 1
    return rows


def nvme_ram_needed(num_rows: int, dim: int) -> int:
    """Bytes of RAM one layer's NVMe store needs at least: its keys and a read buffer of two blocks of values."""
    return num_rows * dim * FP32 + 2 * block_rows(dim) * dim * FP32


_HELD: dict[Path, IO[str]] = {}  # NVMe folders this process holds, and their lock files (kept open while it lives)


def hold_nvme_folder(folder: Path) -> None:
    """Take ``folder`` for this process, for as long as it lives: another process's stores there would write the same
    files (``layer_<i>.*.bin``) under this one's, e.g. two runs started with the shipped ``meft_nvme.json``. The lock
    is an ``flock`` on ``.lock`` (released by the kernel when the process ends, however it ends), naming its pid."""
    key = folder.resolve()
    if key in _HELD:
        return
    lock = open(key / ".lock", "a+")  # noqa: SIM115 (kept open: the lock lasts as long as the file stays open)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise MeftConfigError(
            f"meft.store.nvme_path: {folder} is in use by another process (pid {owner}), whose stores would write "
            "the same files as this run's. Fix: give each run that trains at the same time its own nvme_path."
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _HELD[key] = lock


def check_nvme_path(path: str, needed_bytes: int) -> Path:
    """The NVMe folder, created, proven writable and held for this process (:func:`hold_nvme_folder`), with room for
    ``needed_bytes``; else a clear error."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".meft_write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise MeftConfigError(
            f"meft.store.nvme_path: cannot write to {folder} ({error.strerror}). Fix: point it at a writable folder "
            "on a local NVMe drive."
        ) from error
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise MeftConfigError(
            f"meft.store.nvme_path: {folder} has {free / 2**30:.1f} GiB free but the stores of this node's ranks "
            f"need {needed_bytes / 2**30:.1f} GiB. Fix: free space, choose another drive, or lower meft.num_neurons."
        )
    hold_nvme_folder(folder)
    return folder


def layer_files(folder: Path, layer_index: int) -> dict[str, Path]:
    return {name: folder / f"layer_{layer_index}.{name}.bin" for name in FILES}


def check_files_free(folder: Path, layer_indices: list[int]) -> None:
    """Refuse the files of layers that a store alive in this process uses (another model injected with the same
    ``nvme_path``): creating them again would zero that model's rows under it. A store dropped with its model frees
    them."""
    keys = {index: layer_files(folder, index)["values"].resolve() for index in layer_indices}
    if any(key in LIVE_STORES for key in keys.values()):
        gc.collect()  # a dropped model still held in a reference cycle
    busy = [index for index, key in keys.items() if LIVE_STORES.get(key) is not None]
    if busy:
        raise MeftConfigError(
            f"meft.store.nvme_path: the files of layers {busy} in {folder} belong to another model alive in this "
            "process, whose rows this one would overwrite. Fix: give each model its own nvme_path, or drop the other "
            "model (and its optimizer and engine) first."
        )
