"""SparseRowAdam: AdamW on touched rows only; untouched rows and moments stay bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.sparse_adam
from meft_ds import CheckpointError, MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.sparse_adam import adamw_torch_

DIM = 16
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
BACKENDS = ["fused", "deepspeed", "torch"]


def make_adapter() -> SparseKeyExpertAdapter:
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=4), layer_index=0)
    adapter.store.values.normal_()
    return adapter


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_adamw_on_touched_rows_and_leaves_others_bit_identical(backend: str) -> None:
    adapter = make_adapter()
    store = adapter.store
    touched = torch.tensor([3, 10, 11, 40])
    untouched = torch.tensor([i for i in range(64) if i not in touched.tolist()])
    before = [t.clone() for t in (store.rows, store.exp_avg, store.exp_avg_sq)]

    reference = store.rows[touched].clone().requires_grad_(True)
    torch_adamw = torch.optim.AdamW([reference], **HYPER, foreach=False)
    optimizer = SparseRowAdam([adapter], **HYPER, backend=backend)
    assert optimizer.backend == backend

    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        grads = torch.randn(4, 2, DIM, generator=generator)
        store.accumulate_grad(touched, grads.clone())
        optimizer.step()
        optimizer.zero_grad()
        reference.grad = grads
        torch_adamw.step()

    assert ((store.rows[touched] - reference.detach()).abs().max() <= 1e-5).item()
    torch.testing.assert_close(store.exp_avg[touched], torch_adamw.state[reference]["exp_avg"], rtol=0, atol=1e-6)
    for now, then in zip((store.rows, store.exp_avg, store.exp_avg_sq), before, strict=True):
        assert torch.equal(now[untouched], then[untouched])
    assert adapter.traffic.rows_updated == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_rows_use_global_step_bias_correction(backend: str) -> None:
    """A row touched only at steps 2 and 4 is updated twice, each time with the global step's bias correction."""
    adapter = make_adapter()
    store = adapter.store
    optimizer = SparseRowAdam([adapter], **HYPER, backend=backend)
    row = store.rows[7].clone()
    exp_avg, exp_avg_sq = torch.zeros_like(row), torch.zeros_like(row)
    for step in range(1, 5):
        if step % 2 == 0:
            grad = torch.full((1, 2, DIM), float(step))
            store.accumulate_grad(torch.tensor([7]), grad.clone())
            adamw_torch_(
                row,
                grad[0],
                exp_avg,
                exp_avg_sq,
                step=step,
                lr=HYPER["lr"],
                beta1=0.9,
                beta2=0.99,
                eps=HYPER["eps"],
                weight_decay=HYPER["weight_decay"],
            )
        snapshot = store.rows[7].clone()
        optimizer.step()
        if step % 2:
            assert torch.equal(store.rows[7], snapshot), "an untouched step must not move the row"
    torch.testing.assert_close(store.rows[7], row, rtol=0, atol=1e-6)
    torch.testing.assert_close(store.exp_avg_sq[7], exp_avg_sq, rtol=1e-6, atol=0)


def test_all_backends_agree() -> None:
    adapters = [make_adapter() for _ in BACKENDS]
    for adapter in adapters[1:]:
        adapter.store.rows.copy_(adapters[0].store.rows)
    optimizers = [SparseRowAdam([a], **HYPER, backend=b) for a, b in zip(adapters, BACKENDS, strict=True)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randperm(64, generator=generator)[:9].sort().values
        grads = torch.randn(9, 2, DIM, generator=generator)
        for adapter, optimizer in zip(adapters, optimizers, strict=True):
            adapter.store.accumulate_grad(ids, grads.clone())
            optimizer.step()
    for adapter in adapters[1:]:
        torch.testing.assert_close(adapter.store.rows, adapters[0].store.rows, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.store.exp_avg_sq, adapters[0].store.exp_avg_sq, rtol=1e-5, atol=0)


def test_gradient_accumulation_matches_one_big_batch() -> None:
    big, accumulated = make_adapter(), make_adapter()
    accumulated.store.rows.copy_(big.store.rows)
    accumulated.router.load_state_dict(big.router.state_dict())
    opt_big = SparseRowAdam([big], **HYPER, backend="torch")
    opt_acc = SparseRowAdam([accumulated], **HYPER, backend="torch")
    x = torch.randn(8, DIM)
    target = torch.randn(8, DIM)
    for _ in range(3):
        torch.nn.functional.mse_loss(big(x), target).backward()
        opt_big.step()
        for chunk in (slice(0, 4), slice(4, 8)):  # each half-batch loss weighted by 1/2: the mean over 8 tokens
            (torch.nn.functional.mse_loss(accumulated(x[chunk]), target[chunk]) / 2).backward()
        opt_acc.step()
    torch.testing.assert_close(accumulated.store.rows, big.store.rows, rtol=0, atol=1e-6)


def test_lr_scheduler_drives_the_learning_rate() -> None:
    optimizer = SparseRowAdam([make_adapter()], lr=1.0, backend="torch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.125


def plain_loop(steps: int, *, resume_from: Path | None = None, save_to: Path | None = None) -> torch.nn.Module:
    """A tiny model trained by the README's plain loop, saved with torch.save of the state dicts, or resumed from
    them (the routers and their AdamW from ``model``/``dense``, the rows and their moments from ``sparse``)."""
    model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=64, top_k=4, seed=1))
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if resume_from is not None:
        state = torch.load(resume_from, weights_only=True)
        model.load_state_dict(state["model"])
        dense.load_state_dict(state["dense"])
        sparse.load_state_dict(state["sparse"])
    for step in range(sparse.global_step, steps):
        batch = token_batch(batch=2, length=8, seed=step)
        model(batch, labels=batch).loss.backward()
        for optimizer in (sparse, dense):
            optimizer.step()
            optimizer.zero_grad()
        if save_to is not None and step + 1 == steps // 2:
            state = {"model": model.state_dict(), "dense": dense.state_dict(), "sparse": sparse.state_dict()}
            torch.save(state, save_to)
    return model


def test_a_plain_loop_resumes_from_the_optimizers_state_dict(tmp_path: Path) -> None:
    """The rows are not parameters: the model's state_dict never held them, and the sparse Adam's held its
    hyperparameters alone, so a plain loop (or Accelerate's save_state) resumed with untrained rows, silently."""
    straight = plain_loop(6, save_to=tmp_path / "state.pt")
    resumed = plain_loop(6, resume_from=tmp_path / "state.pt")
    for a, b in zip(meft_ds.adapters(straight), meft_ds.adapters(resumed), strict=True):
        assert torch.equal(a.store.rows, b.store.rows) and torch.equal(a.store.exp_avg_sq, b.store.exp_avg_sq)
        assert torch.equal(a.router.weight, b.router.weight)
    state = torch.load(tmp_path / "state.pt", weights_only=True)["sparse"]
    other = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=128, top_k=4))
    rows = other.meft_adapters["0"].store.rows.clone()
    with pytest.raises(CheckpointError, match=r"saved rows \(64, 2, 64\) do not fit this layer's \(128, 2, 64\)"):
        SparseRowAdam(meft_ds.adapters(other)).load_state_dict(state)
    assert torch.equal(other.meft_adapters["0"].store.rows, rows), "checked before anything loads"


def test_state_dict_round_trip_keeps_global_step() -> None:
    adapter = make_adapter()
    optimizer = SparseRowAdam([adapter], lr=0.5, backend="torch")
    optimizer.step()
    optimizer.step()
    restored = SparseRowAdam([adapter], lr=0.1, backend="torch")
    restored.load_state_dict(optimizer.state_dict())
    assert restored.global_step == 2 and restored.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -1.0}, "lr >= 0"), ({"betas": (0.9, 1.0)}, "betas < 1"), ({"backend": "cuda"}, "unknown backend")],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseRowAdam([make_adapter()], **kwargs)


def test_needs_adapters() -> None:
    with pytest.raises(ValueError, match="got no adapters"):
        SparseRowAdam([])


def test_nonfinite_row_gradients_skip_the_step_and_abort_when_persistent() -> None:
    adapter = make_adapter()
    store = adapter.store
    optimizer = SparseRowAdam([adapter], lr=0.1, backend="torch", max_nonfinite_steps=2)
    before = [t.clone() for t in (store.rows, store.exp_avg, store.exp_avg_sq)]
    bad = torch.zeros(1, 2, DIM)
    bad[0, 1, 3] = float("nan")
    store.accumulate_grad(torch.tensor([5]), bad)
    optimizer.step()
    assert optimizer.nonfinite_steps == 1 and optimizer.global_step == 0
    assert store.accumulated_grads() is None, "the poisoned gradients are dropped"
    for now, then in zip((store.rows, store.exp_avg, store.exp_avg_sq), before, strict=True):
        assert torch.equal(now, then)
    store.accumulate_grad(torch.tensor([5]), torch.ones(1, 2, DIM))
    optimizer.step()  # a good step resets the streak
    assert optimizer.global_step == 1
    store.accumulate_grad(torch.tensor([6]), torch.full((1, 2, DIM), float("inf")))
    optimizer.step()
    store.accumulate_grad(torch.tensor([6]), torch.full((1, 2, DIM), float("inf")))
    with pytest.raises(meft_ds.NonFiniteGradientError, match="2 optimizer steps in a row"):
        optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_nonfinite_row_of_any_adapter_skips_the_step_for_all(backend: str, bad: float) -> None:
    adapters = [make_adapter() for _ in range(3)]
    optimizer = SparseRowAdam(adapters, **HYPER, backend=backend)
    before = [[t.clone() for t in (a.store.rows, a.store.exp_avg, a.store.exp_avg_sq)] for a in adapters]
    ids = torch.tensor([2, 9, 40])
    for index, adapter in enumerate(adapters):
        grads = torch.randn(3, 2, DIM)
        if index == 1:
            grads[2, 0, 5] = bad  # one element of one row of the middle adapter
        adapter.store.accumulate_grad(ids, grads)
    optimizer.step()
    assert optimizer.nonfinite_steps == 1 and optimizer.global_step == 0
    for adapter, then in zip(adapters, before, strict=True):
        assert adapter.store.accumulated_grads() is None
        for now, was in zip((adapter.store.rows, adapter.store.exp_avg, adapter.store.exp_avg_sq), then, strict=True):
            assert torch.equal(now, was)


def test_huge_finite_gradients_are_not_taken_for_nonfinite() -> None:
    adapter = make_adapter()
    optimizer = SparseRowAdam([adapter], **HYPER, backend="fused")
    adapter.store.accumulate_grad(torch.tensor([3, 4]), torch.full((2, 2, DIM), 3e38))  # their sum overflows
    optimizer.step()
    assert optimizer.nonfinite_steps == 0 and optimizer.global_step == 1


def test_without_kernels_auto_takes_the_next_backend_and_fused_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meft_ds.sparse_adam, "cpu_kernels", lambda: None)  # as where the kernels cannot be built
    with pytest.warns(UserWarning, match="the sparse Adam uses its slower 'deepspeed' backend"):
        assert SparseRowAdam([make_adapter()]).backend == "deepspeed"
    with pytest.raises(RuntimeError, match=r"backend 'fused' could not be built\. Fix: use backend='auto'"):
        SparseRowAdam([make_adapter()], backend="fused")
