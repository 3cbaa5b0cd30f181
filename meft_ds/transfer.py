"""Host<->device copies of one adapter, through DeepSpeed's accelerator, with every byte counted.

The same code runs on CUDA (pinned staging buffers, non-blocking copies) and on a CPU-only machine, where the
accelerator's pinning is a no-op and the copies are plain memory copies.
"""

from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator

from meft_ds.ops import cpu_kernels, kernel_threads
from meft_ds.stats import TrafficStats
from meft_ds.store import RowStore


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class RowTransfer:
    """Moves one adapter's rows to the device and their gradients back, reusing a pinned staging buffer."""

    def __init__(self, stats: TrafficStats) -> None:
        self.stats = stats
        self._accelerator = get_accelerator()
        self._staging: torch.Tensor | None = None
        self._copy_done = None  # event of the last host->device copy out of the staging buffer

    def _staging_rows(self, num_rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``(num_rows, 2, dim)`` view of the pinned staging buffer, grown (to the next power of two) as needed."""
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous copy may still be reading the buffer
        buffer = self._staging
        if buffer is None or buffer.dtype != dtype or buffer.shape[0] < num_rows or buffer.shape[2] != dim:
            capacity = 1 << max(num_rows - 1, 0).bit_length()
            buffer = self._accelerator.pin_memory(torch.empty(capacity, 2, dim, dtype=dtype))
            self._staging = buffer
        return buffer[:num_rows]

    def rows_to_device(
        self, store: RowStore, row_ids: torch.Tensor, *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The ``(n, 2, d)`` key/value rows ``row_ids`` of ``store`` on ``device``, in ``dtype``."""
        staging = self._staging_rows(row_ids.numel(), store.dim, dtype)
        kernels = cpu_kernels()
        if kernels is None:
            staging.copy_(store.rows.index_select(0, row_ids))
        else:  # gather and cast in one pass, straight into the staging buffer
            kernels.gather_rows(store.rows, row_ids, staging, kernel_threads())
        on_device = torch.empty(staging.shape, dtype=dtype, device=device)
        on_device.copy_(staging, non_blocking=True)
        if self._accelerator.Event is not None:
            self._copy_done = self._accelerator.Event()
            self._copy_done.record()
        self.stats.row_bytes_to_device += _nbytes(staging)
        self.stats.bytes_to_device += _nbytes(staging)
        self.stats.rows_fetched += row_ids.numel()
        return on_device

    def row_grads_to_host(self, grads: torch.Tensor) -> torch.Tensor:
        """Row gradients (``(n, 2, d)``, in the dtype rows travel in) as a new fp32 CPU tensor."""
        on_host = grads.to("cpu").to(torch.float32, copy=True)
        self.stats.row_bytes_to_host += _nbytes(grads)
        self.stats.bytes_to_host += _nbytes(grads)
        return on_host

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A small tensor (indices) to the device."""
        self.stats.bytes_to_device += _nbytes(tensor)
        return tensor.to(device)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A device tensor (hidden states, router choices) to the CPU, in its own dtype."""
        self.stats.bytes_to_host += _nbytes(tensor)
        return tensor.to("cpu")
