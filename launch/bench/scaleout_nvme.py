"""f. Scale out, part 2: the NVMe tier's read/write GB/s against the raw DeepSpeed aio handle and a plain file.

A model whose ``NvmeRowStore`` adapters get a quarter of the store in RAM trains ``NVME_STEPS`` optimizer steps;
``IoTimer`` charges the store's reads and writes their own time (``nvme_how`` says how). The baselines write and read
one file of the store's size (16 to 256 MiB) in the same folder: a temporary one, or ``$MEFT_BENCH_NVME`` when set.
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
from bench import plots
from bench.common import GB, Context, build_meft, fmt_bytes, fmt_ratio, median_seconds, optimizer_step, stats_delta
from bench.scaleout_plan import adapter_layers, num_layers, plan_batches, plan_model

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
        import meft_ds.aio

        meft_ds.aio.aio_queues()
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
    """Wraps a store's ``start_gather`` (the forward's reads) and its ``_io`` (submits) and ``_wait`` (completes)
    outside of it (the optimizer step's reads and writes): seconds spent, split into reads and writes. With
    ``overlap`` false every read is waited for as soon as it starts (what the store did before it overlapped its
    reads with compute): a forward read at once, the step's reads without ``start_update`` ahead. With ``overlap``
    true (how meft_ds trains) only the seconds spent in the store's calls count (starting the reads, copying out what
    they read once the adapter needs it, waiting for what is not read yet); the rest of the reads' time ran behind
    the FFN, or behind the update of the store before."""

    def __init__(self, overlap: bool) -> None:
        self.overlap = overlap
        self.seconds = {"read": 0.0, "write": 0.0, "forward_read": 0.0}
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
            self.seconds["read"] += elapsed
            self.seconds["forward_read"] += elapsed
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

        store._io, store._wait, store.start_gather = timed_io, timed_wait, timed_start
        if not self.overlap:
            store.start_update = lambda row_ids: None  # rows_for_update reads and waits at once


def nvme_settings(context: Context, plan: dict[str, Any], folder: Path, dim: int) -> dict[str, Any]:
    """The NVMe variant's meft settings: a RAM budget of 1/``STORE_PER_RAM`` of the store (rows and two moments)."""
    s = context.settings
    layers = adapter_layers(num_layers(context, plan))
    store_bytes = len(layers) * 3 * s.step_neurons * 2 * dim * 4
    ram_mb = store_bytes / STORE_PER_RAM / 2**20
    store = {"device": "nvme", "nvme_path": str(folder / "store"), "ram_budget_mb": ram_mb}
    values = {"num_neurons": s.step_neurons, "top_k": s.top_k, "layers": layers}
    return {**values, **context.overrides, "store": store}


def measure_store_io(context: Context, plan: dict[str, Any], folder: Path, overlap: bool) -> dict[str, Any]:
    """A few optimizer steps of a model whose stores live in ``folder``; bytes and seconds of their I/O (see
    :class:`IoTimer` for ``overlap``)."""
    model = plan_model(context, plan)
    dim = model.config.hidden_size
    values = nvme_settings(context, plan, folder, dim)
    model, optimizers = build_meft(model, meft_ds.MeftConfig.from_dict(values), lr=context.settings.train_lr)
    stores = [a.store for a in meft_ds.adapters(model)]
    timer = IoTimer(overlap)
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
        "gap_bytes": stores[0].gap_bytes,
        "bytes_needed": sum(st.bytes_needed for st in stores),  # the rows' own values and moments: no gaps
        "ram_bytes": sum(st.nbytes for st in stores),
        "store_bytes": sum(3 * st.num_rows * 2 * st.dim * 4 for st in stores),  # rows and two moments, fp32
        "dim": dim,
        "neurons": stores[0].num_rows,
    }
    result["read_gbs"] = result["bytes_read"] / result["read_seconds"] / GB if result["read_seconds"] else 0.0
    result["write_gbs"] = result["bytes_written"] / result["write_seconds"] / GB if result["write_seconds"] else 0.0
    result["useful_read_gbs"] = result["bytes_needed"] / result["read_seconds"] / GB if result["read_seconds"] else 0.0
    forward = result["forward_read_seconds"]
    result["forward_read_gbs"] = result["forward_bytes_read"] / forward / GB if forward else 0.0
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
    nothing of the store's is pending then)."""
    import meft_ds.aio

    handle = meft_ds.aio.aio_queues()[0].handle
    path = str(folder / "raw_aio.bin")
    source = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    target = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    try:
        source.uniform_()
        result = file_gbs(
            size,
            lambda: (handle.async_pwrite(source, path, 0), handle.wait()),
            lambda: (handle.async_pread(target, path, 0), handle.wait()),
            target.zero_,
        )
        if not torch.equal(source, target):
            raise RuntimeError("raw aio: the file read back differs from what was written")
    finally:
        handle.free_cpu_locked_tensor(source)
        handle.free_cpu_locked_tensor(target)
        with contextlib.suppress(OSError):
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

    try:
        return file_gbs(size, write, read, drop_pages)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


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
        store = measure_store_io(context, plan, folder, overlap=False)
        overlapped = measure_store_io(context, plan, folder, overlap=True)
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
        "overlapped": overlapped,
        "raw_aio": raw,
        "plain": plain,
        "folder": str(folder.parent),
        "mount": mount_of(folder.parent),
    }


def nvme_rows(nvme: dict[str, Any]) -> list[list[Any]]:
    """The table rows of the NVMe part (experiment f's columns): the store, the raw aio handle, a plain file."""
    store, overlapped, raw, plain = nvme["store"], nvme["overlapped"], nvme["raw_aio"], nvme["plain"]
    steps = len(store["steps"])
    per_step = (store["bytes_read"] + store["bytes_written"]) / steps
    io_ms = (store["read_seconds"] + store["write_seconds"]) / steps * 1e3

    def gbs(part: dict[str, Any]) -> str:
        return f"{part['read_gbs']:.2f} / {part['write_gbs']:.2f}"

    def vs_raw(part: dict[str, Any]) -> str:
        return f"{fmt_ratio(part['read_gbs'] / raw['read_gbs'])} / {fmt_ratio(part['write_gbs'] / raw['write_gbs'])}"

    return [
        [
            "NVMe tier", f"NvmeRowStore, each read waited for at once (measured; RAM {fmt_bytes(store['ram_bytes'])} "
            f"of a {fmt_bytes(store['store_bytes'])} store)", f"{store['rows_updated'] / steps:.0f} updated",
            fmt_bytes(per_step), f"I/O {io_ms:.0f} ms of a {store['seconds'] / steps * 1e3:.0f} ms step; "
            f"whole step {store['step_gbs']:.2f} GB/s", gbs(store), vs_raw(store),
        ],
        [
            "NVMe tier", "NvmeRowStore, reads behind the FFN and the update of the store before (how it trains; "
            "measured)",
            f"{overlapped['rows_updated'] / steps:.0f} updated", fmt_bytes(per_step), overlap_text(nvme), "", "",
        ],
        [
            "NVMe tier", f"DeepSpeed aio handle, one {fmt_bytes(raw['bytes'])} file (O_DIRECT)", "",
            fmt_bytes(raw["bytes"]), "same handle and folder as the store", gbs(raw), "1.00x / 1.00x",
        ],
        [
            "NVMe tier", "plain file: buffered write + fsync, cold read", "", fmt_bytes(plain["bytes"]),
            "same folder", gbs(plain), vs_raw(plain),
        ],
    ]  # fmt: skip


def overlap_text(nvme: dict[str, Any]) -> str:
    """The read seconds left in the step when reads overlap compute, against waiting for each at once."""
    waited, overlapped = nvme["store"], nvme["overlapped"]
    steps = len(waited["steps"])

    def exposed(run: dict[str, Any]) -> tuple[float, float]:
        """ms per step of the forward's reads and of the optimizer step's."""
        forward = run["forward_read_seconds"]
        return forward / steps * 1e3, (run["read_seconds"] - forward) / steps * 1e3

    (forward_before, step_before), (forward_after, step_after) = exposed(waited), exposed(overlapped)
    return (
        f"reads exposed per step: the forward's {forward_after:.0f} ms vs {forward_before:.0f} ms waited for at once "
        f"({1 - forward_after / forward_before:.0%} hidden behind the FFN), the optimizer step's {step_after:.0f} ms "
        f"vs {step_before:.0f} ms ({1 - step_after / step_before:.0%} hidden behind the update of the store before); "
        f"step {overlapped['seconds'] / steps * 1e3:.0f} ms vs {waited['seconds'] / steps * 1e3:.0f} ms"
    )


def nvme_how(nvme: dict[str, Any]) -> str:
    st = nvme["store"]
    return (
        f'NVMe: in the benchmark\'s process, adapters with "store": {{"device": "nvme"}} (keys in RAM; values '
        f"and moments on NVMe, read by blocks of {st['block_rows']} rows, by spans that read through "
        f"gaps of up to {st['gap_bytes'] // 1024} KiB of unselected blocks: the forward's in chunks of up to "
        f"{st['chunk_blocks']} blocks through two aio handles in turns, the optimizer step's straight into buffers "
        f"of their own, written back span by span; RAM {fmt_bytes(st['ram_bytes'])} for a "
        f"{fmt_bytes(st['store_bytes'])} store) train {len(st['steps'])} optimizer steps of {st['tokens']} "
        "tokens (SparseRowAdam; AdamW for the routers). Read GB/s = bytes read over the time reads cost: every "
        "gather_into whole (its reads overlap the keys' gather and the copy-out of the chunk before, counted "
        "too), and the optimizer step's submits and waits; write GB/s = bytes written over their submits and "
        "the waits that complete them (a wait charged to reads and writes by their bytes). Read GB/s counts every "
        "byte read, gaps included; useful read GB/s only the selected rows' own bytes (store.bytes_needed). "
        "That run waits for each read as soon as it starts; a second run, on a fresh model, trains the same "
        "steps as meft_ds does on a CPU: the adapter chooses its rows before its FFN runs (NvmeRowStore.start_gather "
        "puts the first two chunks in flight) and waits for them where it uses them, and the optimizer starts the "
        "next store's step reads (start_update) before it updates a store; its exposed read seconds are those spent "
        "in the store's calls (starting the reads, copying out what they read, waiting for the rest). Baselines in the "
        f"same folder ({nvme['mount']}), median of {IO_REPEATS}: one file written and read whole through the "
        "same DeepSpeed aio handle (1 MiB blocks, queue depth 32, O_DIRECT), and a plain buffered write + fsync and "
        "a cold buffered read (pages dropped with posix_fadvise DONTNEED first)."
    )


def nvme_verdict(nvme: dict[str, Any]) -> str:
    st, raw = nvme["store"], nvme["raw_aio"]
    return (
        f"NVMe store I/O read {st['read_gbs']:.2f} GB/s ({st['read_gbs'] / raw['read_gbs']:.0%} of the raw "
        f"handle's; useful bytes {st['useful_read_gbs']:.2f} GB/s, {st['useful_read_gbs'] / raw['read_gbs']:.0%}; "
        f"the forward's reads alone {st['forward_read_gbs']:.2f} GB/s), write {st['write_gbs']:.2f} "
        f"GB/s vs raw aio {raw['read_gbs']:.2f} / {raw['write_gbs']:.2f} GB/s on the same folder, with the "
        f"store {st['store_bytes'] / st['ram_bytes']:.1f}x its RAM at {st['tokens']} tokens per micro-batch. "
        f"Overlapped with the FFN: {overlap_text(nvme)}."
    )


def nvme_plot(axes: Any, nvme: dict[str, Any] | None) -> None:
    """Read and write GB/s of the store, the raw aio handle and the plain file, side by side."""
    if nvme is None:
        axes.text(0.5, 0.5, "NVMe tier skipped (no async I/O)", ha="center")
        return
    parts = [nvme["store"], nvme["raw_aio"], nvme["plain"]]
    series = {kind: [p[f"{kind}_gbs"] for p in parts] for kind in ("read", "write")}
    plots.grouped_bars(axes, ["NvmeRowStore", "raw aio", "plain file"], series)
    axes.set_ylabel("GB/s")
    axes.legend(fontsize=8)
