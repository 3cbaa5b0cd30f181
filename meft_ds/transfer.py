"""Host<->device traffic of one adapter, through DeepSpeed's accelerator, with every byte counted.

On an accelerator every copy here is asynchronous, and the host waits only where it needs the data:

* Routing inputs (hidden states, router choices) go to the host on the compute stream into pinned buffers (rings
  shared by the model's adapters, :class:`~meft_ds.pinned.PinnedBuffers`); the adapter starts them before the base
  FFN is queued and waits for their event after (``adapter.begin``/``finish``).
* Rows go to the device from a pinned staging buffer (gathered and cast in one pass by meft_ds's kernel), on a side
  stream, into memory allocated on that stream; the compute stream waits for the copy's event where it uses the rows
  (:meth:`RowsInFlight.wait`), and ``record_stream`` keeps the allocator from reusing their block early.
* Index tensors go to the device from pinned memory with ``non_blocking`` copies on the compute stream, which orders
  them before the kernels that read them; the host never waits for them.
* Row gradients go to the host on the side stream, after an event of the compute stream: all rows of the micro-batch's
  union with a per-row "has a gradient" flag. The host completes the hand-over later, where it needs the buffer again
  (a few layers later) or the gradients themselves (:meth:`RowTransfer.flush` at the optimizer boundary): the backward
  never waits for the copy it has just started. Rows whose gradient is all zero (selected, but inactive for every
  token that chose them) travel but are not accumulated, so they are not "touched". Sending them costs little (nearly
  every fetched row has a gradient) and saves a device->host round trip per layer to learn which rows to send.
* With a :class:`~meft_ds.cache.DeviceRowCache`, rows stay on the device within an optimizer step and their gradients
  accumulate there until :meth:`RowTransfer.flush`; so a row travels at most once each way per optimizer step.

Streams are created at the first copy, on the device of the tensors moved (DeepSpeed sets each rank's device after the
adapters are injected). The same code runs on a CPU-only machine: the accelerator has no streams or events there,
pinning is a no-op and the copies are plain memory copies, counted the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from meft_ds.accumulator import RowGradAccumulator
from meft_ds.cache import DeviceRowCache
from meft_ds.pinned import PinnedBuffers
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


@dataclass
class RowsInFlight:
    """Rows on their way to the device. :meth:`wait` orders the current stream after their copy and returns them."""

    rows: torch.Tensor
    copied: Any = None  # event of the copy on the side stream (None: usable on the current stream already)
    gathered: Callable[[], None] | None = None  # completes the store's gather into ``rows`` (CPU: NVMe reads)

    def wait(self) -> torch.Tensor:
        if self.gathered is not None:
            self.gathered()
            self.gathered = None
        if self.copied is not None:
            current = get_accelerator().current_stream(self.rows.device.index)  # the rows' device's, as kernels use
            current.wait_event(self.copied)
            self.rows.record_stream(current)  # allocated on the side stream, used on this one
            self.copied = None
        return self.rows


GradSink = Callable[[torch.Tensor, torch.Tensor], None]  # (grads (n, 2, d), has_grad (n,)) of a backward's rows


def by_union_pos(
    sink: GradSink, num_rows: int, dim: int, dtype: torch.dtype
) -> tuple[RowGradAccumulator, torch.Tensor, Callable[[], None]]:
    """A destination for the gradients of a micro-batch's union of ``num_rows`` rows, by position in the union, whose
    ``done()`` hands all of them (zero where a row has none) in ``dtype`` to ``sink`` with their flags (see
    :meth:`RowTransfer.grad_destination`)."""
    by_pos = RowGradAccumulator(num_rows, dim)

    def done() -> None:
        grads = torch.zeros(num_rows, 2, dim, dtype=dtype)
        has_grad = torch.zeros(num_rows, dtype=torch.bool)
        touched = by_pos.view()
        if touched is not None:
            grads[touched[0]] = touched[1].to(dtype)
            has_grad[touched[0]] = True
        sink(grads, has_grad)

    return by_pos, torch.arange(num_rows), done


@dataclass
class RowGradSink:
    """Where the row gradients of one forward of an adapter go: called with all of the rows' gradients (an
    accelerator's backward), or asked by meft_ds's CPU backward where to write them directly."""

    transfer: RowTransfer
    row_ids: torch.Tensor

    def __call__(self, grads: torch.Tensor, has_grad: torch.Tensor | None = None) -> None:
        self.transfer.accept_grads(self.row_ids, grads, has_grad)

    def destination(self, dtype: torch.dtype) -> tuple[RowGradAccumulator, torch.Tensor, Callable[[], None]]:
        return self.transfer.grad_destination(self.row_ids, dtype)


class _Handover:
    """Row gradients on their way to the host, in pinned buffers; :meth:`complete` adds the rows that have a gradient
    to the store (once), :meth:`discard` drops them (the buffers are still waited for before reuse)."""

    def __init__(self, store: RowStore, row_ids: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor) -> None:
        self.store, self.row_ids, self.grads, self.has_grad = store, row_ids, grads, has_grad
        self.copied: Any = None
        self.done = self.discarded = False

    def complete(self) -> None:
        if self.done:
            return
        if self.copied is not None:
            self.copied.synchronize()
        self.done = True
        if self.discarded:
            return
        self.store.accumulate_grad(self.row_ids, self.grads, self.has_grad)  # rows with a gradient, copied once

    def discard(self) -> None:
        self.discarded = True


class RowTransfer:
    """Moves one adapter's routing inputs, rows and row gradients through pinned ``buffers`` (shared by a model's
    adapters; its own if ``None``); optionally caches rows on the device."""

    def __init__(
        self, store: RowStore, stats: TrafficStats, *, cache_bytes: int = 0, buffers: PinnedBuffers | None = None
    ) -> None:
        self.store = store
        self.stats = stats
        self.cache_bytes = cache_bytes
        self.cache: DeviceRowCache | None = None  # created at the first fetch, when the travel dtype is known
        self.buffers = buffers if buffers is not None else PinnedBuffers()
        self._accelerator = get_accelerator()
        self._device_type = torch.device(self._accelerator.device_name()).type
        self._side_streams: dict[torch.device, Any] = {}  # per device, created at its first copy
        self._handovers: list[_Handover] = []

    # ------------------------------------------------------------------ streams and events
    def _streams_on(self, device: torch.device) -> bool:
        """Whether copies to and from ``device`` are asynchronous, ordered by the accelerator's streams and events:
        it has them, and ``device`` is of its kind. A model left on the CPU beside a GPU copies synchronously (the
        asynchronous test accelerator's device is the CPU)."""
        return self._accelerator.Stream is not None and device.type == self._device_type

    def _side(self, device: torch.device) -> Any:
        """The side stream for copies to and from ``device`` (``None`` without streams there), created at first use."""
        if not self._streams_on(device):
            return None
        if device not in self._side_streams:  # a model moved to another device copies on a stream of that one
            self._side_streams[device] = self._accelerator.Stream(device=device)
        return self._side_streams[device]

    def _event(self, device: torch.device, stream: Any = None) -> Any:
        """An event recorded now on ``stream`` (if ``None``: ``device``'s current stream, where torch queues work on
        its tensors, which need not be the current device's) for work on ``device``, or ``None`` where copies to and
        from ``device`` are synchronous."""
        if not self._streams_on(device):
            return None
        event = self._accelerator.Event()
        event.record(stream if stream is not None else self._accelerator.current_stream(device.index))
        return event

    # ------------------------------------------------------------------ small tensors
    def to_host_async(self, tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, Any]:
        """Start copying ``tensor`` into a pinned buffer of ring ``name`` on the current stream; returns the host view
        and the event to synchronize before reading it (``None`` when the copy is already complete)."""
        ring_slot, (host,) = self.buffers.take(name, (tuple(tensor.shape), tensor.dtype))
        host.copy_(tensor, non_blocking=True)
        self.stats.bytes_to_host += _nbytes(tensor)
        copied = self._event(tensor.device)
        if copied is not None:
            self.buffers.hold(ring_slot, copied.synchronize)
        return host, copied

    def indices_to_device(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host index tensor on the device, as int64, ordered on the current stream before the kernels that read it;
        the host does not wait. It crosses in the narrowest integer type that holds its values (int16 for the cache
        slots and the positions in a micro-batch's union up to 32K rows) from a buffer of the pinned ring "indices",
        held until the copy is done (a fresh pinned tensor dropped at return is safe with torch's caching host
        allocator only: DeepSpeed's native pinning frees its memory when the tensor is collected), and is widened on
        the device, where indexing wants int64. (Rows travel by :meth:`fetch`, routing inputs by
        :meth:`to_host_async`.)"""
        dtype = narrowest_index_dtype(index)  # in a byte buffer: a ring slot serves every index dtype
        ring_slot, (raw,) = self.buffers.take("indices", ((index.numel() * dtype.itemsize,), torch.uint8))
        narrow = raw.view(dtype).view(index.shape)
        narrow.copy_(index)
        on_device = torch.empty(narrow.shape, dtype=narrow.dtype, device=device)
        on_device.copy_(narrow, non_blocking=True)
        copied = self._event(device)
        if copied is not None:
            self.buffers.hold(ring_slot, copied.synchronize)
        self.stats.bytes_to_device += _nbytes(narrow)
        return on_device.long()

    # ------------------------------------------------------------------ rows to the device
    def _upload(self, row_ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> RowsInFlight:
        """Rows ``row_ids`` of the store on their way to ``device`` in ``dtype``: gathered into the staging buffer,
        copied on the side stream into memory allocated there (no kernel queued on the compute stream can still be
        using that block). On a CPU-only machine (no streams) the rows are gathered straight into the tensor the
        adapter computes with, completed when it waits for them (the NVMe tier reads meanwhile), and counted as the
        copy an accelerator makes; the test accelerator with streams (tests/async_accelerator.py) runs the staging
        path on the CPU."""
        shape = (row_ids.numel(), 2, self.store.dim)
        side = self._side(device)
        row_bytes = row_ids.numel() * 2 * self.store.dim * torch.empty(0, dtype=dtype).element_size()
        self.stats.row_bytes_to_device += row_bytes
        self.stats.bytes_to_device += row_bytes
        self.stats.rows_fetched += row_ids.numel()
        if side is None and device.type == "cpu":
            rows = torch.empty(shape, dtype=dtype)
            return RowsInFlight(rows, gathered=self.store.start_gather(row_ids, rows))
        ring_slot, (staging,) = self.buffers.take("rows", (shape, dtype))
        self.store.gather_into(row_ids, staging)  # complete before its copy is queued
        with self._accelerator.stream(side):
            on_device = torch.empty(shape, dtype=dtype, device=device)
            on_device.copy_(staging, non_blocking=True)
        copied = self._event(device, side)
        if copied is not None:
            self.buffers.hold(ring_slot, copied.synchronize)
        return RowsInFlight(on_device, copied)

    def fetch(self, row_ids: torch.Tensor, *, dtype: torch.dtype, device: torch.device) -> RowsInFlight:
        """The ``(n, 2, d)`` key/value rows ``row_ids`` (sorted, unique) on their way to ``device`` in ``dtype``.
        With the cache, they are assembled from cached and fetched rows on the current stream right away."""
        cache = self._cache_for(dtype)
        if cache is None:
            return self._upload(row_ids, dtype, device)
        if cache.rows is not None and (cache.rows.dtype, cache.rows.device) != (dtype, device):
            self._download_pending()  # the cache starts again in the new dtype or device: its gradients go first
        cache.allocate(self.store.dim, dtype, device)
        cache_slots = cache.lookup(row_ids)
        hit = cache_slots >= 0
        miss_ids = row_ids[~hit]
        self.stats.cache_hits += int(hit.sum())
        self.stats.cache_misses += miss_ids.numel()
        incoming = self._upload(miss_ids, dtype, device)
        new_cache_slots, flush_cache_slots, flush_row_ids = cache.admit(miss_ids, keep=cache_slots[hit])
        if flush_cache_slots.numel():
            self._download_cached(flush_cache_slots, flush_row_ids)
        fetched = incoming.wait()
        admitted = (new_cache_slots >= 0).nonzero().flatten()
        if admitted.numel():
            admitted_rows = fetched[self.indices_to_device(admitted, device)]
            cache.rows[self.indices_to_device(new_cache_slots[admitted], device)] = admitted_rows
        rows = torch.empty(row_ids.numel(), 2, self.store.dim, dtype=dtype, device=device)
        hit_on_device = self.indices_to_device(cache_slots[hit], device)
        rows[self.indices_to_device(hit.nonzero().flatten(), device)] = cache.rows[hit_on_device]
        rows[self.indices_to_device((~hit).nonzero().flatten(), device)] = fetched
        return RowsInFlight(rows)

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
    def grad_destination(
        self, row_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[RowGradAccumulator, torch.Tensor, Callable[[], None]]:
        """Where a backward that runs on the host (meft_ds's CPU kernel) writes the gradients of rows ``row_ids``,
        rounded to ``dtype``: ``(accumulator, ids to write them under, done)``. Without a device cache that is the
        store's own accumulator, by row id: the gradients are written once, where the optimizer reads them, and the
        counters count what an accelerator would copy (every row of ``row_ids`` and its flag, in ``dtype``). With
        one, or where the accelerator's streams order copies of host tensors (the asynchronous test accelerator, whose
        device is the CPU), the rows go through :meth:`accept_grads`, as an accelerator's backward hands them over."""
        if self.cache is not None or self._streams_on(torch.device("cpu")):
            return by_union_pos(functools.partial(self.accept_grads, row_ids), row_ids.numel(), self.store.dim, dtype)
        self._count_grads_to_host(row_ids.numel(), dtype)
        return self.store.grad_accumulator, row_ids, lambda: None

    def _count_grads_to_host(self, num_rows: int, dtype: torch.dtype) -> None:
        row_bytes = num_rows * 2 * self.store.dim * torch.empty(0, dtype=dtype).element_size()
        self.stats.row_bytes_to_host += row_bytes
        self.stats.bytes_to_host += row_bytes + num_rows  # and a "has a gradient" flag per row

    def accept_grads(self, row_ids: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor | None = None) -> None:
        """Take the gradients ``(n, 2, d)`` (device, travel dtype) of rows ``row_ids`` from a backward pass: into the
        device cache for cached rows, else on their way to the store. ``has_grad``: ``(n,)`` device flags of the rows
        whose gradient is not all zero, if the backward already knows (else they are computed here)."""
        if has_grad is None:
            has_grad = grads.flatten(1).ne(0).any(dim=1)
        cache = self.cache
        if cache is not None:
            cache_slots = cache.cache_slot_of[row_ids]  # looked up now: a row may have been evicted since the forward
            cached = cache_slots >= 0
            if cached.any():
                union_pos = self.indices_to_device(cached.nonzero().flatten(), grads.device)
                on_device = self.indices_to_device(cache_slots[cached], grads.device)
                cache.grads.index_add_(0, on_device, grads[union_pos].float())
                cache.has_grad[on_device] |= has_grad[union_pos]
                cache.pending[cache_slots[cached]] = True
                uncached = (~cached).nonzero().flatten()
                if not uncached.numel():
                    return
                union_pos = self.indices_to_device(uncached, grads.device)
                row_ids, grads, has_grad = row_ids[uncached], grads[union_pos], has_grad[union_pos]
        self._send_grads(row_ids, grads, has_grad, "grads")

    def _send_grads(self, row_ids: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor, purpose: str) -> None:
        """Start copying ``grads`` and ``has_grad`` (device) of rows ``row_ids`` into pinned buffers of ring
        ``purpose`` on the side stream, after the compute stream has produced them; the host completes the hand-over
        when it needs the buffers again, or at :meth:`flush`."""
        ring_slot, (host_grads, host_flags) = self.buffers.take(
            purpose, (tuple(grads.shape), grads.dtype), (tuple(has_grad.shape), torch.bool)
        )
        produced = self._event(grads.device)
        side = self._side(grads.device)
        with self._accelerator.stream(side):
            if side is not None:
                side.wait_event(produced)
                grads.record_stream(side)  # the compute stream may free them before the side stream has read them
                has_grad.record_stream(side)
            host_grads.copy_(grads, non_blocking=True)
            host_flags.copy_(has_grad, non_blocking=True)
        handover = _Handover(self.store, row_ids, host_grads, host_flags)
        handover.copied = self._event(grads.device, side)
        self._handovers.append(handover)
        self.buffers.hold(ring_slot, handover.complete)
        self._count_grads_to_host(row_ids.numel(), grads.dtype)

    def _download_cached(self, cache_slots: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Send the cached gradients of ``cache_slots`` (rows ``row_ids``) to the store, zeroing them on the device."""
        cache = self.cache
        order = torch.argsort(row_ids)
        cache_slots, row_ids = cache_slots[order], row_ids[order]
        on_device = self.indices_to_device(cache_slots, cache.grads.device)
        grads = cache.grads[on_device].to(self._grad_travel_dtype())
        has_grad = cache.has_grad[on_device]
        cache.grads[on_device] = 0.0
        cache.has_grad[on_device] = False
        cache.pending[cache_slots] = False
        self._send_grads(row_ids, grads, has_grad, "cached")

    def _download_pending(self) -> None:
        """Send every gradient accumulated in the device cache to the store."""
        cache = self.cache
        if cache is not None and cache.pending.any():
            cache_slots = cache.pending.nonzero().flatten()
            self._download_cached(cache_slots, cache.row_id_of[cache_slots])

    def _grad_travel_dtype(self) -> torch.dtype:
        """Accumulated gradients go back in the dtype rows travel in (as every row gradient does without the cache),
        except fp16: a sum over micro-steps of loss-scaled gradients may overflow fp16's range, so those stay fp32."""
        dtype = self.cache.rows.dtype
        return torch.float32 if dtype == torch.float16 else dtype

    def flush(self) -> None:
        """Bring every row gradient into the store: the device cache's, and those still on their way (at an
        optimizer boundary)."""
        self._download_pending()
        for handover in self._handovers:
            handover.complete()
        self._handovers = []

    def drop_grads(self) -> None:
        """Forget the gradients on their way to the host (their buffers are waited for when reused) and those
        accumulating in the device cache (a skipped step)."""
        for handover in self._handovers:
            handover.discard()
        self._handovers = []
        if self.cache is not None and self.cache.grads is not None:
            self.cache.grads.zero_()
            self.cache.has_grad.fill_(False)
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
