"""`ShardedRowStore`: a layer's rows partitioned across the data-parallel ranks, in blocks of whole key-experts.

Each rank holds about ``1/world`` of the rows and their moments, so adding ranks adds adapter capacity. Ranks work
in lockstep through ``deepspeed.comm`` collectives, on host tensors over gloo except where noted:

* routing: every rank's hidden states (in the dtype they travel in: bf16 where rows are bf16) and probed expert ids
  (int16 where the experts fit) are all-gathered (the hidden states, on an accelerator, on the device over its
  backend, NCCL, before they go to the host; on the CPU over gloo); each rank scores the (token, probed expert)
  pairs whose expert it owns and sends each pair's scores to the token's rank (all-to-all), so every score crosses
  once, unsummed: a rank gets exactly the scores a replicated store computes, in ``1/world`` of the bytes an
  all-reduce of the partial score matrices would move;
* rows: a rank asks each owner for the rows it needs (all-to-all of ids) and gets them back, already in the dtype
  rows travel in (all-to-all of rows);
* gradients: at the optimizer boundary :func:`meft_ds.distributed.exchange_row_grads` sends every row's gradient to
  its owner, who alone updates it.

Both go through :class:`OwnerExchange`: the counts cross first, then the rows bound for each owner, then (for rows)
the owners' replies.

Every rank must therefore run the same adapters in the same order (data parallel training does; evaluation runs on
every rank too).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import torch
import torch.distributed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.ops import local_world_size
from meft_ds.routing import score_probed_keys
from meft_ds.stats import TrafficStats
from meft_ds.store import CpuRowStore, shard_file_name
from meft_ds.transfer import narrowest_index_dtype

logger = logging.getLogger("meft_ds")


def resolve_shard(config: MeftConfig) -> MeftConfig:
    """``config`` with ``store.shard`` true or false for this run: ``"auto"`` shards the CPU store when several ranks
    of the run share a node (each would otherwise hold a full replica), saying so once per process. Every rank
    decides alike (one all-reduce): nodes may run different numbers of ranks, and a rank that kept a replica while
    the others sharded would wait forever in their collectives."""
    store = config.store
    if store.shard != "auto":
        return config
    per_node = local_world_size()
    ready = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    shared = store.device == "cpu" and per_node > 1
    if ready and store.device == "cpu":
        flag = torch.tensor([int(shared)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=host_group())
        shared = bool(flag.item())
    if shared:
        _announce(per_node, ready, torch.distributed.get_rank() if ready else 0)
    return dataclasses.replace(config, store=dataclasses.replace(store, shard=shared and ready))


@functools.cache
def _announce(per_node: int, shard: bool, rank: int) -> None:
    if shard and rank == 0:
        logger.info(
            "meft_ds: ranks of this run share a node, so its %d ranks each hold a share of the row stores "
            '(meft.store.shard "auto"); every rank runs every forward. Set "store": {"shard": false} to replicate '
            "them instead.",
            torch.distributed.get_world_size(),
        )
    elif not shard:
        logger.warning(
            "meft_ds: %d ranks share this node but torch.distributed is not initialized before the adapters are "
            "injected: each rank holds a full replica of the row stores. Fix: call deepspeed.init_distributed() "
            'first (meft_ds.initialize does), or set "store": {"shard": false} to keep replicas.',
            per_node,
        )


@functools.cache
def _gloo_group(ranks: tuple[int, ...]) -> Any:
    return torch.distributed.new_group(list(ranks), backend="gloo")


def host_group(group: Any = None) -> Any:
    """A group for collectives on CPU tensors over the ranks of ``group``: ``group`` itself when its backend is gloo,
    else a gloo group over the same ranks (NCCL moves device tensors only). Created on first use, by every rank."""
    if torch.distributed.get_backend(group) == "gloo":
        return group
    # torch's own list (``None``: the default group); DeepSpeed's get_all_ranks_from_group returned no rank for
    # ``None`` (the group of every sharded store) and never returned for ``group.WORLD``
    return _gloo_group(tuple(torch.distributed.get_process_group_ranks(group)))


def adopt_torch_process_group() -> None:
    """DeepSpeed's communication over the process group torch.distributed already has, where only torch's was set up
    (a torchrun + DDP loop that never called deepspeed.init_distributed): DeepSpeed adopts it, creating none."""
    if torch.distributed.is_initialized() and not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)


def shard_bounds(num_rows: int, expert_size: int, world_size: int) -> list[int]:
    """Row boundaries of the ranks' shards: whole experts, as evenly as possible."""
    num_experts = num_rows // expert_size
    return [(w * num_experts // world_size) * expert_size for w in range(world_size + 1)]


def gather_lengths(length: int, group: Any, world_size: int) -> list[int]:
    """Every rank's ``length`` (one int64 all-gather)."""
    mine = torch.tensor([length], dtype=torch.int64)
    lengths = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(lengths, mine, group=group)
    return [int(n.item()) for n in lengths]


def all_gather_padded(tensor: torch.Tensor, lengths: list[int], group: Any) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (``lengths[w]`` rows on rank ``w``, same trailing shape and dtype), padded to the
    longest for the all-gather and trimmed after. It travels as raw bytes, in its own dtype whatever the backend
    supports (gloo has no int16)."""
    padded = tensor.new_zeros(max(lengths), *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather([g.view(torch.uint8) for g in gathered], padded.view(torch.uint8), group=group)
    return [g[:n] for g, n in zip(gathered, lengths, strict=True)]


def all_gather_rows(tensor: torch.Tensor, group: Any, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same trailing shape, any number of rows), via two all-gathers."""
    return all_gather_padded(tensor, gather_lengths(tensor.shape[0], group, world_size), group)


@dataclasses.dataclass
class OwnerExchange:
    """One all-to-all between the ranks of ``group``, item by item (an item: a row id, a row, a row's gradient, a
    (token, expert) pair's scores): this rank sends ``send[w]`` items to rank ``w`` (grouped by destination, in rank
    order) and receives ``receive[w]`` from it; a reply travels the other way."""

    send: list[int]
    receive: list[int]
    group: Any
    counts: torch.Tensor  # ``send`` as the int64 tensor that crossed (counted as traffic by the callers)

    @classmethod
    def to_ranks(cls, destinations: torch.Tensor, world_size: int, group: Any) -> OwnerExchange:
        """The exchange of items bound for ranks ``destinations`` (one per item, ascending): every rank learns how
        many items it receives from each (one all-to-all of counts)."""
        counts = torch.bincount(destinations, minlength=world_size)
        incoming = torch.empty_like(counts)
        dist.all_to_all_single(incoming, counts, group=group)
        return cls(counts.tolist(), incoming.tolist(), group, counts)

    def request(self, items: torch.Tensor) -> torch.Tensor:
        """The items (``items[i]``: any shape and dtype) the other ranks send this one, by source rank."""
        return all_to_all(items, self.send, self.receive, self.group)

    def reply(self, items: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Each rank's answer to what :meth:`request` brought it (one item per item received, in that order), back to
        the rank that sent it: into ``out`` (contiguous) if given."""
        return all_to_all(items, self.receive, self.send, self.group, out)


def all_to_all(
    items: torch.Tensor, send: list[int], receive: list[int], group: Any, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``items`` (``items[i]``: any shape and dtype) exchanged between the ranks of ``group``: ``send[w]`` of them
    (grouped by destination, in rank order) to rank ``w``, ``receive[w]`` from it (into ``out``, contiguous, if
    given)."""
    width = math.prod(items.shape[1:])
    if out is None:
        out = items.new_empty(sum(receive), *items.shape[1:])
    dist.all_to_all_single(
        out.view(-1), items.reshape(-1), [n * width for n in receive], [n * width for n in send], group=group
    )
    return out


class ShardedRowStore(CpuRowStore):
    """The rows ``[row_start, row_stop)`` of a layer that this rank owns, in CPU memory (see the module docstring)."""

    is_shard = True

    def __init__(self, keys: torch.Tensor, *, expert_size: int, stats: TrafficStats, group: Any = None) -> None:
        if not torch.distributed.is_initialized():
            raise MeftConfigError(
                "meft.store.shard: a sharded store needs the distributed environment before the adapters are "
                "injected. Fix: use meft_ds.initialize (it initializes it), or call deepspeed.init_distributed() "
                "before meft_ds.inject."
            )
        adopt_torch_process_group()
        self.group = host_group(group)
        # hidden states are gathered where they are: on an accelerator over its backend (NCCL), before they go to
        # the host (routing_hidden); on the CPU over gloo, on the host (score_probed)
        on_device = get_accelerator().device_name() != "cpu" and torch.distributed.get_backend(group) != "gloo"
        self.device_group = (torch.distributed.group.WORLD if group is None else group) if on_device else None
        self.world_size = dist.get_world_size(group=self.group)
        self.rank = dist.get_rank(group=self.group)
        self.bounds = shard_bounds(keys.shape[0], expert_size, self.world_size)
        self.expert_size = expert_size
        self.num_experts = keys.shape[0] // expert_size
        self.stats = stats
        start, stop = self.bounds[self.rank], self.bounds[self.rank + 1]
        super().__init__(keys[start:stop], row_start=start, num_rows=keys.shape[0])

    def owners(self, row_ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each row."""
        return torch.bucketize(row_ids, torch.tensor(self.bounds[1:]), right=True)

    def expert_owners(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each expert (its rows)."""
        return self.owners(expert_ids * self.expert_size)

    def _count_bytes(self, *tensors: torch.Tensor) -> None:
        self.stats.bytes_between_ranks += sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ reading rows from their owners
    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        exchange = OwnerExchange.to_ranks(self.owners(row_ids), self.world_size, self.group)
        requested = exchange.request(row_ids)
        reply = torch.empty(requested.numel(), 2, self.dim, dtype=out.dtype)
        super().gather_into(requested, reply)
        exchange.reply(reply, out=out[: row_ids.numel()])
        self._count_bytes(exchange.counts, row_ids, reply)

    def routing_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every rank's ``hidden`` states, gathered over the device group, where there is one (the host learns the
        token counts over gloo: no device synchronisation); else this rank's."""
        if self.device_group is None:
            return hidden
        lengths = gather_lengths(hidden.shape[0], self.group, self.world_size)
        self._count_bytes(hidden)
        self.stats.bytes_between_ranks += 8  # the token count
        return torch.cat(all_gather_padded(hidden, lengths, self.device_group))

    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        """The replicated store's scores of this rank's tokens (see the module docstring). ``hidden`` may be in any
        float dtype: it is exchanged in it and scored in fp32, as the replicated store scores it. It holds every
        rank's tokens where :meth:`routing_hidden` gathered them on the device (else they are gathered here)."""
        lengths = gather_lengths(probe_ids.shape[0], self.group, self.world_size)
        everyone_hidden = hidden
        if self.device_group is None:  # every rank, even where only one has tokens (a collective all must join)
            everyone_hidden = torch.cat(all_gather_padded(hidden, lengths, self.group))
            self._count_bytes(hidden)
        narrow = probe_ids.to(narrowest_index_dtype(self.num_experts))
        everyone_probes = torch.cat(all_gather_padded(narrow, lengths, self.group)).long()
        first_expert = self.row_start // expert_size
        owner = self.expert_owners(everyone_probes).flatten()  # of every rank's (token, probe) pair, token-major
        owned = (owner == self.rank).nonzero().flatten()
        scores = score_probed_keys(everyone_hidden.float(), everyone_probes, self.keys, expert_size, first_expert)
        send = scores.view(-1, expert_size).index_select(0, owned)  # by token, so grouped by the token's rank
        pair_rank = torch.repeat_interleave(torch.arange(self.world_size), torch.tensor(lengths) * probe_ids.shape[1])
        send_counts = torch.bincount(pair_rank[owned], minlength=self.world_size).tolist()
        start = sum(lengths[: self.rank]) * probe_ids.shape[1]
        mine_owner = owner[start : start + probe_ids.numel()]
        receive_counts = torch.bincount(mine_owner, minlength=self.world_size).tolist()
        received = all_to_all(send, send_counts, receive_counts, self.group)  # (my pairs, expert_size)
        self._count_bytes(narrow, send)
        self.stats.bytes_between_ranks += 8  # the token count
        mine = torch.empty_like(received)
        mine[torch.argsort(mine_owner, stable=True)] = received  # each owner's pairs arrive in token order
        return mine.view(probe_ids.shape[0], probe_ids.shape[1] * expert_size)

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value, group=self.group)
        return value

    def row_ids_updated_anywhere(self, updated: torch.Tensor) -> torch.Tensor:
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
        return shard_file_name(layer_index, self.rank, self.world_size)
