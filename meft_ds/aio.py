"""DeepSpeed's async I/O for the NVMe tier (:mod:`meft_ds.swap`): the queues, and the spans that cover a set of
blocks of a file."""

from __future__ import annotations

import functools
from typing import Any

import torch

from meft_ds.config import MeftConfigError


class AioQueue:
    """A DeepSpeed async I/O handle and the count of its requests: its ``wait()`` waits for all of them (and must not
    be called with none: DeepSpeed's op aborts), so the first ``completed`` requests are known to be complete."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.submitted, self.completed = handle, 0, 0

    @property
    def pending(self) -> int:
        return self.submitted - self.completed

    def submit(self, write: bool, buffer: torch.Tensor, path: str, offset: int) -> None:
        (self.handle.async_pwrite if write else self.handle.async_pread)(buffer, path, offset)
        self.submitted += 1

    def wait(self) -> None:
        if self.pending:
            self.handle.wait()
            self.completed = self.submitted

    def __del__(self) -> None:
        """DeepSpeed's handle aborts the process when it is destroyed with requests pending (the last optimizer
        step's writes, when nothing waited for them): they complete first."""
        self.wait()


@functools.cache
def aio_queues() -> tuple[AioQueue, ...]:
    """Two pairs of async I/O queues per process (built on first use; needs libaio). A store's reads alternate
    between the queues of its pair, so that one chunk can be waited for while the next is in flight; consecutive
    stores use different pairs, so that waiting for one store's reads does not wait for the next one's."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    class Builder(AsyncIOBuilder):
        """DeepSpeed's builder, without debug information: the op is I/O-bound and built at -O0 anyway, and ``-g``
        cost ~40% of its JIT build's CPU time (58 -> 36 CPU-s for one of its 12 sources, measured). A DeepSpeed
        install with the op prebuilt (DS_BUILD_AIO=1) loads that instead, as before."""

        def cxx_args(self) -> list[str]:
            return [arg for arg in super().cxx_args() if arg != "-g"]

    builder = Builder()
    if not builder.is_compatible(verbose=False):
        raise MeftConfigError(
            "meft.store.device: the NVMe tier needs DeepSpeed's async I/O op, which needs libaio. Fix: "
            "apt-get install libaio-dev (launch/setup.sh does it), or use the CPU store."
        )
    op = builder.load(verbose=False)
    return tuple(AioQueue(op.aio_handle(1024 * 1024, 32, False, False, 1)) for _ in range(4))


def coalesce(blocks: torch.Tensor, gap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spans of the file covering the sorted unique ``blocks``, a span reading through gaps of at most ``gap``
    unselected blocks: ``(first block, count)`` of each span, and each block's position in the spans laid end to end."""
    if not blocks.numel():
        return blocks, blocks, blocks
    opens = torch.ones_like(blocks, dtype=torch.bool)
    opens[1:] = blocks[1:] - blocks[:-1] > gap + 1
    firsts = opens.nonzero().flatten()
    lasts = torch.cat([firsts[1:] - 1, firsts.new_tensor([blocks.numel() - 1])])
    first, count = blocks[firsts], blocks[lasts] - blocks[firsts] + 1
    span = torch.cumsum(opens, 0) - 1
    return first, count, (torch.cumsum(count, 0) - count)[span] + blocks - first[span]


def chunk_requests(first: torch.Tensor, count: torch.Tensor, capacity: int) -> list[list[tuple[int, int, int]]]:
    """The spans laid end to end, cut into chunks of ``capacity`` blocks: per chunk, ``(position in the chunk,
    first block, count)`` of each request (a span crossing a chunk's end is split there)."""
    chunks: list[list[tuple[int, int, int]]] = []
    position = 0
    for block, left in zip(first.tolist(), count.tolist(), strict=True):
        while left:
            chunk, within = divmod(position, capacity)
            take = min(left, capacity - within)
            if chunk == len(chunks):
                chunks.append([])
            chunks[chunk].append((within, block, take))
            position, block, left = position + take, block + take, left - take
    return chunks
