"""``torch.compile`` of an injected model (the HF Trainer's ``torch_compile=True``, DeepSpeed's ``engine.compile()``):
the adapters' host-side work stays out of the graphs, which hold the base model's layers between them."""

from __future__ import annotations

import torch
import torch._dynamo
from tiny_models import tiny_model, token_batch
from torch._dynamo.utils import counters

import meft_ds

MEFT = {"num_neurons": 128, "top_k": 8, "seed": 1}


def test_a_compiled_model_trains_as_the_eager_one_without_recompiling_per_batch() -> None:
    """Dynamo traced into the adapters (routing, the unions, the C++ kernels): graph breaks of 9 kinds inside them and
    new graphs for batches whose union of rows had another size. The hooks run eagerly now: the graphs break only
    there, and the first step's graphs serve the next batches."""
    eager = meft_ds.inject(tiny_model(), MEFT)
    model = meft_ds.inject(tiny_model(), MEFT)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo and AOT autograd, without code generation
    optimizers = [meft_ds.SparseRowAdam(meft_ds.adapters(m), lr=1e-2, backend="torch") for m in (eager, model)]
    torch._dynamo.reset()
    counters.clear()
    for step in range(4):
        batch = token_batch(batch=2, length=8, seed=step)  # the same shape, other rows
        losses = [m(batch, labels=batch).loss for m in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
        for loss, optimizer in zip(losses, optimizers, strict=True):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again after the first batch
    assert counters["graph_break"] and all("compiler.disable" in reason for reason in counters["graph_break"])
    for a, b in zip(meft_ds.adapters(eager), meft_ds.adapters(model), strict=True):
        torch.testing.assert_close(b.store.rows, a.store.rows, rtol=0, atol=1e-6)
