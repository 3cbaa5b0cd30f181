"""`SparseKeyExpertAdapter`: the parallel adapter of one FFN, ``y = FFN(h) + ReLU(h K^T) V`` with top-K sparsity.

Per micro-batch: the router (on the device) picks ``n_probe`` experts per token; the CPU scores those experts' keys
and keeps each token's top-K rows; the union ``U`` of those rows travels to the device; the adapter is computed
over ``U`` with a per-token mask, so every token uses only its own K neurons; in backward the gradients of ``U``'s
rows go back to the row store, which accumulates them until the sparse optimizer step.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from meft_ds.config import MeftConfig
from meft_ds.routing import select_rows
from meft_ds.stats import TrafficStats
from meft_ds.store import RowStore
from meft_ds.transfer import RowTransfer


class SparseAdapterFunction(torch.autograd.Function):
    """``out = (ReLU(gate * (x K_U^T)) * mask) V_U`` over the fetched rows ``U``, gradients written by hand.

    ``rows`` is ``(n, 2, d)`` (key and value of each row of ``U``); it enters with ``requires_grad`` so that
    backward always runs, but its gradient goes to ``row_grad_sink`` (the row store) instead of autograd.
    ``gate`` is ``(T, n)``: the router logit of each row's expert for each token, or ``None`` (ungated).
    """

    @staticmethod
    def forward(ctx, x, gate, rows, mask, row_grad_sink):  # type: ignore[override]
        keys = rows[:, 0].to(x.dtype)
        values = rows[:, 1].to(x.dtype)
        scores = x @ keys.T
        pre = scores if gate is None else scores * gate
        active = mask & (pre > 0)
        out = torch.where(active, pre, 0.0) @ values
        ctx.save_for_backward(x, gate, keys, values, scores, active)
        ctx.row_grad_sink = row_grad_sink
        ctx.row_dtype = rows.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gate, keys, values, scores, active = ctx.saved_tensors
        pre = scores if gate is None else scores * gate
        grad_values = torch.where(active, pre, 0.0).T @ grad_out
        grad_pre = torch.where(active, grad_out @ values.T, 0.0)
        grad_scores = grad_pre if gate is None else grad_pre * gate
        grad_keys = grad_scores.T @ x
        ctx.row_grad_sink(torch.stack([grad_keys, grad_values], dim=1).to(ctx.row_dtype))
        grad_x = grad_scores @ keys if ctx.needs_input_grad[0] else None
        grad_gate = grad_pre * scores if gate is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_gate, None, None, None


class SparseKeyExpertAdapter(nn.Module):
    """The MEFT adapter of one FFN. Owns a small device-side router; its big key/value rows live in ``store``.

    Attributes:
        router: ``nn.Linear(d, E, bias=False)`` on the device, trained by the dense optimizer.
        store: the :class:`RowStore` with the fp32 master rows in CPU memory (not a parameter or buffer, so the
            DeepSpeed engine never sees, casts or partitions it).
        traffic: this adapter's :class:`TrafficStats`.
    """

    def __init__(
        self,
        dim: int,
        config: MeftConfig,
        layer_index: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.layer_index = layer_index
        self.store = RowStore(config.num_neurons, dim, key_init_std=config.key_init_std, seed=config.seed + layer_index)
        self.router = nn.Linear(dim, config.num_experts, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            expert_means = self.store.keys.reshape(config.num_experts, config.expert_size, dim).mean(dim=1)
            self.router.weight.copy_(config.router_init_scale * expert_means)
        self.traffic = TrafficStats()
        self.transfer = RowTransfer(self.traffic)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer={self.layer_index}, d={self.dim}, neurons={c.num_neurons}, experts={c.num_experts}, "
            f"top_k={c.top_k}, n_probe={c.n_probe}, gate={c.gate!r}"
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter's output for ``hidden`` (``(..., d)``), to be added to the FFN's output."""
        config = self.config
        x = hidden.reshape(-1, self.dim)
        logits = self.router(x)
        probe_logits, probe_ids = logits.detach().topk(config.n_probe, dim=1)
        routing = select_rows(
            self.transfer.to_host(x.detach()).float(),
            self.transfer.to_host(probe_ids),
            self.transfer.to_host(probe_logits).float() if config.gated else None,
            self.store.keys,
            expert_size=config.expert_size,
            top_k=config.top_k,
        )
        rows = self.transfer.rows_to_device(
            self.store, routing.row_ids, dtype=config.row_torch_dtype(x.dtype), device=x.device
        )
        slots = self.transfer.to_device(routing.slots, x.device)
        mask = torch.zeros(x.shape[0], rows.shape[0], dtype=torch.bool, device=x.device).scatter_(1, slots, True)
        gate = None
        if config.gated:
            row_experts = self.transfer.to_device(routing.row_ids // config.expert_size, x.device)
            gate = logits.index_select(1, row_experts)
        self.traffic.forward_calls += 1
        sink = functools.partial(self._accumulate_row_grads, routing.row_ids)
        out = SparseAdapterFunction.apply(x, gate, rows.requires_grad_(torch.is_grad_enabled()), mask, sink)
        return out.view_as(hidden)

    def _accumulate_row_grads(self, row_ids: torch.Tensor, grads: torch.Tensor) -> None:
        self.store.accumulate_grad(row_ids, self.transfer.row_grads_to_host(grads))
