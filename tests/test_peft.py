"""MEFT beside PEFT's LoRA in one model (LoRA on the attention, MEFT on the FFNs): injected into a PEFT model, both
train; each saves and reloads its own part."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model, token_batch, train_losses

import meft_ds
from meft_ds import CheckpointError
from meft_ds.export import PEFT_FOLDER

MEFT = {"num_neurons": 128, "top_k": 8, "seed": 1}
LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])


def test_meft_injected_into_a_peft_model_trains_beside_lora_and_both_reload(tmp_path: Path) -> None:
    """inject looked for the decoder layers on the PeftModel itself ("PeftModel has no nn.ModuleList at
    'model.layers'", with a fix about register_ffn), and would have frozen LoRA's parameters."""
    model = get_peft_model(tiny_model(), LORA)
    assert meft_ds.inject(model, MEFT) is model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_" in name for name in trainable) == 8 and sum(".router." in name for name in trainable) == 2
    assert len(trainable) == 10
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [adapter.store.rows.clone() for adapter in meft_ds.adapters(model)]
    sparse = meft_ds.SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = token_batch(batch=2, length=8)
    train_losses(model, [sparse, dense], batch, steps=2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed == set(trainable), "LoRA and the routers train, nothing else"
    assert all(not torch.equal(r, a.store.rows) for r, a in zip(rows, meft_ds.adapters(model), strict=True))

    meft_ds.save_adapter(model, tmp_path / "meft")  # MEFT's part; PEFT's save_pretrained writes LoRA's
    model.save_pretrained(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(meft_ds.load_adapter(tiny_model(), tmp_path / "meft"), tmp_path / "lora")
    meft_ds.MeftModel(model).save_pretrained(tmp_path / "both")  # LoRA's into both/peft
    assert {p.name for p in (tmp_path / "both" / PEFT_FOLDER).iterdir()} >= {"adapter_model.safetensors"}
    in_one_call = meft_ds.MeftModel.from_pretrained(tiny_model(), tmp_path / "both")
    assert isinstance(in_one_call.get_base_model(), PeftModel)
    with torch.no_grad():
        expected = model.eval()(input_ids=batch).logits
        assert torch.equal(reloaded.eval()(input_ids=batch).logits, expected)
        assert torch.equal(in_one_call.eval()(input_ids=batch).logits, expected)


def test_an_exported_adapter_loads_into_a_peft_model_leaving_lora_trainable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """load_adapter injected into the model inside the PEFT model, which froze LoRA's layers with it. A folder that
    also holds PEFT's adapters (MeftTrainer.save_model of a PEFT model) loads MEFT's, and says how to load the rest."""
    meft_ds.save_adapter(meft_ds.inject(tiny_model(), MEFT), tmp_path)
    model = meft_ds.load_adapter(get_peft_model(tiny_model(), LORA), tmp_path)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_" in name for name in trainable) == 8 and sum(".router." in name for name in trainable) == 2
    get_peft_model(tiny_model(), LORA).save_pretrained(tmp_path / PEFT_FOLDER)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        meft_ds.load_adapter(get_peft_model(tiny_model(), LORA), tmp_path)  # PEFT's part loaded by the caller
        assert not caplog.text
        meft_ds.load_adapter(tiny_model(), tmp_path)
    assert "also holds PEFT adapters" in caplog.text and "MeftModel.from_pretrained(base_model, " in caplog.text


def test_routers_frozen_by_get_peft_model_are_named_when_the_engine_is_made(caplog: pytest.LogCaptureFixture) -> None:
    """get_peft_model after inject freezes every parameter PEFT did not add, the routers too: they did not train,
    silently."""
    model = get_peft_model(meft_ds.inject(tiny_model(), MEFT), LORA)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 0},
    }
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        meft_ds.initialize(model=model, config=config)
    assert "the routers of layers [0, 1] do not require gradients, so the engine will not train them" in caplog.text


def test_lora_beside_meft_without_peft_installed_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meft_ds.save_adapter(meft_ds.inject(tiny_model(), MEFT), tmp_path)
    get_peft_model(tiny_model(), LORA).save_pretrained(tmp_path / PEFT_FOLDER)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"peft package is not installed\. Fix: pip install peft\.$"):
        meft_ds.MeftModel.from_pretrained(model, tmp_path)
    assert not meft_ds.adapters(model), "nothing loaded"
