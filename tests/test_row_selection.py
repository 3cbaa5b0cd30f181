"""TF-IDF row selection (``meft.update_rows``): what is counted, which rows a step updates, the background's idf."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.config import MeftConfigError
from meft_ds.routing import Routing
from meft_ds.row_selection import RowSelection

DIM = 16


def routing(row_ids: list[int], union_pos: list[list[int]]) -> Routing:
    return Routing(torch.tensor(row_ids), torch.tensor(union_pos))


def test_training_forwards_count_the_tokens_that_selected_each_row() -> None:
    selection = RowSelection(10, update_rows=2)
    selection.observe(routing([2, 5, 7], [[0, 1], [1, 2], [1, 0]]), training=True)
    selection.observe(routing([5, 9], [[0, 1]]), training=True)
    selection.observe(routing([1, 2], [[0, 1]]), training=False)  # evaluation: not counted
    assert selection.term_counts.tolist() == [0, 0, 2, 0, 0, 4, 0, 1, 0, 1]
    # rows 2, 5, 7, 9 hold gradients: the two most selected are updated, positions ascending
    assert selection.choose(torch.tensor([2, 5, 7, 9])).tolist() == [0, 1]
    assert not selection.term_counts.any()  # the next step counts afresh


def test_all_rows_when_no_more_than_update_rows_hold_gradients() -> None:
    selection = RowSelection(10, update_rows=3)
    selection.observe(routing([2, 5], [[0, 1]]), training=True)
    assert selection.choose(torch.tensor([2, 5])) is None


def test_a_shard_updates_its_part_of_the_choice_over_the_whole_store() -> None:
    """With a sharded store each rank holds the gradients of the rows it owns; given the step's counts summed over
    the ranks, every shard keeps its rows of the same top ``update_rows`` of the whole store."""
    counts = routing([2, 5, 7, 9], [[0, 1], [1, 1], [2, 3], [1, 0]])  # tf: row 2: 2, row 5: 4, rows 7 and 9: 1
    shards = {(2, 7): [0], (5, 9): [0], (7, 9): []}  # owned rows holding a gradient -> positions updated
    for owned, expected in shards.items():
        selection = RowSelection(10, update_rows=2)
        selection.observe(counts, training=True)
        assert selection.choose(torch.tensor(owned)).tolist() == expected
    selection = RowSelection(10, update_rows=2)
    selection.observe(counts, training=True)
    assert selection.choose(torch.tensor([2, 5])) is None  # a shard owning the whole choice updates all it holds


def test_the_background_sets_each_rows_idf() -> None:
    selection = RowSelection(6, update_rows=2)
    with selection.background():
        selection.observe(routing([0, 1], [[0, 1]]), training=False)  # one document each
        selection.observe(routing([1, 2], [[0, 1]]), training=True)
    assert selection.background_documents == 2
    expected = [math.log(3 / 2), math.log(3 / 3), math.log(3 / 2), math.log(3), math.log(3), math.log(3)]
    torch.testing.assert_close(selection.idf, torch.tensor(expected))
    assert not selection.term_counts.any()  # background forwards are not training counts
    # row 1 is selected by every background document: never updated, however often the step selects it
    selection.observe(routing([1, 2, 3], [[0, 1], [0, 2], [0, 1]]), training=True)  # tf: 3, 2, 1
    assert selection.choose(torch.tensor([1, 2, 3])).tolist() == [1, 2]  # rows 2 (2 x 0.41) and 3 (1 x 1.10)
    selection.observe(routing([1], [[0]]), training=True)
    assert selection.choose(torch.tensor([1])).numel() == 0


def test_a_failed_background_keeps_the_earlier_one() -> None:
    selection = RowSelection(4, update_rows=1)
    with selection.background():
        selection.observe(routing([0], [[0]]), training=False)
    idf = selection.idf.clone()
    with pytest.raises(RuntimeError), selection.background():
        selection.observe(routing([1], [[0]]), training=False)
        raise RuntimeError("interrupted")
    assert torch.equal(selection.idf, idf) and selection.background_documents == 1


def trained_adapter(update_rows: int) -> tuple[SparseKeyExpertAdapter, list[torch.Tensor], torch.Tensor]:
    """An adapter after one training step on a fixed batch; its store's state before the step and its routing."""
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=4, update_rows=update_rows), 0)
    store = adapter.store
    store.values.normal_(generator=torch.Generator().manual_seed(1))  # zero values would give zero gradients
    before = [t.clone() for t in (store.rows, store.exp_avg, store.exp_avg_sq)]
    x = torch.randn(12, DIM, generator=torch.Generator().manual_seed(0))
    routing = adapter._route(adapter._start_routing(x, adapter.router(x)))
    selected = routing.row_ids[routing.union_pos.flatten()]
    optimizer = SparseRowAdam([adapter], lr=1e-2)
    adapter(x).pow(2).sum().backward()
    optimizer.step()
    return adapter, before, selected


def test_a_step_updates_only_the_chosen_rows_and_leaves_the_others_untouched() -> None:
    adapter, before, selected = trained_adapter(update_rows=5)
    store = adapter.store
    touched = selected.unique()
    assert touched.numel() > 5
    changed = (store.rows != before[0]).flatten(1).any(1).nonzero().flatten()
    assert changed.numel() == 5 and adapter.traffic.rows_updated == 5
    counts = torch.bincount(selected, minlength=64).float()
    assert counts[changed].min() >= counts[touched].sort(descending=True).values[4]  # the five most selected
    unchanged = torch.ones(64, dtype=torch.bool)
    unchanged[changed] = False
    for now, then in zip((store.rows, store.exp_avg, store.exp_avg_sq), before, strict=True):
        assert torch.equal(now[unchanged], then[unchanged])  # values and moments, bit for bit
    assert store.accumulated_grads() is None  # the left-out rows' gradients went with the step


def test_without_update_rows_every_touched_row_is_updated() -> None:
    adapter, before, selected = trained_adapter(update_rows=0)
    changed = (adapter.store.rows != before[0]).flatten(1).any(1).nonzero().flatten()
    assert torch.equal(changed, selected.unique()) and adapter.row_selection is None


def test_fit_background_reads_one_document_per_call() -> None:
    model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=64, top_k=4, update_rows=8))
    documents = [{"input_ids": token_batch(1, 12, seed=s)} for s in range(3)]
    assert meft_ds.fit_background(model, documents) == 3
    for adapter in meft_ds.adapters(model):
        selection = adapter.row_selection
        assert selection.background_documents == 3
        assert selection.idf.min() >= 0 and selection.idf.max() == pytest.approx(math.log(4))
        assert (selection.idf < math.log(4)).any()  # some rows were selected
    with pytest.raises(ValueError, match="one sequence"):
        meft_ds.fit_background(model, [{"input_ids": token_batch(2, 12)}])


def test_fit_background_needs_update_rows_and_update_rows_is_checked() -> None:
    model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=64, top_k=4))
    with pytest.raises(ValueError, match="update_rows"):
        meft_ds.fit_background(model, [])
    with pytest.raises(MeftConfigError, match="update_rows"):
        MeftConfig(update_rows=-1)
