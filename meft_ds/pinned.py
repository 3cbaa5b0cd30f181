"""`PinnedBuffers`: the page-locked host buffers that a model's adapters copy through, shared by all of them.

A pinned buffer per adapter and purpose would cost the whole adapter's staging size once per layer (16 GiB of
page-locked memory for LLaMA-2-7B with r = 8464, see ``launch/plan.py``). Layers run one after the other, so a short
ring of buffers per purpose serves every adapter of a model: before a buffer is handed out again, whatever last used
it is released: the copy that read or wrote it is waited for, and a gradient hand-over that lives in it is completed
(its rows added to their store). Ring lengths are chosen so that this wait is for work issued well before (see
:data:`RINGS`); on a CPU-only machine there is nothing to wait for.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator

# Buffers per purpose. Rows and routing inputs: 2, so that a pre-retrieval target's copies (issued right after the
# source layer's own) never wait for those. Row gradients: 4, so that the backward of layer i waits at most for the
# hand-over of layer i + 4, issued four layers' backward earlier. Index tensors: 16, several layers' worth (a layer
# sends 1-2, up to 6 with the device cache).
RINGS = {"rows": 2, "hidden": 2, "probe_ids": 2, "probe_gates": 2, "grads": 4, "cached": 2, "indices": 16}


class PinnedBuffers:
    """Rings of reusable pinned host buffers, grown (to a power of two) as needed; one per model.

    A buffer that a ring position outgrows is dropped. Where pinning goes through torch's caching host allocator
    (CUDA), its block stays pinned in that allocator's cache for later pinned allocations of its size; since every
    buffer here is a power of two and grows by doubling at least, what a position leaves behind while it keeps its dtype
    is less than its current buffer: the pinned memory held is then at most twice :attr:`nbytes`."""

    def __init__(self) -> None:
        self._accelerator = get_accelerator()
        self._buffers: dict[tuple[str, int, int], torch.Tensor] = {}
        self._release: dict[tuple[str, int], Callable[[], None]] = {}
        self._turn: dict[str, int] = {}
        # dropped (with its model) while copies may be in flight: wait for them before the buffers go (DeepSpeed's
        # native pinning frees the memory with the tensor; only torch's caching host allocator waits for copies)
        weakref.finalize(self, _release_all, self._release).atexit = False  # at exit the process's memory goes anyway

    def take(self, purpose: str, *parts: tuple[tuple[int, ...], torch.dtype]) -> tuple[tuple[str, int], list]:
        """The next ring slot of ``purpose`` (its ring's next position, released: see the module docstring), and a
        view of each requested ``(shape, dtype)`` part in it; give the ring slot back to :meth:`hold` with what
        releases it."""
        turn = self._turn.get(purpose, 0)
        self._turn[purpose] = turn + 1
        ring_slot = (purpose, turn % RINGS[purpose])
        release = self._release.pop(ring_slot, None)
        if release is not None:
            release()
        views = []
        for index, (shape, dtype) in enumerate(parts):
            numel = 1
            for size in shape:
                numel *= size
            key = (*ring_slot, index)
            buffer = self._buffers.get(key)
            if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
                capacity = 1 << max(numel - 1, 0).bit_length()
                with torch.inference_mode(False):  # reused outside it: a first forward may run under inference_mode
                    buffer = self._accelerator.pin_memory(torch.empty(capacity, dtype=dtype))
                self._buffers[key] = buffer
            views.append(buffer[:numel].view(shape))
        return ring_slot, views

    def hold(self, ring_slot: tuple[str, int], release: Callable[[], None]) -> None:
        """``ring_slot`` is in use until ``release()`` has run: it runs before it is handed out again."""
        self._release[ring_slot] = release

    @property
    def nbytes(self) -> int:
        """Pinned bytes held."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


def _release_all(release: dict[tuple[str, int], Callable[[], None]]) -> None:
    while release:
        release.pop(next(iter(release)))()
