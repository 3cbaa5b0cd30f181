"""The methods MEFT is compared with, trained by the same launcher (``launch/train.py --method``): LoRA through PEFT,
the dense parallel adapter MEFT sparsifies, and full fine-tuning; and each method's device-resident training bytes,
from the memory plan's own accounting (:mod:`meft_ds.plan`).

Every method trains at the same FFNs, those :func:`meft_ds.inject` finds (LoRA: their linear layers, e.g. ``gate_proj``,
``up_proj``, ``down_proj``, and a mixture-of-experts block's expert weights; full fine-tuning: every weight), under the
same DeepSpeed engine, optimizer, schedule and ZeRO-Offload settings. :func:`load_baseline` puts an exported LoRA or
parallel adapter back onto its base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.inject import (
    FFNOutput,
    adapters,
    add_to_ffn_output,
    decoder_layers,
    ffn_input,
    locate_ffns,
    text_config,
    trainable_numel,
)
from meft_ds.plan import (
    Item,
    Setup,
    dense_trainable_items,
    device_training_bytes,
    setup_from_ds_config,
    training_items,
    with_union,
)

METHODS = ("meft", "lora", "parallel_adapter", "full")
PARALLEL_ADAPTER_FILE = "parallel_adapter.safetensors"


class DenseParallelAdapter(nn.Module):
    """The dense parallel adapter MEFT sparsifies: ``ReLU(h K^T) V`` with trainable ``K, V`` of shape ``(r, d)``,
    every neuron firing; ``V`` starts at zero (so the model starts at the base model), ``K`` at N(0, 0.02)."""

    def __init__(self, dim: int, neurons: int, *, key_init_std: float = 0.02) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(neurons, dim) * key_init_std)
        self.values = nn.Parameter(torch.zeros(neurons, dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden @ self.keys.T) @ self.values


def _add_output(
    adapter: DenseParallelAdapter, module: nn.Module, args: tuple, kwargs: dict, output: FFNOutput
) -> FFNOutput:
    return add_to_ffn_output(output, adapter(ffn_input(args, kwargs)))


def add_dense_adapters(model: nn.Module, neurons: int) -> list[nn.Parameter]:
    """``y = FFN(h) + ReLU(h K^T) V`` beside every decoder layer's FFN (where :func:`meft_ds.inject` puts MEFT's); the
    base stays frozen. Returns the adapters' parameters."""
    model.requires_grad_(False)
    location = locate_ffns(model)
    layers = decoder_layers(model, location)
    added = nn.ModuleList(DenseParallelAdapter(text_config(model.config).hidden_size, neurons) for _ in layers)
    for layer, adapter in zip(layers, added, strict=True):
        getattr(layer, location.ffn_attr).register_forward_hook(
            functools.partial(_add_output, adapter), with_kwargs=True
        )
    model.add_module("dense_adapters", added)
    return list(added.parameters())


@dataclasses.dataclass(frozen=True)
class LoraTargets:
    """What LoRA adapts in the FFNs MEFT sits beside: full names of linear layers (PEFT's ``target_modules``) and of
    mixture-of-experts blocks' stacked expert weights, ``(experts, out, in)`` tensors (its ``target_parameters``: a
    low-rank update per expert)."""

    modules: list[str]
    parameters: list[str] = dataclasses.field(default_factory=list)


def ffn_lora_targets(model: nn.Module) -> LoraTargets:
    """LoRA's targets in every FFN :func:`meft_ds.inject` adapts, so that it adapts what MEFT sits beside on every
    architecture meft_ds knows: the linear layers (LLaMA-style: ``gate_proj``, ``up_proj``, ``down_proj``; GPT-2:
    ``c_fc``, ``c_proj`` of its MLP, not those of its attention; a MoE block's router and shared experts) and a MoE
    block's stacked expert weights (Mixtral: ``experts.gate_up_proj``, ``experts.down_proj``)."""
    location = locate_ffns(model)
    ffns = {id(getattr(layer, location.ffn_attr)) for layer in decoder_layers(model, location)}
    targets = LoraTargets([])
    for name, module in model.named_modules():
        if id(module) in ffns:
            targets.modules.extend(f"{name}.{inner}" for inner, sub in module.named_modules() if _is_linear(sub))
            targets.parameters.extend(
                f"{name}.{inner}" for inner, weight in module.named_parameters() if weight.dim() == 3
            )
    return targets


def resolve_lora_targets(model: nn.Module, which: str = "ffn") -> LoraTargets:
    """LoRA's targets by name: "ffn" (:func:`ffn_lora_targets`, where MEFT sits), "all-linear" (every linear layer
    but the output head, as PEFT's), or comma-separated names of linear layers (PEFT's ``target_modules``: a name
    matches the modules whose full name ends with it, e.g. ``q_proj,v_proj``). Names no linear layer has are a
    MeftConfigError that lists the ones there."""
    if which == "ffn":
        return ffn_lora_targets(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [name for name, module in model.named_modules() if _is_linear(module) and module is not head]
    if which == "all-linear":
        return LoraTargets(linears)
    names = [name.strip() for name in which.split(",") if name.strip()]
    missing = [name for name in names if not any(f".{full}".endswith(f".{name}") for full in linears)]
    if missing or not names:
        there = sorted({full.rsplit(".", 1)[-1] for full in linears})
        raise MeftConfigError(
            f"--lora_targets {which!r}: no linear layer named {', '.join(missing) or 'at all'} in this model. Fix: use "
            f"ffn, all-linear, or names from {', '.join(there)}"
        )
    return LoraTargets(names)


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (a subclass too: Falcon's, a quantized one), or transformers' ``Conv1D`` (GPT-2's linear layers,
    weights stored transposed), which PEFT's LoRA adapts; not a MoE router that subclasses ``nn.Linear`` with a forward
    of its own (Llama 4's returns its scores and logits, a tuple PEFT's LoRA layer cannot take)."""
    if type(module).__name__ == "Conv1D":
        return True
    router = type(module).__name__.endswith("Router") and type(module).forward is not nn.Linear.forward
    return isinstance(module, nn.Linear) and not router


def add_lora(model: nn.Module, rank: int, targets: LoraTargets) -> nn.Module:
    """A PEFT ``LoraModel`` of ``model`` (alpha = 2 r, no dropout) on the ``targets``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets.modules,
        target_parameters=targets.parameters or None, bias="none",
    )  # fmt: skip
    return get_peft_model(model, config)


def prepare_baseline(
    method: str, model: nn.Module, *, lora_r: int, adapter_neurons: int, lora_targets: str = "ffn"
) -> nn.Module:
    """The model ``method`` (not "meft", which :func:`meft_ds.initialize` sets up) trains: only its trainable part
    requires gradients. LoRA adapts ``lora_targets`` (see :func:`resolve_lora_targets`)."""
    if method == "lora":
        return add_lora(model, lora_r, resolve_lora_targets(model, lora_targets))
    if method == "parallel_adapter":
        add_dense_adapters(model, adapter_neurons)
        return model
    if method == "full":
        return model.requires_grad_(True)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class TrainingBytes:
    """A run's device-resident training bytes (see :func:`meft_ds.plan.training_items`), itemised."""

    items: list[Item]

    @property
    def device(self) -> int:
        return device_training_bytes(self.items)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_bytes": self.device,
            "items": [dataclasses.asdict(item) for item in self.items if item.training and item.tier == "device"],
        }


def training_bytes(
    method: str, model: nn.Module, ds_config: dict[str, Any], *, batch_size: int, seq_len: int, world_size: int = 1,
    rows_fetched_per_layer: float | None = None, checkpointing: bool = False,
) -> TrainingBytes:  # fmt: skip
    """The device-resident training bytes of ``model`` trained by ``method`` under ``ds_config`` (resolved, as the
    engine ran it): the memory plan's items for the trainable parameters, their gradients and optimizer states
    where this ZeRO config keeps them, and for MEFT also the rows fetched and kept for backward (``|U|`` from
    ``rows_fetched_per_layer``, measured per adapter and forward of a micro-step, else the plan's uniform estimate;
    one layer's with activation ``checkpointing``), rows in flight and the device row cache."""
    found = adapters(model)
    meft = found[0].config if found else MeftConfig()
    dim = text_config(model.config).hidden_size
    shape = dict(batch_size=batch_size, seq_len=seq_len, world_size=world_size, checkpointing=checkpointing)
    setup: Setup = setup_from_ds_config(ds_config, meft, dim=dim, **shape)
    if method != "meft":
        largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
        return TrainingBytes(dense_trainable_items(method, trainable_numel(model), setup, largest))  # no rows here
    if rows_fetched_per_layer:
        setup = with_union(setup, rows_fetched_per_layer)
    return TrainingBytes(training_items(setup, adapters=len(found), dim=dim))


def export_baseline(method: str, model: nn.Module, tokenizer: Any, output_dir: Path) -> None:
    """Write what a baseline trained to ``output_dir``: LoRA as a PEFT adapter, the dense parallel adapters as
    :data:`PARALLEL_ADAPTER_FILE` (``<layer>.keys``, ``<layer>.values``), full fine-tuning as a whole model with its
    tokenizer (a folder that ``--model`` loads)."""
    if method == "parallel_adapter":
        from safetensors.torch import save_file

        output_dir.mkdir(parents=True, exist_ok=True)
        save_file(model.dense_adapters.state_dict(), str(output_dir / PARALLEL_ADAPTER_FILE))
        return
    model.save_pretrained(str(output_dir))  # PeftModel's: the adapter only; PreTrainedModel's: every weight
    if method == "full":
        tokenizer.save_pretrained(str(output_dir))


def exported_method(folder: Path) -> str:
    """The method whose export ``folder`` holds (a ``launch/train.py --output_dir``), told by its files: "lora" (a PEFT
    LoRA adapter), "parallel_adapter", "full" (a whole model) or "meft" (anything else: loading it says what is
    missing)."""
    config_file = folder / "adapter_config.json"
    if (folder / PARALLEL_ADAPTER_FILE).is_file():
        return "parallel_adapter"
    if config_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(config_file.read_text()).get("peft_type") == "LORA":
                return "lora"
        return "meft"
    return "full" if (folder / "config.json").is_file() else "meft"


def load_baseline(method: str, model: nn.Module, folder: Path) -> nn.Module:
    """``model`` with the LoRA or dense parallel adapter :func:`export_baseline` wrote to ``folder``, in the model's
    dtype and on its device, for evaluation."""
    if method == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    from safetensors.torch import load_file

    state = load_file(str(folder / PARALLEL_ADAPTER_FILE))
    add_dense_adapters(model, state["0.keys"].shape[0])
    model.dense_adapters.load_state_dict(state)
    weight = next(model.parameters())
    model.dense_adapters.to(device=weight.device, dtype=weight.dtype)
    return model
