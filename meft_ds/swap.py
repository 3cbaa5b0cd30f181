"""`NvmeRowStore`: a layer's values and Adam moments in files on NVMe, its keys in RAM, read through DeepSpeed's aio.

For stores larger than CPU memory. Routing scores every token against the keys of its probed experts, and at real
batch sizes (512 tokens x 8 probes) nearly every expert of a layer is probed: so the keys (``r x d`` fp32, a sixth
of what the store holds) stay in RAM, and routing reads nothing from NVMe. What lives on NVMe is what a micro-batch
needs only for the rows it selected: their values, and at the optimizer step the touched rows' values and moments.

* The unit of I/O is a block of ``block_rows`` consecutive rows (the fewest whose values fill 4 KiB, or one row where
  one row is larger): a micro-batch reads the blocks holding the rows it selected. A request costs far more than the
  bytes of a few blocks (DeepSpeed's handle opens the file and serves its requests one after another), so the blocks
  are read by spans that read through gaps of up to ``gap_bytes`` unselected blocks (:func:`coalesce`); the gap
  blocks are read, counted in ``nvme_bytes_read``, and dropped. The spans, laid end to end, are cut into chunks of
  half the read area (``ram_budget`` minus the keys), read on two aio handles in turns, one per half: a chunk is
  read while the one before is copied out of the other half.
* The forward's reads start when the rows are chosen (:meth:`NvmeRowStore.start_gather`) and are waited for where
  the rows are used: on a CPU the adapter chooses its rows before the FFN runs, so the first two chunks are read
  while the FFN computes (on an accelerator the host reads while the device runs the FFN's queued kernels).
* At the optimizer step the spans holding the touched rows' blocks (values and both moments, through the same gaps)
  are read straight into buffers of their own, updated in place (the keys in RAM beside them), and written back
  span by span, the gaps' unchanged blocks with them. The optimizer starts the next store's reads before it updates
  this one (:meth:`NvmeRowStore.start_update`; consecutive stores use different pairs of queues), and the writes
  complete behind the reads that follow.

Files live under the NVMe folder: ``layer_<i>.{values,exp_avg,exp_avg_sq}.bin``, raw fp32, ``r x d`` values and
``r x 2 x d`` moments (rounded up to whole blocks), created sparse (all zeros) without writing. Checkpoints hold
``rows.bin`` (keys and values side by side, ``r x 2 x d``) and the two moments, as before. The buffers handed to the
I/O op are flat page-locked tensors (DeepSpeed's op raises on 2-D buffers and then hangs on wait()).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from meft_ds.aio import aio_queues, chunk_requests, coalesce
from meft_ds.config import MeftConfigError
from meft_ds.nvme_folder import (
    FILES,
    FP32,
    LIVE_STORES,
    MOMENTS,
    block_rows,
    check_files_free,
    layer_files,
    nvme_ram_needed,
)
from meft_ds.routing import score_probed_keys
from meft_ds.stats import TrafficStats
from meft_ds.store import CheckpointError, RowsForUpdate, RowStore

GAP_BYTES = 128 * 1024  # read through a gap of unselected blocks up to this size rather than start a new request:
# a request cost ~130 us more than its bytes on this machine (measured), which is ~128 KiB at ~1 GB/s


class ReadChunk(NamedTuple):
    """One chunk read by :meth:`NvmeRowStore._read`: blocks ``start:stop`` of those asked for are rows ``selected`` of
    ``blocks``, a ``(k, block numel)`` view of the read area (the other rows are gaps read through)."""

    blocks: torch.Tensor
    selected: torch.Tensor
    start: int
    stop: int


class UpdateReads(NamedTuple):
    """The optimizer step's reads of one store (:meth:`NvmeRowStore.start_update`): the spans (``first`` block,
    ``count`` blocks) holding rows ``row_ids``, read into ``buffers`` (per file, the spans laid end to end), each row
    at position ``index`` of the spans' rows."""

    row_ids: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    index: torch.Tensor
    buffers: dict[str, torch.Tensor]


_stores_created = itertools.count()  # which pair of queues a new store takes: consecutive layers alternate


class NvmeRowStore(RowStore):
    """The rows of one layer: keys in RAM, values and moments on NVMe (see the module docstring). It keeps no per-row
    step counts (``row_steps`` is ``None``); its gradient accumulator grows with the rows touched."""

    reads_ahead = True

    def __init__(
        self, keys: torch.Tensor, *, expert_size: int, folder: Path, layer_index: int, ram_budget: int,
        stats: TrafficStats, gap_bytes: int = GAP_BYTES,
    ) -> None:  # fmt: skip
        self.num_rows, self.dim = keys.shape
        self.expert_size = expert_size  # routing's unit; I/O goes by blocks of rows instead
        self.row_start, self.row_stop = 0, self.num_rows
        self.block_rows = block_rows(self.dim)
        self.num_blocks = -(-self.num_rows // self.block_rows)
        self.value_numel = self.block_rows * self.dim  # one block of values; a block of moments is twice that
        needed = nvme_ram_needed(self.num_rows, self.dim)
        if ram_budget < needed:  # checked for the whole model at injection (meft_ds.memory); kept for direct use
            raise MeftConfigError(
                f"meft.store.ram_budget_mb: {ram_budget / 2**20:.2f} MiB for this layer, but its keys stay in RAM "
                f"({self.num_rows} x {self.dim} x 4 bytes) with a read buffer: at least {needed / 2**20:.2f} MiB. "
                "Fix: raise ram_budget_mb to the number of layers x that."
            )
        check_files_free(folder, [layer_index])
        self.files = layer_files(folder, layer_index)
        LIVE_STORES[self.files["values"].resolve()] = self
        self.stats = stats
        pair = next(_stores_created) % 2
        self.queues = aio_queues()[2 * pair : 2 * pair + 2]
        self.handle = self.queues[0].handle  # allocates the page-locked buffers
        self.keys_ram = keys.clone()
        self.gap_bytes = gap_bytes
        self.bytes_needed = 0  # of what was read, the values and moments of the rows asked for (no gaps, no neighbours)
        chunk_blocks = (ram_budget - self.num_rows * self.dim * FP32) // (2 * self.value_numel * FP32)
        self.chunk_blocks = int(min(chunk_blocks, self.num_blocks))
        self._read_area = self.handle.new_cpu_locked_tensor(2 * self.chunk_blocks * self.value_numel, torch.empty(0))
        self._writing: list[torch.Tensor] = []  # buffers whose writes may still be in flight
        self._written_upto = [0, 0]  # each queue's request count after the last write: complete once it completed
        self._update_reads: UpdateReads | None = None  # the next optimizer step's reads, started ahead
        self._reading = False  # reads into the read area may still be in flight
        self._create_files()

    # ------------------------------------------------------------------ I/O
    def _block_numel(self, name: str) -> int:
        """fp32 values of one block in file ``name``: ``block_rows x d`` values, twice that for a moment."""
        return self.value_numel * (1 if name == "values" else 2)

    def _io(self, write: bool, buffer: torch.Tensor, name: str, first_block: int, handle: int = 0) -> None:
        """Start reading or writing the flat ``buffer`` at block ``first_block`` of file ``name``."""
        offset = first_block * self._block_numel(name) * FP32
        self.queues[handle].submit(write, buffer, str(self.files[name]), offset)
        if write:
            self.stats.nvme_bytes_written += buffer.numel() * FP32
        else:
            self.stats.nvme_bytes_read += buffer.numel() * FP32

    def _wait(self, handle: int = 0) -> None:
        self.queues[handle].wait()

    def _wait_all(self) -> None:
        for handle in range(len(self.queues)):
            self._wait(handle)

    def _finish_writes(self) -> None:
        """Wait for the last optimizer step's writes, where a wait has not completed them already, and free their
        buffers."""
        if self._writing:
            for queue, upto in zip(self.queues, self._written_upto, strict=True):
                if queue.completed < upto:
                    queue.wait()
            for buffer in self._writing:
                self.handle.free_cpu_locked_tensor(buffer)
            self._writing = []

    def _create_files(self) -> None:
        """Zero values and moments: sparse files of the right size (reading a hole gives zeros)."""
        for name in FILES:
            with open(self.files[name], "wb") as file:
                file.truncate(self.num_blocks * self._block_numel(name) * FP32)

    def _blocks_of(self, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sorted unique blocks holding ``row_ids``; each row's block among them, and its row within that block."""
        blocks, inverse = torch.unique(torch.div(row_ids, self.block_rows, rounding_mode="floor"), return_inverse=True)
        return blocks, inverse, row_ids % self.block_rows

    def _read(self, blocks: torch.Tensor) -> Iterator[ReadChunk]:
        """Read the values of ``blocks`` (sorted, unique) into the read area, by spans that read through gaps of up to
        ``gap_bytes`` (see :func:`coalesce`), cut into chunks of half the area. On return the first two chunks are in
        flight, one per half and queue. Iterating waits for each chunk in turn and yields a :class:`ReadChunk`, valid
        until the next step, after which the chunk two ahead is read into the half it leaves."""
        capacity = self.chunk_blocks
        first, count, positions = coalesce(blocks, self.gap_bytes // (self.value_numel * FP32))
        bounds = torch.searchsorted(positions, torch.arange(0, int(count.sum()) + capacity, capacity)).tolist()
        chunks = chunk_requests(first, count, capacity)
        started = 0

        def buffer(index: int) -> torch.Tensor:
            start = index % 2 * capacity * self.value_numel
            return self._read_area[start : start + capacity * self.value_numel]

        def start_free(consumed: int) -> None:
            """Start the next chunks while a half of the area is free: chunks ``consumed:started`` hold theirs."""
            nonlocal started
            while started < min(consumed + 2, len(chunks)):
                for within, block, length in chunks[started]:
                    target = buffer(started)[within * self.value_numel : (within + length) * self.value_numel]
                    self._io(False, target, "values", block, started % 2)
                started += 1

        def wait_in_turn() -> Iterator[ReadChunk]:
            try:
                for index in range(len(chunks)):
                    self._wait(index % 2)
                    lo, hi = bounds[index], bounds[index + 1]
                    selected = positions[lo:hi] - index * capacity
                    yield ReadChunk(buffer(index).view(-1, self.value_numel), selected, lo, hi)
                    start_free(index + 1)
            finally:  # also when the caller stops early: no read may still fill the area
                self._wait_all()
                self._reading = False

        if self._reading:  # a gather never completed (its forward failed): its reads end before the area is reused
            self._wait_all()
        self._reading = True
        start_free(0)
        return wait_in_turn()

    def _spans_io(
        self, write: bool, buffers: dict[str, torch.Tensor], first: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Read or write every span (``first`` block, ``count`` blocks) of every file, the spans laid end to end in
        that file's buffer; the spans alternate between the queues."""
        position = 0
        for number, (block, length) in enumerate(zip(first.tolist(), count.tolist(), strict=True)):
            for name, buffer in buffers.items():
                width = self._block_numel(name)
                self._io(write, buffer[position * width : (position + length) * width], name, block, number % 2)
            position += length

    # ------------------------------------------------------------------ the store interface
    @property
    def keys(self) -> torch.Tensor:
        return self.keys_ram

    @property
    def nbytes(self) -> int:
        """CPU bytes held: the keys and the read buffers (values and moments are on NVMe)."""
        return (self.keys_ram.numel() + self._read_area.numel()) * FP32

    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        return score_probed_keys(hidden.float(), probe_ids, self.keys_ram, expert_size)

    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        self.start_gather(row_ids, out)()

    def start_gather(self, row_ids: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
        """Keys from RAM into ``out`` while the first two chunks of values are read; the returned function waits for
        each chunk in turn and copies it out, cast to ``out``'s dtype, while the next ones are read. What runs before
        it is called (the FFN, on a CPU) overlaps the reads in flight."""
        n = row_ids.numel()
        self._finish_writes()
        self.bytes_needed += n * self.dim * FP32
        blocks, block, within = self._blocks_of(row_ids)
        reads = self._read(blocks)
        out[:n, 0].copy_(self.keys_ram.index_select(0, row_ids))

        def finish() -> None:
            for chunk in reads:
                rows = ((block >= chunk.start) & (block < chunk.stop)).nonzero().flatten()
                at = chunk.selected[block[rows] - chunk.start] * self.block_rows + within[rows]
                out[:n, 1].index_copy_(0, rows, chunk.blocks.view(-1, self.dim).index_select(0, at).to(out.dtype))

        return finish

    def start_update(self, row_ids: torch.Tensor) -> None:
        """Start the reads :meth:`rows_for_update` needs for ``row_ids``. The optimizer calls it for the next store
        before it updates this one, so that these reads run behind that update."""
        self._drop_update_reads()
        self._update_reads = self._start_reads(row_ids)

    def _start_reads(self, row_ids: torch.Tensor) -> UpdateReads:
        """Start reading the spans of blocks holding ``row_ids`` (through gaps, as the forward reads): values and both
        moments, straight into buffers of their own."""
        self._finish_writes()
        self.bytes_needed += row_ids.numel() * self.dim * FP32 * 5  # values and two moments of 2 x d
        blocks, block, within = self._blocks_of(row_ids)
        first, count, at = coalesce(blocks, self.gap_bytes // (self._block_numel("exp_avg") * FP32))
        blocks_read = int(count.sum())
        buffers = {
            name: self.handle.new_cpu_locked_tensor(blocks_read * self._block_numel(name), torch.empty(0))
            for name in FILES
        }  # fmt: skip
        self._spans_io(False, buffers, first, count)
        index = at[block] * self.block_rows + within  # each row's place in the spans' rows
        return UpdateReads(row_ids, first, count, index, buffers)

    def _drop_update_reads(self) -> None:
        """Reads started for an update that did not come (its rows differ, or the step failed): wait, free."""
        if self._update_reads is not None:
            self._wait_all()
            for buffer in self._update_reads.buffers.values():
                self.handle.free_cpu_locked_tensor(buffer)
            self._update_reads = None

    @contextlib.contextmanager
    def rows_for_update(self, row_ids: torch.Tensor) -> Iterator[RowsForUpdate]:
        """The touched rows in the spans :meth:`start_update` reads (started here unless it was, for these rows),
        updated in place by the caller (the keys from RAM beside the values), then written back span by span, the
        gaps' unchanged blocks with them (rewriting a gap costs less than a request more: measured, a layer's writes
        took 2.3x as long by runs of touched blocks alone). The writes complete behind the next reads."""
        reads = self._update_reads
        if reads is None or not torch.equal(reads.row_ids, row_ids):
            self._drop_update_reads()
            reads = self._start_reads(row_ids)
        self._update_reads = None
        buffers, index = reads.buffers, reads.index
        span_rows = buffers["values"].numel() // self.dim
        try:
            rows = torch.empty(span_rows, 2, self.dim)  # only the touched rows are filled, read and written
            values = buffers["values"].view(span_rows, self.dim)
            rows[index, 0] = self.keys_ram.index_select(0, row_ids)
            self._wait_all()
            rows[index, 1] = values.index_select(0, index)
            moments = [buffers[name].view(span_rows, 2, self.dim) for name in MOMENTS]
            yield rows, *moments, index
            self.keys_ram[row_ids] = rows[index, 0]
            values[index] = rows[index, 1]
            self._spans_io(True, buffers, reads.first, reads.count)
            self._writing, buffers = list(buffers.values()), {}
            self._written_upto = [queue.submitted for queue in self.queues]
        finally:  # buffers left here were not handed to writes: their reads end before they are freed
            if buffers:
                self._wait_all()
            for buffer in buffers.values():
                self.handle.free_cpu_locked_tensor(buffer)

    # ------------------------------------------------------------------ whole files (export, checkpoints)
    def _read_whole(self, name: str) -> torch.Tensor:
        """A whole file as an ``(r, d)`` (values) or ``(r, 2, d)`` (moments) tensor."""
        self._finish_writes()
        width = self._block_numel(name)
        buffer = self.handle.new_cpu_locked_tensor(self.num_blocks * width, torch.empty(0))
        self._io(False, buffer, name, 0)
        self._wait(0)
        shape = (self.num_rows, self.dim) if name == "values" else (self.num_rows, 2, self.dim)
        out = buffer[: self.num_rows * width // self.block_rows].view(shape).clone()
        self.handle.free_cpu_locked_tensor(buffer)
        return out

    def _write_whole(self, name: str, tensor: torch.Tensor) -> None:
        self._finish_writes()
        width = self._block_numel(name)
        buffer = self.handle.new_cpu_locked_tensor(self.num_blocks * width, torch.empty(0))
        buffer.zero_()
        buffer[: tensor.numel()].copy_(tensor.reshape(-1))
        self._io(True, buffer, name, 0)
        self._wait(0)
        self.handle.free_cpu_locked_tensor(buffer)

    def full_rows(self) -> torch.Tensor:
        return torch.stack([self.keys_ram, self._read_whole("values")], dim=1)

    def assign_rows(self, rows: torch.Tensor) -> None:
        self.keys_ram.copy_(rows[:, 0])
        self._write_whole("values", rows[:, 1])

    # ------------------------------------------------------------------ checkpoints: rows and moments, whole
    def file_name(self, layer_index: int) -> str:
        return f"layer_{layer_index}.nvme"

    def save(self, directory: Path, layer_index: int) -> None:
        self._finish_writes()
        target = directory / self.file_name(layer_index)
        target.mkdir(parents=True, exist_ok=True)
        self.full_rows().numpy().tofile(target / "rows.bin")
        size = self.num_rows * 2 * self.dim * FP32
        for name in MOMENTS:
            shutil.copyfile(self.files[name], target / f"{name}.bin")
            os.truncate(target / f"{name}.bin", size)

    def check_saved(self, directory: Path, layer_index: int) -> None:
        saved = directory / self.file_name(layer_index)
        expected = self.num_rows * 2 * self.dim * FP32
        for name in ("rows", *MOMENTS):
            file = saved / f"{name}.bin"
            if not file.is_file() or file.stat().st_size != expected:
                raise CheckpointError(
                    f"{file}: missing, or not the {expected} bytes layer {layer_index}'s NVMe store holds. Fix: resume "
                    "with the meft settings, model and store of the run that wrote the checkpoint."
                )

    def load(self, directory: Path, layer_index: int) -> None:
        saved = directory / self.file_name(layer_index)
        shape = (self.num_rows, 2, self.dim)
        self.assign_rows(torch.from_file(str(saved / "rows.bin"), size=shape[0] * 2 * self.dim).view(shape))
        for name in MOMENTS:
            shutil.copyfile(saved / f"{name}.bin", self.files[name])
            os.truncate(self.files[name], self.num_blocks * self.value_numel * 2 * FP32)
        self.drop_grads()

    def digest(self, into: hashlib._Hash) -> None:
        self._finish_writes()
        into.update(memoryview(self.keys_ram.numpy()))
        for name in FILES:
            with open(self.files[name], "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    into.update(chunk)
