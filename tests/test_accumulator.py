"""The row-gradient accumulator: packed, never reallocated, written once by the backward, finiteness known from the
writes; and a skipped step touches nothing."""

from __future__ import annotations

import pytest
import torch

import meft_ds.accumulator
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.accumulator import RowGradAccumulator

DIM = 16


@pytest.fixture(params=["kernel", "torch"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accumulator's own tests run on the CPU kernel and on the pure-torch code that replaces it where the kernels
    cannot be built (``MEFT_DS_TORCH_FALLBACK=1``)."""
    if request.param == "torch":
        monkeypatch.setattr(meft_ds.accumulator, "cpu_kernels", lambda: None)


def make_adapter(**overrides) -> SparseKeyExpertAdapter:
    settings = {"num_neurons": 256, "top_k": 8, "num_experts": 16, "n_probe": 4, **overrides}
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(**settings), layer_index=0)
    adapter.store.values.normal_(0, 0.1)
    return adapter


@pytest.mark.usefixtures("implementation")
def test_rows_are_summed_by_id_in_one_buffer_and_read_in_first_touch_order() -> None:
    accumulator = RowGradAccumulator(50, DIM)
    dense = torch.zeros(50, 2, DIM)
    generator = torch.Generator().manual_seed(0)
    buffer = None
    for ids in ([30, 4, 12], [4, 40, 1], [49, 30]):  # new rows every time, out of order
        ids = torch.tensor(ids)
        grads = torch.randn(ids.numel(), 2, DIM, generator=generator)
        accumulator.add(ids, grads)
        dense[ids] += grads
        buffer = buffer or accumulator.grads.data_ptr()
        assert accumulator.grads.data_ptr() == buffer, "accumulating never reallocates"
    ids, grads = accumulator.view()
    assert torch.equal(ids, torch.tensor([30, 4, 12, 40, 1, 49]))  # nothing moves once written
    torch.testing.assert_close(grads, dense[ids], rtol=0, atol=1e-6)
    grads.mul_(2)  # a view: in-place changes stay
    assert torch.equal(accumulator.view()[1], grads)


@pytest.mark.usefixtures("implementation")
def test_a_buffer_without_room_for_every_row_grows_keeping_what_it_holds() -> None:
    accumulator = RowGradAccumulator(100, DIM, capacity=0)  # as the NVMe tier's
    first, second = torch.randn(2, 2, DIM), torch.randn(14, 2, DIM)
    accumulator.add(torch.tensor([50, 60]), first)
    accumulator.add(torch.arange(10, 24), second)
    assert accumulator.grads.shape[0] < 100
    ids, grads = accumulator.view()
    assert torch.equal(ids, torch.cat([torch.tensor([50, 60]), torch.arange(10, 24)]))
    assert torch.equal(grads, torch.cat([first, second]))


@pytest.mark.usefixtures("implementation")
def test_flags_select_rows_and_low_precision_grads_are_widened_exactly() -> None:
    accumulator = RowGradAccumulator(10, DIM)
    grads = torch.randn(3, 2, DIM).bfloat16()
    accumulator.add(torch.tensor([2, 5, 7]), grads, torch.tensor([True, False, True]))
    ids, got = accumulator.view()
    assert torch.equal(ids, torch.tensor([2, 7]))
    assert torch.equal(got, grads[[0, 2]].float())


@pytest.mark.usefixtures("implementation")
def test_finiteness_is_known_from_the_writes_and_outside_writes_are_rechecked() -> None:
    accumulator = RowGradAccumulator(10, DIM)
    accumulator.add(torch.tensor([1, 2]), torch.full((2, 2, DIM), 3e38))
    assert accumulator.all_finite()
    accumulator.add(torch.tensor([2]), torch.full((1, 2, DIM), 3e38))  # the sum overflows to inf
    assert not accumulator.all_finite()
    accumulator.clear()
    accumulator.add(torch.tensor([3]), torch.ones(1, 2, DIM))
    assert accumulator.all_finite()
    accumulator.view()[1][0, 1, 5] = float("nan")  # a write from outside: seen through the version counter
    assert not accumulator.all_finite()
    accumulator.clear()
    assert accumulator.view() is None and accumulator.all_finite()


def test_the_backward_writes_each_touched_row_once_into_the_store() -> None:
    adapter = make_adapter()
    store = adapter.store
    x = torch.randn(12, DIM)
    grad_out = torch.randn(12, DIM)
    grad_out[8:] = 0.0  # "padding" tokens: the rows only they chose get no gradient
    adapter(x).backward(grad_out)
    adapter.collect_row_grads()
    buffer = store.grad_accumulator.grads.data_ptr()
    ids, grads = store.accumulated_grads()

    # the reference: the same rows through the dense masked function, all of U handed over with flags
    reference = make_adapter()
    reference.store.rows.copy_(store.rows)
    reference.router.load_state_dict(adapter.router.state_dict())
    routing = reference._route(reference._start_routing(x, reference.router(x)))
    rows = store.rows[routing.row_ids].clone().requires_grad_()
    mask = torch.zeros(12, rows.shape[0], dtype=torch.bool).scatter_(1, routing.union_pos, True)
    gate = (x @ reference.router.weight.T).index_select(1, routing.row_ids // adapter.config.expert_size)
    handed = []
    from meft_ds.adapter import MaskedAdapterFunction

    MaskedAdapterFunction.apply(x, gate, rows, mask, lambda g: handed.append(g)).backward(grad_out)
    expected = handed[0]
    has_grad = expected.flatten(1).ne(0).any(dim=1)
    assert 0 < has_grad.sum() < routing.row_ids.numel(), "some fetched rows must have no gradient"
    assert torch.equal(ids, routing.row_ids[has_grad])
    torch.testing.assert_close(grads, expected[has_grad], rtol=1e-5, atol=1e-6)

    SparseRowAdam([adapter], lr=1e-2).step()
    adapter(x).backward(grad_out)
    assert store.grad_accumulator.grads.data_ptr() == buffer, "the buffer is kept across optimizer steps"


def test_bf16_rows_get_the_gradients_that_travel_in_bf16() -> None:
    fp32, bf16 = make_adapter(), make_adapter(row_dtype="bf16")
    bf16.store.rows.copy_(fp32.store.rows)
    x = torch.randn(6, DIM)
    for adapter in (fp32, bf16):
        adapter(x).pow(2).sum().backward()
        adapter.collect_row_grads()
    (ids, grads), (ids_bf16, grads_bf16) = fp32.store.accumulated_grads(), bf16.store.accumulated_grads()
    assert torch.equal(ids, ids_bf16)
    # routing saw bf16 hidden states in both (fp32 rows travel... in fp32): compare with the rounded fp32 gradients
    torch.testing.assert_close(grads_bf16, grads.bfloat16().float(), rtol=1e-2, atol=1e-3)
    assert torch.equal(grads_bf16, grads_bf16.bfloat16().float()), "values are representable in bf16"


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_a_nonfinite_gradient_skips_the_step_leaving_rows_and_moments_bit_identical(backend: str) -> None:
    adapter = make_adapter()
    store = adapter.store
    optimizer = SparseRowAdam([adapter], lr=1e-2, backend=backend)
    x = torch.randn(8, DIM)
    adapter(x).pow(2).sum().backward()
    optimizer.step()  # moments are nonzero from here on
    before = [t.clone() for t in (store.rows, store.exp_avg, store.exp_avg_sq, store.row_steps)]
    grad_out = torch.randn(8, DIM)
    grad_out[3, 2] = float("inf")
    adapter(x).backward(grad_out)
    optimizer.step()
    assert optimizer.nonfinite_steps == 1 and optimizer.global_step == 1
    for now, then in zip((store.rows, store.exp_avg, store.exp_avg_sq, store.row_steps), before, strict=True):
        assert torch.equal(now, then)
    assert store.accumulated_grads() is None
