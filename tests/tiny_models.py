"""Tiny random causal LMs of each supported family, small enough for unit tests on two CPU cores."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from meft_ds.data import facts_dataset

VOCAB = 1000
# zero_optimization.reduce_bucket_size for tests' engines. A ZeRO-3 engine reserves its bucket up front (DeepSpeed's
# default 5e8 elements: 2 GB of fp32, untouched, so committed memory rather than resident), and a test session's
# engines are not freed: two dozen of them took the pytest process past the machine's memory, and its next fork of a
# subprocess failed (ENOMEM).
SMALL_BUCKET = 1_000_000
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# what a family's tiny config needs beyond the common sizes: a head size or rotary size that fits them
_EXTRA: dict[str, dict[str, int]] = {
    "gptj": {"rotary_dim": 8}, "helium": {"head_dim": 16}, "gemma3": {"head_dim": 16}, "ministral": {"head_dim": 16},
    "hunyuan_v1_dense": {"head_dim": 16}, "hunyuan_v1_moe": {"head_dim": 16},
    "lfm2_moe": {"num_dense_layers": 1, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    # a dense layer, then a MoE one
    "llama4_text": {
        "head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 4, "interleave_moe_layer_step": 2,
    },
}  # fmt: skip
_EXTRA["llama4"] = _EXTRA["llama4_text"]
# a dense layer, then a MoE one with a shared expert; DeepSeek's multi-head latent attention in small ranks
_DEEPSEEK_MOE = {
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}  # fmt: skip
_MLA = {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
_EXTRA |= {family: _DEEPSEEK_MOE | _MLA for family in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")}
_EXTRA["dots1"] = _DEEPSEEK_MOE | {"head_dim": 16}
_EXTRA["minimax_m2"] = {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}
_EXTRA["minicpm3"] = _MLA
_EXTRA["qwen3_5_text"] = {
    "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
}  # fmt: skip
_MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 8, "mamba_n_groups": 1}
_EXTRA["bamba"] = _MAMBA2 | {"attn_layer_indices": [1]}
_EXTRA["granitemoehybrid"] = _MAMBA2 | {
    "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 64,
}  # fmt: skip
_EXTRA["codegen"] = {"rotary_dim": 8}
_EXTRA["gpt_neo"] = {"attention_types": [[["global", "local"], 1]]}
_EXTRA["gemma3n_text"] = {
    "head_dim": 16, "num_kv_shared_layers": 0, "laurel_rank": 8, "altup_num_inputs": 2,
    "hidden_size_per_layer_input": 8, "activation_sparsity_pattern": [0.0, 0.0],
}  # fmt: skip
# hybrids: a linear-attention (gated DeltaNet) or Mamba layer, then an attention one; Jamba's FFNs dense, then MoE
_EXTRA["qwen3_next"] = {
    "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
}  # fmt: skip
_EXTRA["jamba"] = {
    "num_experts": 4, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2,
    "attn_layer_offset": 1, "mamba_d_state": 8, "mamba_dt_rank": 8,
}  # fmt: skip
_LAYER_TYPES = {
    "lfm2": ("conv", "full_attention"), "lfm2_moe": ("conv", "full_attention"), "lfm3": ("conv", "full_attention"),
    "qwen3_next": ("linear_attention", "full_attention"), "qwen3_5_text": ("linear_attention", "full_attention"),
    "granitemoehybrid": ("mamba", "attention"), "gemma3n_text": ("sliding_attention", "full_attention"),
}  # fmt: skip
# multimodal families: their vision tower's tiny config (the language model gets the common sizes)
_MULTIMODAL: dict[str, dict[str, int]] = {
    "gemma3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14),
    # (AutoModelForCausalLM builds its text model, llama4_text, as from a Llama 4 checkpoint)
    "llama4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
}  # fmt: skip


def tiny_config(family: str = "llama", layers: int = 2) -> PretrainedConfig:
    """A tiny config of ``family`` (a ``model_type``): hidden size 64, 4 heads, ``VOCAB`` tokens."""
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
    if family in _MULTIMODAL:  # a language model inside: the common sizes are its text config's
        text = {**common, **_EXTRA.get(family, {})}
        return AutoConfig.for_model(family, text_config=text, vision_config=_MULTIMODAL[family])
    if family in _LAYER_TYPES:  # a type per layer, in turn
        common["layer_types"] = (list(_LAYER_TYPES[family]) * layers)[:layers]
    config = AutoConfig.for_model(family, **common, **_EXTRA.get(family, {}))
    # some families' default special tokens lie past the tiny vocabulary
    for name, tiny_id in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        ids = getattr(config, name, None)
        if any(i >= VOCAB for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)):
            setattr(config, name, tiny_id)
    return config


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def token_batch(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_losses(model: torch.nn.Module, optimizers: list, batch: torch.Tensor, steps: int = 4) -> list[float]:
    """``steps`` training steps on ``batch`` (its tokens as labels), every optimizer stepping; the losses."""
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def word_tokenizer(*, chat: bool) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (vocabulary < 1000, the tiny models' size) trained offline on the facts
    prompts; with ``chat`` a ChatML template whose end-of-turn token is EOS, else a plain EOS and no template."""
    texts = [f"Question: {e.prompt}\nAnswer: {e.answers[0]}" for e in facts_dataset() + facts_dataset("eval")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=900, special_tokens=special, initial_alphabet=alphabet)
    )
    if chat:
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=CHATML)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
