"""`RowGradAccumulator`: the gradients of one store's touched rows, summed over micro-steps, packed in one buffer.

Entry ``e < count`` holds the fp32 gradient of row ``ids[e]``; ``entry_of[id]`` is that entry (``-1``: the row has no
gradient). A row's first gradient is copied into the next free entry, later ones are added to it in place: no
zero-fill, and nothing already accumulated is ever copied again. The buffer is allocated once, at the first gradient,
with room for every row the store holds, and kept across optimizer steps (a sharded store's rank also holds
gradients of rows that others own until they are exchanged, and the NVMe tier starts small: for those it grows,
doubling). The backward's CPU kernel
writes into it directly (:class:`meft_ds.adapter.TopKAdapterFunction`).

Every value written is checked for NaN/inf on the way (in the kernel, while it is in a register), so the optimizer's
skip test reads nothing; a write from outside (an unscale, a clip, a test's poke) shows in the buffer's version
counter, and the next test then reads the gradients once.
"""

from __future__ import annotations

import torch

from meft_ds.ops import cpu_kernels, kernel_threads


class RowGradAccumulator:
    """Row gradients of ids in ``[0, num_ids)``, rows of ``(2, dim)``; room for ``capacity`` rows (all if ``None``)
    at first."""

    def __init__(self, num_ids: int, dim: int, *, capacity: int | None = None) -> None:
        self.num_ids, self.dim = num_ids, dim
        self.initial_capacity = num_ids if capacity is None else min(capacity, num_ids)
        self.entry_of = torch.full((num_ids,), -1, dtype=torch.int64)
        self.grads = torch.empty(0, 2, dim)
        self.ids = torch.empty(0, dtype=torch.int64)
        self.count = 0
        self._finite: bool | None = True  # every value written was finite (None: unknown, something else wrote)
        # averaged over the data-parallel ranks (meft_ds.distributed.exchange_row_grads) since the last gradient came
        self.averaged_over_ranks = False
        self._version = self.grads._version  # the buffer's version counter after our last write

    def _note_outside_writes(self) -> None:
        """In-place writes by others bump the buffer's version counter (our kernels' writes do not): after one, the
        gradients' finiteness is unknown until read."""
        if self._version != self.grads._version:
            self._finite, self._version = None, self.grads._version

    # ------------------------------------------------------------------ adding
    def reserve(self, new_rows: int) -> None:
        """Make room for ``new_rows`` more rows (a no-op once the buffer holds every row it may need)."""
        needed = min(self.count + new_rows, self.num_ids)
        if needed <= self.grads.shape[0]:
            return
        self._note_outside_writes()
        capacity = min(self.num_ids, max(needed, 2 * self.grads.shape[0], self.initial_capacity))
        grads = torch.empty(capacity, 2, self.dim)
        ids = torch.empty(capacity, dtype=torch.int64)
        grads[: self.count] = self.grads[: self.count]
        ids[: self.count] = self.ids[: self.count]
        self.grads, self.ids = grads, ids
        self._version = grads._version

    def kernel_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(grads, ids, entry_of, count)`` for a kernel that adds rows (call :meth:`reserve` first, and
        :meth:`committed` with what the kernel returns)."""
        return self.grads, self.ids, self.entry_of, self.count

    def committed(self, count: int, finite: bool) -> None:
        """A kernel wrote into :meth:`kernel_state`: entries ``[old count, count)`` are new, and its values were
        ``finite`` or not."""
        self.count = count
        self.averaged_over_ranks = False
        self._note_outside_writes()
        if self._finite is not None:
            self._finite = self._finite and finite

    def add(self, ids: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor | None = None) -> None:
        """Add ``grads`` (``(n, 2, d)``, any float dtype; copied) to rows ``ids`` (``(n,)``, unique), only where
        ``has_grad`` (``(n,)`` bool) is true, if given."""
        self.reserve(ids.numel())
        kernels = cpu_kernels()
        if kernels is not None:
            grads = grads.contiguous()
            flags = torch.empty(0, dtype=torch.bool) if has_grad is None else has_grad.contiguous()
            count, finite = kernels.accumulate_rows_(*self.kernel_state(), ids.contiguous(), grads, flags,
                                                     kernel_threads())  # fmt: skip
            self.committed(count, finite)
            return
        if has_grad is not None:
            ids, grads = ids[has_grad], grads[has_grad]
        grads = grads.float()
        self._note_outside_writes()
        entries = self.entry_of[ids]
        new = entries < 0
        first, added = self.count, int(new.sum())
        new_entries = torch.arange(first, first + added)
        self.entry_of[ids[new]] = new_entries
        self.ids[new_entries] = ids[new]
        self.grads[new_entries] = grads[new]
        self.grads.index_add_(0, entries[~new], grads[~new])
        finite = bool(torch.isfinite(self.grads[entries[~new]]).all() and torch.isfinite(grads[new]).all())
        self._version = self.grads._version  # these writes are ours
        self.committed(first + added, finite)

    # ------------------------------------------------------------------ reading
    def view(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ids, grads)``: the touched rows' ids, in the order they first got a gradient, and their gradients
        (``(n, 2, d)`` fp32, a view into the buffer: in-place changes stay); ``None`` when no row has a gradient.
        Nothing downstream needs the ids sorted (the optimizer indexes rows by id, the NVMe tier and the exchange
        between ranks sort what they read), and sorting them meant moving every row: 30 ms per 7B-shaped layer and
        optimizer step on the H200 machine's host, a fifth of MEFT's host time there."""
        if self.count == 0:
            return None
        return self.ids[: self.count], self.grads[: self.count]

    def all_finite(self) -> bool:
        """Whether every accumulated value is finite: known from the writes, unless something else wrote since (then
        one read pass, whose answer is kept until the next outside write)."""
        self._note_outside_writes()
        if self._finite is None:
            grads = self.grads[: self.count]
            kernels = cpu_kernels()
            if kernels is not None:
                self._finite = bool(kernels.all_finite(grads, kernel_threads()))
            else:
                self._finite = bool(torch.isfinite(grads).all())
        return self._finite

    def clear(self) -> None:
        """Forget every gradient (the buffer is kept)."""
        self.entry_of[self.ids[: self.count]] = -1
        self.count = 0
        self.averaged_over_ranks = False
        self._finite, self._version = True, self.grads._version
