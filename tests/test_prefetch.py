"""Pre-retrieval (prefetch_layers = p): layer i's rows are chosen from the FFN input of the adapter p layers
earlier, with layer i's own router, and fetched while the layers in between run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import tiny_model, token_batch, train_losses
from torch.utils.checkpoint import checkpoint

import meft_ds
from meft_ds import SparseRowAdam
from meft_ds.routing import select_rows

MEFT = {"num_neurons": 128, "top_k": 8, "seed": 2}


def test_rows_come_from_the_earlier_layers_hidden_states() -> None:
    model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "prefetch_layers": 1})
    adapters = meft_ds.adapters(model)
    assert [a.prefetch_target for a in adapters] == [adapters[1], adapters[2], None]
    # a reference, not a submodule: each router is named and saved once, as without pre-retrieval
    plain = meft_ds.inject(tiny_model(layers=3), MEFT)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ffn_inputs, used_rows = {}, {}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, args, i=index: ffn_inputs.__setitem__(i, args[0].detach()))
    for adapter in adapters:
        original = adapter.finish

        def spy(hidden, pending, adapter=adapter, original=original):
            prefetched = adapter._prefetched
            used_rows[adapter.layer_index] = None if prefetched is None else prefetched.routing.row_ids
            return original(hidden, pending)

        adapter.finish = spy
    with torch.no_grad():
        model(token_batch(batch=2, length=8))
    assert used_rows[0] is None, "the first layer has no earlier layer: it routes from its own hidden states"
    for target in (1, 2):
        x = ffn_inputs[target - 1].reshape(-1, 64)
        adapter = adapters[target]
        gates, probe = adapter.router(x).topk(adapter.config.n_probe, dim=1)
        expected = select_rows(x, probe, gates, adapter.store.keys, expert_size=adapter.config.expert_size, top_k=8)
        assert torch.equal(used_rows[target], expected.row_ids)


def test_prefetched_model_trains() -> None:
    model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "prefetch_layers": 2})
    losses = train_losses(model, [SparseRowAdam(meft_ds.adapters(model), lr=1e-2)], token_batch(batch=2, length=12))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_applied_around_the_layers_is_refused(reentrant: bool) -> None:
    """Checkpointing not through transformers (torch.utils.checkpoint around each layer, as DeepSpeed's does): the
    recomputed forward of a layer whose rows were pre-retrieved would route from its own hidden states (other rows,
    or with reentrant checkpointing gradients of rows the forward did not use)."""
    model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "prefetch_layers": 1}).train()
    model.enable_input_require_grads()  # reentrant checkpointing differentiates only through inputs that need it

    def checkpointed(*args: Any, forward: Callable, **kwargs: Any) -> Any:
        return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=reentrant)

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpointed, forward=layer.forward)
    batch = token_batch(batch=2, length=12)
    loss = model(batch, labels=batch).loss  # the forward itself pre-retrieves as usual
    with pytest.raises(meft_ds.MeftConfigError, match=r"meft.prefetch_layers: 1 pre-retrieves rows .* checkpointing"):
        loss.backward()


def test_prefetch_distance_must_stay_within_the_adapters() -> None:
    with pytest.raises(meft_ds.MeftConfigError, match=r"meft.prefetch_layers: 2 reaches past the 2 adapter layers"):
        meft_ds.inject(tiny_model(layers=2), {**MEFT, "prefetch_layers": 2})
