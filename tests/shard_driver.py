"""Run under `torchrun --nproc_per_node 2 shard_driver.py OUTPUT_DIR`: every operation of a sharded store equals the
replicated store's, each rank holds about half of the rows, data-parallel training with a sharded store and the device
cache ends exactly where the replicated store without cache does (no rank serves a row another rank's owner updated),
the end-of-run check of replicated stores finds one that diverged, and MeftTrainer's ``save_model`` gathers a sharded
store's whole adapter, which one process reloads to the trained model's logits. Two ranks on one node shard the
store by default ("auto"), and ranks decide it alike; host collectives go through a gloo group where the default
group is NCCL. Exits non-zero (with the failed assertion) otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm as dist
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.distributed import check_replicas_identical, exchange_row_grads
from meft_ds.routing import score_probed_keys
from meft_ds.shard import all_gather_rows, host_group, resolve_shard

DIM = 16


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = {"num_neurons": 96, "top_k": 4, "num_experts": 12, "n_probe": 3}
    sharded = [SparseKeyExpertAdapter(DIM, MeftConfig(**base, store={"shard": True}), i) for i in range(2)]
    replicated = [SparseKeyExpertAdapter(DIM, MeftConfig(**base, store={"shard": False}), i) for i in range(2)]
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
    assert torch.equal(scores, score_probed_keys(hidden, probe, replicated[1].store.keys, 8)), "the owners' scores"
    routing_exchanges_bf16_hidden_states(sharded[1], replicated[1], hidden.bfloat16(), probe)
    store = sharded[1].store
    assert store.device_group is None  # on the CPU the hidden states are gathered on the host
    store.device_group = torch.distributed.group.WORLD  # the accelerator's route (over NCCL there), gloo here
    everyone = store.routing_hidden(hidden.bfloat16())
    assert everyone.shape[0] == sum(5 + w for w in range(world)), f"every rank's tokens, not {everyone.shape}"
    scores = store.score_probed(everyone, probe, 8)
    assert torch.equal(scores, replicated[1].store.score_probed(hidden.bfloat16(), probe, 8))
    store.device_group = None
    a_rank_without_tokens_joins_the_routing_collectives(sharded[1], replicated[1])

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

    replicated_rows = train_data_parallel({"store": {"shard": False}})
    cached_sharded_rows = train_data_parallel({"cache_mb": 1})  # "auto": 2 ranks on this node shard the store
    for expected, got in zip(replicated_rows, cached_sharded_rows, strict=True):
        assert torch.equal(expected, got), f"sharded + cache ends {(expected - got).abs().max():.3g} away"
    ranks_choose_the_same_rows_to_update(world, replicated_rows)
    ranks_agree_on_sharding()
    diverged_replicas_are_found(sharded, replicated)
    host_collectives_where_the_default_group_is_nccl(world)
    trainer_saves_the_whole_sharded_adapter(Path(sys.argv[1]))
    print(f"rank {rank}: OK")


def routing_exchanges_bf16_hidden_states(
    sharded: SparseKeyExpertAdapter, replicated: SparseKeyExpertAdapter, hidden: torch.Tensor, probe: torch.Tensor
) -> None:
    """bf16 hidden states (rows travelling in bf16) are exchanged as bf16: the scores are bit-identical to the
    replicated store's, and the bytes this rank puts into the routing collectives are its token count, its hidden
    states in bf16 (2 bytes per value), its probes in int16 and the scores of the pairs it owns (fp32), nothing more."""
    before = sharded.traffic.bytes_between_ranks
    scores = sharded.store.score_probed(hidden, probe, 8)
    assert torch.equal(scores, replicated.store.score_probed(hidden, probe, 8)), "bf16 exchange, fp32 scores"
    every_probe = torch.cat(all_gather_rows(probe, sharded.store.group, dist.get_world_size()))
    owned_pairs = int((sharded.store.expert_owners(every_probe) == dist.get_rank()).sum())
    expected = 8 + hidden.numel() * 2 + probe.numel() * 2 + owned_pairs * 8 * 4
    assert sharded.traffic.bytes_between_ranks - before == expected


def a_rank_without_tokens_joins_the_routing_collectives(sharded: SparseKeyExpertAdapter,
                                                         replicated: SparseKeyExpertAdapter) -> None:  # fmt: skip
    """Rank 1 has no tokens: rank 0's hidden states are then everyone's, and it took the host gather for done
    while rank 1 joined it, so their collectives no longer matched."""
    tokens = 4 if dist.get_rank() == 0 else 0
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(tokens, DIM, generator=generator)
    probe = torch.stack([torch.randperm(12, generator=generator)[:3] for _ in range(4)])[:tokens]
    scores = sharded.store.score_probed(hidden, probe, 8)
    assert torch.equal(scores, score_probed_keys(hidden, probe, replicated.store.keys, 8))


def diverged_replicas_are_found(sharded: list[SparseKeyExpertAdapter],
                                replicated: list[SparseKeyExpertAdapter]) -> None:  # fmt: skip
    """launch/train.py's end-of-run check: replicas that agree give every rank the same digest; one value changed on
    one rank is found on every rank (the check is collective); sharded stores hold different rows by design and are
    not compared."""
    digest = check_replicas_identical(replicated)
    gathered = [torch.empty(len(digest), dtype=torch.uint8) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    assert all(torch.equal(gathered[0], other) for other in gathered), "equal replicas, different digests"
    assert check_replicas_identical(sharded) is None
    if dist.get_rank() == 1:
        replicated[1].store.values[5, 3] += 1.0
    try:
        check_replicas_identical(replicated)
    except RuntimeError as error:
        assert "replicated row stores differ between ranks" in str(error), error
    else:
        raise AssertionError("a diverged replica went unnoticed")
    if dist.get_rank() == 1:
        replicated[1].store.values[5, 3] -= 1.0


def ranks_agree_on_sharding() -> None:
    """ "auto" shards where ranks share a node, and every rank decides alike: nodes may run different numbers of
    ranks (here rank 1 is told it is alone on its node), and a rank keeping a replica would hang the others."""
    told = os.environ["LOCAL_WORLD_SIZE"]
    if dist.get_rank() == 1:
        os.environ["LOCAL_WORLD_SIZE"] = "1"
    try:
        assert resolve_shard(MeftConfig(num_neurons=96, top_k=4)).store.shard is True
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = told


def host_collectives_where_the_default_group_is_nccl(world: int) -> None:
    """On GPUs the default group is NCCL, which moves device tensors only; the host's collectives (CPU tensors) go
    through a gloo group over the same ranks. With the default group reporting "nccl", as it does there, that group
    holds every rank, and a sharded store builds on it and exchanges its gradients (DeepSpeed's rank list of the
    default group, used before, was empty: the store failed to build on every multi-GPU run that sharded)."""
    gloo_backend = torch.distributed.get_backend

    def as_on_gpus(group: object = None) -> str:
        return "nccl" if group is None or group is torch.distributed.group.WORLD else gloo_backend(group)

    torch.distributed.get_backend = as_on_gpus
    try:
        for group in (None, torch.distributed.group.WORLD):
            host = host_group(group)
            assert host is not None and gloo_backend(host) == "gloo"
            assert torch.distributed.get_process_group_ranks(host) == list(range(world))
        config = MeftConfig(num_neurons=96, top_k=4, num_experts=12, n_probe=3, store={"shard": True})
        adapter = SparseKeyExpertAdapter(DIM, config, 0)
        assert adapter.store.group is host_group(None) and adapter.store.rows.shape[0] == 96 // world
        touched = torch.arange(dist.get_rank(), 96, 7)
        adapter.store.accumulate_grad(touched, torch.ones(touched.numel(), 2, DIM))
        exchange_row_grads([adapter])
        ids, grads = adapter.store.accumulated_grads()
        everyone = torch.cat([torch.arange(rank, 96, 7) for rank in range(world)])
        owned = everyone[(everyone >= adapter.store.row_start) & (everyone < adapter.store.row_stop)]
        assert torch.equal(ids.sort().values, owned.unique())
        assert grads.sum().item() == owned.numel() * 2 * DIM / world, "each rank's ones, averaged over the ranks"
    finally:
        torch.distributed.get_backend = gloo_backend


def train_data_parallel(meft: dict) -> list[torch.Tensor]:
    """A tiny LLaMA trained data-parallel by hand (each rank its own micro-batches, router gradients all-reduced,
    row gradients exchanged as the plugin does): every layer's rows at the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = meft_ds.inject(tiny_model(layers=2), {"num_neurons": 128, "top_k": 8, "seed": 3, **meft})
    adapters = meft_ds.adapters(model)
    assert all(a.store.is_shard == (meft.get("store") != {"shard": False}) for a in adapters)
    routers = [p for p in model.parameters() if p.requires_grad]
    sparse, dense = SparseRowAdam(adapters, lr=1e-2), torch.optim.AdamW(routers, lr=1e-2)
    for step in range(6):
        for micro in range(2):
            batch = token_batch(batch=2, length=8, seed=100 * step + 10 * micro + rank)
            (model(batch, labels=batch).loss / 2).backward()
        for param in routers:
            dist.all_reduce(param.grad)
            param.grad /= world
        for adapter in adapters:
            adapter.collect_row_grads()
        exchange_row_grads(adapters)
        for optimizer in (sparse, dense):
            optimizer.step()
            optimizer.zero_grad()
    return [adapter.store.full_rows() for adapter in adapters]


def ranks_choose_the_same_rows_to_update(world: int, every_row: list[torch.Tensor]) -> None:
    """TF-IDF row selection (meft.update_rows): each rank counts its own micro-batches' tokens and the counts are
    summed with the gradients, so replicas update the same rows and stay identical, and a sharded store (the default
    of 2 ranks on a node), each shard updating its part of one choice over the whole store, ends exactly where they
    do; both away from the run that updates every touched row (``every_row``)."""
    replicated = train_data_parallel({"store": {"shard": False}, "update_rows": 16})
    for rows in replicated:
        gathered = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(gathered, rows)
        assert all(torch.equal(gathered[0], other) for other in gathered), "the replicas updated different rows"
    sharded = train_data_parallel({"update_rows": 16})
    for expected, got, unselected in zip(replicated, sharded, every_row, strict=True):
        assert torch.equal(expected, got), f"the shards chose other rows: {(expected - got).abs().max():.3g} away"
        assert not torch.equal(expected, unselected), "update_rows changed nothing"


def trainer_saves_the_whole_sharded_adapter(output_dir: Path) -> None:
    """``trainer.save_model`` on every rank (as the Trainer calls it) gathers both ranks' rows; rank 0 writes, and a
    fresh base model in one process (rows in memory) reloads the folder to the trained model's logits."""
    from accelerate import PartialState
    from hf_support import MEFT, USE_DEEPSPEED, collator, features, meft_json
    from tiny_models import word_tokenizer
    from transformers import TrainingArguments

    from meft_ds.hf import MeftTrainer

    # Without a GPU, TrainingArguments(deepspeed=...) sets Accelerate up for one process whatever the launcher says;
    # a distributed state configured beforehand (gloo, DeepSpeed) is used as it is
    os.environ[USE_DEEPSPEED] = "true"
    PartialState(backend="gloo")
    tokenizer = word_tokenizer(chat=True)
    args = TrainingArguments(
        output_dir=str(output_dir), deepspeed=meft_json({**MEFT, "store": {"shard": True}}), max_steps=2,
        learning_rate=1e-2, per_device_train_batch_size=2, save_strategy="no", report_to=[], disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    assert args.world_size == 2 and args.should_save == (dist.get_rank() == 0)
    trainer = MeftTrainer(model=tiny_model(), args=args, train_dataset=features(tokenizer, 8),
                          data_collator=collator(tokenizer))  # fmt: skip
    trainer.train()
    model = trainer.model.eval()
    assert all(a.store.is_shard and a.store.rows.shape[0] == MEFT["num_neurons"] // 2 for a in meft_ds.adapters(model))
    trainer.save_model(str(output_dir / "final"))
    batch = collator(tokenizer)(features(tokenizer, 4))
    with torch.no_grad():
        trained = model(**batch).logits  # on both ranks: a sharded store's forward is collective
    dist.barrier()  # rank 0 has written
    if dist.get_rank() == 0:
        fresh = meft_ds.MeftModel.from_pretrained(tiny_model(), output_dir / "final")
        assert not meft_ds.adapters(fresh)[0].store.is_shard
        with torch.no_grad():
            assert torch.equal(fresh(**batch).logits, trained), "the export holds every rank's rows"


if __name__ == "__main__":
    main()
    dist.destroy_process_group()  # while the interpreter is whole (meft_ds.training.run_cli says why)
