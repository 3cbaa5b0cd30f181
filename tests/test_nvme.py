"""The NVMe tier: a store 4x larger than its RAM budget trains at 2 x 256 tokens per micro-batch to the same rows and
moments as the in-memory store; checkpoints; clear errors for an unusable path, a missing libaio, or a budget too
small."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.aio
import meft_ds.memory
import meft_ds.swap
from meft_ds import CheckpointError, MeftConfigError, SparseRowAdam

MEFT = {"num_neurons": 1024, "top_k": 8, "num_experts": 128, "n_probe": 4, "seed": 1}
KEYS = 1024 * 64 * 4  # a layer's keys: 1024 rows x d=64 x fp32, what the tier keeps in RAM
RAM_MB = 2 * 1.5 * KEYS / 2**20  # keys and read buffers of half their size, for the 2 layers


def nvme(tmp_path: Path, ram_mb: float = RAM_MB) -> dict:
    return {"device": "nvme", "nvme_path": str(tmp_path / "nvme"), "ram_budget_mb": ram_mb}


def train(store: dict | None, steps: int = 4, batch: int = 1, length: int = 6) -> torch.nn.Module:
    model = meft_ds.inject(tiny_model(), {**MEFT, "store": store})
    optimizer = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    for step in range(steps):
        tokens = token_batch(batch=batch, length=length, seed=step)
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_store_4x_its_ram_budget_trains_at_2x256_tokens_like_the_in_memory_store(tmp_path: Path) -> None:
    in_memory = train(None, steps=3, batch=2, length=256)
    on_nvme = train(nvme(tmp_path), steps=3, batch=2, length=256)
    for memory, disk in zip(meft_ds.adapters(in_memory), meft_ds.adapters(on_nvme), strict=True):
        store = disk.store
        assert memory.store.nbytes >= 4 * store.nbytes, "the store is at least 4x what the tier holds in RAM"
        assert store.nbytes <= RAM_MB * 2**20 / 2
        assert torch.equal(store.full_rows(), memory.store.rows)
        assert torch.equal(store._read_whole("exp_avg"), memory.store.exp_avg)
        assert torch.equal(store._read_whole("exp_avg_sq"), memory.store.exp_avg_sq)
        # most rows were selected: 512 tokens x K=8 over 1024 rows; each micro-batch read only their blocks' values
        assert 0 < memory.traffic.rows_updated <= 3 * 1024
        assert disk.traffic.nvme_bytes_written > 0
    files = sorted(p.name for p in (tmp_path / "nvme" / "rank_0").iterdir())
    layer_files = [f"layer_{i}.{name}.bin" for i in range(2) for name in ("exp_avg", "exp_avg_sq", "values")]
    assert files == [".lock", *layer_files]  # and the lock of the process that trains in the folder


def read_requests(store: meft_ds.swap.NvmeRowStore) -> list[int]:
    """Records the byte count of each read request the store submits from now on."""
    requests, submit = [], store._io

    def counted(write: bool, buffer: torch.Tensor, *args: object) -> None:
        if not write:
            requests.append(buffer.numel() * 4)
        submit(write, buffer, *args)

    store._io = counted
    return requests


@pytest.mark.parametrize(
    ("gap_blocks", "expected"),
    [(0, [4096, 4096, 4096]), (1, [3 * 4096, 4096]), (60, [16 * 4096] * 4)],
    ids=["no gap read through", "a gap of one block read through", "all read, chunk by chunk"],
)
def test_reads_the_blocks_of_the_selected_rows_through_small_gaps(
    tmp_path: Path, gap_blocks: int, expected: list[int]
) -> None:
    model = train(nvme(tmp_path), steps=1)
    store = meft_ds.adapters(model)[0].store
    store.gap_bytes = gap_blocks * 4096
    requests = read_requests(store)
    rows = torch.tensor([0, 1, 40, 1023])  # blocks 0, 2 and 63 (16 rows of d=64 per 4 KiB block)
    before = store.stats.nvme_bytes_read
    out = torch.empty(4, 2, 64, dtype=torch.bfloat16)
    store.gather_into(rows, out)
    assert requests == expected  # 60 blocks reach from 2 to 63: one span of 64 blocks, in chunks of 16 (64 KiB)
    assert store.stats.nvme_bytes_read - before == sum(expected)
    assert torch.equal(out, store.full_rows()[rows].bfloat16())


def test_the_step_reads_and_writes_the_spans_of_the_touched_rows_gaps_included(tmp_path: Path) -> None:
    """The optimizer step reads the touched rows' spans straight into buffers of their own and writes the same spans
    back: one request per span and file each way; the rows in the gaps come back unchanged."""
    model = train(nvme(tmp_path), steps=1)
    store = meft_ds.adapters(model)[0].store
    store.gap_bytes = 2 * 4096  # one block of moments (16 rows x 2 x d=64 x fp32): blocks 0 and 2 share a span
    rows_before, exp_avg_before = store.full_rows(), store._read_whole("exp_avg")
    requests, submit = [], store._io
    store._io = lambda write, buffer, name, block, *rest: (
        requests.append((write, name, block, buffer.numel() * 4)),
        submit(write, buffer, name, block, *rest),
    )
    touched = torch.tensor([0, 1, 40, 1023])  # blocks 0, 2 and 63
    with store.rows_for_update(touched) as (rows, exp_avg, _, index):
        assert torch.equal(rows[index], rows_before[touched]) and torch.equal(exp_avg[index], exp_avg_before[touched])
        rows[index] += 1.0
        exp_avg[index] -= 1.0
    store._io = submit
    spans = [(0, 3), (63, 1)]  # (first block, blocks)
    per_file = [(name, first, blocks * width) for first, blocks in spans
                for name, width in (("values", 4096), ("exp_avg", 8192), ("exp_avg_sq", 8192))]  # fmt: skip
    assert requests == [(False, *r) for r in per_file] + [(True, *r) for r in per_file]
    expected_rows, expected_exp_avg = rows_before.clone(), exp_avg_before.clone()
    expected_rows[touched] += 1.0
    expected_exp_avg[touched] -= 1.0
    assert torch.equal(store.full_rows(), expected_rows)
    assert torch.equal(store._read_whole("exp_avg"), expected_exp_avg)

    keys, store.keys_ram = store.keys_ram, torch.empty(0, 64)  # the update fails while its reads are in flight
    with pytest.raises(RuntimeError, match="index_select"), store.rows_for_update(touched):
        pass
    store.keys_ram = keys
    assert [queue.pending for queue in store.queues] == [0, 0], "reads end before their buffers are freed"
    assert torch.equal(store.full_rows(), expected_rows)


def test_the_next_store_is_read_while_one_updates(tmp_path: Path) -> None:
    """At the optimizer step the next store's reads are started before a store updates, on queues of its own (a
    wait for one store's reads does not wait for the next one's); reads started for other rows are dropped."""
    model = train(nvme(tmp_path), steps=1)
    stores = [adapter.store for adapter in meft_ds.adapters(model)]
    assert not set(map(id, stores[0].queues)) & set(map(id, stores[1].queues))
    optimizer = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    tokens = token_batch(batch=2, length=16, seed=7)
    model(tokens, labels=tokens).loss.backward()
    in_flight, update = [], optimizer._update_rows
    optimizer._update_rows = lambda *args: (
        in_flight.append([store._update_reads is not None and store.queues[0].pending > 0 for store in stores]),
        update(*args),
    )
    optimizer.step()
    assert in_flight == [[False, True], [False, True]]  # the first store's reads start in its own update

    expected = stores[0].full_rows()[[5]]
    stores[0].start_update(torch.tensor([0, 1]))
    with stores[0].rows_for_update(torch.tensor([5])) as (rows, _, _, index):
        assert torch.equal(rows[index], expected)


def test_reads_are_in_flight_until_the_rows_are_used(tmp_path: Path) -> None:
    """start_gather returns with two chunks in flight (one per half of the read area and queue); the others are read
    as the chunks before are copied out. In a forward on the CPU the adapter starts them before its FFN runs; with
    events (an accelerator, or the test harness that imitates one) it routes after the FFN's kernels are queued."""
    model = train(nvme(tmp_path), steps=1)
    store = meft_ds.adapters(model)[0].store
    store.gap_bytes = 60 * 4096  # one span of 64 blocks: 4 chunks of 16
    requests = read_requests(store)
    rows = torch.tensor([0, 1, 40, 1023])
    out = torch.empty(4, 2, 64)
    finish = store.start_gather(rows, out)
    assert requests == [16 * 4096] * 2 and [queue.pending for queue in store.queues] == [1, 1]
    assert torch.equal(out[:, 0], store.keys[rows])  # the keys, from RAM, meanwhile
    finish()
    assert requests == [16 * 4096] * 4 and [queue.pending for queue in store.queues] == [0, 0]
    assert torch.equal(out, store.full_rows()[rows])

    store.start_gather(rows, torch.empty(4, 2, 64))  # never completed (as when a forward fails): reads in flight
    submit, queued_before = store._io, []
    store._io = lambda *args: (queued_before.append(sum(q.pending for q in store.queues)), submit(*args))
    again = torch.empty(4, 2, 64)
    store.gather_into(rows, again)  # waits for them before it reads into the same area
    store._io = submit
    assert queued_before[0] == 0 and torch.equal(again, out)

    in_flight_at_ffn = []
    for layer, adapter in zip(model.model.layers, meft_ds.adapters(model), strict=True):
        adapter.store._finish_writes()  # the training step's: what the hook counts is the forward's reads
        queues = adapter.store.queues  # a pre-hook registered after the adapter's own runs after it
        layer.mlp.register_forward_pre_hook(lambda *_, q=queues: in_flight_at_ffn.append(sum(x.pending for x in q)))
    with torch.no_grad():
        model(token_batch(batch=2, length=64, seed=5))
    with_events = get_accelerator().Event is not None
    assert len(in_flight_at_ffn) == 2 and all((pending > 0) != with_events for pending in in_flight_at_ffn)


def test_writes_in_flight_complete_before_their_queues_are_destroyed(tmp_path: Path) -> None:
    """DeepSpeed's handle aborts the whole process when it is destroyed with requests pending: a plain loop leaves the
    last step's writes in flight, and they complete before the queues go (with the files as the step left them)."""
    model = train(nvme(tmp_path), steps=1)
    store = meft_ds.adapters(model)[1].store
    assert store.queues[0].pending > 0, "the last step's writes are in flight"
    files = {name: Path(path) for name, path in store.files.items()}
    keys = store.keys.clone()
    meft_ds.aio.aio_queues.cache_clear()
    del model, store
    gc.collect()  # the stores, their queues and DeepSpeed's handles go: the process must still be alive
    values = torch.from_file(str(files["values"]), size=1024 * 64).view(1024, 64)
    assert torch.equal(meft_ds.adapters(train(None, steps=1))[1].store.rows, torch.stack([keys, values], dim=1))


def test_store_at_its_smallest_budget_trains_like_the_in_memory_store(tmp_path: Path) -> None:
    """A read area of two blocks of values: chunks of one block, a block of moments read in the whole area."""
    smallest = 2 * meft_ds.nvme_folder.nvme_ram_needed(1024, 64) / 2**20
    in_memory = train(None, steps=2, batch=2, length=16)
    on_nvme = train(nvme(tmp_path, ram_mb=smallest), steps=2, batch=2, length=16)
    for memory, disk in zip(meft_ds.adapters(in_memory), meft_ds.adapters(on_nvme), strict=True):
        assert disk.store.chunk_blocks == 1
        assert torch.equal(disk.store.full_rows(), memory.store.rows)
        assert torch.equal(disk.store._read_whole("exp_avg_sq"), memory.store.exp_avg_sq)


def test_exported_nvme_adapter_reloads_in_memory(tmp_path: Path) -> None:
    model = train(nvme(tmp_path), steps=2)
    meft_ds.save_adapter(model, tmp_path / "export")
    batch = token_batch(batch=1, length=6, seed=9)
    with torch.no_grad():
        expected = model.eval()(batch).logits
        assert torch.equal(meft_ds.load_adapter(tiny_model(), tmp_path / "export")(batch).logits, expected)


def test_the_sparse_adams_state_dict_refuses_rows_on_nvme_with_the_fix(tmp_path: Path) -> None:
    """The rows of the NVMe tier are not in memory for a plain loop's torch.save: refused, not left out silently."""
    model = train(nvme(tmp_path), steps=1)
    optimizer = SparseRowAdam(meft_ds.adapters(model))
    assert "rows" not in optimizer.state_dict(), "a fresh optimizer's state (Accelerate's prepare reads it)"
    optimizer.step()
    with pytest.raises(CheckpointError, match=r"^NvmeRowStore: the rows are not all in this process's memory .* Fix: "):
        optimizer.state_dict()
    assert "rows" not in optimizer.state_dict(with_rows=False)


def test_engine_checkpoint_round_trip_with_the_nvme_store(tmp_path: Path) -> None:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "meft": {**MEFT, "store": nvme(tmp_path)},
    }
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config)
    for step in range(4):
        batch = token_batch(batch=1, length=6, seed=step)
        engine.backward(engine(batch, labels=batch).loss)
        engine.step()
        if step == 1:
            engine.save_checkpoint(str(tmp_path / "checkpoints"))
            saved = [a.store.full_rows() for a in meft_ds.adapters(model)]
    assert not torch.equal(meft_ds.adapters(model)[0].store.full_rows(), saved[0])
    engine.load_checkpoint(str(tmp_path / "checkpoints"))
    for adapter, rows in zip(meft_ds.adapters(model), saved, strict=True):
        assert torch.equal(adapter.store.full_rows(), rows)
    assert (tmp_path / "checkpoints" / "global_step2" / "meft" / "layer_0.nvme" / "rows.bin").is_file()


def test_unwritable_path_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(MeftConfigError, match=r"meft\.store\.nvme_path: cannot write to"):
        meft_ds.inject(tiny_model(), {**MEFT, "store": {"device": "nvme", "nvme_path": str(blocker / "x")}})


def test_missing_libaio_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    meft_ds.aio.aio_queues.cache_clear()
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    try:
        with pytest.raises(MeftConfigError, match=r"needs libaio\. Fix: apt-get install libaio-dev"):
            meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})
    finally:
        meft_ds.aio.aio_queues.cache_clear()


def test_budget_too_small_names_the_mib_it_needs(tmp_path: Path) -> None:
    needed = 2 * (KEYS + 2 * 16 * 64 * 4) / 2**20  # 2 layers x (keys + two 4 KiB blocks of values)
    with pytest.raises(MeftConfigError, match=rf"raise ram_budget_mb to at least {needed:.2f} "):
        meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path, ram_mb=needed * 0.9)})


def test_a_folder_another_process_trains_in_is_refused(tmp_path: Path) -> None:
    """Two runs with the same nvme_path (e.g. both with the shipped meft_nvme.json) wrote the same files, each under
    the other's rows. The folder is locked for the process that holds it (an flock: released when it ends, however);
    the lock here is taken through another open file, as another process's would be."""
    import fcntl

    folder = tmp_path / "nvme" / "rank_0"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("4242\n")
        other.flush()
        in_use = r"nvme_path: .*rank_0 is in use by another process \(pid 4242\).*Fix: give each run that trains at"
        with pytest.raises(MeftConfigError, match=in_use):
            meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})
    meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})  # released: this process takes it
    assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
    meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})  # and keeps it for its later models


def test_free_space_is_checked_for_every_rank_of_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ranks of a node write their files to the same drive, each checking it before anyone writes (the files
    start sparse): room for one rank's stores but not two is refused when two ranks share the node."""
    import shutil

    one_rank = 3 * meft_ds.memory.store_bytes(2, MEFT["num_neurons"], 64) // 4  # rows and two moments, 2 layers
    usage = shutil.disk_usage(tmp_path)._replace(free=int(1.5 * one_rank))
    monkeypatch.setattr(meft_ds.swap.shutil, "disk_usage", lambda path: usage)
    meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})  # one rank: room enough
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    gib = 2 * one_rank / 2**30
    with pytest.raises(MeftConfigError, match=rf"the stores of this node's ranks need {gib:.1f} GiB"):
        meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path / "two")})


def test_a_folder_another_live_model_of_this_process_uses_is_refused(tmp_path: Path) -> None:
    """A second model injected with the same nvme_path while the first lives created the same files again, zeroing
    the first one's rows under it; once the first model is dropped its files are free."""
    first = meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})
    rows = [a.store.full_rows().clone() for a in meft_ds.adapters(first)]
    second = tiny_model()
    with pytest.raises(MeftConfigError, match=r"files of layers \[0, 1\] in .*rank_0 belong to another model alive in"):
        meft_ds.inject(second, {**MEFT, "store": nvme(tmp_path)})
    assert all(p.requires_grad for p in second.parameters()) and not meft_ds.adapters(second)  # left as it was
    for adapter, before in zip(meft_ds.adapters(first), rows, strict=True):
        assert torch.equal(adapter.store.full_rows(), before)
    meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path / "other")})  # its own folder
    del first, adapter  # (the loop variable held layer 1's adapter)
    meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})
