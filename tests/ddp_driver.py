"""Run under `torchrun --nproc_per_node 2 ddp_driver.py`: a plain PyTorch loop of several ranks (torch.distributed
set up by the loop, DDP for the routers, no DeepSpeed engine), for a replicated and a sharded store. A row step
whose gradients were not averaged over the ranks is refused, before any row changes (the replicas drifted apart
silently, a sharded store failed with "row id out of range"); with ``meft_ds.exchange_row_grads`` the ranks end with
the same rows (FSDP in place of DDP: tests/fsdp_driver.py). Exits non-zero (with the failed assertion) otherwise."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from tiny_models import tiny_model, token_batch

import meft_ds


def train(shard: bool, *, exchange: bool, fsdp: bool = False) -> torch.Tensor:
    """Three steps of each rank's own micro-batches, the routers in DDP (or FSDP); the losses, every layer's rows and
    the routers at the end, in one tensor."""
    model = meft_ds.inject(tiny_model(), {"num_neurons": 128, "top_k": 8, "seed": 3, "store": {"shard": shard}})
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # imported only here: see tests/fsdp_driver.py

        for layer in model.model.layers:
            fully_shard(layer)
        ddp = fully_shard(model)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    adapters = meft_ds.adapters(model)
    sparse = meft_ds.SparseRowAdam(adapters, lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        batch = token_batch(batch=2, length=8, seed=10 * step + tdist.get_rank())
        loss = ddp(batch, labels=batch).loss
        loss.backward()
        losses.append(loss.detach().reshape(1))
        if exchange:
            meft_ds.exchange_row_grads(adapters)
        for optimizer in (sparse, dense):
            optimizer.step()
            optimizer.zero_grad()
    routers = [getattr(a.router.weight, "full_tensor", a.router.weight.detach)() for a in adapters]  # FSDP: DTensors
    return torch.cat([*losses, *(a.store.full_rows().flatten() for a in adapters), *(r.flatten() for r in routers)])


def main() -> None:
    tdist.init_process_group("gloo")  # torch's alone: meft_ds has DeepSpeed adopt it
    rank = tdist.get_rank()
    for shard in (False, True):
        try:
            train(shard, exchange=False)
        except RuntimeError as error:
            assert "the rows' gradients were not averaged over the ranks" in str(error), error
        else:
            raise AssertionError("a step without averaging the rows' gradients over the ranks ran")
        rows = train(shard, exchange=True)
        gathered = [torch.empty_like(rows) for _ in range(tdist.get_world_size())]
        tdist.all_gather(gathered, rows)
        assert torch.equal(gathered[0][3:], gathered[1][3:]), f"shard={shard}: the ranks' rows or routers differ"
    tdist.destroy_process_group()
    print(f"rank {rank}: OK", flush=True)


if __name__ == "__main__":
    main()
