"""meft_ds: memory-efficient fine-tuning with sparse key-expert adapters in CPU memory, as a DeepSpeed plugin."""

from __future__ import annotations

from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.background import fit_background
from meft_ds.clipping import clip_grad_norm_
from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.distributed import exchange_row_grads
from meft_ds.engine import attach, initialize
from meft_ds.export import save_adapter
from meft_ds.export_load import load_adapter
from meft_ds.host_memory import keep_freed_host_memory
from meft_ds.inference import InferenceOnlyError, for_inference, for_training
from meft_ds.inject import (
    UnsupportedModelError,
    adapters,
    disable_adapters,
    inject,
    register_ffn,
    supported_model_types,
)
from meft_ds.meft_model import MeftModel
from meft_ds.ops import read_cpu_info_once
from meft_ds.plugin import MeftPlugin
from meft_ds.sparse_adam import NonFiniteGradientError, SparseRowAdam
from meft_ds.stats import sum_stats
from meft_ds.store import CheckpointError

read_cpu_info_once()  # DeepSpeed reads the CPU afresh (~1 s each) every time it builds or loads a CPU op


def stats(model: nn.Module) -> dict[str, int]:
    """Cumulative counters summed over the model's adapters: ``bytes_to_device``, ``bytes_to_host``,
    ``row_bytes_to_device``, ``row_bytes_to_host``, ``rows_fetched``, ``rows_updated``, ``forward_calls``."""
    return sum_stats([a.traffic for a in adapters(model)])


__all__ = [
    "CheckpointError",
    "InferenceOnlyError",
    "MeftConfig",
    "MeftConfigError",
    "MeftModel",
    "MeftPlugin",
    "NonFiniteGradientError",
    "SparseKeyExpertAdapter",
    "SparseRowAdam",
    "UnsupportedModelError",
    "adapters",
    "attach",
    "clip_grad_norm_",
    "disable_adapters",
    "exchange_row_grads",
    "fit_background",
    "for_inference",
    "for_training",
    "initialize",
    "inject",
    "keep_freed_host_memory",
    "load_adapter",
    "register_ffn",
    "save_adapter",
    "stats",
    "supported_model_types",
]
