"""The byte and row counters equal the analytic traffic of a known batch; zero-gradient rows are never touched."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.routing import select_rows

DIM, TOKENS, INDEX = 32, 12, 2  # indices cross as int16 (their values fit)


def routed(adapter: SparseKeyExpertAdapter, x: torch.Tensor):
    config = adapter.config
    travel = config.row_torch_dtype(x.dtype)  # routing inputs reach the host in the row dtype
    with torch.no_grad():
        gates, probe = adapter.router(x).topk(config.n_probe, dim=1)
        gates = gates.to(travel).float() if config.gated else None
        return select_rows(
            x.detach().to(travel).float(), probe, gates, adapter.store.keys, expert_size=config.expert_size,
            top_k=config.top_k,
        )  # fmt: skip


@pytest.mark.parametrize(("row_dtype", "row_bytes"), [("auto", 4), ("fp32", 4), ("bf16", 2)])
def test_counters_equal_analytic_bytes(row_dtype: str, row_bytes: int) -> None:
    config = MeftConfig(num_neurons=256, top_k=8, num_experts=16, n_probe=4, row_dtype=row_dtype)
    adapter = SparseKeyExpertAdapter(DIM, config, layer_index=0)
    adapter.store.values.normal_(0, 0.1)
    x = torch.randn(TOKENS, DIM, requires_grad=True)
    union = routed(adapter, x).row_ids.numel()

    adapter(x).sum().backward()
    adapter.collect_row_grads()
    touched = adapter.store.num_touched
    SparseRowAdam([adapter], backend="torch").step()

    fetched = union * DIM * 2 * row_bytes  # |U| rows x d x {key, value} x dtype size
    traffic = adapter.traffic.as_dict()
    assert traffic["row_bytes_to_device"] == fetched
    assert traffic["row_bytes_to_host"] == fetched  # every row's gradient returns, with a flag...
    assert 0 < touched <= union  # ...and only rows with a nonzero gradient are touched
    # + each token's K union positions and each row's expert
    assert traffic["bytes_to_device"] == fetched + TOKENS * 8 * INDEX + union * INDEX
    # + hidden states, probe ids and gates (hidden states and gates in the row dtype); + a "has a gradient" flag per row
    assert traffic["bytes_to_host"] == fetched + TOKENS * DIM * row_bytes + TOKENS * 4 * (INDEX + row_bytes) + union
    assert traffic["rows_fetched"] == union
    assert traffic["rows_updated"] == touched


def test_rows_selected_but_inactive_for_every_token_are_not_touched() -> None:
    # ungated, and every probed neuron selected: many rows have a negative score for all tokens that chose them
    config = MeftConfig(num_neurons=64, top_k=16, num_experts=16, n_probe=4, gate="none")
    adapter = SparseKeyExpertAdapter(DIM, config, layer_index=0)
    adapter.store.values.normal_(0, 0.1)
    x = torch.randn(3, DIM)
    routing = routed(adapter, x)
    scores = x @ adapter.store.keys[routing.row_ids].T  # (T, |U|)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, routing.union_pos, True)
    active_rows = routing.row_ids[(chosen & (scores > 0)).any(0)]
    assert 0 < active_rows.numel() < routing.row_ids.numel(), "the case must have inactive rows to prove anything"

    adapter(x).pow(2).sum().backward()
    adapter.collect_row_grads()
    ids, _ = adapter.store.accumulated_grads()
    assert torch.equal(ids, active_rows)
    SparseRowAdam([adapter], backend="torch").step()
    assert adapter.traffic.rows_updated == active_rows.numel()


def test_model_stats_sum_over_adapters_and_fetch_fewer_rows_than_dense() -> None:
    model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=1024, top_k=8))
    batch = token_batch(batch=1, length=8)
    model(batch, labels=batch).loss.backward()
    stats = meft_ds.stats(model)
    per_layer = [a.traffic.rows_fetched for a in meft_ds.adapters(model)]
    assert stats["rows_fetched"] == sum(per_layer)
    assert all(0 < n <= 8 * 8 for n in per_layer), "at most T x K rows per layer, never all r"
    assert stats["row_bytes_to_device"] == stats["rows_fetched"] * 64 * 2 * 4


@pytest.mark.parametrize(
    ("index", "dtype"),
    [
        (0, torch.int16), (2**15, torch.int16), (2**15 + 1, torch.int32), (2**31, torch.int32),
        (2**31 + 1, torch.int64), (torch.tensor([2**15 - 1]), torch.int16), (torch.tensor([5, 2**15]), torch.int32),
        (torch.tensor([2**31]), torch.int64), (torch.empty(0, dtype=torch.int64), torch.int16),
    ],
)  # fmt: skip
def test_indices_cross_in_the_narrowest_dtype_that_holds_them(index: int | torch.Tensor, dtype: torch.dtype) -> None:
    """A bound (row or expert count) holds values below it; a tensor its own values: int64 only past 2^31 - 1 (a
    store of more than 2^31 rows per layer)."""
    from meft_ds.transfer import narrowest_index_dtype

    assert narrowest_index_dtype(index) == dtype
