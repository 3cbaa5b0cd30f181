"""f. Scale out, part 2: the NVMe tier's read/write GB/s against the raw DeepSpeed aio handle and a plain file.

NVMe tier. In this process: a model with ``NvmeRowStore`` adapters (keys in RAM; values and moments on NVMe, read
by blocks of rows) whose RAM budget is a quarter of the store (the keys and read buffers of half their size), trains
``NVME_STEPS`` optimizer steps of one whole micro-batch (``micro_batch x seq_len`` tokens: 2 x 256 in the full run).
Read GB/s = bytes read over the time reads cost the training: the whole of every ``gather_into`` (its reads overlap
the keys' gather and the copy-out of the chunk before, which are counted too) and, at the optimizer step, the
submits and waits of the store's ``_io``/``_wait``; write GB/s = bytes written over their submits and the waits
that complete them (a wait is charged to reads and writes in proportion to their bytes). In the same folder and
run: one file of the store's size (16 to 256 MiB) written and read whole through the store's DeepSpeed async I/O
handle (O_DIRECT, like the store), and with plain buffered writes + fsync and a cold read (the file's pages dropped
with posix_fadvise). The folder is a temporary one, or ``$MEFT_BENCH_NVME`` when set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import meft_ds
from bench.common import GB, Context
from bench.scaleout_plan import adapter_layers, num_layers, plan_batches, plan_model
from bench.traffic import build_meft, optimizer_step, stats_delta

STORE_PER_RAM = 4  # the store (values, keys and two moments) over the RAM budget (keys and read buffers)
NVME_STEPS = 3
RAW_MIN, RAW_MAX = 16 * 2**20, 256 * 2**20
IO_REPEATS = 3


def aio_available() -> str | None:
    """None when DeepSpeed's async I/O op works here, else why not."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            return "DeepSpeed's async_io op is not compatible here (libaio missing?)"
        import meft_ds.swap

        meft_ds.swap.aio_handle()
    except Exception as error:  # a missing libaio surfaces in several ways
        return f"DeepSpeed's async_io op cannot be built or loaded ({error.__class__.__name__}: {error})"
    return None


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
    """Wraps a store's ``gather_into`` (whole calls: reads) and its ``_io`` (submits) and ``_wait`` (completes)
    outside of it (the optimizer step's reads and writes): seconds spent, split into reads and writes."""

    def __init__(self) -> None:
        self.seconds = {"read": 0.0, "write": 0.0, "forward_read": 0.0}
        self.forward_bytes = 0
        self._pending = {"read": 0, "write": 0}
        self._in_gather = False

    def instrument(self, store: Any) -> None:
        submit, wait, gather = store._io, store._wait, store.gather_into

        def timed_gather(row_ids: torch.Tensor, out: torch.Tensor) -> None:
            store._finish_writes()  # the writes it would wait for first: timed as writes
            before, start = store.stats.nvme_bytes_read, time.perf_counter()
            self._in_gather = True
            try:
                gather(row_ids, out)
            finally:
                self._in_gather = False
            elapsed = time.perf_counter() - start
            self.seconds["read"] += elapsed
            self.seconds["forward_read"] += elapsed
            self.forward_bytes += store.stats.nvme_bytes_read - before

        def timed_io(write: bool, buffer: torch.Tensor, *args: Any) -> None:
            start = time.perf_counter()
            submit(write, buffer, *args)
            if not self._in_gather:
                kind = "write" if write else "read"
                self.seconds[kind] += time.perf_counter() - start
                self._pending[kind] += buffer.numel() * buffer.element_size()

        def timed_wait(*args: Any) -> None:
            start = time.perf_counter()
            wait(*args)
            elapsed, pending = time.perf_counter() - start, sum(self._pending.values())
            if self._in_gather or not pending:
                return
            for kind, count in self._pending.items():
                self.seconds[kind] += elapsed * count / pending
            self._pending = {"read": 0, "write": 0}

        store._io, store._wait, store.gather_into = timed_io, timed_wait, timed_gather


def nvme_settings(context: Context, plan: dict[str, Any], folder: Path, dim: int) -> dict[str, Any]:
    """The NVMe variant's meft settings: a RAM budget of 1/``STORE_PER_RAM`` of the store (rows and two moments)."""
    s = context.settings
    layers = adapter_layers(num_layers(context, plan))
    store_bytes = len(layers) * 3 * s.step_neurons * 2 * dim * 4
    ram_mb = store_bytes / STORE_PER_RAM / 2**20
    store = {"device": "nvme", "nvme_path": str(folder / "store"), "ram_budget_mb": ram_mb}
    values = {"num_neurons": s.step_neurons, "top_k": s.top_k, "layers": layers}
    return {**values, **context.overrides, "store": store}


def measure_store_io(context: Context, plan: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A few optimizer steps of a model whose stores live in ``folder``; bytes and seconds of their I/O."""
    model = plan_model(context, plan)
    dim = model.config.hidden_size
    values = nvme_settings(context, plan, folder, dim)
    model, optimizers = build_meft(model, meft_ds.MeftConfig.from_dict(values), lr=context.settings.train_lr)
    stores = [a.store for a in meft_ds.adapters(model)]
    timer = IoTimer()
    for store in stores:
        timer.instrument(store)
    batches = plan_batches(context, plan, NVME_STEPS)
    before, started, steps = meft_ds.stats(model), time.perf_counter(), []
    for step in range(NVME_STEPS):
        batch = batches[step % len(batches)]
        start, counters = time.perf_counter(), meft_ds.stats(model)
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        optimizer_step(optimizers)
        steps.append({"seconds": time.perf_counter() - start, **stats_delta(counters, meft_ds.stats(model))})
    for store in stores:
        store._finish_writes()  # the last step's writes, counted and timed
    elapsed = time.perf_counter() - started
    counted = stats_delta(before, meft_ds.stats(model))
    result = {
        "steps": steps,
        "seconds": elapsed,
        "read_seconds": timer.seconds["read"],
        "write_seconds": timer.seconds["write"],
        "forward_read_seconds": timer.seconds["forward_read"],
        "forward_bytes_read": timer.forward_bytes,
        "bytes_read": counted["nvme_bytes_read"],
        "bytes_written": counted["nvme_bytes_written"],
        "rows_updated": counted["rows_updated"],
        "rows_fetched": counted["rows_fetched"],
        "tokens": batches[0]["input_ids"].numel(),
        "layers": len(stores),
        "block_rows": stores[0].block_rows,
        "chunk_blocks": stores[0].chunk_blocks,
        "ram_bytes": sum(st.nbytes for st in stores),
        "store_bytes": sum(3 * st.num_rows * 2 * st.dim * 4 for st in stores),  # rows and two moments, fp32
        "dim": dim,
        "neurons": stores[0].num_rows,
    }
    result["read_gbs"] = result["bytes_read"] / result["read_seconds"] / GB if result["read_seconds"] else 0.0
    result["write_gbs"] = result["bytes_written"] / result["write_seconds"] / GB if result["write_seconds"] else 0.0
    forward = result["forward_read_seconds"]
    result["forward_read_gbs"] = result["forward_bytes_read"] / forward / GB if forward else 0.0
    result["step_gbs"] = (result["bytes_read"] + result["bytes_written"]) / elapsed / GB
    del model, optimizers, stores
    shutil.rmtree(folder / "store", ignore_errors=True)
    return result


def raw_aio_io(folder: Path, size: int, repeats: int = IO_REPEATS) -> dict[str, Any]:
    """Median GB/s of writing and reading one ``size``-byte file whole through the store's DeepSpeed aio handle."""
    import meft_ds.swap

    handle = meft_ds.swap.aio_handle()
    path = str(folder / "raw_aio.bin")
    source = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    target = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    writes, reads = [], []
    try:
        source.uniform_()
        for _ in range(repeats):
            start = time.perf_counter()
            handle.async_pwrite(source, path, 0)
            handle.wait()
            writes.append(time.perf_counter() - start)
            target.zero_()
            start = time.perf_counter()
            handle.async_pread(target, path, 0)
            handle.wait()
            reads.append(time.perf_counter() - start)
        if not torch.equal(source, target):
            raise RuntimeError("raw aio: the file read back differs from what was written")
    finally:
        handle.free_cpu_locked_tensor(source)
        handle.free_cpu_locked_tensor(target)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"bytes": size, "write_gbs": size / statistics.median(writes) / GB,
            "read_gbs": size / statistics.median(reads) / GB}  # fmt: skip


def plain_file_io(folder: Path, size: int, repeats: int = IO_REPEATS) -> dict[str, Any]:
    """Median GB/s of a plain buffered write + fsync of one ``size``-byte file, and of a cold read of it (its pages
    dropped from the page cache with posix_fadvise first)."""
    path = folder / "plain.bin"
    source = torch.rand(size // 4).numpy()
    target = torch.empty(size // 4).numpy()
    writes, reads = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            with open(path, "wb") as file:
                file.write(memoryview(source).cast("B"))
                file.flush()
                os.fsync(file.fileno())
            writes.append(time.perf_counter() - start)
            descriptor = os.open(path, os.O_RDONLY)
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)
            view = memoryview(target).cast("B")
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as file:
                done = 0
                while done < size:
                    read = file.readinto(view[done:])
                    if not read:
                        break
                    done += read
            reads.append(time.perf_counter() - start)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return {"bytes": size, "write_gbs": size / statistics.median(writes) / GB,
            "read_gbs": size / statistics.median(reads) / GB}  # fmt: skip


def measure_nvme(context: Context, plan: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    why = aio_available()
    if why is not None:
        note = f"NVMe tier skipped: {why}"
        print(f"  note: {note}")
        notes.append(note)
        return None
    parent = os.environ.get("MEFT_BENCH_NVME")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="meft_bench_nvme_", dir=parent or None))
    try:
        store = measure_store_io(context, plan, folder)
        size = min(RAW_MAX, max(RAW_MIN, store["store_bytes"])) // 2**20 * 2**20
        raw = raw_aio_io(folder, size)
        plain = plain_file_io(folder, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  NVMe store: read {store['read_gbs']:.2f} GB/s, write {store['write_gbs']:.2f} GB/s; raw aio "
          f"{raw['read_gbs']:.2f} / {raw['write_gbs']:.2f} GB/s; plain {plain['read_gbs']:.2f} / "
          f"{plain['write_gbs']:.2f} GB/s")  # fmt: skip
    return {
        "store": store,
        "raw_aio": raw,
        "plain": plain,
        "folder": str(folder.parent),
        "mount": mount_of(folder.parent),
    }
