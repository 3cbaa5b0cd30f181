"""A CPU test accelerator that runs host<->device copies the way CUDA does, so accelerator-only code runs in CI.

DeepSpeed's CPU accelerator has no streams or events and every copy is synchronous, so code guarded by them never
runs in a CPU test. :class:`AsyncAccelerator` is DeepSpeed's CPU accelerator with streams, events and pinned memory
that exist, and a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that gives copies CUDA's asynchrony:

* a ``non_blocking`` copy into pinned host memory (device -> host) lands only when the host synchronizes an event
  recorded after it (or its stream, or the device); until then its destination holds poison (NaN, or a sentinel for
  integers) and any op touching it is an error;
* a ``non_blocking`` copy issued on a side stream does not happen until another stream waits for it (``wait_event``,
  ``wait_stream``) or the host synchronizes; until then its destination holds poison;
* the pinned buffer a copy reads from is "in flight" until the host has synchronized with that copy: rewriting it
  before is an error (checked at the write where torch dispatches it, and by comparing the buffer's bytes with what
  the copy read, which also catches writes by compiled kernels), and so is freeing it, or the pinned buffer a copy
  writes into (DeepSpeed's native pinning frees the memory when the tensor is collected; only torch's caching host
  allocator waits for the copy);
* a copy on one stream reads its source when that stream gets to it: another stream may not write the source before
  it has waited for the copy;
* the caching allocator's cross-stream rules: an op on stream S may not write a tensor allocated on stream C unless S
  waited for C after the allocation (C's queued kernels may still use the block), may not read a tensor last written
  on C unless S waited for that write, and a tensor allocated on one stream and used on another needs
  ``record_stream`` for the other.

Compute ops run eagerly on the CPU, as if each stream executed everything queued on it at once: only copies are
deferred, which is where meft_ds's asynchrony lives. A :class:`~torch.overrides.TorchFunctionMode` records blocking
transfers made by meft_ds's own code (``.to(device)`` or ``.cpu()`` without ``non_blocking``), each a full stream
synchronisation on a GPU. Used by ``tests/test_async.py`` through the ``async_accelerator`` fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from async_streams import FakeEvent, FakeStream
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

_COPY = torch.ops.aten.copy_.default
_RECORD_STREAM = torch.ops.aten.record_stream.default


class AsyncHazard(AssertionError):
    """Code used a tensor in a way that is a race on a real accelerator."""


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _poison(tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    elif tensor.dtype == torch.bool:
        tensor.fill_(True)
    else:
        tensor.fill_(torch.iinfo(tensor.dtype).min)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (``torch.equal`` tells NaN from NaN apart)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(*(_bytes(t) for t in (a, b)))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@dataclass(eq=False)
class _Copy:
    """One deferred ``non_blocking`` copy."""

    stream: FakeStream
    time: int
    dst: Callable[[], torch.Tensor | None]  # the destination, as it is now (None: freed)
    dst_key: int
    src: torch.Tensor  # what the copy read (a snapshot)
    source: Callable[[], torch.Tensor | None]  # the tensor passed as the source, as it is now (None: freed)
    source_key: int
    to_host: bool
    landed: bool = False  # the destination holds the data (visible to the device)
    host_done: bool = False  # the host synchronized with the copy

    def land(self) -> None:
        if not self.landed:
            self.check_source()
            with _disable_current_modes():
                dst = self.dst()
                if dst is not None:  # freed: pinned memory is reported by AsyncAccelerator, device memory is safe
                    dst.copy_(self.src)
            self.landed = True

    def check_source(self) -> None:
        """The pinned buffer a host->device copy reads must not change before the copy has completed."""
        if self.to_host:
            return
        with _disable_current_modes():
            source = self.source()
            unchanged = source is None or _same_bytes(self.src, source)  # freed: reported by AsyncAccelerator
        if not unchanged:
            raise AsyncHazard(
                f"a pinned host buffer was rewritten while a non_blocking copy out of it (issued on {self.stream}) was "
                "still pending: synchronize an event recorded after the copy before reusing the buffer"
            )


def _weak_view(tensor: torch.Tensor) -> Callable[[], torch.Tensor | None]:
    """``tensor`` as it is when called, without keeping its memory alive (a weak reference to the tensor owning it)."""
    owner = weakref.ref(tensor if tensor._base is None else tensor._base)
    size, stride, offset = tensor.size(), tensor.stride(), tensor.storage_offset()
    return lambda: None if owner() is None else owner().as_strided(size, stride, offset)


@dataclass(frozen=True)
class HostWait:
    """A host synchronisation that had copies to complete: where it waited, and when the newest was issued."""

    caller: str
    newest: int


@dataclass
class _Facts:
    """What the dispatch mode knows about one storage."""

    allocated: tuple[FakeStream, int] | None = None
    written: tuple[FakeStream, int] | None = None
    recorded: set[int] = field(default_factory=set)  # streams passed to record_stream


class AsyncAccelerator(CPU_Accelerator):
    """DeepSpeed's CPU accelerator with CUDA's asynchrony (see the module docstring).

    Attributes:
        host_waits: host synchronisations that had a pending copy to complete, with the frame that waited.
        blocking_transfers: blocking ``.to(device)`` / ``.cpu()`` calls made by meft_ds code (file:line).
        deferred_copies: ``non_blocking`` copies that were deferred.
    """

    def __init__(self) -> None:
        super().__init__()
        self._name = "cpu"  # DeepSpeed and meft_ds compare against "cpu" to pick host code paths
        self.streams: dict[int, FakeStream] = {}
        self._clock = itertools.count()
        self._device_index = 0
        self._defaults: dict[int, FakeStream] = {}
        self.current = self.default_stream()
        self.copies: list[_Copy] = []
        self.facts: dict[int, _Facts] = {}
        self.pinned: dict[int, str | None] = {}  # storage key -> where meft_ds pinned it, while it lives
        self.freed_in_flight: list[str | None] = []  # where pinned memory freed before its copies completed was made
        self.host_waits: list[HostWait] = []
        self.blocking_transfers: list[str] = []
        self.deferred_copies = 0

    # ------------------------------------------------------------------ DeepSpeed's accelerator interface
    def set_device(self, device_index: int | torch.device) -> None:
        # as torch.cuda.set_device: an index or a device (ZeRO-3 passes its local device)
        index = device_index.index if isinstance(device_index, torch.device) else device_index
        self._device_index = 0 if index is None else int(index)

    def current_device(self) -> int:
        return self._device_index

    @property
    def Stream(self) -> Any:  # DeepSpeed's name
        def make(device: torch.device | int | None = None, priority: int = 0) -> FakeStream:
            index = device.index if isinstance(device, torch.device) else device
            return FakeStream(self, self._device_index if index is None else int(index))

        return make

    @property
    def Event(self) -> Any:  # DeepSpeed's name
        return lambda enable_timing=False, blocking=False, interprocess=False: FakeEvent(self)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        previous = self.current
        if stream is not None:
            self.current = stream
        try:
            yield
        finally:
            self.current = previous

    def current_stream(self, device_index: int | None = None) -> FakeStream:
        return self.current

    def default_stream(self, device_index: int | None = None) -> FakeStream:
        index = self._device_index if device_index is None else int(device_index)
        if index not in self._defaults:
            self._defaults[index] = FakeStream(self, index)
        return self._defaults[index]

    def synchronize(self, device_index: int | None = None) -> None:
        now = self.tick()
        for stream in list(self.streams.values()):
            self.host_wait(stream, now, {})

    def pin_memory(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Pinned memory for meft_ds (a copy, as CUDA's is). DeepSpeed's own buffers stay what its CPU accelerator
        makes them, with synchronous copies: the harness checks meft_ds, not DeepSpeed's CPU paths."""
        if _caller(meft_only=True) is None:
            return super().pin_memory(tensor, *args, **kwargs)
        return self.pinned_copy(tensor)

    @staticmethod
    def peek(tensor: torch.Tensor) -> torch.Tensor:
        """What ``tensor`` holds now, read past the harness's checks (to see poison in a test)."""
        with _disable_current_modes():
            return tensor.clone()

    def pinned_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in (what the harness treats as) pinned host memory."""
        pinned = tensor.clone()
        self.pinned[_key(pinned)] = _caller()
        weakref.finalize(pinned, self._pinned_freed, _key(pinned))
        return pinned

    def _pinned_freed(self, key: int) -> None:
        made_at = self.pinned.pop(key, None)
        self.facts.pop(key, None)  # the address may be reused: what was written into this buffer is not the next's
        if any((c.dst_key if c.to_host else c.source_key) == key and not c.host_done for c in self.copies):
            self.freed_in_flight.append(made_at)

    def check_nothing_freed_in_flight(self) -> None:
        if self.freed_in_flight:
            raise AsyncHazard(
                f"pinned host memory (made at {self.freed_in_flight[0]}) was freed while a non_blocking copy into or "
                "out of it was pending: keep it until an event recorded after the copy is synchronized"
            )

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return _key(tensor) in self.pinned

    # ------------------------------------------------------------------ the timeline
    def tick(self) -> int:
        return next(self._clock)

    def pending(self, stream: FakeStream, time: int, knowledge: dict[int, int]) -> list[_Copy]:
        """The copies not yet complete on ``stream`` up to ``time``, and on the streams it had waited for then
        (``knowledge``: stream id -> time)."""
        horizon = {**knowledge, stream.stream_id: time}
        return [c for c in self.copies if not c.host_done and c.time <= horizon.get(c.stream.stream_id, -1)]

    def device_wait(self, waiter: FakeStream, stream: FakeStream, time: int, knowledge: dict[int, int]) -> None:
        """``waiter``'s later work is ordered after ``stream``'s work up to ``time``: those copies land."""
        for copy in self.pending(stream, time, knowledge):
            copy.land()
        for key, value in [*knowledge.items(), (stream.stream_id, time)]:
            waiter.waited[key] = max(waiter.waited.get(key, -1), value)

    def host_wait(self, stream: FakeStream, time: int, knowledge: dict[int, int]) -> None:
        """The host waits for ``stream``'s work up to ``time`` (and what it had waited for): those copies complete."""
        done = self.pending(stream, time, knowledge)
        for copy in done:
            copy.land()
            copy.check_source()
            copy.host_done = True
        if done:
            self.host_waits.append(HostWait(_caller(), max(c.time for c in done)))
            self.copies = [c for c in self.copies if not c.host_done]

    def _facts(self, tensor: torch.Tensor) -> _Facts:
        return self.facts.setdefault(_key(tensor), _Facts())

    # ------------------------------------------------------------------ what the dispatch mode calls
    def on_copy(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Handle ``dst.copy_(src, non_blocking=True)``; returns False when it is an ordinary (immediate) copy."""
        to_host, from_host = self.is_pinned(dst), self.is_pinned(src)
        if not (to_host or from_host):
            return False
        stream, now = self.current, self.tick()
        self.check_access(src, write=False)
        self.check_access(dst, write=True)
        read = (_weak_view(dst), _key(dst), src.detach().clone(), _weak_view(src), _key(src))
        if to_host:  # the device may change src after this point in stream order: the copy reads it now
            copy = _Copy(stream, now, *read, to_host=True)
            _poison(dst)
        else:
            copy = _Copy(stream, now, *read, to_host=False)
            if stream is self.default_stream(stream.device_index):
                copy.land()  # kernels queued after it on the same stream see it
            else:
                _poison(dst)
        self.copies.append(copy)
        self.deferred_copies += 1
        facts = self._facts(dst)
        facts.written = (stream, now)
        return True

    def check_access(self, tensor: torch.Tensor, *, write: bool) -> None:
        """The rules of the module docstring for one tensor an op on the current stream reads or writes."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        stream, key = self.current, _key(tensor)
        for copy in self.copies:
            if copy.dst_key == key and not copy.host_done:
                if copy.to_host:
                    raise AsyncHazard(
                        "the host used a pinned buffer whose non_blocking copy from the device has not completed: "
                        "synchronize an event recorded after the copy first"
                    )
                if not copy.landed:
                    if copy.stream is not stream:
                        raise AsyncHazard(
                            f"{stream} used a tensor whose non_blocking copy on {copy.stream} it has not waited for: "
                            "make it wait_event() on an event recorded after the copy"
                        )
                    copy.land()
            if write and copy.source_key == key and not copy.host_done and not copy.to_host:
                raise AsyncHazard(
                    f"a pinned host buffer was rewritten while a non_blocking copy out of it (on {copy.stream}) was "
                    "still pending: synchronize an event recorded after the copy before reusing the buffer"
                )
            # the same tensor still alive (a freed one's memory is the allocator's business: record_stream)
            read_by_copy = write and copy.source_key == key and not copy.host_done and copy.source() is not None
            if read_by_copy and not stream.knows(copy.stream, copy.time):
                raise AsyncHazard(
                    f"{stream} writes a tensor that a non_blocking copy on {copy.stream} still reads: make it "
                    "wait_event() on an event recorded after the copy first"
                )
        self.check_nothing_freed_in_flight()
        if key in self.pinned:
            return
        facts = self.facts.get(key)
        if facts is None:
            return
        if facts.allocated is not None:
            owner, born = facts.allocated
            if owner is not stream and stream.stream_id not in facts.recorded:
                if write and not stream.knows(owner, born):
                    raise AsyncHazard(
                        f"{stream} writes a tensor allocated on {owner} without waiting for {owner} after the "
                        f"allocation (kernels queued there may still use the block): call {stream}.wait_stream(...) "
                        "first, or allocate it on the writing stream"
                    )
                if not write:
                    raise AsyncHazard(
                        f"{stream} uses a tensor allocated on {owner} without record_stream({stream}): the caching "
                        "allocator may hand its block to the next allocation on the allocating stream"
                    )
        if facts.written is not None:
            writer, when = facts.written
            if not stream.knows(writer, when):
                raise AsyncHazard(
                    f"{stream} uses a tensor written on {writer} without waiting for that write: wait_event() first"
                )

    def on_op(self, func: Any, args: tuple, kwargs: dict, run: Any) -> Any:
        schema = func._schema
        inputs = dict(zip([a.name for a in schema.arguments], args, strict=False)) | kwargs
        written = {
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        }  # fmt: skip
        for name, value in inputs.items():
            for tensor in tree_flatten(value)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.check_access(tensor, write=name in written)
        input_keys = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = run()
        now = self.tick()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel():
                key = _key(tensor)
                if key not in input_keys and key not in self.pinned:  # a fresh allocation, written by this op
                    self.facts[key] = _Facts(allocated=(self.current, now), written=(self.current, now))
        for name in written:
            for tensor in tree_flatten(inputs.get(name))[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and _key(tensor) not in self.pinned:
                    self._facts(tensor).written = (self.current, now)
        return out


def _caller(*, meft_only: bool = False) -> str | None:
    """Where the harness was called from: the innermost meft_ds frame of the stack (``file:line (function)``), or
    the innermost frame's ``path:line``. With ``meft_only``: the direct caller (past this file and torch's own
    frames) if it is meft_ds code, else ``None``."""
    frame = sys._getframe(1)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        inside = name == __file__ or "/torch/" in name
        if "/meft_ds/" in name and "/tests/" not in name:
            return f"{name.rsplit('/meft_ds/', 1)[1]}:{frame.f_lineno} ({frame.f_code.co_name})"
        if meft_only and not inside:
            return None
        fallback = fallback or f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None if meft_only else fallback


class _CopyMode(TorchDispatchMode):
    def __init__(self, harness: AsyncAccelerator) -> None:
        super().__init__()
        self.harness = harness

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        harness = self.harness
        if func is _RECORD_STREAM:
            harness._facts(args[0]).recorded.add(args[1].stream_id)
            return None
        non_blocking = kwargs.get("non_blocking") or (len(args) > 2 and args[2])
        if func is _COPY and non_blocking and harness.on_copy(args[0], args[1]):
            return args[0]
        return harness.on_op(func, args, kwargs, lambda: func(*args, **kwargs))


class _BlockingTransferMode(TorchFunctionMode):
    """Records ``.to(<device>)`` and ``.cpu()`` calls from meft_ds code that do not pass ``non_blocking=True``."""

    def __init__(self, harness: AsyncAccelerator) -> None:
        super().__init__()
        self.harness = harness

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu) and not kwargs.get("non_blocking"):
            moves = func is torch.Tensor.cpu or "device" in kwargs
            moves = moves or any(isinstance(a, (str, torch.device)) for a in args[1:])
            where = _caller(meft_only=True) if moves else None
            if where is not None:
                self.harness.blocking_transfers.append(where)
        return func(*args, **kwargs)


@contextlib.contextmanager
def async_accelerator() -> Iterator[AsyncAccelerator]:
    """Install an :class:`AsyncAccelerator` as DeepSpeed's accelerator, with its modes, for the block; everything
    still pending is completed (and checked) at the end."""
    from deepspeed.accelerator import real_accelerator

    previous = real_accelerator.ds_accelerator
    harness = AsyncAccelerator()
    real_accelerator.ds_accelerator = harness
    try:
        with _CopyMode(harness), _BlockingTransferMode(harness):
            yield harness
            harness.synchronize()
            harness.check_nothing_freed_in_flight()
    finally:
        real_accelerator.ds_accelerator = previous
