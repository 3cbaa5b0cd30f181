"""meft_ds.baselines, the methods MEFT is compared with (launch/train.py --method, the benchmarks): the dense parallel
adapter's formula and placement, LoRA's targets (the FFNs' linear layers, every linear layer, names, a mixture of
experts' stacked weights)."""

from __future__ import annotations

import types

import pytest
import torch
from tiny_models import tiny_model, token_batch, train_losses

from meft_ds.baselines import (
    DenseParallelAdapter,
    LoraTargets,
    add_dense_adapters,
    ffn_lora_targets,
    prepare_baseline,
    resolve_lora_targets,
)
from meft_ds.config import MeftConfigError
from meft_ds.inject import UnsupportedModelError


def test_dense_parallel_adapter_is_the_formula() -> None:
    torch.manual_seed(0)
    layer = DenseParallelAdapter(8, 32)
    hidden = torch.randn(5, 8)
    assert torch.equal(layer(hidden), torch.zeros(5, 8))  # values start at zero
    with torch.no_grad():
        layer.values.normal_()
    expected = torch.relu(hidden @ layer.keys.T) @ layer.values
    torch.testing.assert_close(layer(hidden), expected)
    model = tiny_model()
    tokens = token_batch(2, 16)
    base_logits = model(tokens).logits
    params = add_dense_adapters(model, 32)
    assert sum(p.numel() for p in params) == 2 * (2 * 32 * 64)
    assert [p for p in model.parameters() if p.requires_grad] == params
    torch.testing.assert_close(model(tokens).logits, base_logits)  # V = 0: the base model's output
    gpt2 = tiny_model("gpt2")  # its FFNs found where inject finds them (transformer.h[i].mlp), not model.layers
    assert sum(p.numel() for p in add_dense_adapters(gpt2, 32)) == 2 * (2 * 32 * gpt2.config.hidden_size)
    toy = torch.nn.Linear(2, 2)
    toy.config = types.SimpleNamespace(model_type="toy", hidden_size=2)
    with pytest.raises(UnsupportedModelError, match="model_type 'toy'"):
        add_dense_adapters(toy, 8)


def test_lora_targets_the_linear_layers_of_the_ffns_meft_sits_beside() -> None:
    llama, gpt2 = tiny_model(), tiny_model("gpt2")
    assert ffn_lora_targets(llama) == LoraTargets(
        [f"model.layers.{i}.mlp.{name}" for i in (0, 1) for name in ("gate_proj", "up_proj", "down_proj")]
    )
    targets = ffn_lora_targets(gpt2).modules
    assert targets == [f"transformer.h.{i}.mlp.{name}" for i in (0, 1) for name in ("c_fc", "c_proj")]
    lora = prepare_baseline("lora", gpt2, lora_r=4, adapter_neurons=0)  # Conv1D layers (GPT-2's), not attn.c_proj
    trained = {name.split(".lora_")[0] for name, p in lora.named_parameters() if p.requires_grad}
    assert trained == {f"base_model.model.{name}" for name in targets}


def test_lora_targets_by_name() -> None:
    """--lora_targets: where MEFT sits (ffn, the default), every linear layer but the head, or names."""
    llama = tiny_model()
    assert resolve_lora_targets(llama) == ffn_lora_targets(llama)
    every = resolve_lora_targets(llama, "all-linear").modules
    assert len(every) == 2 * 7 and "lm_head" not in every and "model.layers.1.self_attn.o_proj" in every
    lora = prepare_baseline("lora", llama, lora_r=4, adapter_neurons=0, lora_targets=" q_proj, v_proj")
    trained = {name.split(".lora_")[0] for name, p in lora.named_parameters() if p.requires_grad}
    assert trained == {f"base_model.model.model.layers.{i}.self_attn.{w}" for i in (0, 1) for w in ("q_proj", "v_proj")}
    with pytest.raises(MeftConfigError, match=r"'q_proj,query': no linear layer named query.*names from down_proj, "):
        resolve_lora_targets(tiny_model(), "q_proj,query")


def test_the_dense_adapter_adds_to_a_moe_block_that_returns_its_router_scores() -> None:
    """gpt-oss's MoE block returns (hidden states, router scores): the adapter's output goes to the hidden states."""
    model, batch = tiny_model("gpt_oss"), token_batch()
    with torch.no_grad():
        base = model(batch).logits
    adapter_weights = add_dense_adapters(model, 16)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, base)  # V = 0
    losses = train_losses(model, [torch.optim.AdamW(adapter_weights, lr=1e-2)], batch)
    assert losses[-1] < losses[0]


def test_lora_on_a_mixture_of_experts_adapts_every_expert() -> None:
    """Mixtral's experts are stacked (experts, out, in) weights, no linear layers: LoRA had no target in its FFNs."""
    mixtral = tiny_model("mixtral")
    experts = mixtral.config.num_local_experts
    targets = ffn_lora_targets(mixtral)
    assert targets.parameters == [
        f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")
    ]
    batch = token_batch()
    with torch.no_grad():
        base = mixtral(batch).logits
    lora = prepare_baseline("lora", mixtral, lora_r=4, adapter_neurons=0)
    with torch.no_grad():
        assert torch.equal(lora(batch).logits, base)  # B = 0
    trainable = {name: p for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in name and "lora_" in name for name in trainable)
    per_expert = (64 + 2 * 128) + (128 + 64)  # A and B of rank 1: gate_up (in 64, out 2 x 128), down (in 128, out 64)
    assert sum(p.numel() for p in trainable.values()) == 2 * experts * 4 * per_expert  # 2 layers, rank 4
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = train_losses(lora, [optimizer], batch)
    assert losses[-1] < losses[0]


def test_llama4_s_moe_layers_take_lora_and_the_dense_adapter() -> None:
    """Llama 4's MoE block returns its tokens flattened with its router's logits, and its router is a linear layer
    whose forward returns a tuple: LoRA adapts the dense layer, the shared expert and the stacked experts, not the
    router (PEFT's LoRA layer failed on its tuple), and the dense adapter adds in the block's output shape."""
    model, batch = tiny_model("llama4_text"), token_batch()
    targets = ffn_lora_targets(model)
    assert targets.modules == [
        *(f"model.layers.0.feed_forward.{w}" for w in ("gate_proj", "up_proj", "down_proj")),
        *(f"model.layers.1.feed_forward.shared_expert.{w}" for w in ("gate_proj", "up_proj", "down_proj")),
    ]
    assert targets.parameters == [f"model.layers.1.feed_forward.experts.{w}" for w in ("gate_up_proj", "down_proj")]
    with torch.no_grad():
        base = model(batch).logits
    for method in ("lora", "parallel_adapter"):
        adapted = prepare_baseline(method, tiny_model("llama4_text"), lora_r=4, adapter_neurons=16)
        with torch.no_grad():
            assert torch.equal(adapted(batch).logits, base)  # B = 0, V = 0
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        losses = train_losses(adapted, [torch.optim.AdamW(trainable, lr=1e-2)], batch)
        assert losses[-1] < losses[0], method
