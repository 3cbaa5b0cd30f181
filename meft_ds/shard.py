"""`ShardedRowStore`: a layer's rows partitioned across the data-parallel ranks, in blocks of whole key-experts.

Each rank holds about ``1/world`` of the rows and their moments, so adding ranks adds adapter capacity. Ranks work
in lockstep through ``deepspeed.comm`` collectives on host tensors:

* routing: every rank's hidden states and probes are all-gathered; each rank scores the pairs whose expert it owns
  (zeros elsewhere) and one all-reduce sums the owners' scores, so every rank gets its tokens' scores;
* rows: a rank asks each owner for the rows it needs (all-to-all of ids) and gets them back, already in the dtype
  rows travel in (all-to-all of rows);
* gradients: at the optimizer boundary :func:`meft_ds.distributed.exchange_row_grads` sends every row's gradient to
  its owner, who alone updates it.

Every rank must therefore run the same adapters in the same order (data parallel training does; evaluation runs on
every rank too).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed
from deepspeed import comm as dist

from meft_ds.config import MeftConfigError
from meft_ds.routing import score_probed_keys
from meft_ds.stats import TrafficStats
from meft_ds.store import RowStore


@functools.cache
def _gloo_group(ranks: tuple[int, ...]) -> Any:
    return torch.distributed.new_group(list(ranks), backend="gloo")


def host_group(group: Any = None) -> Any:
    """A group for collectives on CPU tensors over the ranks of ``group``: ``group`` itself when its backend is gloo,
    else a gloo group over the same ranks (NCCL moves device tensors only). Created on first use, by every rank."""
    if torch.distributed.get_backend(group) == "gloo":
        return group
    return _gloo_group(tuple(dist.get_all_ranks_from_group(group)))


def shard_bounds(num_rows: int, expert_size: int, world_size: int) -> list[int]:
    """Row boundaries of the ranks' shards: whole experts, as evenly as possible."""
    num_experts = num_rows // expert_size
    return [(w * num_experts // world_size) * expert_size for w in range(world_size + 1)]


def all_gather_rows(tensor: torch.Tensor, group: Any, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same trailing shape, any number of rows), via two all-gathers."""
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(n.item() for n in lengths))
    padded = tensor.new_zeros(longest, *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [g[: int(n.item())] for g, n in zip(gathered, lengths, strict=True)]


class ShardedRowStore(RowStore):
    """The rows ``[row_start, row_stop)`` of a layer that this rank owns (see the module docstring)."""

    is_shard = True

    def __init__(self, keys: torch.Tensor, *, expert_size: int, stats: TrafficStats, group: Any = None) -> None:
        if not torch.distributed.is_initialized():
            raise MeftConfigError(
                "meft.store.shard: a sharded store needs the distributed environment before the adapters are "
                "injected. Fix: use meft_ds.initialize (it initializes it), or call deepspeed.init_distributed() "
                "before meft_ds.inject."
            )
        self.group = host_group(group)
        self.world_size = dist.get_world_size(group=self.group)
        self.rank = dist.get_rank(group=self.group)
        self.bounds = shard_bounds(keys.shape[0], expert_size, self.world_size)
        self.expert_size = expert_size
        self.stats = stats
        start, stop = self.bounds[self.rank], self.bounds[self.rank + 1]
        super().__init__(keys[start:stop], row_start=start, num_rows=keys.shape[0])

    def owners(self, row_ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each row."""
        return torch.bucketize(row_ids, torch.tensor(self.bounds[1:]), right=True)

    def _count_bytes(self, *tensors: torch.Tensor) -> None:
        self.stats.bytes_between_ranks += sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ reading rows from their owners
    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        counts = torch.bincount(self.owners(row_ids), minlength=self.world_size)
        incoming = torch.empty_like(counts)
        dist.all_to_all_single(incoming, counts, group=self.group)
        send, receive = counts.tolist(), incoming.tolist()
        requested = torch.empty(sum(receive), dtype=torch.int64)
        dist.all_to_all_single(requested, row_ids, receive, send, group=self.group)
        reply = torch.empty(requested.numel(), 2, self.dim, dtype=out.dtype)
        super().gather_into(requested, reply)
        width = 2 * self.dim
        rows = out[: row_ids.numel()]
        dist.all_to_all_single(
            rows.view(-1), reply.view(-1), [n * width for n in send], [n * width for n in receive], group=self.group
        )
        self._count_bytes(counts, row_ids, reply)

    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        everyone_hidden = all_gather_rows(hidden, self.group, self.world_size)
        everyone_probes = all_gather_rows(probe_ids, self.group, self.world_size)
        sizes = [h.shape[0] for h in everyone_hidden]
        partial = score_probed_keys(
            torch.cat(everyone_hidden),
            torch.cat(everyone_probes),
            self.keys,
            expert_size,
            self.row_start // expert_size,
        )
        dist.all_reduce(partial, group=self.group)  # each score comes from exactly one owner
        self._count_bytes(hidden, probe_ids, partial)
        start = sum(sizes[: self.rank])
        return partial[start : start + hidden.shape[0]]

    def rows_updated_anywhere(self, updated: torch.Tensor) -> torch.Tensor:
        """Every rank's updated rows (their owners updated them): a rank's device cache may hold any of them. Every
        rank calls it, for every adapter, at every optimizer step."""
        everyone = torch.cat(all_gather_rows(updated, self.group, self.world_size))
        self._count_bytes(updated)
        return everyone.unique(sorted=True)

    def full_rows(self) -> torch.Tensor:
        rows = torch.cat(all_gather_rows(self.rows, self.group, self.world_size))
        self._count_bytes(self.rows)
        return rows

    # ------------------------------------------------------------------ files: each rank writes its part
    def file_name(self, layer_index: int) -> str:
        return f"layer_{layer_index}.shard_{self.rank}_of_{self.world_size}.safetensors"
