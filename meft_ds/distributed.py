"""Row gradients across data-parallel ranks, and a check that replicated stores stay identical.

The DeepSpeed engine all-reduces its own parameters' gradients, never the rows' (they live outside it). At each
optimizer boundary :func:`exchange_row_grads` averages the accumulated row gradients over the ranks, moving only
touched rows, in one of two ways:

* replicated stores: every rank learns the union of touched row ids (an all-gather of ids), lays its gradients out
  over that union and joins one all-reduce; every rank then applies the same sparse Adam step to the same rows
  (with ``meft.update_rows``, the step's token counts are summed too, so that every rank chooses the same ones);
* sharded stores: every row's gradient goes to the rank that owns it (all-to-all), which sums the ranks'
  contributions and alone updates the row (with ``meft.update_rows``, the token counts are summed as above, and each
  owner updates its part of the rows chosen over the whole store).

All layers travel together, each layer's row ids offset by ``position * r``.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.shard import OwnerExchange, adopt_torch_process_group, all_gather_rows, host_group


def _touched(adapters: list[SparseKeyExpertAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' accumulated ``(ids offset by position * r, grads)``, concatenated."""
    ids, grads = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, 2, adapters[0].store.dim)]
    for position, adapter in enumerate(adapters):
        accumulated = adapter.store.accumulated_grads()
        if accumulated is not None:
            ids.append(accumulated[0] + position * adapter.store.num_rows)
            grads.append(accumulated[1])
    return torch.cat(ids), torch.cat(grads)


def _store_summed(adapters: list[SparseKeyExpertAdapter], ids: torch.Tensor, grads: torch.Tensor, scale: float) -> None:
    """Replace every layer's accumulator with ``scale`` times the sum of ``grads`` per (offset) row id."""
    num_rows = adapters[0].store.num_rows
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = grads.new_zeros(unique.numel(), 2, grads.shape[2]).index_add_(0, inverse, grads).mul_(scale)
    for position, adapter in enumerate(adapters):
        adapter.store.drop_grads()
        lo, hi = torch.searchsorted(unique, torch.tensor([position, position + 1]) * num_rows).tolist()
        if hi > lo:
            adapter.store.accumulate_grad(unique[lo:hi] - position * num_rows, summed[lo:hi])  # copied in


def _allreduce(adapters: list[SparseKeyExpertAdapter], group: Any, world_size: int) -> None:
    mine, grads = _touched(adapters)
    union = torch.cat(all_gather_rows(mine, group, world_size)).unique(sorted=True)
    laid_out = grads.new_zeros(union.numel(), 2, grads.shape[2])
    laid_out[torch.searchsorted(union, mine)] = grads
    dist.all_reduce(laid_out, group=group)
    _store_summed(adapters, union, laid_out, 1.0 / world_size)
    share = (mine.numel() * 8 + laid_out.numel() * 4 + _sum_term_counts(adapters, group)) // len(adapters)
    for adapter in adapters:  # what this rank put into the collectives, spread over the layers
        adapter.traffic.bytes_between_ranks += share


def _sum_term_counts(adapters: list[SparseKeyExpertAdapter], group: Any) -> int:
    """TF-IDF row selection (``meft.update_rows``): each adapter's token counts of this step summed over the ranks,
    so that every rank chooses the same rows of the whole store; the bytes put in (0 without row selection)."""
    counts = [a.row_selection.term_counts for a in adapters if a.row_selection is not None]
    if not counts:
        return 0
    summed = torch.cat(counts)
    dist.all_reduce(summed, group=group)
    for target, part in zip(counts, summed.split([c.numel() for c in counts]), strict=True):
        target.copy_(part)
    return summed.numel() * summed.element_size()


def _send_to_owners(adapters: list[SparseKeyExpertAdapter], group: Any, world_size: int) -> None:
    mine, grads = _touched(adapters)
    num_rows = adapters[0].store.num_rows
    owners = adapters[0].store.owners(mine % num_rows)  # every layer is sharded the same way
    order = torch.argsort(owners, stable=True)
    mine, grads = mine[order], grads[order]
    exchange = OwnerExchange.to_ranks(owners[order], world_size, group)
    _store_summed(adapters, exchange.request(mine), exchange.request(grads), 1.0 / world_size)
    share = (mine.numel() * 8 + grads.numel() * 4 + _sum_term_counts(adapters, group)) // len(adapters)
    for adapter in adapters:
        adapter.traffic.bytes_between_ranks += share


def exchange_row_grads(adapters: list[SparseKeyExpertAdapter], *, group: Any = None) -> None:
    """Average the accumulated row gradients over the data-parallel ranks of ``group`` (see the module docstring),
    the device cache's and those on their way included. Gradients are means over ranks, as the engine makes its own.
    Every rank calls it before :meth:`SparseRowAdam.step`, which refuses gradients that were not averaged."""
    adopt_torch_process_group()
    if not adapters or dist.get_world_size(group=group) == 1:
        return
    for adapter in adapters:
        adapter.collect_row_grads()
    store = adapters[0].store
    if store.is_shard:
        _send_to_owners(adapters, store.group, store.world_size)
    else:
        group = host_group(group)
        _allreduce(adapters, group, dist.get_world_size(group=group))
    for adapter in adapters:
        adapter.store.grad_accumulator.averaged_over_ranks = True


SQUARED_NORM_BLOCK = 1 << 20


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``(tensor ** 2).sum()`` as a float64 scalar, without a temporary the size of ``tensor``: fp32 dot products of
    blocks of 2^20 values (BLAS keeps several partial sums, relative error ~1e-6 here), added in float64. Casting the
    whole tensor to float64 first, as this did before, allocated and page-faulted twice the rows' accumulated
    gradients at every clipped step (0.31 s against 8 ms for one 7B-shaped layer's 8000 rows on 2 cores)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    squared = torch.zeros((), dtype=torch.float64, device=flat.device)
    for block in flat.split(SQUARED_NORM_BLOCK):
        squared += torch.dot(block, block)
    return squared


def row_grad_squared_norm(adapters: list[SparseKeyExpertAdapter]) -> float:
    """The squared norm of all rows' gradients, after :func:`exchange_row_grads`: with sharded stores each rank holds
    its owned rows' gradients, so the parts are summed over the ranks."""
    squared = torch.zeros((), dtype=torch.float64)
    for adapter in adapters:
        accumulated = adapter.store.accumulated_grads()
        if accumulated is not None:
            squared += squared_norm(accumulated[1])
    if adapters:
        squared = adapters[0].store.sum_over_shards(squared)
    return float(squared)


def clip_coefficient(norm: float, max_norm: float) -> float | None:
    """The factor that brings gradients of ``norm`` down to ``max_norm``, as torch clips; ``None`` where there is
    nothing to scale: the norm is within the bound, or not finite (the step is skipped then)."""
    coefficient = max_norm / (norm + 1e-6)
    return coefficient if coefficient < 1.0 and math.isfinite(norm) else None


def scale_row_grads(adapters: list[SparseKeyExpertAdapter], factor: float) -> None:
    """Multiply every row gradient accumulated in the stores by ``factor`` (clipping)."""
    for adapter in adapters:
        accumulated = adapter.store.accumulated_grads()
        if accumulated is not None:
            accumulated[1].mul_(factor)


def check_replicas_identical(adapters: list[SparseKeyExpertAdapter], *, group: Any = None) -> bytes | None:
    """Raise if the replicated stores differ between the ranks of ``group``; returns this rank's digest of its
    stores, or ``None`` where there is nothing to compare (one rank; sharded stores, which hold different rows by
    design): the digest reads the rows and both moments, three times the store (1.3 s for the built-in model at
    r = 4096 on 2 cores, minutes for a 7B model's, or an NVMe tier's whole file)."""
    replicated = not any(adapter.store.is_shard for adapter in adapters)
    if not replicated or dist.get_world_size(group=group) == 1:
        return None
    digest = hashlib.sha256()
    for adapter in adapters:
        adapter.store.digest(digest)
    mine = digest.digest()
    group = host_group(group)
    world_size = dist.get_world_size(group=group)
    gathered = [torch.empty(len(mine), dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, torch.frombuffer(bytearray(mine), dtype=torch.uint8), group=group)
    digests = [bytes(t.tolist()) for t in gathered]
    if len(set(digests)) != 1:
        raise RuntimeError(
            "meft_ds: the replicated row stores differ between ranks (digests "
            f"{', '.join(d.hex()[:12] for d in digests)}). This is a bug: please report it with your config."
        )
    return mine


def unlink_cpu_allreduce_buffer() -> None:
    """Take this rank's DeepSpeed CPU all-reduce buffer out of ``/dev/shm`` (every rank must call it).

    DeepSpeed's shared-memory communication (its CPU accelerator) creates a 67 MB file there per rank at init and never
    removes it, so every run would leave its ranks' buffers in memory until reboot. Each rank maps every rank's buffer
    during init; after a barrier no one needs the names any more, and the memory stays with the processes until they
    exit (also when killed)."""
    from deepspeed.comm import comm  # its backend object: deepspeed.comm.cdb is bound before init, to None

    shm = getattr(comm.cdb, "shm_comm_op", None)
    if shm is None or not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    uid, addr, port = os.getuid(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{dist.get_rank()}").unlink(missing_ok=True)
