"""f. Scale out, part 2: the NVMe tier's read/write GB/s against the raw DeepSpeed aio handle and a plain file.

The context's model, its ``NvmeRowStore`` adapters given a quarter of the store in RAM, trains ``NVME_STEPS`` optimizer
steps twice: waiting for each read at once, then as meft_ds trains (reads overlapping compute); ``IoTimer`` charges
the store's reads and writes their own time (sections.md's ``nvme_how`` says how). The baselines write and read one
file of the store's size (16 to 256 MiB) in the same folder: a temporary one, or ``$MEFT_BENCH_NVME`` when set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import meft_ds
from bench import common, plots
from bench.common import GB, Context, build_meft, fmt_bytes, fmt_ratio, median_seconds, stats_delta, step_function
from meft_ds.aio import aio_queues

STORE_PER_RAM = 4  # the store (values, keys and two moments) over the RAM budget (keys and read buffers)
NVME_STEPS = 3
RAW_MIN, RAW_MAX = 16 * 2**20, 256 * 2**20
IO_REPEATS = 3


def mount_of(folder: Path) -> str:
    """``device (fs type) at mount point`` of the file system holding ``folder`` (Linux), or '?'."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    path = str(folder.resolve())
    best = max((m for m in mounts if path == m[1] or path.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)  # fmt: skip
    return f"{best[0]} ({best[2]}) at {best[1]}" if best else "?"


class IoTimer:
    """Wraps a store's ``start_gather`` (the forward's reads) and its ``_io`` (submits) and ``_wait`` (completes)
    outside of it (the optimizer step's reads and writes): seconds spent, split into reads and writes. ``overlap``
    false: every read waited for as soon as it starts (no ``start_update`` ahead either); true (how meft_ds trains):
    only the seconds spent in the store's calls count, the rest ran behind the FFN or the update of the store before."""

    def __init__(self, overlap: bool) -> None:
        self.overlap = overlap
        self.seconds = {"read_seconds": 0.0, "write_seconds": 0.0, "forward_read_seconds": 0.0}
        self.forward_bytes = 0
        self._pending = {"read": 0, "write": 0}
        self._in_gather = False

    @contextlib.contextmanager
    def _forward_read(self, store: Any) -> Iterator[None]:
        """Seconds and bytes of the forward's reads in the block."""
        start, before = time.perf_counter(), store.stats.nvme_bytes_read
        self._in_gather = True
        try:
            yield
        finally:
            self._in_gather = False
        elapsed = time.perf_counter() - start
        self.seconds["read_seconds"] += elapsed
        self.seconds["forward_read_seconds"] += elapsed
        self.forward_bytes += store.stats.nvme_bytes_read - before

    def instrument(self, store: Any) -> None:
        submit, wait, start_gather = store._io, store._wait, store.start_gather

        def timed_start(row_ids: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
            store._finish_writes()  # the writes it would wait for first: timed as writes
            with self._forward_read(store):
                finish = start_gather(row_ids, out)
                if not self.overlap:
                    finish()

            def timed_finish() -> None:
                with self._forward_read(store):
                    finish()  # (reads the chunks after the first two)

            return timed_finish if self.overlap else lambda: None

        def timed_io(write: bool, buffer: torch.Tensor, *args: Any) -> None:
            start = time.perf_counter()
            submit(write, buffer, *args)
            if not self._in_gather:
                kind = "write" if write else "read"
                self.seconds[f"{kind}_seconds"] += time.perf_counter() - start
                self._pending[kind] += buffer.numel() * buffer.element_size()

        def timed_wait(*args: Any) -> None:
            start = time.perf_counter()
            wait(*args)
            elapsed, pending = time.perf_counter() - start, sum(self._pending.values())
            if self._in_gather or not pending:
                return
            for kind, count in self._pending.items():
                self.seconds[f"{kind}_seconds"] += elapsed * count / pending
            self._pending = {"read": 0, "write": 0}

        store._io, store._wait, store.start_gather = timed_io, timed_wait, timed_start
        if not self.overlap:
            store.start_update = lambda row_ids: None  # rows_for_update reads and waits at once


def measure_store_io(context: Context, values: dict[str, Any], folder: Path, overlap: bool) -> dict[str, Any]:
    """``NVME_STEPS`` optimizer steps of the context's model with adapters of meft settings ``values`` whose stores
    live in ``folder``, with a RAM budget of 1/``STORE_PER_RAM`` of the store (rows and two moments); bytes and
    seconds of their I/O (see :class:`IoTimer` for ``overlap``)."""
    s, model = context.settings, context.fresh_model()
    store_bytes = len(values["layers"]) * 3 * s.step_neurons * 2 * model.config.hidden_size * 4
    store = {"device": "nvme", "nvme_path": str(folder / "store"), "ram_budget_mb": store_bytes / STORE_PER_RAM / 2**20}
    model, optimizers = build_meft(model, meft_ds.MeftConfig.from_dict({**values, "store": store}), lr=s.train_lr)
    stores = [a.store for a in meft_ds.adapters(model)]
    timer = IoTimer(overlap)
    for st in stores:
        timer.instrument(st)
    step = step_function(model, optimizers, context.batch)  # forward, backward, optimizer step: micro-batch 0, 1, ..
    before, started, steps = meft_ds.stats(model), time.perf_counter(), []
    for _ in range(NVME_STEPS):
        counters = meft_ds.stats(model)
        step()
        steps.append(stats_delta(counters, meft_ds.stats(model)))
    for st in stores:
        st._finish_writes()  # the last step's writes, counted and timed
    elapsed = time.perf_counter() - started
    counted = stats_delta(before, meft_ds.stats(model))
    result = {
        "steps": steps, "seconds": elapsed, **timer.seconds, "forward_bytes_read": timer.forward_bytes,
        "bytes_read": counted["nvme_bytes_read"], "bytes_written": counted["nvme_bytes_written"],
        "rows_updated": counted["rows_updated"], "tokens": context.batch(0)["input_ids"].numel(),
        "block_rows": stores[0].block_rows, "chunk_blocks": stores[0].chunk_blocks, "gap_bytes": stores[0].gap_bytes,
        "bytes_needed": sum(st.bytes_needed for st in stores),  # the rows' own values and moments: no gaps
        "ram_bytes": sum(st.nbytes for st in stores),
        "store_bytes": sum(3 * st.num_rows * 2 * st.dim * 4 for st in stores),  # rows and two moments, fp32
    }  # fmt: skip
    for name, count, seconds in [
        ("read", "bytes_read", "read_seconds"), ("write", "bytes_written", "write_seconds"),
        ("useful_read", "bytes_needed", "read_seconds"), ("forward_read", "forward_bytes_read", "forward_read_seconds"),
    ]:  # fmt: skip
        result[f"{name}_gbs"] = result[count] / result[seconds] / GB if result[seconds] else 0.0
    result["step_gbs"] = (result["bytes_read"] + result["bytes_written"]) / elapsed / GB
    del model, optimizers, stores
    shutil.rmtree(folder / "store", ignore_errors=True)
    return result


def file_gbs(size: int, write: Callable[[], Any], read: Callable[[], Any], before_read: Callable[[], Any]) -> dict:
    """Median GB/s of ``IO_REPEATS`` rounds of ``write()`` then ``read()`` of one ``size``-byte file (``before_read()``
    untimed in between)."""
    writes, reads = [], []
    for _ in range(IO_REPEATS):
        writes.append(median_seconds(write, repeats=1, warmup=0)[0])
        before_read()
        reads.append(median_seconds(read, repeats=1, warmup=0)[0])
    return {"bytes": size, "write_gbs": size / statistics.median(writes) / GB,
            "read_gbs": size / statistics.median(reads) / GB}  # fmt: skip


def raw_aio_io(folder: Path, size: int) -> dict[str, Any]:
    """Writing and reading one ``size``-byte file whole through the store's DeepSpeed aio handle (its first queue's;
    nothing of the store's is pending then). ``measure`` removes the folder, and the file, whatever happens."""
    handle, path = aio_queues()[0].handle, str(folder / "raw_aio.bin")
    source, target = (handle.new_cpu_locked_tensor(size // 4, torch.empty(0)) for _ in range(2))
    try:
        source.uniform_()
        result = file_gbs(size, lambda: (handle.async_pwrite(source, path, 0), handle.wait()),
                          lambda: (handle.async_pread(target, path, 0), handle.wait()), target.zero_)  # fmt: skip
        if not torch.equal(source, target):
            raise RuntimeError("raw aio: the file read back differs from what was written")
    finally:  # pinned memory outlives a failed benchmark otherwise
        handle.free_cpu_locked_tensor(source)
        handle.free_cpu_locked_tensor(target)
    os.unlink(path)
    return result


def plain_file_io(folder: Path, size: int) -> dict[str, Any]:
    """A plain buffered write + fsync of one ``size``-byte file, and a cold read of it (its pages dropped from the
    page cache with posix_fadvise first)."""
    path = folder / "plain.bin"
    source = torch.rand(size // 4).numpy()
    view = memoryview(torch.empty(size // 4).numpy()).cast("B")

    def write() -> None:
        with open(path, "wb") as file:
            file.write(memoryview(source).cast("B"))
            file.flush()
            os.fsync(file.fileno())

    def drop_pages() -> None:
        descriptor = os.open(path, os.O_RDONLY)
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)

    def read() -> None:
        with open(path, "rb", buffering=0) as file:
            done = 0
            while done < size and (count := file.readinto(view[done:])):
                done += count

    result = file_gbs(size, write, read, drop_pages)
    path.unlink()
    return result


def measure(context: Context, values: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """The store waited for at once and overlapped (meft settings ``values``), the raw aio handle, a plain file."""
    try:
        aio_queues()
    except Exception as error:  # a missing libaio surfaces in several ways
        notes.append(f"NVMe tier skipped: DeepSpeed's async_io op cannot be built or loaded ({type(error).__name__}: "
                     f"{error})")  # fmt: skip
        print(f"  note: {notes[-1]}")
        return None
    parent = os.environ.get("MEFT_BENCH_NVME")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="meft_bench_nvme_", dir=parent or None))
    try:
        store = measure_store_io(context, values, folder, overlap=False)
        overlapped = measure_store_io(context, values, folder, overlap=True)
        size = min(RAW_MAX, max(RAW_MIN, store["store_bytes"])) // 2**20 * 2**20
        raw, plain = raw_aio_io(folder, size), plain_file_io(folder, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"store": store, "overlapped": overlapped, "raw_aio": raw, "plain": plain, "mount": mount_of(folder.parent)}


def text(nvme: dict[str, Any], name: str) -> str:
    """sections.md's ``nvme_<name>`` (how, verdict, overlap, and table cells) filled with the NVMe part's results."""
    st, raw, steps = nvme["store"], nvme["raw_aio"], len(nvme["store"]["steps"])

    def ms(run: dict[str, Any]) -> list[float]:  # per step: the forward's reads, the optimizer step's, the step
        forward = run["forward_read_seconds"]
        return [forward / steps * 1e3, (run["read_seconds"] - forward) / steps * 1e3, run["seconds"] / steps * 1e3]

    before, after = ms(st), ms(nvme["overlapped"])
    values = {
        "st": st, "raw": raw, "steps": steps, "gap_kib": st["gap_bytes"] // 1024, "mount": nvme["mount"],
        "repeats": IO_REPEATS, "read_share": st["read_gbs"] / raw["read_gbs"],
        "useful_share": st["useful_read_gbs"] / raw["read_gbs"], "ram_ratio": st["store_bytes"] / st["ram_bytes"],
        "io_ms": (st["read_seconds"] + st["write_seconds"]) / steps * 1e3, "step_ms": st["seconds"] / steps * 1e3,
        "before": before, "after": after, "hidden": [1 - a / b for a, b in zip(after, before, strict=True)],
    }  # fmt: skip
    if name == "verdict":
        values["overlap"] = text(nvme, "overlap")
    return common.text("f", f"nvme_{name}", **values)


def rows(nvme: dict[str, Any]) -> list[list[Any]]:
    """The table rows of the NVMe part (experiment f's columns): the store, the raw aio handle, a plain file."""
    store, overlapped, raw, plain = nvme["store"], nvme["overlapped"], nvme["raw_aio"], nvme["plain"]
    steps = len(store["steps"])
    per_step = fmt_bytes((store["bytes_read"] + store["bytes_written"]) / steps)

    def gbs(part: dict[str, Any]) -> str:
        return f"{part['read_gbs']:.2f} / {part['write_gbs']:.2f}"

    def vs_raw(part: dict[str, Any]) -> str:
        return f"{fmt_ratio(part['read_gbs'] / raw['read_gbs'])} / {fmt_ratio(part['write_gbs'] / raw['write_gbs'])}"

    return [
        ["NVMe tier", text(nvme, "waited"), f"{store['rows_updated'] / steps:.0f} updated", per_step, text(nvme, "io"),
         gbs(store), vs_raw(store)],
        ["NVMe tier", text(nvme, "overlapped"), f"{overlapped['rows_updated'] / steps:.0f} updated", per_step,
         text(nvme, "overlap"), "", ""],
        ["NVMe tier", f"DeepSpeed aio handle, one {fmt_bytes(raw['bytes'])} file (O_DIRECT)", "",
         fmt_bytes(raw["bytes"]), "same handle and folder as the store", gbs(raw), "1.00x / 1.00x"],
        ["NVMe tier", "plain file: buffered write + fsync, cold read", "", fmt_bytes(plain["bytes"]), "same folder",
         gbs(plain), vs_raw(plain)],
    ]  # fmt: skip


def plot(axes: Any, nvme: dict[str, Any] | None) -> None:
    """Read and write GB/s of the store, the raw aio handle and the plain file, side by side."""
    if nvme is None:
        axes.text(0.5, 0.5, "NVMe tier skipped (no async I/O)", ha="center")
        return
    parts = [nvme["store"], nvme["raw_aio"], nvme["plain"]]
    series = {kind: [p[f"{kind}_gbs"] for p in parts] for kind in ("read", "write")}
    plots.grouped_bars(axes, ["NvmeRowStore", "raw aio", "plain file"], series)
    axes.set_ylabel("GB/s")
    axes.legend(fontsize=8)
