"""Key-Experts routing on the CPU: score only the probed experts' keys, keep each token's top-K, build the union.

The router (on the device) has already chosen ``n_probe`` experts per token. Scoring is grouped by expert, so each
probed expert's keys are read once per micro-batch and the work is ``T * n_probe * (r / E) * d`` multiply-adds
instead of ``T * r * d`` for scoring every key (SPEC.md, method step 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meft_ds.ops import cpu_kernels, kernel_threads


@dataclass
class Routing:
    """Which rows a micro-batch needs.

    Attributes:
        row_ids: ``(n,)`` int64, sorted and unique: the union ``U`` of the rows any token selected.
        union_pos: ``(T, K)`` int64: for each token, the positions in ``row_ids`` (the union) of its own top-K rows.
        scores: ``(T, K)`` fp32: each of those rows' score ``h_t . k_j`` (ungated) as routing computed it, or
            ``None``. Where the adapter computes from the same hidden states and fp32 keys, these are the scores its
            kernel would compute (the same bits), so it takes them instead of computing them again.
    """

    row_ids: torch.Tensor
    union_pos: torch.Tensor
    scores: torch.Tensor | None = None


def score_probed_keys_torch(
    hidden: torch.Tensor, probe_ids: torch.Tensor, keys: torch.Tensor, expert_size: int, first_expert: int = 0
) -> torch.Tensor:
    """``(T, n_probe * expert_size)`` scores ``h_t . k_j`` of each token against the keys of its probed experts.

    Column ``p * expert_size + j`` is neuron ``j`` of the token's ``p``-th probed expert. ``keys`` hold the experts
    ``first_expert, first_expert + 1, ...`` (all of them, or a shard's); probed experts outside them score 0. The
    reference for (and fallback of) the compiled ``score_probed`` kernel, which does the same grouping in C++.
    """
    num_tokens, n_probe = probe_ids.shape
    dim = hidden.shape[1]
    experts = keys.view(-1, expert_size, dim)
    local = probe_ids.reshape(-1) - first_expert
    held = (local >= 0) & (local < experts.shape[0])
    pair_expert = torch.where(held, local, experts.shape[0])  # not held: an extra bucket, never scored
    order = torch.argsort(pair_expert, stable=True)
    counts = torch.bincount(pair_expert, minlength=experts.shape[0] + 1)[:-1]
    scores = hidden.new_zeros(num_tokens * n_probe, expert_size)
    active = counts.nonzero().flatten().tolist()
    bounds = counts.cumsum(0)[active].tolist()
    starts = (counts.cumsum(0) - counts)[active].tolist()
    for expert, start, end in zip(active, starts, bounds, strict=True):
        pairs = order[start:end]
        scores[pairs] = hidden[pairs // n_probe] @ experts[expert].T
    return scores.view(num_tokens, n_probe * expert_size)


def score_probed_keys(
    hidden: torch.Tensor, probe_ids: torch.Tensor, keys: torch.Tensor, expert_size: int, first_expert: int = 0
) -> torch.Tensor:
    """Like :func:`score_probed_keys_torch`, on the compiled kernel when it could be built."""
    kernels = cpu_kernels()
    if kernels is None:
        return score_probed_keys_torch(hidden, probe_ids, keys, expert_size, first_expert)
    return kernels.score_probed(
        hidden.contiguous(), probe_ids.contiguous(), keys, expert_size, first_expert, kernel_threads()
    )


def top_k_rows(
    scores: torch.Tensor, probe_ids: torch.Tensor, probe_gates: torch.Tensor | None, *, expert_size: int, top_k: int
) -> torch.Tensor:
    """``(T, K)`` int64 global row ids of each token's top-K neurons among its probed experts, on the scores' device
    (no host synchronisation, so the device path of :mod:`meft_ds.inference` uses it too).

    Args:
        scores: ``(T, n_probe * expert_size)`` from :func:`score_probed_keys` (or a sharded store's equivalent).
        probe_ids: ``(T, n_probe)`` int64 expert ids chosen by the router.
        probe_gates: ``(T, n_probe)`` router logits of those experts (gate mode ``"logit"``), or ``None``. With
            gates, a neuron's score is its activation before the ReLU, ``g_e(h) * (h . k_j)``.
    """
    if probe_gates is not None:
        scores = (scores.view(*probe_ids.shape, expert_size) * probe_gates.unsqueeze(-1)).flatten(1)
    columns = scores.topk(top_k, dim=1, sorted=False).indices
    experts = probe_ids.gather(1, torch.div(columns, expert_size, rounding_mode="floor"))
    return experts * expert_size + columns % expert_size


def select_from_scores(
    scores: torch.Tensor, probe_ids: torch.Tensor, probe_gates: torch.Tensor | None, *, expert_size: int, top_k: int
) -> Routing:
    """Each token's top-K neurons among its probed experts (:func:`top_k_rows`), and the union of rows over the
    micro-batch; on the host in one pass of the compiled ``select_top_k`` where it could be built (which also keeps
    the picks' scores)."""
    kernels = cpu_kernels() if scores.device.type == "cpu" else None
    if kernels is None:
        return union_of(top_k_rows(scores, probe_ids, probe_gates, expert_size=expert_size, top_k=top_k))
    gates = scores.new_empty(0) if probe_gates is None else probe_gates.float().contiguous()
    row_ids, union_pos, pick_scores = kernels.select_top_k(
        scores.float().contiguous(), probe_ids.long().contiguous(), gates, expert_size, top_k, kernel_threads()
    )
    return Routing(row_ids=row_ids, union_pos=union_pos, scores=pick_scores)


def union_of(rows: torch.Tensor) -> Routing:
    """The sorted union of ``rows`` (``(T, K)`` row ids) and each entry's position in it. Row ids are bounded by the
    store, so a presence map does what ``torch.unique(sorted=True, return_inverse=True)`` does without its sort:
    O(T K + max id) instead of O(T K log T K), 10-20x faster at the sizes MEFT routes."""
    flat = rows.flatten()
    bound = int(flat.max()) + 1 if flat.numel() else 0
    present = torch.zeros(bound, dtype=torch.bool)
    present[flat] = True
    row_ids = present.nonzero().flatten()
    position = torch.empty(bound, dtype=torch.int64)
    position[row_ids] = torch.arange(row_ids.numel())
    return Routing(row_ids=row_ids, union_pos=position[rows])


def select_rows(
    hidden: torch.Tensor,
    probe_ids: torch.Tensor,
    probe_gates: torch.Tensor | None,
    keys: torch.Tensor,
    *,
    expert_size: int,
    top_k: int,
) -> Routing:
    """:func:`select_from_scores` over all ``(r, d)`` fp32 master ``keys`` (any row stride), for ``(T, d)`` fp32
    ``hidden`` states on the CPU."""
    scores = score_probed_keys(hidden, probe_ids, keys, expert_size)
    return select_from_scores(scores, probe_ids, probe_gates, expert_size=expert_size, top_k=top_k)
