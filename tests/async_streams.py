"""The streams and events of the asynchronous test accelerator (``async_accelerator.py``): points in queues whose
ordering the accelerator checks; they do no work of their own."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from async_accelerator import AsyncAccelerator


class FakeStream(torch.Stream):
    """A stream of :class:`AsyncAccelerator` (a real ``torch.Stream`` so that ``Tensor.record_stream`` takes it)."""

    _ids = itertools.count(1)

    def __new__(cls, harness: AsyncAccelerator, device_index: int) -> FakeStream:
        return super().__new__(cls, stream_id=next(cls._ids), device_index=device_index, device_type=0)

    def __init__(self, harness: AsyncAccelerator, device_index: int) -> None:
        self.harness = harness
        self.waited: dict[int, int] = {}  # stream id -> time up to which this stream waited for that stream
        harness.streams[self.stream_id] = self

    def __repr__(self) -> str:
        return f"FakeStream(id={self.stream_id}, device={self.device_index})"

    def knows(self, stream: FakeStream, time: int) -> bool:
        """Whether work on this stream is ordered after ``stream``'s work up to ``time``."""
        return stream is self or self.waited.get(stream.stream_id, -1) >= time

    def wait_event(self, event: FakeEvent) -> None:
        if event.stream is None:
            return
        self.harness.device_wait(self, event.stream, event.time, event.knowledge)

    def wait_stream(self, stream: FakeStream) -> None:
        self.harness.device_wait(self, stream, self.harness.tick(), dict(stream.waited))

    def synchronize(self) -> None:
        self.harness.host_wait(self, self.harness.tick(), self.waited)

    def query(self) -> bool:
        return not self.harness.pending(self, self.harness.tick(), self.waited)


class FakeEvent:
    """An event of :class:`AsyncAccelerator`: a point in one stream's queue."""

    def __init__(self, harness: AsyncAccelerator) -> None:
        self.harness = harness
        self.stream: FakeStream | None = None
        self.time = -1
        self.knowledge: dict[int, int] = {}

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream if stream is not None else self.harness.current
        self.time = self.harness.tick()
        self.knowledge = dict(self.stream.waited)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.harness.host_wait(self.stream, self.time, self.knowledge)

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream if stream is not None else self.harness.current).wait_event(self)

    def query(self) -> bool:
        return self.stream is None or not self.harness.pending(self.stream, self.time, self.knowledge)
