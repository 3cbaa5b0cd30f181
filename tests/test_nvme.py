"""The NVMe tier: a store larger than its RAM budget trains to the same store as the in-memory one; checkpoints;
clear errors for an unusable path, a missing libaio, or a budget too small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.swap
from meft_ds import MeftConfigError, SparseRowAdam

MEFT = {"num_neurons": 1024, "top_k": 8, "num_experts": 128, "n_probe": 4, "seed": 1}
BLOCK = 8 * 2 * 64 * 4  # an expert block: 8 rows x (key, value) x d=64 x fp32
RAM_MB = 2 * 48 * BLOCK / 2**20  # 48 of 128 expert blocks per layer, for the 2 layers


def nvme(tmp_path: Path, ram_mb: float = RAM_MB) -> dict:
    return {"device": "nvme", "nvme_path": str(tmp_path / "nvme"), "ram_budget_mb": ram_mb}


def train(store: dict | None, steps: int = 4) -> torch.nn.Module:
    model = meft_ds.inject(tiny_model(), {**MEFT, "store": store})
    optimizer = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    for step in range(steps):
        batch = token_batch(batch=1, length=6, seed=step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_store_larger_than_its_ram_budget_trains_like_the_in_memory_store(tmp_path: Path) -> None:
    in_memory, on_nvme = train(None), train(nvme(tmp_path))
    for memory, disk in zip(meft_ds.adapters(in_memory), meft_ds.adapters(on_nvme), strict=True):
        assert disk.store.capacity < disk.store.num_experts, "the RAM cache must be smaller than the store"
        assert disk.store.nbytes * 8 == memory.store.nbytes, "RAM holds 1/8 of what the in-memory store holds"
        assert torch.equal(disk.store.full_rows(), memory.store.rows)
        assert disk.traffic.nvme_bytes_read > 0 and disk.traffic.nvme_bytes_written > 0
    files = sorted(p.name for p in (tmp_path / "nvme" / "rank_0").iterdir())
    assert files == [f"layer_{i}.{name}.bin" for i in range(2) for name in ("exp_avg", "exp_avg_sq", "rows")]


def test_exported_nvme_adapter_reloads_in_memory(tmp_path: Path) -> None:
    model = train(nvme(tmp_path), steps=2)
    meft_ds.save_adapter(model, tmp_path / "export")
    batch = token_batch(batch=1, length=6, seed=9)
    with torch.no_grad():
        expected = model.eval()(batch).logits
        assert torch.equal(meft_ds.load_adapter(tiny_model(), tmp_path / "export")(batch).logits, expected)


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

    meft_ds.swap.aio_handle.cache_clear()
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    try:
        with pytest.raises(MeftConfigError, match=r"needs libaio\. Fix: apt-get install libaio-dev"):
            meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path)})
    finally:
        meft_ds.swap.aio_handle.cache_clear()


def test_budgets_too_small_are_named(tmp_path: Path) -> None:
    with pytest.raises(MeftConfigError, match="too small to hold one expert block"):
        meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path, ram_mb=BLOCK / 2**20)})
    model = meft_ds.inject(tiny_model(), {**MEFT, "store": nvme(tmp_path, ram_mb=2 * 4 * BLOCK / 2**20)})
    batch = token_batch(batch=2, length=16)
    with pytest.raises(MeftConfigError, match=r"probes \d+ experts of a layer but the cache holds 4"):
        model(batch)
