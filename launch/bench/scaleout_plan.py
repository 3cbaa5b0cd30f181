"""Experiment f's model: which model and text both parts of the experiment use (scaleout.py, scaleout_nvme.py)."""

from __future__ import annotations

from typing import Any

import torch

from bench.common import Context, Settings
from meft_ds.models import is_builtin_model

ADAPTER_LAYERS = 4  # the last layers of the model
# SmolLM2-135M's shape with 4 layers: the quick run's random model
RANDOM_LLAMA = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip


def model_plan(context: Context) -> dict[str, Any]:
    """Which model and text: the context's own model (tests, or any model a caller put there), the real SmolLM2 in
    the full run, a random model of SmolLM2's shape with random tokens in the quick run."""
    s = context.settings
    if context.model is not None and not is_builtin_model(context.model):
        return {"source": "context", "label": f"the context's model ({type(context.model).__name__})"}
    if s.step_neurons >= Settings.full().step_neurons:
        return {"source": "builtin", "label": "SmolLM2-135M-Instruct (real weights, real text)"}
    return {
        "source": {"random": RANDOM_LLAMA},
        "label": "a random LLaMA of SmolLM2-135M's shape, 4 layers, random tokens",
    }


def plan_model(context: Context, plan: dict[str, Any]) -> torch.nn.Module:
    if isinstance(plan["source"], dict):
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_LLAMA)).eval().requires_grad_(False)
    return context.fresh_model()


def plan_batches(context: Context, plan: dict[str, Any], count: int) -> list[dict[str, torch.Tensor]]:
    if isinstance(plan["source"], dict):
        generator = torch.Generator().manual_seed(0)
        shape = (context.settings.micro_batch, context.settings.seq_len)
        ids = [torch.randint(0, RANDOM_LLAMA["vocab_size"], shape, generator=generator) for _ in range(count)]
        return [{"input_ids": i, "labels": i.clone()} for i in ids]
    return context.batches()


def num_layers(context: Context, plan: dict[str, Any]) -> int:
    random = isinstance(plan["source"], dict)
    return RANDOM_LLAMA["num_hidden_layers"] if random else context.base().config.num_hidden_layers


def plan_dim(context: Context, plan: dict[str, Any]) -> int:
    return RANDOM_LLAMA["hidden_size"] if isinstance(plan["source"], dict) else context.base().config.hidden_size


def adapter_layers(total: int) -> list[int]:
    return list(range(max(0, total - ADAPTER_LAYERS), total))
