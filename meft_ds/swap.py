"""`NvmeRowStore`: a layer's rows and Adam moments in files on NVMe, read and written through DeepSpeed's async I/O.

For stores larger than CPU memory. The unit of I/O is a key-expert's block of ``r/E`` contiguous rows (tens of KB to
a few MB): routing needs whole experts' keys anyway, and the rows a token fires lie inside its probed experts.

* Rows (keys and values) of recently used experts stay in a RAM cache of ``ram_budget`` bytes (LRU over blocks); a
  micro-batch's probed experts are read into it (if missing) before they are scored, and rows are gathered from it.
* At the optimizer step the touched experts' rows and moments are read into compact buffers, updated in place, and
  written back (the cached copies refreshed), so files always hold the current state.

Files live under ``nvme_path``: ``layer_<i>.{rows,exp_avg,exp_avg_sq}.bin``, raw fp32, ``r x 2 x d`` each. The buffers
handed to the I/O op are flat page-locked tensors (DeepSpeed's op raises on 2-D buffers and then hangs on wait()).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from meft_ds.config import MeftConfigError
from meft_ds.ops import cpu_kernels, kernel_threads
from meft_ds.routing import score_probed_keys
from meft_ds.stats import TrafficStats
from meft_ds.store import CheckpointError, RowStore

FP32 = 4
TENSORS = ("rows", "exp_avg", "exp_avg_sq")
ALIGNMENT = 512  # O_DIRECT: offsets and sizes must be multiples of the logical block size


@functools.cache
def aio_handle() -> Any:
    """One DeepSpeed async I/O handle per process (built on first use; needs libaio)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise MeftConfigError(
            "meft.store.device: the NVMe tier needs DeepSpeed's async I/O op, which needs libaio. Fix: "
            "apt-get install libaio-dev (launch/setup.sh does it), or use the CPU store."
        )
    return builder.load(verbose=False).aio_handle(1024 * 1024, 32, False, False, 1)


def check_nvme_path(path: str, needed_bytes: int) -> Path:
    """The NVMe folder, created and proven writable, with room for ``needed_bytes``; else a clear error."""
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
            f"meft.store.nvme_path: {folder} has {free / 2**30:.1f} GiB free but the stores need "
            f"{needed_bytes / 2**30:.1f} GiB. Fix: free space, choose another drive, or lower meft.num_neurons."
        )
    return folder


class NvmeRowStore(RowStore):
    """The rows of one layer on NVMe, with a RAM cache of hot expert blocks (see the module docstring)."""

    def __init__(
        self, keys: torch.Tensor, *, expert_size: int, folder: Path, layer_index: int, ram_budget: int,
        stats: TrafficStats,
    ) -> None:  # fmt: skip
        self.num_rows, self.dim = keys.shape
        self.row_start, self.row_stop = 0, self.num_rows
        self.expert_size = expert_size
        self.num_experts = self.num_rows // expert_size
        self.block_numel = expert_size * 2 * self.dim
        if (self.block_numel * FP32) % ALIGNMENT:
            raise MeftConfigError(
                f"meft.store.device: an expert block of {expert_size} rows x 2 x d={self.dim} fp32 is "
                f"{self.block_numel * FP32} bytes, not a multiple of {ALIGNMENT} as direct I/O needs. Fix: choose "
                "num_experts so that num_neurons / num_experts * hidden_size is a multiple of 64."
            )
        self.files = {name: folder / f"layer_{layer_index}.{name}.bin" for name in TENSORS}
        self.stats = stats
        self.handle = aio_handle()
        capacity = min(ram_budget // (self.block_numel * FP32), self.num_experts)
        if capacity < 1:
            raise MeftConfigError(
                f"meft.store.ram_budget_mb: too small to hold one expert block ({self.block_numel * FP32} bytes) "
                "per layer. Fix: raise it."
            )
        self.capacity = capacity
        self._cache = self.handle.new_cpu_locked_tensor(capacity * self.block_numel, torch.empty(0))
        self._cache_rows = self._cache.view(capacity * expert_size, 2, self.dim)
        self.slot_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        self.expert_of = torch.full((capacity,), -1, dtype=torch.int64)
        self.last_used = torch.zeros(capacity, dtype=torch.int64)
        self._clock = 0
        self._grad_ids: torch.Tensor | None = None
        self._grads: torch.Tensor | None = None
        self._write_initial(keys)

    # ------------------------------------------------------------------ I/O
    def _io(self, write: bool, buffer: torch.Tensor, name: str, first_expert: int) -> None:
        """Start reading or writing the flat ``buffer`` at expert block ``first_expert`` of file ``name``."""
        offset = first_expert * self.block_numel * FP32
        if write:
            self.handle.async_pwrite(buffer, str(self.files[name]), offset)
            self.stats.nvme_bytes_written += buffer.numel() * FP32
        else:
            self.handle.async_pread(buffer, str(self.files[name]), offset)
            self.stats.nvme_bytes_read += buffer.numel() * FP32

    def _wait(self) -> None:
        self.handle.wait()

    def _write_initial(self, keys: torch.Tensor) -> None:
        """Keys with zero values, and zero moments (one layer's files at a time pass through memory)."""
        rows = torch.zeros(self.num_rows, 2, self.dim)
        self._write_file("exp_avg", rows)
        self._write_file("exp_avg_sq", rows)
        rows[:, 0] = keys
        self._write_file("rows", rows)

    # ------------------------------------------------------------------ the RAM cache of expert blocks
    def _ensure_cached(self, experts: torch.Tensor) -> torch.Tensor:
        """Slots holding ``experts`` (unique), reading the missing ones; raises if they cannot all fit at once."""
        if experts.numel() > self.capacity:
            raise MeftConfigError(
                f"meft.store.ram_budget_mb: a micro-batch probes {experts.numel()} experts of a layer but the cache "
                f"holds {self.capacity}. Fix: raise ram_budget_mb to at least "
                f"{experts.numel() * self.block_numel * FP32 * 2 / 2**20:.0f} x the number of layers / 2**20 MiB."
            )
        self._clock += 1
        slots = self.slot_of[experts]
        missing = experts[slots < 0]
        if missing.numel():
            free = torch.ones(self.capacity, dtype=torch.bool)
            free[slots[slots >= 0]] = False
            candidates = free.nonzero().flatten()
            occupied = (self.expert_of[candidates] >= 0).long()
            order = torch.argsort(occupied * (self._clock + 1) + self.last_used[candidates], stable=True)
            chosen = candidates[order[: missing.numel()]]
            evicted = self.expert_of[chosen]
            self.slot_of[evicted[evicted >= 0]] = -1
            self.expert_of[chosen] = missing
            self.slot_of[missing] = chosen
            for expert, slot in zip(missing.tolist(), chosen.tolist(), strict=True):
                self._io(False, self._block(self._cache, slot), "rows", expert)
            self._wait()
            slots = self.slot_of[experts]
        self.last_used[slots] = self._clock
        return slots

    def _cached_row_positions(self, row_ids: torch.Tensor) -> torch.Tensor:
        experts = torch.div(row_ids, self.expert_size, rounding_mode="floor")
        unique, inverse = torch.unique(experts, return_inverse=True)
        slots = self._ensure_cached(unique)
        return slots[inverse] * self.expert_size + row_ids % self.expert_size

    # ------------------------------------------------------------------ the store interface
    @property
    def keys(self) -> torch.Tensor:
        raise AttributeError("an NVMe store holds no full key matrix in memory; use full_rows() to export")

    @property
    def nbytes(self) -> int:
        """CPU bytes held: the RAM cache (the rows and moments themselves are on NVMe)."""
        return self._cache.numel() * FP32

    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        positions = self._cached_row_positions(row_ids)
        kernels = cpu_kernels()
        if kernels is None:
            out[: row_ids.numel()].copy_(self._cache_rows.index_select(0, positions))
        else:
            kernels.gather_rows(self._cache_rows, positions, out, kernel_threads())

    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        unique, inverse = torch.unique(probe_ids, return_inverse=True)
        slots = self._ensure_cached(unique)  # probed experts, as cache slots: the kernel scores slot "experts"
        return score_probed_keys(hidden.float(), slots[inverse], self._cache_rows[:, 0], expert_size)

    def _block(self, buffer: torch.Tensor, position: int, count: int = 1) -> torch.Tensor:
        return buffer[position * self.block_numel : (position + count) * self.block_numel]

    def _compact_io(self, write: bool, buffers: dict[str, torch.Tensor], experts: list[int]) -> None:
        """Read or write the blocks of ``experts`` (sorted) at consecutive positions of ``buffers``, one I/O per
        run of consecutive experts, and wait."""
        start = 0
        while start < len(experts):
            end = start + 1
            while end < len(experts) and experts[end] == experts[end - 1] + 1:
                end += 1
            for name, buffer in buffers.items():
                self._io(write, self._block(buffer, start, end - start), name, experts[start])
            start = end
        self._wait()

    @contextlib.contextmanager
    def rows_for_update(
        self, row_ids: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        experts = torch.unique(torch.div(row_ids, self.expert_size, rounding_mode="floor"))
        count, numel = experts.numel(), experts.numel() * self.block_numel
        buffers = {name: self.handle.new_cpu_locked_tensor(numel, torch.empty(0)) for name in TENSORS}
        try:
            self._compact_io(False, buffers, experts.tolist())
            views = [buffers[name].view(count * self.expert_size, 2, self.dim) for name in TENSORS]
            index = torch.searchsorted(experts, row_ids // self.expert_size) * self.expert_size
            index += row_ids % self.expert_size
            yield (*views, index)
            self._compact_io(True, buffers, experts.tolist())
            cached = self.slot_of[experts]
            for position in (cached >= 0).nonzero().flatten().tolist():  # refresh the cached copies
                self._block(self._cache, int(cached[position])).copy_(self._block(buffers["rows"], position))
        finally:
            for buffer in buffers.values():
                self.handle.free_cpu_locked_tensor(buffer)

    def _read_file(self, name: str) -> torch.Tensor:
        """A whole file as an ``(r, 2, d)`` tensor (export and checkpoint helpers)."""
        buffer = self.handle.new_cpu_locked_tensor(self.num_experts * self.block_numel, torch.empty(0))
        self._io(False, buffer, name, 0)
        self._wait()
        out = buffer.view(self.num_rows, 2, self.dim).clone()
        self.handle.free_cpu_locked_tensor(buffer)
        return out

    def _write_file(self, name: str, rows: torch.Tensor) -> None:
        buffer = self.handle.new_cpu_locked_tensor(self.num_experts * self.block_numel, torch.empty(0))
        buffer.copy_(rows.reshape(-1))
        self._io(True, buffer, name, 0)
        self._wait()
        self.handle.free_cpu_locked_tensor(buffer)
        self._forget_cache()

    def _forget_cache(self) -> None:
        self.slot_of.fill_(-1)
        self.expert_of.fill_(-1)

    def full_rows(self) -> torch.Tensor:
        return self._read_file("rows")

    def assign_rows(self, rows: torch.Tensor) -> None:
        self._write_file("rows", rows)

    # ------------------------------------------------------------------ checkpoints: the files, copied
    def file_name(self, layer_index: int) -> str:
        return f"layer_{layer_index}.nvme"

    def save(self, directory: Path, layer_index: int) -> None:
        target = directory / self.file_name(layer_index)
        target.mkdir(parents=True, exist_ok=True)
        for name, file in self.files.items():
            shutil.copyfile(file, target / f"{name}.bin")

    def check_saved(self, directory: Path, layer_index: int) -> None:
        saved = directory / self.file_name(layer_index)
        expected = self.num_rows * 2 * self.dim * FP32
        for name in TENSORS:
            file = saved / f"{name}.bin"
            if not file.is_file() or file.stat().st_size != expected:
                raise CheckpointError(
                    f"{file}: missing, or not the {expected} bytes layer {layer_index}'s NVMe store holds. Fix: resume "
                    "with the meft settings, model and store of the run that wrote the checkpoint."
                )

    def load(self, directory: Path, layer_index: int) -> None:
        saved = directory / self.file_name(layer_index)
        for name, file in self.files.items():
            shutil.copyfile(saved / f"{name}.bin", file)
        self._forget_cache()
        self.drop_grads()

    def digest(self, into: hashlib._Hash) -> None:
        for name in TENSORS:
            with open(self.files[name], "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    into.update(chunk)
