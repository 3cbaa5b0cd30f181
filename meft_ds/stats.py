"""Counters of what crosses host<->device and what the optimizer touches, kept by the code that does it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrafficStats:
    """Cumulative counters of one adapter.

    ``bytes_*`` count every copy between host and device (rows, indices, hidden states); ``row_bytes_*`` only the
    key/value rows and their gradients; ``bytes_between_ranks`` what this rank put into the collectives that keep
    replicated stores identical (row ids and the union's gradients). On a CPU-only machine the copies are plain
    memory copies, counted the same way, so tests on CPU assert the traffic users get on an accelerator.
    """

    bytes_to_device: int = 0
    bytes_to_host: int = 0
    row_bytes_to_device: int = 0
    row_bytes_to_host: int = 0
    rows_fetched: int = 0
    rows_updated: int = 0
    bytes_between_ranks: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    nvme_bytes_read: int = 0
    nvme_bytes_written: int = 0
    forward_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def sum_stats(parts: list[TrafficStats]) -> dict[str, int]:
    """Field-wise sum of several adapters' counters."""
    total = TrafficStats()
    for part in parts:
        for f in dataclasses.fields(total):
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    return total.as_dict()
