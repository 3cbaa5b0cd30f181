"""Keeping replicated row stores identical across data-parallel ranks.

The DeepSpeed engine all-reduces its own parameters' gradients, never the rows' (they live outside it). At each
optimizer boundary :func:`allreduce_row_grads` averages the accumulated row gradients over the ranks, exchanging only
touched rows: every rank learns the union of touched row ids (an all-gather of ids), lays its gradients out over that
union and joins one all-reduce. Every rank then applies the same sparse Adam step to the same rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from deepspeed import comm as dist

from meft_ds.adapter import SparseKeyExpertAdapter


def _all_gather_variable(tensor: torch.Tensor, group: Any, world_size: int) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), via two fixed-size all-gathers."""
    length = torch.tensor([tensor.numel()], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(n.item() for n in lengths))
    padded = torch.full((longest,), -1, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [g[: int(n.item())] for g, n in zip(gathered, lengths, strict=True)]


def allreduce_row_grads(adapters: list[SparseKeyExpertAdapter], *, group: Any = None) -> int:
    """Average every adapter's accumulated row gradients over the ranks of ``group``; returns the bytes sent.

    All layers travel together: one all-gather of row ids (each layer's ids offset by ``layer * r``) and one
    all-reduce of the gradients laid out over each layer's union of ids.
    """
    world_size = dist.get_world_size(group=group)
    if world_size == 1:
        return 0
    local_ids, local_grads = [], []
    for position, adapter in enumerate(adapters):
        accumulated = adapter.store.accumulated_grads()
        if accumulated is not None:
            local_ids.append(accumulated[0] + position * adapter.store.num_rows)
            local_grads.append(accumulated)
    mine = torch.cat(local_ids) if local_ids else torch.empty(0, dtype=torch.int64)
    union = torch.cat(_all_gather_variable(mine, group, world_size)).unique(sorted=True)

    offsets = torch.tensor([0] + [a.store.num_rows for a in adapters]).cumsum(0)
    buffers, spans = [], []
    for position, adapter in enumerate(adapters):
        lo, hi = torch.searchsorted(union, offsets[position : position + 2]).tolist()
        ids = union[lo:hi] - offsets[position]
        buffer = torch.zeros(ids.numel(), 2, adapter.store.dim)
        accumulated = adapter.store.accumulated_grads()
        if accumulated is not None:
            buffer[torch.searchsorted(ids, accumulated[0])] = accumulated[1]
        buffers.append(buffer)
        spans.append(ids)
    flat = torch.cat([b.flatten() for b in buffers])
    dist.all_reduce(flat, group=group)
    flat.div_(world_size)
    start = 0
    for adapter, ids, buffer in zip(adapters, spans, buffers, strict=True):
        averaged = flat[start : start + buffer.numel()].view_as(buffer).clone()
        start += buffer.numel()
        own = adapter.store.num_touched
        adapter.store.drop_grads()
        if ids.numel():
            adapter.store.accumulate_grad(ids, averaged)
        # what this rank puts into the collectives for this layer: its row ids, then the union's gradients
        adapter.traffic.bytes_between_ranks += own * 8 + averaged.numel() * averaged.element_size()
    return mine.numel() * mine.element_size() + flat.numel() * flat.element_size()


def store_digest(adapters: list[SparseKeyExpertAdapter]) -> bytes:
    """SHA-256 of every store's rows and moments, hashed in place (no copy of the store)."""
    digest = hashlib.sha256()
    for adapter in adapters:
        adapter.store.digest(digest)
    return digest.digest()


def check_replicas_identical(adapters: list[SparseKeyExpertAdapter], *, group: Any = None) -> bytes:
    """Raise if the replicated stores differ between the ranks of ``group``; returns this rank's digest."""
    mine = store_digest(adapters)
    world_size = dist.get_world_size(group=group)
    if world_size == 1:
        return mine
    gathered = [torch.empty(len(mine), dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, torch.frombuffer(bytearray(mine), dtype=torch.uint8), group=group)
    digests = [bytes(t.tolist()) for t in gathered]
    if len(set(digests)) != 1:
        raise RuntimeError(
            "meft_ds: the replicated row stores differ between ranks (digests "
            f"{', '.join(d.hex()[:12] for d in digests)}). This is a bug: please report it with your config."
        )
    return mine
