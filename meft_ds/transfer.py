"""Host<->device traffic of one adapter, through DeepSpeed's accelerator, with every byte counted.

* Routing inputs (hidden states, router choices) go to the host asynchronously, into reusable pinned buffers, so an
  adapter can start them before the base FFN is queued and wait for them only after (see ``adapter.begin``).
* Rows go to the device from a reusable pinned staging buffer (gathered and cast in one pass by meft_ds's kernel),
  on the accelerator's side stream; the compute stream waits on an event, not on the host.
* Row gradients come back only for rows whose gradient is not all zero (a row selected but inactive for every token
  that chose it has none, and is not "touched").
* With a :class:`~meft_ds.cache.DeviceRowCache`, rows stay on the device within an optimizer step and their gradients
  accumulate there until :meth:`RowTransfer.flush`; so a row travels at most once each way per optimizer step.

The same code runs on a CPU-only machine: the accelerator has no streams or events there, pinning is a no-op and the
copies are plain memory copies, counted the same way.
"""

from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator

from meft_ds.cache import DeviceRowCache
from meft_ds.stats import TrafficStats
from meft_ds.store import RowStore


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def narrowest_index_dtype(index: torch.Tensor | int) -> torch.dtype:
    """The smallest of int16/int32/int64 that holds the values of ``index`` (non-negative), or values below
    ``index`` when it is a bound."""
    bound = index if isinstance(index, int) else (int(index.max()) + 1 if index.numel() else 0)
    for dtype in (torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max + 1:
            return dtype
    return torch.int64


class RowTransfer:
    """Moves one adapter's routing inputs, rows and row gradients, reusing pinned buffers; optionally caches rows."""

    def __init__(self, store: RowStore, stats: TrafficStats, *, cache_bytes: int = 0) -> None:
        self.store = store
        self.stats = stats
        self.cache_bytes = cache_bytes
        self.cache: DeviceRowCache | None = None  # created at the first fetch, when the travel dtype is known
        self._accelerator = get_accelerator()
        self._stream = self._accelerator.Stream() if self._accelerator.Stream is not None else None
        self._host_buffers: dict[str, torch.Tensor] = {}
        self._upload_done = None  # event of the last copy out of the row staging buffer

    # ------------------------------------------------------------------ pinned host buffers
    def _host_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of shape ``shape`` into the reusable pinned buffer ``name``, grown (to a power of two) as needed."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._host_buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            capacity = 1 << max(numel - 1, 0).bit_length()
            buffer = self._accelerator.pin_memory(torch.empty(capacity, dtype=dtype))
            self._host_buffers[name] = buffer
        return buffer[:numel].view(shape)

    # ------------------------------------------------------------------ small tensors
    def to_host_async(self, tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, object | None]:
        """Start copying ``tensor`` into the pinned buffer ``name``; returns the host view and an event to wait on
        (``None`` when the copy is already complete)."""
        host = self._host_buffer(name, tuple(tensor.shape), tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        self.stats.bytes_to_host += _nbytes(tensor)
        if self._accelerator.Event is None:
            return host, None
        event = self._accelerator.Event()
        event.record()
        return host, event

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (which the caller owns: a fresh result) on the host, now; on a CPU device, itself."""
        self.stats.bytes_to_host += _nbytes(tensor)
        return tensor.to("cpu")

    def to_device(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host index tensor on the device, as int64. It crosses in the narrowest integer type that holds its
        values (int16 for the slots and positions of a micro-batch's union up to 32K rows), and is widened on the
        device, where indexing wants int64: a quarter of the bytes for a few cheap passes."""
        narrow = index.to(narrowest_index_dtype(index))
        self.stats.bytes_to_device += _nbytes(narrow)
        return narrow.to(device).long()

    # ------------------------------------------------------------------ rows to the device
    def _upload(self, row_ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``row_ids`` of the store on ``device`` in ``dtype``: gathered into the staging buffer, then copied on
        the side stream; the current stream waits for the copy before it uses the result. (On a CPU-only machine the
        copy is a plain memory copy: the same path, so the path users run on an accelerator is the one tested.)"""
        if self._upload_done is not None:
            self._upload_done.synchronize()  # the previous copy may still be reading the staging buffer
        shape = (row_ids.numel(), 2, self.store.dim)
        staging = self._host_buffer("rows", shape, dtype)
        self.store.gather_into(row_ids, staging)
        on_device = torch.empty(shape, dtype=dtype, device=device)
        with self._accelerator.stream(self._stream):
            on_device.copy_(staging, non_blocking=True)
        if self._stream is not None:
            self._upload_done = self._accelerator.Event()
            self._upload_done.record(self._stream)
            self._accelerator.current_stream().wait_event(self._upload_done)
        self.stats.row_bytes_to_device += _nbytes(on_device)
        self.stats.bytes_to_device += _nbytes(on_device)
        self.stats.rows_fetched += row_ids.numel()
        return on_device

    def fetch(self, row_ids: torch.Tensor, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The ``(n, 2, d)`` key/value rows ``row_ids`` (sorted, unique) on ``device`` in ``dtype``, a new tensor."""
        cache = self._cache_for(dtype)
        if cache is None:
            return self._upload(row_ids, dtype, device)
        cache.allocate(self.store.dim, dtype, device)
        slots = cache.lookup(row_ids)
        hit = slots >= 0
        miss_ids = row_ids[~hit]
        self.stats.cache_hits += int(hit.sum())
        self.stats.cache_misses += miss_ids.numel()
        fetched = self._upload(miss_ids, dtype, device)
        new_slots, flush_slots, flush_rows = cache.admit(miss_ids, keep=slots[hit])
        if flush_slots.numel():
            self._download_cached(flush_slots, flush_rows)
        admitted = (new_slots >= 0).nonzero().flatten()
        if admitted.numel():
            cache.rows[self.to_device(new_slots[admitted], device)] = fetched[self.to_device(admitted, device)]
        rows = torch.empty(row_ids.numel(), 2, self.store.dim, dtype=dtype, device=device)
        rows[self.to_device(hit.nonzero().flatten(), device)] = cache.rows[self.to_device(slots[hit], device)]
        rows[self.to_device((~hit).nonzero().flatten(), device)] = fetched
        return rows

    def _cache_for(self, dtype: torch.dtype) -> DeviceRowCache | None:
        """The device cache, sized to the budget: a cached row costs ``2d`` values in ``dtype`` plus ``2d`` fp32
        gradient accumulators. ``None`` without a budget, or when the budget holds no row."""
        if self.cache is None and self.cache_bytes > 0:
            per_row = 2 * self.store.dim * (torch.empty(0, dtype=dtype).element_size() + 4)
            capacity = min(self.cache_bytes // per_row, self.store.num_rows)
            if capacity > 0:
                self.cache = DeviceRowCache(self.store.num_rows, capacity)
        return self.cache

    # ------------------------------------------------------------------ row gradients to the host
    def accept_grads(self, row_ids: torch.Tensor, grads: torch.Tensor, nonzero: torch.Tensor | None = None) -> None:
        """Take the gradients ``(n, 2, d)`` (device, travel dtype) of rows ``row_ids`` from a backward pass: into the
        device cache for cached rows, else to the store; rows whose gradient is all zero stay where they are.
        ``nonzero``: which rows have a gradient, if the backward already knows (else it is computed here)."""
        if nonzero is None:
            nonzero = grads.flatten(1).ne(0).any(dim=1)
        nonzero = self.to_host(nonzero)
        cache = self.cache
        if cache is not None:
            slots = cache.slot_of[row_ids]  # looked up now: a row may have been evicted since the forward
            cached = slots >= 0
            if cached.any():
                positions = self.to_device(cached.nonzero().flatten(), grads.device)
                cache.grads.index_add_(0, self.to_device(slots[cached], grads.device), grads[positions].float())
                cache.pending[slots[cached & nonzero]] = True
            nonzero &= ~cached
        selected = nonzero.nonzero().flatten()
        if selected.numel() == row_ids.numel():  # every row has a gradient: no positions to send, no gather
            host = self.to_host(grads)
        elif selected.numel():
            host = self.to_host(grads[self.to_device(selected, grads.device)])
        else:
            return
        self.stats.row_bytes_to_host += _nbytes(host)
        self.store.accumulate_grad(row_ids[selected], host.float())

    def _download_cached(self, slots: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Move the cached gradients of ``slots`` (rows ``row_ids``) into the store, zeroing them on the device."""
        order = torch.argsort(row_ids)
        slots, row_ids = slots[order], row_ids[order]
        on_device = self.to_device(slots, self.cache.grads.device)
        host = self.to_host(self.cache.grads[on_device].to(self._grad_travel_dtype()))
        self.stats.row_bytes_to_host += _nbytes(host)
        self.cache.grads[on_device] = 0.0
        self.cache.pending[slots] = False
        self.store.accumulate_grad(row_ids, host.float())

    def _grad_travel_dtype(self) -> torch.dtype:
        """Accumulated gradients go back in the dtype rows travel in (as every row gradient does without the cache),
        except fp16: a sum over micro-steps of loss-scaled gradients may overflow fp16's range, so those stay fp32."""
        dtype = self.cache.rows.dtype
        return torch.float32 if dtype == torch.float16 else dtype

    def flush(self) -> None:
        """Move every gradient still accumulating in the device cache into the store (at an optimizer boundary)."""
        cache = self.cache
        if cache is not None and cache.pending.any():
            slots = cache.pending.nonzero().flatten()
            self._download_cached(slots, cache.row_of[slots])

    def drop_grads(self) -> None:
        """Forget the gradients accumulating in the device cache (a skipped optimizer step)."""
        if self.cache is not None and self.cache.grads is not None:
            self.cache.grads.zero_()
            self.cache.pending.fill_(False)

    def invalidate(self, row_ids: torch.Tensor | None = None) -> None:
        """The master copies of ``row_ids`` (all rows if ``None``) changed: drop their device copies."""
        if self.cache is None:
            return
        if row_ids is None:
            self.cache.clear()
        else:
            self.cache.invalidate(row_ids)

    @property
    def device_bytes(self) -> int:
        """Bytes this transfer keeps resident on the device (the cache; fetched rows live only for a micro-step)."""
        return 0 if self.cache is None else self.cache.nbytes
