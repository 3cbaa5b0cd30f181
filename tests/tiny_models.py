"""Tiny random causal LMs of each supported family, small enough for unit tests on two CPU cores."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 1000


def tiny_config(family: str = "llama", layers: int = 2) -> PretrainedConfig:
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, vocab_size=VOCAB)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**common)


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def token_batch(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
