"""`RowStore`: one adapter's key and value rows, their Adam moments and gradient accumulator, in CPU memory."""

from __future__ import annotations

import torch


class RowStore:
    """Owns the fp32 master rows of one adapter; the adapter only borrows fetched copies for one micro-step.

    Row ``i`` of ``rows`` holds ``(key_i, value_i)`` side by side, so the rows a micro-batch needs are one gather
    (one staging buffer, one copy each way) and one contiguous block for the optimizer. ``keys`` and ``values`` are
    writable ``(r, d)`` views. Gradients of fetched rows are accumulated compactly (only touched rows, sorted ids)
    until the optimizer consumes them (:meth:`accumulated_grads`, then :meth:`drop_grads`).
    """

    def __init__(self, num_rows: int, dim: int, *, key_init_std: float, seed: int) -> None:
        self.num_rows = num_rows
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        self.rows = torch.zeros(num_rows, 2, dim)
        self.rows[:, 0] = torch.empty(num_rows, dim).normal_(0.0, key_init_std, generator=generator)
        # values start at zero, so an injected model starts exactly at the base model
        self.exp_avg = torch.zeros_like(self.rows)
        self.exp_avg_sq = torch.zeros_like(self.rows)
        self._grad_ids: torch.Tensor | None = None
        self._grads: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        return self.rows[:, 0]

    @property
    def values(self) -> torch.Tensor:
        return self.rows[:, 1]

    @property
    def nbytes(self) -> int:
        """CPU bytes of the rows and moments (the accumulator is bounded by the same size and usually far smaller)."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.exp_avg, self.exp_avg_sq))

    @property
    def num_touched(self) -> int:
        """Rows holding an accumulated gradient."""
        return 0 if self._grad_ids is None else self._grad_ids.numel()

    def accumulate_grad(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """Add ``grads`` (``(n, 2, d)`` fp32, owned by the store from now on) to rows ``ids`` (sorted, unique)."""
        if self._grad_ids is None:
            self._grad_ids, self._grads = ids, grads
            return
        assert self._grads is not None
        merged = torch.cat([self._grad_ids, ids]).unique(sorted=True)
        if merged.numel() == self._grad_ids.numel():
            self._grads.index_add_(0, torch.searchsorted(self._grad_ids, ids), grads)
            return
        grown = self._grads.new_zeros(merged.numel(), 2, self.dim)
        grown.index_copy_(0, torch.searchsorted(merged, self._grad_ids), self._grads)
        grown.index_add_(0, torch.searchsorted(merged, ids), grads)
        self._grad_ids, self._grads = merged, grown

    def accumulated_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The accumulated ``(ids, grads)`` (ids sorted and unique), or ``None`` when no row has a gradient."""
        if self._grad_ids is None:
            return None
        assert self._grads is not None
        return self._grad_ids, self._grads

    def drop_grads(self) -> None:
        self._grad_ids = self._grads = None
