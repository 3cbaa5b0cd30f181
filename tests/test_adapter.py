"""The sparse adapter computes SPEC.md's method exactly: dense equivalence, per-token locality, routing."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from deepspeed.accelerator import real_accelerator
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.adapter
from meft_ds import MeftConfig, SparseKeyExpertAdapter
from meft_ds.adapter import MaskedAdapterFunction, TopKAdapterFunction
from meft_ds.routing import select_rows

DIM = 32


@pytest.fixture(params=["top_k", "masked"], autouse=True)
def compute_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both implementations: the CPU kernel over each token's K rows, and the masked dense
    form over U that accelerators run (forced here on the CPU)."""
    if request.param == "masked":
        monkeypatch.setattr(meft_ds.adapter, "computes_over_top_k", lambda x: False)
    else:
        assert meft_ds.adapter.computes_over_top_k(torch.zeros(1)), "fp32 CPU input must take the kernel path"
    return request.param


def make_adapter(**overrides) -> SparseKeyExpertAdapter:
    config = MeftConfig(**{"num_neurons": 64, "top_k": 64, "num_experts": 8, "n_probe": 8, **overrides})
    adapter = SparseKeyExpertAdapter(DIM, config, layer_index=0)
    adapter.store.values.normal_(0.0, 0.05)  # trained-looking values, so value gradients matter
    return adapter


def dense_reference(x: torch.Tensor, adapter: SparseKeyExpertAdapter):
    """A dense ReLU parallel adapter over all r neurons (gate = the router logit of each neuron's expert)."""
    keys = adapter.store.keys.clone().requires_grad_(True)
    values = adapter.store.values.clone().requires_grad_(True)
    router = adapter.router.weight.detach().clone().requires_grad_(True)
    pre = x @ keys.T
    if adapter.config.gated:
        pre = pre * (x @ router.T).repeat_interleave(adapter.config.expert_size, dim=1)
    return torch.relu(pre) @ values, keys, values, router


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gate", ["logit", "none"])
def test_full_top_k_equals_dense_parallel_adapter(gate: str) -> None:
    adapter = make_adapter(gate=gate)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(2, 12, DIM)

    out = adapter(x)
    out.backward(grad_out)
    adapter.collect_row_grads()
    ids, row_grads = adapter.store.accumulated_grads()

    ref_out, keys, values, router = dense_reference(x_ref.view(-1, DIM), adapter)
    ref_out.backward(grad_out.view(-1, DIM))

    assert torch.equal(ids, torch.arange(64)), "with K = r every row is fetched"
    assert rel_err(out.view(-1, DIM), ref_out) <= 1e-5
    assert rel_err(row_grads[:, 0], keys.grad) <= 1e-5
    assert rel_err(row_grads[:, 1], values.grad) <= 1e-5
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
    if gate == "logit":
        assert rel_err(adapter.router.weight.grad, router.grad) <= 1e-5
    else:
        assert adapter.router.weight.grad is None, "ungated: the router only chooses experts, it gets no gradient"


def test_values_start_at_zero_so_output_is_zero() -> None:
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=8), layer_index=0)
    assert torch.count_nonzero(adapter.store.values) == 0
    assert torch.count_nonzero(adapter(torch.randn(5, DIM))) == 0


def test_router_starts_at_scaled_expert_key_means() -> None:
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=8, num_experts=8), layer_index=3)
    means = adapter.store.keys.view(8, 8, DIM).mean(dim=1)
    torch.testing.assert_close(adapter.router.weight, 50.0 * means)
    assert adapter.store.keys.std().item() == pytest.approx(0.02, rel=0.1)


def routing_of(adapter: SparseKeyExpertAdapter, x: torch.Tensor):
    logits = adapter.router(x).detach()
    gates, probe = logits.topk(adapter.config.n_probe, dim=1)
    config = adapter.config
    routing = select_rows(
        x,
        probe,
        gates if config.gated else None,
        adapter.store.keys,
        expert_size=config.expert_size,
        top_k=config.top_k,
    )
    return routing, probe, logits


@pytest.mark.parametrize("gate", ["logit", "none"])
def test_each_token_uses_only_its_own_top_k_rows(gate: str) -> None:
    adapter = make_adapter(num_neurons=256, top_k=8, num_experts=16, n_probe=4, gate=gate)
    x = torch.randn(10, DIM)
    with torch.no_grad():
        batch_out = adapter(x)
        routing, probe, logits = routing_of(adapter, x)
        for t in range(x.shape[0]):
            own_rows = routing.row_ids[routing.union_pos[t]]
            assert own_rows.unique().numel() == 8
            assert set((own_rows // 16).tolist()) <= set(probe[t].tolist()), "rows come from probed experts"
            # explicit per-token sum over its own K rows
            pre = adapter.store.keys[own_rows] @ x[t]
            if gate == "logit":
                pre = pre * logits[t, own_rows // 16]
            expected = torch.relu(pre) @ adapter.store.values[own_rows]
            torch.testing.assert_close(batch_out[t], expected, rtol=1e-5, atol=1e-6)
            # the same token alone (a different union U) gives the same output
            torch.testing.assert_close(adapter(x[t : t + 1])[0], batch_out[t], rtol=1e-5, atol=1e-6)


def test_changing_rows_outside_a_tokens_top_k_changes_nothing_for_it() -> None:
    adapter = make_adapter(num_neurons=256, top_k=8, num_experts=16, n_probe=4)
    x = torch.randn(6, DIM)
    with torch.no_grad():
        before = adapter(x)
        routing, probe, _ = routing_of(adapter, x)
        token = 0
        own = set(routing.row_ids[routing.union_pos[token]].tolist())
        probed = set(probe[token].tolist())
        others = [j for j in range(256) if j not in own]
        adapter.store.values[others] += 1.0  # any value row it did not select
        unprobed = [j for j in range(256) if j // 16 not in probed]
        adapter.store.keys[unprobed] *= -3.0  # any key outside its probed experts
        after = adapter(x)
    torch.testing.assert_close(after[token], before[token], rtol=0, atol=0)
    assert not torch.equal(after, before), "the perturbation must reach other tokens, or the test proves nothing"


def test_routing_matches_brute_force_top_k_over_probed_experts() -> None:
    torch.manual_seed(3)
    keys = torch.randn(96, DIM)
    x = torch.randn(7, DIM)
    probe = torch.stack([torch.randperm(12)[:3] for _ in range(7)])
    gates = torch.randn(7, 3)
    routing = select_rows(x, probe, gates, keys, expert_size=8, top_k=5)
    for t in range(7):
        candidates = torch.cat([torch.arange(e * 8, e * 8 + 8) for e in probe[t].tolist()])
        scores = (keys[candidates] @ x[t]) * gates[t].repeat_interleave(8)
        expected = candidates[scores.topk(5).indices].sort().values
        assert torch.equal(routing.row_ids[routing.union_pos[t]].sort().values, expected)
    selected = routing.row_ids[routing.union_pos].unique()
    assert torch.equal(routing.row_ids, selected), "U is exactly the union of the tokens' rows, sorted"


def test_no_grad_forward_leaves_store_untouched() -> None:
    adapter = make_adapter(num_neurons=64, top_k=8)
    with torch.no_grad():
        adapter(torch.randn(4, DIM))
    assert adapter.store.accumulated_grads() is None


def test_row_gradients_accumulate_across_micro_steps() -> None:
    adapter = make_adapter(num_neurons=256, top_k=8, num_experts=16, n_probe=4)
    x = torch.randn(8, DIM)
    adapter(x).pow(2).sum().backward()
    adapter.collect_row_grads()
    ids_full, grads_full = (t.clone() for t in adapter.store.accumulated_grads())
    adapter.drop_row_grads()
    for half in (x[:4], x[4:]):
        adapter(half).pow(2).sum().backward()
    adapter.collect_row_grads()
    ids, grads = adapter.store.accumulated_grads()  # in first-touch order: compared by id
    order, order_full = ids.argsort(), ids_full.argsort()
    assert torch.equal(ids[order], ids_full[order_full])
    torch.testing.assert_close(grads[order], grads_full[order_full], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gated", [True, False])
def test_top_k_and_masked_functions_agree(gated: bool) -> None:
    tokens, n, top_k = 9, 20, 5
    x = torch.randn(tokens, DIM, requires_grad=True)
    rows = torch.randn(n, 2, DIM) * 0.3
    union_pos = torch.stack([torch.randperm(n)[:top_k] for _ in range(tokens)])
    logits = torch.randn(tokens, n, requires_grad=True)  # one "expert" per row, for simplicity
    grad_out = torch.randn(tokens, DIM)
    results = []
    for function in (TopKAdapterFunction, MaskedAdapterFunction):
        x.grad = logits.grad = None
        sunk = []

        def sink(grads: torch.Tensor, has_grad: torch.Tensor | None = None, sunk: list = sunk) -> None:
            if has_grad is not None:  # the kernel's flags must say which rows' gradients are not all zero
                assert torch.equal(has_grad, grads.flatten(1).ne(0).any(dim=1))
            sunk.append(grads)

        if function is TopKAdapterFunction:
            gate = logits.gather(1, union_pos) if gated else None
            out = function.apply(x, gate, rows.clone().requires_grad_(), union_pos, sink, None)
        else:
            mask = torch.zeros(tokens, n, dtype=torch.bool).scatter_(1, union_pos, True)
            out = function.apply(x, logits if gated else None, rows.clone().requires_grad_(), mask, sink)
        out.backward(grad_out)
        results.append((out.detach(), x.grad.clone(), None if logits.grad is None else logits.grad.clone(), sunk[0]))
    for top_k_result, masked_result in zip(*results, strict=True):
        if masked_result is None:
            assert top_k_result is None
        else:
            torch.testing.assert_close(top_k_result, masked_result, rtol=1e-5, atol=1e-6)


class _StreamsOfAnotherDevice(CPU_Accelerator):
    """DeepSpeed's CPU accelerator posing as a GPU's: streams and events exist, for device type "cuda"."""

    def device_name(self, device_index: int | None = None) -> str:
        return "cuda"

    @property
    def Stream(self) -> Any:  # DeepSpeed's name
        return self._refuse

    @property
    def Event(self) -> Any:  # DeepSpeed's name
        return self._refuse

    @staticmethod
    def _refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a stream or event was made for CPU tensors")


def test_a_model_left_on_the_cpu_beside_a_gpu_copies_synchronously() -> None:
    """Under a GPU's accelerator a model on the CPU (e.g. a reference run) makes no stream or event: its copies are
    CPU copies (found on the H200, where it asked CUDA for a side stream on the CPU), and its gradients are the same."""
    x = torch.randn(8, DIM)

    def row_grads() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(3)
        adapter = make_adapter(num_neurons=256, top_k=8, num_experts=16, n_probe=4)
        adapter(x).pow(2).sum().backward()
        adapter.collect_row_grads()
        ids, grads = adapter.store.accumulated_grads()
        order = ids.argsort()
        return ids[order], grads[order]

    expected = row_grads()
    previous = real_accelerator.ds_accelerator
    real_accelerator.ds_accelerator = _StreamsOfAnotherDevice()
    try:
        got = row_grads()
    finally:
        real_accelerator.ds_accelerator = previous
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_training_forward_that_no_sparse_adam_steps_is_named_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain loop with the routers' optimizer alone: the rows' gradients accumulate, never applied."""
    monkeypatch.setattr(meft_ds.adapter, "_warned_unstepped", False)
    batch = token_batch(batch=2, length=8)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=64, top_k=4))
        with torch.no_grad():
            model(batch)  # evaluation: nothing to step
        assert not caplog.text
        for _ in range(2):
            model(batch, labels=batch).loss.backward()
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("meft_ds: the meft adapter of layer 0 trains, but no SparseRowAdam steps its rows")

    caplog.clear()
    monkeypatch.setattr(meft_ds.adapter, "_warned_unstepped", False)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=64, top_k=4))
        meft_ds.SparseRowAdam(meft_ds.adapters(model))
        model(batch, labels=batch).loss.backward()
    assert not caplog.text
