"""What autograd keeps for backward in a training forward of a causal LM, measured without weights.

A model instantiated on the meta device (no weights, no memory) runs a forward pass, loss included, under
``saved_tensors_hooks`` that sum the storages saved for backward, each once, per decoder layer. Attention is measured
as an accelerator runs it: SDPA's flash kernels keep ``q, k, v``, the output and a log-sum-exp, never the ``(S, S)``
scores (on meta, SDPA would take its math path and keep them). A stand-in for each adapter keeps what a real one
keeps besides its rows and ``(T, |U|)`` tensors (which :mod:`meft_ds.plan` adds). Tests apply the same accounting to
real forwards. A model that does not run on meta falls back to :func:`analytic_saved_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from meft_ds.inject import FFNOutput, add_to_ffn_output, decoder_layers, ffn_input, locate_ffns


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd keeps for backward, per decoder layer and outside them (embedding, final norm, head, loss)."""

    per_layer: tuple[int, ...]
    outside: int

    @property
    def total(self) -> int:
        return self.outside + sum(self.per_layer)


class _AdapterStandIn(torch.autograd.Function):
    """What an adapter adds to the base model's graph, besides its rows and ``(T, |U|)`` tensors (added by the
    plan): it keeps the FFN input (router and adapter input) and makes the FFN output depend on trainable weights, so
    every later layer saves its activations, as with real adapters. (Measuring graphs never run backward.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.zeros_like(x)


class _FlashAttention(torch.autograd.Function):
    """SDPA as flash kernels run it (output shape only): keeps ``q, k, v`` (GQA not repeated), the output, an fp32
    log-sum-exp per head and token, and the mask if one is given, as ``torch``'s CPU and CUDA flash kernels do."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32), mask)
        return out


class _FlashOnMeta(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _FlashAttention.apply(*args[:3], kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


@contextlib.contextmanager
def saved_bytes_counter(model: nn.Module, adapted: Sequence[int] | None = None) -> Iterator[list[SavedBytes]]:
    """Within the block, sum the storages autograd saves for backward, each once, excluding parameters and buffers,
    per decoder layer of ``model``; the result is appended to the yielded list when the block ends. ``adapted``:
    decoder layers whose FFN gets the adapter stand-in (``None``: the model carries real adapters, or none)."""
    location = locate_ffns(model)
    layers = decoder_layers(model, location)
    excluded = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    per_layer, outside, current = [0] * len(layers), [0], [-1]  # current layer, -1 outside: outside[-1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded and storage._cdata not in seen:
            seen.add(storage._cdata)
            (per_layer if current[0] >= 0 else outside)[current[0]] += storage.nbytes()
        return tensor

    weight = torch.zeros(1, device=next(model.parameters()).device, requires_grad=True)

    def stand_in(module: nn.Module, args: tuple, kwargs: dict, out: FFNOutput) -> FFNOutput:
        hidden = ffn_input(args, kwargs)
        return add_to_ffn_output(out, _AdapterStandIn.apply(hidden, weight))

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, -1)))
        if adapted is not None and index in adapted:
            hooks.append(getattr(layer, location.ffn_attr).register_forward_hook(stand_in, with_kwargs=True))
    result: list[SavedBytes] = []
    try:
        with _FlashOnMeta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield result
    finally:
        for hook in hooks:
            hook.remove()
    result.append(SavedBytes(tuple(per_layer), outside[0]))


@contextlib.contextmanager
def linear_of(zero3: bool) -> Iterator[None]:
    """``torch.nn.functional.linear`` in the block as a ZeRO-3 engine runs it (``zero3``) or as torch defines it,
    put back afterwards. A ZeRO-3 engine replaces it process-wide, for good, with DeepSpeed's ``zero3_linear_wrap``
    (``zero_optimization.memory_efficient_linear``, on by default), which keeps every linear's input for backward;
    torch's keeps none for a frozen weight. Measured without this, a plan would depend on whether the process had
    made a ZeRO-3 engine before."""
    if zero3:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap as linear
    else:
        linear = torch._C._nn.linear  # what torch.nn.functional.linear is until someone replaces it
    before = F.linear
    F.linear = linear
    try:
        yield
    finally:
        F.linear = before


def measure_saved_bytes(
    model: nn.Module, input_ids: torch.Tensor, adapted: Sequence[int] | None = None, *, zero3_linear: bool = False
) -> SavedBytes:
    """What a training forward of ``model`` on ``input_ids`` (labels = inputs: the loss included) saves for backward,
    counted by :func:`saved_bytes_counter`, its linears as ZeRO-3 runs them or not (:func:`linear_of`)."""
    with linear_of(zero3_linear), saved_bytes_counter(model, adapted) as result:
        model(input_ids=input_ids, labels=input_ids)
    return result[0]


def analytic_saved_bytes(
    config: Any, dtype: torch.dtype, tokens: int, adapted: Sequence[int], *, zero3_linear: bool = False
) -> SavedBytes:
    """The fallback when a model does not run on meta: what a LLaMA-style layer saves per token with frozen weights
    (a frozen projection keeps no input). Two RMSNorms an fp32 input and rsqrt each; flash attention q, k, v, its
    output and an fp32 log-sum-exp per head; SiLU and the gate*up product three ``ffn``-wide tensors; the adapter its
    input. Layers before the first adapter save nothing but it. Outside: the final norm, the fp32 log-softmax, the
    labels. ZeRO-3's linear (``zero3_linear``) keeps the projections' inputs too: the two norms' outputs and the
    attention's reshaped output per layer, the final norm's output outside."""
    d, c, heads = config.hidden_size, dtype.itemsize, config.num_attention_heads
    kv = d // heads * (getattr(config, "num_key_value_heads", None) or heads)
    ffn = getattr(config, "intermediate_size", None) or 4 * d
    inputs = 3 * d if zero3_linear else 0
    layer = tokens * (2 * (d * 4 + 4) + c * (2 * d + 2 * kv + 3 * ffn + inputs) + 4 * heads)
    first = min(adapted, default=config.num_hidden_layers)
    per_layer = [
        (layer if i > first else 0) + (tokens * d * c if i in adapted else 0) for i in range(config.num_hidden_layers)
    ]
    outside = tokens * (d * 4 + 4 + config.vocab_size * 4 + 8 + (d * c if zero3_linear else 0))
    return SavedBytes(tuple(per_layer), outside)


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model, frozen and in training mode (dropout masks count), on the meta device: no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train().requires_grad_(False)
