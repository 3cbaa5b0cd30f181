"""Serving from the device: :func:`for_inference` puts every adapter's rows on the model's device and routes there.

Training routes on the host (``meft_ds/adapter.py``): per layer and micro-batch the hidden states go to the host, the
CPU scores the probed experts' keys, and the union of the selected rows travels to the device. At inference nothing
is updated, so the rows fit on the device without optimizer state or gradient accumulator (141M elements for the
built-in demo; for LLaMA-7B with r = 8464 on 32 layers 4.4 GB of bf16 rows, plus 2.2 GB with exact routing's fp32
keys). :class:`DeviceRows` holds one adapter's rows there and computes, per call, router logits -> the top
``n_probe`` experts -> the scores of the probed experts' keys -> each token's top-K -> the adapter's output over those
K rows: no hidden state goes to the host, no row is gathered there.

**The same choices as the training path.** A top-K choice is discrete, so the scores must be the training path's, in
its precision: it scores the fp32 master keys against the hidden states rounded to the row dtype, in fp32, times the
router logits rounded to the row dtype. With ``exact_routing`` (the default) the keys stay fp32 on the device and
the same products are computed in fp32; the output uses keys and values rounded to the row dtype, as the rows that
travel are. ``exact_routing=False`` keeps the keys in the row dtype too (a quarter less device memory under bf16):
scores then come from bf16-rounded keys, so a token may swap its K-th neuron for a near tie and outputs may drift
from the training path's.

**Where the device is the CPU** the rows stay in host memory and each call runs the training path's own routines
(the compiled scoring kernel, the union, the same autograd Function's forward) on them: greedy generation is
bit-identical, and what is saved is the staging and the copies. **On an accelerator** it runs shape-static torch ops
(gathers, batched matmuls; no data-dependent size, hence no host synchronisation) whose sums run in another order than
the CPU kernel's: equal up to fp32 rounding, so a choice can differ only where two scores tie to the last bit.

Training is refused while the rows are on the device (they receive no gradients): :func:`for_training` goes back to
the host path; the row store (fp32 master rows and Adam moments, in CPU memory) was never touched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from meft_ds.adapter import MaskedAdapterFunction, SparseKeyExpertAdapter, TopKAdapterFunction, computes_over_top_k
from meft_ds.inject import adapters
from meft_ds.routing import score_probed_keys, select_from_scores, top_k_rows

# Tokens are scored in chunks whose gathered keys and rows stay under this many bytes (a prefill of 2048 tokens on
# LLaMA-7B would otherwise gather 6 GB of probed keys per layer); a decoding step is one chunk.
CHUNK_BYTES = 256 * 2**20


class InferenceOnlyError(RuntimeError):
    """A forward that would train ran on a model whose rows :func:`for_inference` put on the device."""


class DeviceRows:
    """One adapter's keys and values on the model's device, and the adapter's forward computed from them.

    Attributes:
        keys: ``(r, d)``, fp32 with ``exact_routing``, else in the row dtype.
        values: ``(r, d)`` in the row dtype (``config.row_torch_dtype`` of the compute dtype: what travels today).
        mirror_host: on a CPU, run the training path's own routines (bit-identical outputs). Tests set it ``False``
            to run the accelerator's routine on the CPU.
    """

    def __init__(self, adapter: SparseKeyExpertAdapter, *, exact_routing: bool) -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.exact_routing = exact_routing
        self.mirror_host = True
        weight = adapter.router.weight
        self.device, self.compute_dtype = weight.device, weight.dtype
        self.row_dtype = self.config.row_torch_dtype(self.compute_dtype)
        self.keys = self.values = torch.empty(0)
        self.place()

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held on the device."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def place(self, device: torch.device | None = None, compute_dtype: torch.dtype | None = None) -> None:
        """(Re)load every row from the store onto ``device`` for ``compute_dtype`` (the current ones if ``None``).
        The bytes count as traffic to the device once; a sharded store gathers its rows (every rank must call)."""
        self.device = device or self.device
        self.compute_dtype = compute_dtype or self.compute_dtype
        self.row_dtype = self.config.row_torch_dtype(self.compute_dtype)
        self.keys = self.values = torch.empty(0)  # free the previous copies first
        rows = self.adapter.store.full_rows()
        key_dtype = torch.float32 if self.exact_routing else self.row_dtype
        # on a CPU in the store's own dtype these are views of the store's rows: no copy
        self.keys = rows[:, 0].to(self.device, key_dtype)
        self.values = rows[:, 1].to(self.device, self.row_dtype)
        self.adapter.traffic.bytes_to_device += self.nbytes
        self.adapter.traffic.row_bytes_to_device += self.nbytes

    # ------------------------------------------------------------------ the adapter's forward
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router's logits for ``x`` (``(T, d)``); refuses a forward that would train."""
        if torch.is_grad_enabled():
            raise InferenceOnlyError(
                f"meft adapter of layer {self.adapter.layer_index}: meft_ds.for_inference(model) put the key/value "
                "rows on the device for inference only; they would get no gradient. Fix: run the forward under "
                "torch.no_grad() or torch.inference_mode() (generate() does), or call meft_ds.for_training(model) "
                "before training."
            )
        return self.adapter.router(x)

    def output(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The adapter's output for ``x`` (``(T, d)``) given its router ``logits`` (``(T, E)``)."""
        if x.device != self.device or x.dtype != self.compute_dtype:  # the model was moved or cast since
            self.place(x.device, x.dtype)
        config = self.config
        self.adapter.traffic.forward_calls += 1
        probe_logits, probe_ids = logits.topk(config.n_probe, dim=1)
        # what the training path sends the host: hidden states and gates rounded to the row dtype, used in fp32
        hidden = x.to(self.row_dtype).float()
        gates = probe_logits.to(self.row_dtype).float() if config.gated else None
        if self.mirror_host and x.device.type == "cpu" and self.keys.dtype == torch.float32:
            return self._as_on_host(x, logits, hidden, probe_ids, gates)
        return self._on_device(x, logits, hidden, probe_ids, gates)

    def _as_on_host(
        self, x: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor, probe_ids: torch.Tensor,
        gates: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The training path's own routines, on rows that need not travel (the device is the host)."""
        config = self.config
        scores = score_probed_keys(hidden, probe_ids, self.keys, config.expert_size)
        routing = select_from_scores(scores, probe_ids, gates, expert_size=config.expert_size, top_k=config.top_k)
        ids, union_pos = routing.row_ids, routing.union_pos
        rows = torch.stack((self.keys.index_select(0, ids).to(self.row_dtype), self.values.index_select(0, ids)), 1)
        row_experts = ids // config.expert_size
        if computes_over_top_k(x):
            gate = logits.float().gather(1, row_experts[union_pos]) if config.gated else None
            return TopKAdapterFunction.apply(x.float().contiguous(), gate, rows, union_pos, None, None).to(x.dtype)
        mask = torch.zeros(x.shape[0], ids.numel(), dtype=torch.bool, device=x.device).scatter_(1, union_pos, True)
        gate = logits.index_select(1, row_experts) if config.gated else None
        return MaskedAdapterFunction.apply(x, gate, rows, mask, None)

    def _on_device(
        self, x: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor, probe_ids: torch.Tensor,
        gates: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """Shape-static torch ops, in chunks of tokens: each token's probed keys gathered and scored in fp32 (autocast
        off and no matmul, whatever TF32 setting, as the host scores), its top-K rows gathered, the adapter computed
        over them."""
        config = self.config
        size, top_k = config.expert_size, config.top_k
        offsets = torch.arange(size, device=x.device)
        per_token = (config.n_probe * size + 2 * top_k) * x.shape[1] * 12
        chunk = max(1, CHUNK_BYTES // per_token)
        device_type = x.device.type
        fp32 = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        parts = []
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            experts = probe_ids[part]
            neurons = (experts.unsqueeze(-1) * size + offsets).flatten(1)  # (t, n_probe * size) row ids
            with fp32:  # products and sums in fp32 on the vector units: a matmul in fp32 may run in TF32 where the
                # user allows it (transformers' tf32=True, Accelerate's), rounding the scores to 10 bits of mantissa
                scores = (self.keys[neurons].float() * hidden[part].unsqueeze(1)).sum(-1)
            part_gates = None if gates is None else gates[part]
            rows = top_k_rows(scores, experts, part_gates, expert_size=size, top_k=top_k)
            parts.append(self._over_rows(x[part], logits[part], rows))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _over_rows(self, x: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``sum_k ReLU(gate_k * (x . key_k)) value_k`` over each token's own rows ``rows`` (``(t, K)`` ids), with
        the keys and values the training path's rows carry (rounded to the row dtype)."""
        keys = self.keys[rows].to(self.row_dtype).to(x.dtype)
        values = self.values[rows].to(x.dtype)
        pre = torch.bmm(keys, x.unsqueeze(-1)).squeeze(-1)
        if self.config.gated:
            pre = pre * logits.gather(1, torch.div(rows, self.config.expert_size, rounding_mode="floor"))
        return torch.bmm(torch.where(pre > 0, pre, 0.0).unsqueeze(1), values).squeeze(1)


def for_inference(model: nn.Module, *, exact_routing: bool = True) -> nn.Module:
    """Serve ``model`` from its device: every adapter's keys and values are placed on the device its router is on, in
    the dtype rows travel in (``meft.row_dtype``; ``"auto"`` is the compute dtype), and routed there: no host copy per
    generated token and layer. Greedy outputs are those of the training path (see the module docstring).

    Args:
        exact_routing: keep the keys in fp32 so that routing scores exactly what the training path scores (its master
            keys are fp32); with a bf16/fp16 model the rows then take 6 bytes per element pair instead of 4. ``False``
            keeps keys in the row dtype too (see the module docstring).

    Forwards must run without autograd (``torch.no_grad()``; ``generate()`` does), else :class:`InferenceOnlyError`.
    Call it again after moving or casting the model (a forward on another device or dtype places the rows again);
    with a sharded store every rank must call it (the rows are gathered). The row store stays in CPU memory, so that
    :func:`for_training` can go back. Returns ``model``.
    """
    found = adapters(model)
    if not found:
        raise ValueError(
            "for_inference: the model has no meft adapters. Fix: meft_ds.load_adapter(model, path) (or meft_ds.inject) "
            "first."
        )
    for adapter in found:
        adapter.serving = None  # free a previous placement before making the next
        adapter.serving = DeviceRows(adapter, exact_routing=exact_routing)
    return model


def for_training(model: nn.Module) -> nn.Module:
    """Undo :func:`for_inference`: free the rows on the device; forwards route on the host again and can train (the
    row store was never changed). Returns ``model``."""
    for adapter in adapters(model):
        adapter.serving = None
    return model
