"""Per-row bias correction: a row first touched at step t gets the update a fresh Adam makes at its step 1."""

from __future__ import annotations

import pytest
import torch

from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam
from meft_ds.config import MeftConfigError

DIM = 16
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


def make_adapter() -> SparseKeyExpertAdapter:
    adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=4), layer_index=0)
    adapter.store.values.normal_()
    return adapter


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_a_late_row_gets_a_fresh_adams_updates(backend: str) -> None:
    adapter = make_adapter()
    store = adapter.store
    optimizer = SparseRowAdam([adapter], **HYPER, backend=backend, bias_correction="per_row")
    early, late = 3, 7  # touched at every step; first touched at step 3
    references = {row: store.rows[row].clone().requires_grad_(True) for row in (early, late)}
    fresh = {row: torch.optim.AdamW([p], **HYPER, foreach=False) for row, p in references.items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        rows = [early, late] if step >= 3 else [early]
        grads = torch.randn(len(rows), 2, DIM, generator=generator)
        store.accumulate_grad(torch.tensor(rows), grads.clone())
        optimizer.step()
        for row, grad in zip(rows, grads, strict=True):
            references[row].grad = grad
            fresh[row].step()
        if step == 3:  # its first update: about lr per element, not the global step's ~3.2x lr
            moved = (store.rows[late] - references[late].detach()).abs().max()
            assert moved <= 1e-6
    for row in (early, late):
        torch.testing.assert_close(store.rows[row], references[row].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(store.exp_avg_sq[row], fresh[row].state[references[row]]["exp_avg_sq"])
    assert store.row_steps[early] == 5 and store.row_steps[late] == 3 and store.row_steps.sum() == 8


def test_global_correction_is_unchanged_and_counts_nothing() -> None:
    adapter = make_adapter()
    optimizer = SparseRowAdam([adapter], **HYPER, backend="fused")
    for _ in range(2):
        adapter.store.accumulate_grad(torch.tensor([5]), torch.ones(1, 2, DIM))
        optimizer.step()
    assert not adapter.store.row_steps.any()


def test_step_counts_are_saved_with_the_store(tmp_path) -> None:
    adapter = make_adapter()
    optimizer = SparseRowAdam([adapter], **HYPER, bias_correction="per_row")
    adapter.store.accumulate_grad(torch.tensor([2, 9]), torch.ones(2, 2, DIM))
    optimizer.step()
    adapter.store.save(tmp_path, 0)
    restored = make_adapter()
    restored.store.load(tmp_path, 0)
    assert torch.equal(restored.store.row_steps, adapter.store.row_steps)
    assert restored.store.row_steps[[2, 9]].tolist() == [1, 1]


def test_settings_are_checked() -> None:
    assert MeftConfig(bias_correction="per_row").bias_correction == "per_row"
    with pytest.raises(MeftConfigError, match=r"meft\.bias_correction: unknown mode 'row'.*'global', 'per_row'"):
        MeftConfig(bias_correction="row")
    with pytest.raises(MeftConfigError, match=r"meft\.bias_correction: 'per_row' is not supported with the NVMe"):
        MeftConfig(bias_correction="per_row", store={"device": "nvme", "nvme_path": "/tmp/x"})
    with pytest.raises(ValueError, match="unknown bias_correction"):
        SparseRowAdam([make_adapter()], bias_correction="row")
    with pytest.raises(ValueError, match="one step count, not one per row"):
        SparseRowAdam([make_adapter()], backend="deepspeed", bias_correction="per_row")
