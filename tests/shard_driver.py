"""Run under `torchrun --nproc_per_node 2`: every operation of a sharded store equals the replicated store's, and
each rank holds about half of the rows. Exits non-zero (with the failed assertion) otherwise."""

from __future__ import annotations

import deepspeed
import torch
from deepspeed import comm as dist

from meft_ds import MeftConfig, SparseKeyExpertAdapter
from meft_ds.distributed import exchange_row_grads
from meft_ds.routing import score_probed_keys

DIM = 16


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = {"num_neurons": 96, "top_k": 4, "num_experts": 12, "n_probe": 3}
    sharded = [SparseKeyExpertAdapter(DIM, MeftConfig(**base, store={"shard": True}), i) for i in range(2)]
    replicated = [SparseKeyExpertAdapter(DIM, MeftConfig(**base), i) for i in range(2)]
    for s, r in zip(sharded, replicated, strict=True):
        r.store.values.normal_(generator=torch.Generator().manual_seed(7))
        s.store.assign_rows(r.store.rows)
        assert torch.equal(s.router.weight, r.router.weight), "routers start identical"
        assert s.store.rows.shape[0] == 96 // world, "each rank holds its share of whole experts"
        assert s.store.nbytes * world == r.store.nbytes
        assert torch.equal(s.store.full_rows(), r.store.rows)

    generator = torch.Generator().manual_seed(100 + rank)  # each rank asks for different things
    ids = torch.randperm(96, generator=generator)[:20].sort().values
    out = torch.empty(20, 2, DIM)
    sharded[0].store.gather_into(ids, out)
    assert torch.equal(out, replicated[0].store.rows[ids]), "rows come from their owners unchanged"
    bf16 = torch.empty(20, 2, DIM, dtype=torch.bfloat16)
    sharded[0].store.gather_into(ids, bf16)
    assert torch.equal(bf16, replicated[0].store.rows[ids].to(torch.bfloat16)), "and in the travel dtype"

    hidden = torch.randn(5 + rank, DIM, generator=generator)  # ranks may hold different numbers of tokens
    probe = torch.stack([torch.randperm(12, generator=generator)[:3] for _ in range(5 + rank)])
    scores = sharded[1].store.score_probed(hidden, probe, 8)
    expected = score_probed_keys(hidden, probe, replicated[1].store.keys, 8)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)

    for s, r in zip(sharded, replicated, strict=True):
        touched = torch.randperm(96, generator=generator)[:30].sort().values
        grads = torch.randn(30, 2, DIM, generator=generator)
        s.store.accumulate_grad(touched, grads.clone())
        r.store.accumulate_grad(touched, grads.clone())
    exchange_row_grads(sharded)
    exchange_row_grads(replicated)
    for s, r in zip(sharded, replicated, strict=True):
        r_ids, r_grads = r.store.accumulated_grads()
        owned = (r_ids >= s.store.row_start) & (r_ids < s.store.row_stop)
        s_ids, s_grads = s.store.accumulated_grads()
        assert torch.equal(s_ids, r_ids[owned]), "the owner gets exactly its touched rows"
        torch.testing.assert_close(s_grads, r_grads[owned], rtol=1e-6, atol=1e-7)
        assert s.traffic.bytes_between_ranks > 0
    print(f"rank {rank}: OK")


if __name__ == "__main__":
    main()
