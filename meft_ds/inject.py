"""Model surgery: attach a `SparseKeyExpertAdapter` in parallel to chosen FFNs of a Hugging Face causal LM.

Each supported architecture is one registry entry saying where the decoder layers are and what the FFN module of
a layer is called. The adapter becomes a child module of the FFN (``<ffn>.meft_adapter``) and a forward hook adds
its output to the FFN's, so the base model's structure and state-dict keys stay as they were. The adapters are
registered on the model root, in ``model.meft_adapters`` (keyed by layer index), never inside the FFN: an FFN that
is an ``nn.Sequential`` would otherwise run its new child as one more stage.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.aio import aio_queues
from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.memory import check_store_fits, store_bytes
from meft_ds.nvme_folder import check_files_free, check_nvme_path
from meft_ds.ops import local_world_size
from meft_ds.pinned import PinnedBuffers
from meft_ds.shard import resolve_shard

ADAPTERS_ATTR = "meft_adapters"
logger = logging.getLogger("meft_ds")
# what ``model.save_pretrained`` calls once the model has adapters (:func:`_save_pretrained`): meft_ds.export's
# save_adapter, which sits in a higher layer and registers itself here when imported (``import meft_ds`` does)
_adapter_saver: Callable[..., Path] | None = None


class UnsupportedModelError(ValueError):
    """The model's architecture is not in the FFN registry."""


@dataclass(frozen=True)
class FFNLocation:
    """Where the FFNs of an architecture live: ``model.<layers_path>[i].<ffn_attr>``."""

    layers_path: str
    ffn_attr: str


# Families whose decoder layers are ``model.layers`` and whose FFN is each layer's ``mlp``, a module that takes the
# hidden states alone and returns a tensor of their shape (each checked on a tiny model by tests/test_inject.py)
_MODEL_LAYERS_MLP = (
    "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bitnet", "cohere", "cohere2", "cwm", "diffllama",
    "doge", "ernie4_5", "exaone", "exaone4", "flint", "gemma", "gemma2", "gemma3_text", "gemma3n_text",
    "gemma4_unified_text", "glm", "glm4", "granite", "granite_swa", "helium", "hunyuan_v1_dense", "hyperclovax",
    "internlm3", "iquestcoder", "jais2", "llama", "minicpm3", "ministral", "ministral3", "mistral",
    "modernbert-decoder", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "persimmon", "phi", "phi3",
    "qwen2", "qwen3", "qwen3_5_text", "seed_oss", "smollm3", "stablelm", "starcoder2", "vaultgemma",
)  # fmt: skip
# Mixture-of-experts families of that layout: the FFN is the whole sparse MoE block (router, experts, shared experts;
# gpt-oss's returns its router's scores too), so the adapter sits beside all of it (--method lora adapts its experts'
# stacked weights)
_MOE_LAYERS_MLP = (
    "cohere2_moe", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
    "glm4_moe_lite", "gpt_oss", "hunyuan_v1_moe", "jetmoe", "minimax", "minimax_m2", "mixtral", "olmoe", "phimoe",
    "qwen2_moe", "qwen3_moe",
    "qwen3_next",  # gated DeltaNet (linear attention) and attention layers in turn, a MoE FFN on each
)  # fmt: skip
_REGISTRY: dict[str, FFNLocation] = {
    model_type: FFNLocation("model.layers", "mlp") for model_type in _MODEL_LAYERS_MLP + _MOE_LAYERS_MLP
}
_REGISTRY |= {
    "granitemoe": FFNLocation("model.layers", "block_sparse_moe"),
    "granitemoe_swa": FFNLocation("model.layers", "block_sparse_moe"),
    "granitemoeshared": FFNLocation("model.layers", "block_sparse_moe"),
    "falcon_h1": FFNLocation("model.layers", "feed_forward"),  # Mamba-2 and attention side by side in each layer
    "lfm3": FFNLocation("model.layers", "feed_forward"),
    "lfm2": FFNLocation("model.layers", "feed_forward"),  # Liquid's LFM2: convolution and attention layers
    "lfm2_moe": FFNLocation("model.layers", "feed_forward"),
    "jamba": FFNLocation("model.layers", "feed_forward"),  # Mamba and attention layers, dense and MoE FFNs in turn
    "bamba": FFNLocation("model.layers", "feed_forward"),  # Mamba-2 and attention layers
    "granitemoehybrid": FFNLocation("model.layers", "block_sparse_moe"),  # Granite 4: Mamba-2 and attention layers
    # Llama 4: dense and MoE layers in turn (interleave_moe_layer_step), each layer's FFN its feed_forward; the MoE
    # block (a routed expert per token and a shared one) returns its tokens flattened, with its router's logits. Its
    # checkpoints (model of images and text) load through AutoModelForCausalLM as the text model, llama4_text
    "llama4_text": FFNLocation("model.layers", "feed_forward"),
    "llama4": FFNLocation("language_model.model.layers", "feed_forward"),
    # Gemma 3 4B-27B: a model of images and text, whose language model gets the adapters
    "gemma3": FFNLocation("model.language_model.layers", "mlp"),
    "falcon": FFNLocation("transformer.h", "mlp"),
    "gpt2": FFNLocation("transformer.h", "mlp"),
    "bloom": FFNLocation("transformer.h", "mlp"),
    "gpt_bigcode": FFNLocation("transformer.h", "mlp"),
    "gpt_neo": FFNLocation("transformer.h", "mlp"),
    "codegen": FFNLocation("transformer.h", "mlp"),
    "mpt": FFNLocation("transformer.blocks", "ffn"),
    "gpt_neox_japanese": FFNLocation("gpt_neox_japanese.layers", "mlp"),
    "gptj": FFNLocation("transformer.h", "mlp"),
    "gpt_neox": FFNLocation("gpt_neox.layers", "mlp"),
}


def register_ffn(model_type: str, layers_path: str, ffn_attr: str) -> None:
    """Teach :func:`inject` a new architecture, keyed by ``model.config.model_type``.

    Example: ``register_ffn("my_arch", "model.decoder.layers", "feed_forward")``. The FFN module must take the
    hidden states ``(..., d)`` as its first argument and return a tensor of the same shape, or a tuple that begins
    with one.
    """
    _REGISTRY[model_type] = FFNLocation(layers_path, ffn_attr)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def check_model_type(model_type: str | None, what: str) -> None:
    """A clear error unless the FFNs of ``model_type`` (of the model ``what`` names) are known: a launcher asks it of
    the model's config before loading the weights."""
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"meft_ds does not know where the FFNs of model_type {model_type!r} ({what}) are. "
            f"Supported: {', '.join(supported_model_types())}. Fix: call "
            "meft_ds.register_ffn(model_type, layers_path, ffn_attr) first, e.g. "
            "register_ffn('llama', 'model.layers', 'mlp')."
        )


def locate_ffns(model: nn.Module) -> FFNLocation:
    """Where the FFNs of ``model``'s architecture are (its registry entry), or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_model_type(model_type, type(model).__name__)
    return _REGISTRY[model_type]


def without_peft_wrapper(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (LoRA on the attention beside MEFT on the FFNs), else
    ``model`` itself. (PEFT saves its own adapters with its ``save_pretrained``; meft_ds.save_adapter saves MEFT's.)"""
    if type(model).__module__.split(".")[0] == "peft" and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def holds_peft_layers(model: nn.Module) -> bool:
    """Whether PEFT put its tuner layers (e.g. LoRA's) into ``model``, a PEFT model's or the model it wraps."""
    return any(type(module).__module__.split(".")[0] == "peft" for module in model.modules())


def decoder_layers(model: nn.Module, location: FFNLocation) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers at ``location``, or a clear error. In a bare base model (``AutoModel``'s
    ``LlamaModel``: no head, its decoder at the top) the path goes without the base model's prefix (``layers`` for
    ``model.layers``); exports name the FFNs by the registered path all the same, so that they load into either."""
    path = location.layers_path
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and path.startswith(prefix + ".") and not isinstance(getattr(model, prefix, None), nn.Module):
        path = path.removeprefix(prefix + ".")
    layers: object = model
    for name in path.split("."):
        layers = getattr(layers, name, None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList at {location.layers_path!r}. Fix: register the right "
            "path with meft_ds.register_ffn(model_type, layers_path, ffn_attr)."
        )
    return layers


def register_adapter_saver(save: Callable[..., Path]) -> None:
    """Make ``save`` (``save(model, directory, *, is_main_process, max_shard_size)``) what ``model.save_pretrained``
    writes for a model with adapters."""
    global _adapter_saver
    _adapter_saver = save


def _save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool | None = None,
    max_shard_size: int | str | None = None, push_to_hub: bool = False, **ignored: Any,
) -> Path:  # fmt: skip
    """``model.save_pretrained`` of a model with adapters: the adapter in PEFT's layout, as
    :meth:`meft_ds.MeftModel.save_pretrained` writes it. transformers' own method would save the frozen base model
    and the routers without the rows, which live in the row stores, not in parameters: the training would be lost
    without a word. Takes transformers' arguments; ``is_main_process`` and ``max_shard_size`` mean what they mean
    there, the others (``state_dict``, ``safe_serialization``, ...) describe the base model's weights and are
    ignored. ``type(model).save_pretrained(model, path)`` still saves the base model's weights."""
    if push_to_hub:
        raise MeftConfigError(
            "save_pretrained(push_to_hub=True): meft_ds saves the adapter to a folder only. Fix: save it, then upload "
            "the folder (huggingface_hub.upload_folder), or call model.push_to_hub(repo_id)."
        )
    if _adapter_saver is None:
        raise RuntimeError("meft_ds.export was not imported. Fix: import meft_ds.")
    logger.info("meft_ds: model.save_pretrained(%s) writes the meft adapter (PEFT's layout).", save_directory)
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return _adapter_saver(model, save_directory, is_main_process=is_main_process, **shard)


def text_config(config: Any) -> Any:
    """The config of a model's decoder: the config itself for a language model, its text part for a multimodal one
    (Gemma 3's ``text_config``: hidden size, depth), by transformers' ``get_text_config``."""
    text = getattr(config, "get_text_config", None)
    return text(decoder=True) if text is not None else config


def ffn_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states an FFN's forward hook sees going in."""
    return args[0] if args else next(iter(kwargs.values()))


FFNOutput = torch.Tensor | tuple[torch.Tensor, ...]


def add_to_ffn_output(output: FFNOutput, added: torch.Tensor) -> FFNOutput:
    """``output + added`` for an FFN that returns its hidden states, or a tuple of them and more (gpt-oss's MoE block
    returns its router's scores beside them); ``added`` in the output's shape (Llama 4's MoE block returns its tokens
    flattened, ``(B * S, d)`` for ``(B, S, d)`` in)."""
    hidden = output[0] if isinstance(output, tuple) else output
    added = added.reshape(hidden.shape)
    if isinstance(output, tuple):
        return (hidden + added, *output[1:])
    return hidden + added


# Both hooks run eagerly under torch.compile: their host-side routing and unions of data-dependent sizes would break
# the graphs inside them and compile new ones for every batch (tests/test_compile.py).
@torch.compiler.disable
def _begin_adapter(
    adapter: SparseKeyExpertAdapter, layer: nn.Module, ffn: nn.Module, args: tuple, kwargs: dict
) -> None:
    """Before the FFN: the router runs and the routing inputs start for the host (see SparseKeyExpertAdapter)."""
    if adapter.disabled:
        return
    if layer.training and getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
        adapter.config.check_activation_checkpointing()  # enabled after inject (e.g. by the HF Trainer)
    adapter.pending = adapter.begin(ffn_input(args, kwargs))


@torch.compiler.disable
def _add_adapter_output(
    adapter: SparseKeyExpertAdapter, ffn: nn.Module, args: tuple, kwargs: dict, output: FFNOutput
) -> FFNOutput:
    """After the FFN (its kernels queued): route, fetch and add the adapter's output."""
    if adapter.disabled:
        return output
    pending, adapter.pending = adapter.pending, None
    hidden = ffn_input(args, kwargs)
    return add_to_ffn_output(output, adapter.finish(hidden, pending if pending is not None else adapter.begin(hidden)))


def _compute_dtype(ffn: nn.Module, layer: nn.Module) -> torch.dtype | None:
    """The dtype the FFN computes in: its first floating-point parameter's, else its layer's (a quantized FFN, e.g.
    bitsandbytes' 4-bit weights, computes in the dtype of its input, which the layer's norms have)."""
    for module in (ffn, layer):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            return dtype
    return None


def _nvme_folder(config: MeftConfig, layer_indices: list[int], dim: int) -> Path | None:
    """This rank's folder of the NVMe tier (checked writable, with room, libaio present, and its layers' files not
    another live model's), or None."""
    if config.store.device != "nvme":
        return None
    aio_queues()  # fails now, with the fix, if DeepSpeed's async I/O op cannot be built
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # rows and two moments, for every rank of this node: they share the folder's drive (and each checks it before any
    # writes: the files start sparse)
    needed = local_world_size() * 3 * store_bytes(len(layer_indices), config.num_neurons, dim) // 4
    folder = check_nvme_path(str(Path(config.store.nvme_path) / f"rank_{rank}"), needed)
    check_files_free(folder, layer_indices)
    return folder


def adapters(model: nn.Module) -> list[SparseKeyExpertAdapter]:
    """The model's adapters, in layer order."""
    found = [m for m in model.modules() if isinstance(m, SparseKeyExpertAdapter)]
    return sorted(found, key=lambda a: a.layer_index)


def trainable_numel(model: nn.Module) -> int:
    """Trainable values: the parameters that require gradients, and the adapters' rows (keys and values of every
    layer, which live in the row stores, not in parameters)."""
    rows = sum(a.config.num_neurons * 2 * a.dim for a in adapters(model))
    return rows + sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` (or the engine holding it) computes as its base model: the FFNs' hooks skip the
    adapters, so nothing is routed, fetched or given a gradient, and a PEFT model's own adapters (LoRA beside MEFT) are
    off too (PEFT's ``disable_adapter()``). E.g. a DPO reference model's log-probabilities from the policy in training,
    without a second copy of the model and its row store. A forward run in the block computes the base model's
    activations: where activation checkpointing recomputes them in the backward, run that backward in the block too."""
    found = adapters(model)
    if not found:
        raise MeftConfigError(
            f"disable_adapters: {type(model).__name__} has no meft adapters. Fix: pass the model meft_ds.inject (or "
            "meft_ds.initialize, MeftTrainer) added them to."
        )
    inside = {id(a) for a in found}
    targets = {id(a.prefetch_target) for a in found if a.prefetch_target is not None}
    split = [
        a.layer_index
        for a in found
        if (a.rows_pre_retrieved and id(a) not in targets)
        or (a.prefetch_target is not None and id(a.prefetch_target) not in inside)
    ]
    if split:
        raise MeftConfigError(
            f"disable_adapters: the adapters of layers {split} pre-retrieve rows for, or from, adapters outside "
            f"{type(model).__name__} (meft.prefetch_layers), which would be left with rows fetched for a forward that "
            "never used them. Fix: pass the whole model."
        )
    before = [adapter.disabled for adapter in found]
    with contextlib.ExitStack() as peft_adapters_off:
        for peft_model in _peft_models(model):  # PEFT's own method, not the one follow_peft_disable sets
            peft_adapters_off.enter_context(type(peft_model).disable_adapter(peft_model))
        for adapter in found:
            adapter.disabled = True
        try:
            yield
        finally:
            for adapter, disabled in zip(found, before, strict=True):
                adapter.disabled = disabled


def follow_peft_disable(model: nn.Module) -> None:
    """Make the ``disable_adapter()`` of each PEFT model in ``model`` (MEFT beside LoRA) switch MEFT's adapters off
    as well (:func:`disable_adapters`): code written for PEFT takes that block for the base model, as TRL's DPO, KTO
    and GRPO trainers do for their reference model when none is given; with only LoRA off, that "reference" would be
    the policy's MEFT part, moving as it trains."""
    for peft_model in _peft_models(model):
        if adapters(peft_model):
            peft_model.disable_adapter = functools.partial(disable_adapters, peft_model)


def _peft_models(model: nn.Module) -> list[nn.Module]:
    """The PEFT ``PeftModel`` s in ``model``: itself, or the one a ``MeftModel`` or an engine holds."""
    return [module for module in model.modules() if without_peft_wrapper(module) is not module]


def warn_settings_not_used(model: nn.Module, given: MeftConfig, *, from_argument: bool) -> None:
    """``model`` already has adapters, which keep their settings (shapes, and the sparse Adam's hyperparameters):
    name those of ``given`` (the caller's ``meft=`` argument if ``from_argument``, else the DeepSpeed config's
    ``"meft"`` section) that differ and so take no effect."""
    source = "meft=" if from_argument else "the DeepSpeed config's meft section"
    kept, wanted = adapters(model)[0].config.to_dict(), given.to_dict()
    if wanted["store"]["shard"] == "auto":  # decided for this run as the adapters were made
        wanted["store"]["shard"] = kept["store"]["shard"]
    differing = [f"{key}={wanted[key]!r} (the adapters': {kept[key]!r})" for key in wanted if wanted[key] != kept[key]]
    if differing:
        logger.warning(
            "meft_ds: the model already has adapters, which keep their own settings; these of %s differ and take no "
            "effect: %s. Fix: drop them, or start from a model without adapters to train ones with these settings.",
            source, ", ".join(differing),
        )  # fmt: skip


def inject(model: nn.Module, config: MeftConfig | dict | None = None) -> nn.Module:
    """Attach sparse key-expert adapters to the FFNs chosen by ``config.layers`` and freeze the base model.

    Returns the same model object. Only the adapters' routers are trainable parameters; the key/value rows live in
    each adapter's CPU row store and are trained by :class:`meft_ds.SparseRowAdam`. A PEFT model (e.g. LoRA on the
    attention) gets them in the model it wraps, its own trainable parameters left as PEFT set them.
    """
    config = resolve_shard(MeftConfig.from_dict(config))
    if adapters(model):
        raise MeftConfigError("meft: this model already has meft adapters. Fix: inject once per model.")
    base = without_peft_wrapper(model)
    location = locate_ffns(base)
    layers = decoder_layers(base, location)
    dim = text_config(base.config).hidden_size
    chosen = config.resolve_layers(len(layers))
    ffns = {}
    for index in chosen:
        ffn = getattr(layers[index], location.ffn_attr, None)
        if not isinstance(ffn, nn.Module):
            raise UnsupportedModelError(
                f"layer {index} of {type(base).__name__} has no FFN module {location.ffn_attr!r}. Fix: register "
                "the right name with meft_ds.register_ffn(model_type, layers_path, ffn_attr)."
            )
        ffns[index] = ffn
    if config.prefetch_layers >= len(ffns):
        raise MeftConfigError(
            f"meft.prefetch_layers: {config.prefetch_layers} reaches past the {len(ffns)} adapter layers. Fix: use "
            f"0 (exact, the default) up to {len(ffns) - 1}."
        )
    check_store_fits(config, len(ffns), dim)
    nvme_folder = _nvme_folder(config, list(ffns), dim)
    if not holds_peft_layers(base):  # (PEFT froze the base model itself and trains its own layers)
        for param in model.parameters():
            param.requires_grad_(False)
    cache_bytes = int(config.cache_mb * 2**20) // len(ffns)
    store_ram_bytes = int(config.store.ram_budget_mb * 2**20) // len(ffns)
    pinned_buffers = PinnedBuffers()  # the layers run one after the other: they share rings of staging buffers
    registered = nn.ModuleDict()
    for index, ffn in ffns.items():
        reference = next(ffn.parameters(), None)
        adapter = SparseKeyExpertAdapter(
            dim,
            config,
            index,
            device=reference.device if reference is not None else None,
            dtype=_compute_dtype(ffn, layers[index]),
            cache_bytes=cache_bytes,
            nvme_folder=nvme_folder,
            store_ram_bytes=store_ram_bytes,
            pinned_buffers=pinned_buffers,
        )
        registered[str(index)] = adapter
        ffn.register_forward_pre_hook(functools.partial(_begin_adapter, adapter, layers[index]), with_kwargs=True)
        ffn.register_forward_hook(functools.partial(_add_adapter_output, adapter), with_kwargs=True)
    base.add_module(ADAPTERS_ATTR, registered)
    chain = list(registered.values())
    for source, target in zip(chain, chain[config.prefetch_layers :], strict=False):
        if config.prefetch_layers:
            source.pre_retrieve_for(target)
    base.meft_config = config
    if callable(getattr(base, "save_pretrained", None)):  # a transformers model: see _save_pretrained
        base.save_pretrained = functools.partial(_save_pretrained, base)
    follow_peft_disable(model)
    return model
