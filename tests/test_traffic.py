"""The byte and row counters equal the analytic traffic of a known batch."""

from __future__ import annotations

import pytest
import torch

import meft_ds
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.routing import select_rows

DIM, TOKENS = 32, 12


@pytest.mark.parametrize(("row_dtype", "row_bytes"), [("auto", 4), ("fp32", 4), ("bf16", 2)])
def test_counters_equal_analytic_bytes(row_dtype: str, row_bytes: int) -> None:
    config = MeftConfig(num_neurons=256, top_k=8, num_experts=16, n_probe=4, row_dtype=row_dtype)
    adapter = SparseKeyExpertAdapter(DIM, config, layer_index=0)
    x = torch.randn(TOKENS, DIM, requires_grad=True)

    with torch.no_grad():
        gates, probe = adapter.router(x).topk(4, dim=1)
        union = select_rows(x.detach(), probe, gates, adapter.store.keys, expert_size=16, top_k=8).row_ids.numel()
    adapter(x).sum().backward()
    SparseRowAdam([adapter], backend="torch").step()

    rows = union * DIM * 2 * row_bytes  # |U| rows x d x {key, value} x dtype size
    traffic = adapter.traffic.as_dict()
    assert traffic["row_bytes_to_device"] == rows
    assert traffic["row_bytes_to_host"] == rows
    index = 8  # int64
    assert traffic["bytes_to_device"] == rows + TOKENS * 8 * index + union * index  # + slots + experts of U
    assert traffic["bytes_to_host"] == rows + TOKENS * DIM * 4 + TOKENS * 4 * (index + 4)  # + h + probe ids, gates
    assert traffic["rows_fetched"] == union
    assert traffic["rows_updated"] == union


def test_model_stats_sum_over_adapters_and_fetch_fewer_rows_than_dense() -> None:
    from tiny_models import tiny_model, token_batch

    model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=1024, top_k=8))
    batch = token_batch(batch=1, length=8)
    model(batch, labels=batch).loss.backward()
    stats = meft_ds.stats(model)
    per_layer = [a.traffic.rows_fetched for a in meft_ds.adapters(model)]
    assert stats["rows_fetched"] == sum(per_layer)
    assert all(0 < n <= 8 * 8 for n in per_layer), "at most T x K rows per layer, never all r"
    assert stats["row_bytes_to_device"] == stats["rows_fetched"] * 64 * 2 * 4
