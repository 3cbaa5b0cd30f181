"""`DeviceRowCache`: which rows of one adapter stay on the device, with their gradient accumulators.

Rows do not change within an optimizer step, so a row needed by several micro-steps need travel to the device once,
and its gradient back once: the cache keeps fetched rows (in the dtype rows travel in) and accumulates their
gradients on the device (fp32, like the store's accumulator) until the optimizer boundary flushes them. After the
sparse optimizer updates rows, their cached copies are dropped, so a stale row is never used. Each cached row has a
*cache slot* (its index in the device tensors). Eviction is LRU; a cache slot holding unflushed gradient is flushed
before it is reused.

This class only keeps the books (host-side maps, the device tensors); :class:`meft_ds.transfer.RowTransfer` moves
the bytes.
"""

from __future__ import annotations

import torch


class DeviceRowCache:
    """Up to ``capacity`` rows of a ``num_rows``-row store, resident on the device.

    Attributes (all indexed by cache slot, except ``cache_slot_of``):
        rows: ``(capacity, 2, d)`` device copies (allocated on first use, in the travel dtype).
        grads: ``(capacity, 2, d)`` fp32 device gradient accumulators.
        has_grad: ``(capacity,)`` device flags: the cache slot's accumulator holds a nonzero gradient (known on the
            device only, so that the backward never waits for it; it travels with the gradients when they are
            flushed).
        cache_slot_of: ``(num_rows,)`` host map row id -> cache slot, ``-1`` when not cached.
        row_id_of: ``(capacity,)`` host map cache slot -> row id, ``-1`` when free.
        pending: ``(capacity,)`` host flags: the cache slot's accumulator received gradient not yet flushed (which
            may be all zero: ``has_grad`` tells).
    """

    @torch.inference_mode(False)  # its tensors are updated in place later: a first forward may run under it
    def __init__(self, num_rows: int, capacity: int) -> None:
        self.capacity = capacity
        self.cache_slot_of = torch.full((num_rows,), -1, dtype=torch.int64)
        self.row_id_of = torch.full((capacity,), -1, dtype=torch.int64)
        self.last_used = torch.zeros(capacity, dtype=torch.int64)
        self.pending = torch.zeros(capacity, dtype=torch.bool)
        self.rows: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None
        self.has_grad: torch.Tensor | None = None
        self._clock = 0

    @torch.inference_mode(False)
    def allocate(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Create (or re-create, emptied, if the dtype or device changed) the device tensors."""
        rows = self.rows
        if rows is not None and rows.dtype == dtype and rows.device == device:
            return
        self.rows = torch.empty(self.capacity, 2, dim, dtype=dtype, device=device)
        self.grads = torch.zeros(self.capacity, 2, dim, dtype=torch.float32, device=device)
        self.has_grad = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        self.clear()

    @property
    def nbytes(self) -> int:
        """Device bytes held (rows, gradient accumulators and their flags)."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.grads, self.has_grad) if t is not None)

    def lookup(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Cache slots of ``row_ids`` (``-1`` for misses), marking the hits as just used."""
        cache_slots = self.cache_slot_of[row_ids]
        self._clock += 1
        self.last_used[cache_slots[cache_slots >= 0]] = self._clock
        return cache_slots

    def admit(self, row_ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assign cache slots to ``row_ids`` (not cached), never evicting the cache slots in ``keep``.

        Returns ``(cache_slots, flush_cache_slots, flush_row_ids)``: a cache slot per row (``-1`` where the cache is
        too small), and the cache slots (with their previous row ids) that held unflushed gradient: the caller must
        move those gradients to the store, and zero them, before the new rows accumulate into the cache slots.
        """
        available = torch.ones(self.capacity, dtype=torch.bool)
        available[keep] = False
        candidates = available.nonzero().flatten()
        # free cache slots first, then the least recently used
        occupied = (self.row_id_of[candidates] >= 0).long()
        order = torch.argsort(occupied * (self._clock + 1) + self.last_used[candidates], stable=True)
        chosen = candidates[order[: row_ids.numel()]]
        cache_slots = torch.full_like(row_ids, -1)
        cache_slots[: chosen.numel()] = chosen
        flushing = self.pending[chosen]
        flush_cache_slots, flush_row_ids = chosen[flushing], self.row_id_of[chosen][flushing]
        self.pending[chosen] = False
        previous = self.row_id_of[chosen]
        self.cache_slot_of[previous[previous >= 0]] = -1
        admitted = row_ids[: chosen.numel()]
        self.row_id_of[chosen] = admitted
        self.cache_slot_of[admitted] = chosen
        self.last_used[chosen] = self._clock
        return cache_slots, flush_cache_slots, flush_row_ids

    def invalidate(self, row_ids: torch.Tensor) -> None:
        """Forget rows whose master copies changed (their gradients must have been flushed)."""
        cache_slots = self.cache_slot_of[row_ids]
        cache_slots = cache_slots[cache_slots >= 0]
        self.row_id_of[cache_slots] = -1
        self.cache_slot_of[row_ids] = -1
        self.pending[cache_slots] = False

    def clear(self) -> None:
        self.cache_slot_of.fill_(-1)
        self.row_id_of.fill_(-1)
        self.pending.fill_(False)
        self.last_used.zero_()
        if self.grads is not None:
            self.grads.zero_()
            self.has_grad.fill_(False)
