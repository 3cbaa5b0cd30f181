"""The device row cache: rows travel once per optimizer step, gradients once, results equal the uncached run,
and a row updated by the optimizer is never served stale."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import SparseRowAdam
from meft_ds.cache import DeviceRowCache

MEFT = {"num_neurons": 128, "top_k": 8, "seed": 1}


def train(cache_mb: float, *, steps: int = 3, micro_steps: int = 4):
    model = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": cache_mb})
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=1e-2, backend="torch")
    batches = [token_batch(batch=2, length=8, seed=s) for s in range(micro_steps)]
    per_step = []
    for _ in range(steps):
        before = meft_ds.stats(model)
        for batch in batches:  # the same micro-batches every step: all rows repeat within a step
            (model(batch, labels=batch).loss / micro_steps).backward()
        sparse.step()
        sparse.zero_grad()
        after = meft_ds.stats(model)
        per_step.append({k: after[k] - before[k] for k in after})
    return model, per_step


def test_cache_gives_the_same_training_and_moves_each_row_once_per_step() -> None:
    plain, plain_traffic = train(cache_mb=0)
    cached, cached_traffic = train(cache_mb=64)  # room for every row
    for a, b in zip(meft_ds.adapters(plain), meft_ds.adapters(cached), strict=True):
        torch.testing.assert_close(a.store.rows, b.store.rows, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.store.exp_avg_sq, b.store.exp_avg_sq, rtol=1e-5, atol=0)
    for plain_step, cached_step in zip(plain_traffic, cached_traffic, strict=True):
        # uncached: rows travel at every micro-step; cached: once per step (rows of the step's union)
        assert cached_step["rows_fetched"] < plain_step["rows_fetched"]
        assert cached_step["rows_fetched"] == cached_step["cache_misses"]
        assert cached_step["cache_hits"] > 0
        assert cached_step["row_bytes_to_host"] < plain_step["row_bytes_to_host"]
        assert cached_step["rows_updated"] == plain_step["rows_updated"]
    # every row of a step's union is fetched exactly once in that step: after the first micro-step of a step the
    # union repeats, so misses equal the distinct rows of the step
    unique_rows = cached_traffic[0]["rows_updated"]
    assert cached_traffic[0]["cache_misses"] >= unique_rows


def test_updated_rows_are_never_served_stale() -> None:
    model = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": 64})
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=0.5, backend="torch")
    batch = token_batch(batch=2, length=8)
    model(batch, labels=batch).loss.backward()
    sparse.step()  # updates rows and must drop their cached copies
    model.eval()
    with torch.no_grad():
        cached_logits = model(batch).logits
        for adapter in meft_ds.adapters(model):
            adapter.rows_changed()  # force every row to come fresh from the store
        fresh_logits = model(batch).logits
    assert torch.equal(cached_logits, fresh_logits)


def test_small_cache_evicts_and_flushes_pending_gradients() -> None:
    plain, _ = train(cache_mb=0, steps=2)
    tiny_cache, traffic = train(cache_mb=0.05, steps=2)  # a few rows per layer: constant eviction
    assert all(0 < a.transfer.cache.capacity < 128 for a in meft_ds.adapters(tiny_cache))
    for a, b in zip(meft_ds.adapters(plain), meft_ds.adapters(tiny_cache), strict=True):
        torch.testing.assert_close(a.store.rows, b.store.rows, rtol=0, atol=1e-6)
    assert traffic[0]["cache_misses"] > 0


def test_admit_prefers_free_cache_slots_then_least_recently_used() -> None:
    cache = DeviceRowCache(num_rows=10, capacity=3)
    cache_slots, flush_cache_slots, _ = cache.admit(torch.tensor([1, 2, 3]), keep=torch.tensor([], dtype=torch.int64))
    assert sorted(cache_slots.tolist()) == [0, 1, 2] and flush_cache_slots.numel() == 0
    cache.lookup(torch.tensor([1, 3]))  # row 2 becomes the least recently used
    cache.pending[cache.cache_slot_of[2]] = True
    cache_slots, _, flush_row_ids = cache.admit(torch.tensor([7]), keep=torch.tensor([], dtype=torch.int64))
    assert flush_row_ids.tolist() == [2] and cache.cache_slot_of[2] == -1 and cache.cache_slot_of[7] == cache_slots[0]
    cache_slots, _, _ = cache.admit(torch.tensor([8, 9]), keep=cache.cache_slot_of[torch.tensor([1, 3, 7])])
    assert cache_slots.tolist() == [-1, -1], "kept cache slots are never evicted"


@pytest.mark.parametrize("cache_mb", [0, 0.05])
def test_a_first_forward_under_inference_mode_leaves_training_intact(cache_mb: float) -> None:
    """The pinned rings and the cache are made at the first forward; one under ``torch.inference_mode`` (an
    evaluation before training) made them inference tensors, which later training may not write: it failed a few
    forwards later, when a ring buffer came round again."""
    model = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": cache_mb})
    with torch.inference_mode():
        model(token_batch(batch=2, length=8, seed=9))
    reference = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": cache_mb})
    for seed in range(4):
        batch = token_batch(batch=2, length=8, seed=seed)
        losses = [m(batch, labels=batch).loss for m in (model, reference)]
        for loss in losses:
            loss.backward()
        assert losses[0].item() == losses[1].item()
    if cache_mb:
        assert meft_ds.stats(model)["cache_hits"] > 0, "the cache was used"


def accumulated(model: torch.nn.Module) -> list[dict[int, torch.Tensor]]:
    """Per adapter, every row gradient of the step so far, by row id (the device cache flushed)."""
    found = []
    for adapter in meft_ds.adapters(model):
        adapter.collect_row_grads()
        row_ids, grads = adapter.store.accumulated_grads()
        found.append(dict(zip(row_ids.tolist(), grads, strict=True)))
    return found


def test_a_forward_in_another_dtype_within_the_window_keeps_the_cached_gradients() -> None:
    """A forward in another dtype (the model cast to evaluate in bf16, between micro-steps) re-creates the cache's
    device tensors in that dtype; the gradients they held were dropped with them, silently. They go to the store
    first."""
    plain = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": 0})
    cached = meft_ds.inject(tiny_model(), {**MEFT, "cache_mb": 64})
    batch = token_batch(batch=2, length=8)
    for model in (plain, cached):
        model(batch, labels=batch).loss.backward()
    with torch.no_grad():
        cached.to(torch.bfloat16)(batch)
    cached.float()
    expected, found = accumulated(plain), accumulated(cached)
    for plain_grads, cached_grads in zip(expected, found, strict=True):
        assert plain_grads.keys() == cached_grads.keys() and plain_grads
        for row_id, grad in plain_grads.items():
            torch.testing.assert_close(cached_grads[row_id], grad, rtol=1e-6, atol=1e-7)
