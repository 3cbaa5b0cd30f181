"""What a memory plan knows of the base model, without its weights: its config (a built-in name, a config.json, a
folder, a .gguf file or a hub id) and, from an instance on the meta device, its parameter count and what its
training forward keeps for backward (:mod:`meft_ds.activations`; :mod:`meft_ds.plan` adds everything else).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.activations import SavedBytes, analytic_saved_bytes, measure_saved_bytes
from meft_ds.config import MeftConfig
from meft_ds.inject import text_config
from meft_ds.models import BUILTIN_MODEL, ModelLoadError, names_builtin_model, not_loadable, resolve_model

# Known configurations, so that a plan needs no hub: LLaMA-2-7B's config.json, and the built-in SmolLM2 GGUF's.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    BUILTIN_MODEL: dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                        rope_theta=100000.0, tie_word_embeddings=True),
}  # fmt: skip


def load_model_config(source: Any, *, weights: bool = False) -> Any:
    """A ``PretrainedConfig`` from a built-in name, a config.json, a folder, a .gguf file or a hub id (no weights).
    ``weights``: the model itself is to be loaded next (``launch/train.py``), so a source without weights (a
    config.json, a built-in configuration other than the built-in model) is refused, and the fixes say what loads."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    without_weights = (source in BUILTIN_CONFIGS and not names_builtin_model(source)) or str(source).endswith(".json")
    if weights and without_weights:
        raise ModelLoadError(
            f"--model {source}: a configuration without weights, which only the memory plan (launch/plan.py) takes. "
            f"Fix: pass a local folder (save_pretrained) or .gguf file, or a hub id; the built-in default needs no "
            f"hub (--model {BUILTIN_MODEL})."
        )
    if source in BUILTIN_CONFIGS:
        return LlamaConfig(**BUILTIN_CONFIGS[source])
    if str(source).endswith(".json"):
        if not Path(source).is_file():
            raise ModelLoadError(f"--model {source}: no such file. Fix: pass an existing config.json or its folder.")
        folder, gguf_file = str(source), None
    else:
        folder, gguf_file = resolve_model(str(source))
    try:
        return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as error:
        if weights:
            raise not_loadable(str(source), error) from error
        raise ModelLoadError(
            f"--model {source}: not a built-in name ({', '.join(BUILTIN_CONFIGS)}), a local config.json, folder or "
            f".gguf file, nor a config on the hub ({type(error).__name__}: {str(error).splitlines()[0][:160]}). Fix: "
            "pass a local config.json (e.g. from the model's hub page), or one of the built-in names."
        ) from error


@dataclass(frozen=True)
class ModelFacts:
    """What the plan knows of the base model: counted and measured on meta (``measured=False``: estimated)."""

    name: str
    dim: int
    num_layers: int
    adapters: int
    vocab: int
    params: int
    base_bytes: int
    saved: SavedBytes
    measured: bool


def model_facts(
    model: nn.Module, meft: MeftConfig, batch: int, seq_len: int, name: str = "", *, zero3_linear: bool = False
) -> ModelFacts:
    """Count the meta ``model``'s parameters and measure its training forward at ``batch x seq_len`` (its linears as
    ZeRO-3 runs them, where ``zero3_linear``)."""
    config = text_config(model.config)  # a multimodal model's decoder
    adapted = meft.resolve_layers(config.num_hidden_layers)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    try:
        saved, measured = measure_saved_bytes(model, ids, adapted, zero3_linear=zero3_linear), True
    except (NotImplementedError, RuntimeError, TypeError):
        tokens = batch * seq_len
        saved, measured = analytic_saved_bytes(config, model.dtype, tokens, adapted, zero3_linear=zero3_linear), False
    tensors = [*model.parameters(), *model.buffers()]  # parameters() lists tied weights once
    return ModelFacts(
        name or model.config.name_or_path or model.config.model_type, config.hidden_size, config.num_hidden_layers,
        len(adapted),
        config.vocab_size, sum(p.numel() for p in model.parameters()), sum(x.nbytes for x in tensors), saved, measured,
    )  # fmt: skip
