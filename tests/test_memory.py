"""The stores' memory is estimated before allocation, and a configuration that does not fit is refused."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

import meft_ds
from meft_ds import MeftConfig, MeftConfigError
from meft_ds.memory import check_store_fits, store_bytes


def test_estimate_counts_rows_moments_and_accumulator() -> None:
    # LLaMA-7B, r = 8464: 32 layers x 4 tensors x 8464 x 2 x 4096 x 4 bytes
    assert store_bytes(32, 8464, 4096) == 32 * 4 * 8464 * 2 * 4096 * 4
    model = meft_ds.inject(tiny_model(), {"num_neurons": 128, "top_k": 8})
    allocated = sum(a.store.nbytes for a in meft_ds.adapters(model))
    assert allocated == store_bytes(2, 128, 64) * 3 // 4, "rows + moments allocated; accumulator only when touched"


def test_too_large_store_is_refused_with_a_configuration_that_fits() -> None:
    config = MeftConfig(num_neurons=65536, top_k=64)
    available = 3 * 2**30
    with pytest.raises(MeftConfigError) as error:
        check_store_fits(config, num_layers=32, dim=4096, available=available)
    message = str(error.value)
    assert message.startswith("meft.num_neurons:") and "GiB" in message and "Fix: use num_neurons=" in message
    suggested = int(message.split("num_neurons=")[1].split()[0])
    check_store_fits(MeftConfig(num_neurons=suggested, top_k=64), num_layers=32, dim=4096, available=available)


def test_inject_checks_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meft_ds.memory.available_bytes", lambda: 1000)
    model = tiny_model()
    with pytest.raises(MeftConfigError, match=r"need .* GiB of CPU memory"):
        meft_ds.inject(model, {"num_neurons": 128, "top_k": 8})
    assert not meft_ds.adapters(model) and all(p.requires_grad for p in model.parameters())
