"""`SparseKeyExpertAdapter`: the parallel adapter of one FFN, ``y = FFN(h) + ReLU(h K^T) V`` with top-K sparsity.

Per micro-batch: the router (on the device) picks ``n_probe`` experts per token; the CPU scores those experts' keys
and keeps each token's top-K rows; the union ``U`` of those rows travels to the device; the adapter is computed
over ``U`` with a per-token mask, so every token uses only its own K neurons; in backward the gradients of ``U``'s
rows go back to the row store, which accumulates them until the sparse optimizer step.

Two autograd Functions compute the same thing. On an accelerator, :class:`MaskedAdapterFunction` runs dense GEMMs
over all of ``U`` with a ``(T, |U|)`` mask (what tensor cores are good at). When the adapter computes on the CPU (fp32),
:class:`TopKAdapterFunction` runs meft_ds's kernel over each token's own K rows: ``T*K*d`` work instead of
``T*|U|*d``, 25-50x less at the sizes MEFT uses. Tests hold the two equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from meft_ds.config import MeftConfig
from meft_ds.ops import cpu_kernels, kernel_threads
from meft_ds.pinned import PinnedBuffers
from meft_ds.routing import Routing, select_from_scores
from meft_ds.row_selection import RowSelection
from meft_ds.shard import ShardedRowStore, resolve_shard
from meft_ds.sparse_adam import has_row_optimizer
from meft_ds.stats import TrafficStats
from meft_ds.store import CpuRowStore, RowStore, initial_keys
from meft_ds.swap import NvmeRowStore
from meft_ds.transfer import RowGradSink, RowsInFlight, RowTransfer, by_union_pos, narrowest_index_dtype

_DEVICE_TYPE = get_accelerator().device_name()
logger = logging.getLogger("meft_ds")
_warned_unstepped = False


def _check_rows_are_stepped(adapter: SparseKeyExpertAdapter) -> None:
    """One warning per process at the first training forward of an adapter that no SparseRowAdam steps: a model
    trained by transformers' own Trainer, an engine meft_ds was not attached to, or a plain loop without SparseRowAdam
    accumulates the rows' gradients and never applies them (and with the values at zero the routers get no gradient
    either): the model stays the base model, silently."""
    global _warned_unstepped
    if _warned_unstepped or has_row_optimizer(adapter):
        return
    _warned_unstepped = True
    logger.warning(
        "meft_ds: the meft adapter of layer %d trains, but no SparseRowAdam steps its rows: their gradients accumulate "
        "and are never applied, and the model stays the base model. Fix: with DeepSpeed, meft_ds.initialize (or "
        "meft_ds.attach(engine)); with the Hugging Face Trainer, meft_ds.hf.MeftTrainer; in a plain loop, "
        "meft_ds.SparseRowAdam(meft_ds.adapters(model), lr=...) stepped beside the routers' optimizer.",
        adapter.layer_index,
    )


class ServingRows(Protocol):
    """What a serving adapter asks of its rows on the device (:class:`meft_ds.inference.DeviceRows`, set by
    :func:`meft_ds.for_inference`), named here so that the adapter does not import the layer above it."""

    def router_logits(self, x: torch.Tensor) -> torch.Tensor: ...

    def output(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...

    def place(self, device: torch.device | None = None, compute_dtype: torch.dtype | None = None) -> None: ...


class MaskedAdapterFunction(torch.autograd.Function):
    """``out = (ReLU(gate * (x K_U^T)) * mask) V_U`` over the fetched rows ``U``, gradients written by hand.

    ``rows`` is ``(n, 2, d)`` (key and value of each row of ``U``); it enters with ``requires_grad`` so that
    backward always runs, but its gradient goes to ``row_grad_sink`` (the row store) instead of autograd.
    ``gate`` is ``(T, n)``: the router logit of each row's expert for each token, or ``None`` (ungated).
    Under ``torch.autocast`` the hand-written backward runs in the forward's autocast state (``custom_bwd``), so its
    matmuls take the same dtypes as the forward's.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type=_DEVICE_TYPE)
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
    @torch.amp.custom_bwd(device_type=_DEVICE_TYPE)
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


ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the CPU kernel's codes for the travel dtype


class TopKAdapterFunction(torch.autograd.Function):
    """The same adapter over each token's own K rows (``union_pos``: ``(T, K)``, their positions in ``rows``, the
    micro-batch's union), on meft_ds's CPU kernel. ``gate`` is ``(T, K)``: the router logit of each of those rows'
    expert, or ``None``; ``known_scores``: routing's ``(T, K)`` scores of the picks where they are exactly what the
    kernel would compute (:attr:`~meft_ds.routing.Routing.scores`), else ``None``. The backward writes the rows'
    gradients, rounded to the dtype rows travel in, where a :class:`~meft_ds.transfer.RowGradSink` says (straight
    into the store's accumulator); any other sink is called with all rows' gradients and their flags."""

    @staticmethod
    def forward(ctx, x, gate, rows, union_pos, row_grad_sink, known_scores):  # type: ignore[override]
        compute_rows = rows.to(x.dtype).contiguous()
        gate_or_empty = x.new_empty(0) if gate is None else gate.contiguous()
        known = x.new_empty(0) if known_scores is None else known_scores
        out, scores = cpu_kernels().sparse_adapter_forward(
            x, compute_rows, union_pos, gate_or_empty, known, kernel_threads()
        )
        ctx.save_for_backward(x, gate_or_empty, compute_rows, union_pos, scores)
        ctx.row_grad_sink = row_grad_sink
        ctx.row_dtype = rows.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gate, rows, union_pos, scores = ctx.saved_tensors
        sink = ctx.row_grad_sink
        if isinstance(sink, RowGradSink):
            accumulator, ids, done = sink.destination(ctx.row_dtype)
        else:
            accumulator, ids, done = by_union_pos(sink, rows.shape[0], rows.shape[2], ctx.row_dtype)
        accumulator.reserve(ids.numel())
        grad_x, grad_gate, count, finite = cpu_kernels().sparse_adapter_backward(
            grad_out.contiguous(), x, rows, union_pos, gate, scores, ids, *accumulator.kernel_state(),
            ROUNDING[ctx.row_dtype], kernel_threads(),
        )  # fmt: skip
        accumulator.committed(count, finite)
        done()
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_gate if gate.numel() and ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


class TopKGateFunction(torch.autograd.Function):
    """The gate of each of a token's top-K rows, ``gate[t, k] = x_t . W[experts[t, k]]`` (the router logit of its
    expert), read from ``logits`` computed without autograd. Its backward gives the router (and ``x``) their
    gradients on meft_ds's kernel from the (token, expert) pairs in use, at most ``n_probe`` per token, instead of
    autograd's two dense ``(T, E) x (E, d)`` products over a gradient that is zero for all other experts."""

    @staticmethod
    def forward(ctx, x, weight, logits, experts):  # type: ignore[override]
        ctx.save_for_backward(x, weight, experts)
        return logits.gather(1, experts)

    @staticmethod
    def backward(ctx, grad_gate):  # type: ignore[override]
        x, weight, experts = ctx.saved_tensors
        grad_x, grad_weight = cpu_kernels().gate_backward(grad_gate.contiguous(), x, weight, experts, kernel_threads())
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def computes_over_top_k(x: torch.Tensor) -> bool:
    """Whether the adapter for input ``x`` runs on the CPU kernel (on the CPU, kernel built; it computes in fp32
    whatever the input's dtype, as the paper keeps adapters in fp32 under bf16/fp16 autocast)."""
    return x.device.type == "cpu" and cpu_kernels() is not None


@dataclass
class ChosenRows:
    """Rows chosen for this adapter, on their way: by :meth:`SparseKeyExpertAdapter.begin` on a CPU, or from an
    earlier layer's hidden states (pre-retrieval)."""

    routing: Routing
    rows: RowsInFlight


@dataclass
class PendingRouting:
    """What :meth:`SparseKeyExpertAdapter.begin` started and :meth:`~SparseKeyExpertAdapter.finish` completes: the
    router logits (on the device, differentiable) and the routing inputs on their way to the host, or the rows
    chosen already."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    probe_ids: torch.Tensor | None = None
    probe_gates: torch.Tensor | None = None
    copied: object | None = None  # event of the copies to the host (None: already complete)
    chosen: ChosenRows | None = None


def build_store(
    config: MeftConfig, keys: torch.Tensor, traffic: TrafficStats, *, layer_index: int, nvme_folder: Path | None,
    ram_budget: int,
) -> RowStore:  # fmt: skip
    """The row store ``config.store`` describes, starting from a layer's initial ``keys``."""
    if config.store.device == "nvme":
        assert nvme_folder is not None
        return NvmeRowStore(
            keys, expert_size=config.expert_size, folder=nvme_folder, layer_index=layer_index, ram_budget=ram_budget,
            stats=traffic,
        )  # fmt: skip
    if resolve_shard(config).store.shard:  # "auto": sharded where several ranks share a node
        return ShardedRowStore(keys, expert_size=config.expert_size, stats=traffic)
    return CpuRowStore(keys)


class SparseKeyExpertAdapter(nn.Module):
    """The MEFT adapter of one FFN. Owns a small device-side router; its big key/value rows live in ``store``.

    Called as a module it computes its output in one go; :func:`meft_ds.inject` instead calls :meth:`begin` before
    the FFN runs (router, and the routing inputs start for the host) and :meth:`finish` after it, so that on an
    accelerator the FFN's kernels are queued before the host waits for the routing inputs and works.

    Attributes:
        router: ``nn.Linear(d, E, bias=False)`` on the device, trained by the dense optimizer.
        store: the :class:`~meft_ds.store.RowStore` ``config.store`` asks for (in CPU memory, sharded or on NVMe)
            with the fp32 master rows (not a parameter or buffer, so the DeepSpeed engine never sees, casts or
            partitions it). Keys start N(0, key_init_std) from a per-layer seed, identical on every rank.
        transfer: the :class:`RowTransfer` that moves this adapter's bytes (and holds its device cache, if any),
            through ``pinned_buffers`` (shared by a model's adapters; its own if ``None``).
        traffic: this adapter's :class:`TrafficStats`.
        prefetch_target: the adapter ``prefetch_layers`` layers later, whose rows this one pre-retrieves (or None).
        serving: set by :func:`meft_ds.for_inference`: all rows on the device, routed there (``meft_ds/inference.py``);
            ``None`` (training, and the default) routes on the host as described above.
    """

    def __init__(
        self,
        dim: int,
        config: MeftConfig,
        layer_index: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_bytes: int = 0,
        nvme_folder: Path | None = None,
        store_ram_bytes: int = 0,
        pinned_buffers: PinnedBuffers | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.layer_index = layer_index
        keys = initial_keys(config.num_neurons, dim, std=config.key_init_std, seed=config.seed + layer_index)
        self.router = nn.Linear(dim, config.num_experts, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            expert_means = keys.view(config.num_experts, config.expert_size, dim).mean(dim=1)
            self.router.weight.copy_(config.router_init_scale * expert_means)
        self.traffic = TrafficStats()
        self.store = build_store(
            config, keys, self.traffic, layer_index=layer_index, nvme_folder=nvme_folder, ram_budget=store_ram_bytes
        )
        self.transfer = RowTransfer(self.store, self.traffic, cache_bytes=cache_bytes, buffers=pinned_buffers)
        self.prefetch_target: SparseKeyExpertAdapter | None = None
        self.rows_pre_retrieved = False  # an earlier adapter pre-retrieves this one's rows
        self.pending: PendingRouting | None = None  # set between the FFN's pre-hook and hook
        self.disabled = False  # the FFN's hooks skip the adapter (meft_ds.disable_adapters)
        self._prefetch_routing: PendingRouting | None = None  # started by the source layer's begin
        self._prefetched: ChosenRows | None = None
        self.serving: ServingRows | None = None
        self.row_selection = RowSelection(config.num_neurons, config.update_rows) if config.update_rows else None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer={self.layer_index}, d={self.dim}, neurons={c.num_neurons}, experts={c.num_experts}, "
            f"top_k={c.top_k}, n_probe={c.n_probe}, gate={c.gate!r}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter's output for ``hidden`` (``(..., d)``), to be added to the FFN's output."""
        return self.finish(hidden, self.begin(hidden))

    def begin(self, hidden: torch.Tensor) -> PendingRouting:
        """Router logits on the device, and (unless rows were pre-retrieved) the routing inputs on their way; also
        the pre-retrieval target's routing inputs, so that both are waited for at once, before the FFN's kernels."""
        x = hidden.reshape(-1, self.dim)
        if self.serving is not None:  # rows on the device (meft_ds.for_inference): nothing starts for the host
            return PendingRouting(self.serving.router_logits(x))
        # on the CPU kernel's path the router's gradient flows through TopKGateFunction instead of these logits
        with torch.set_grad_enabled(torch.is_grad_enabled() and not computes_over_top_k(x)):
            logits = self.router(x)
        if self.prefetch_target is not None:
            self.prefetch_target.start_prefetch(x)
        prefetched = self._prefetched
        if prefetched is not None and prefetched.routing.union_pos.shape[0] == x.shape[0]:
            return PendingRouting(logits)
        if self.rows_pre_retrieved and self.training and torch.is_grad_enabled():
            # the source layer's forward did not run first: a recomputation (activation checkpointing applied around
            # the layers, not through transformers, whose flag _begin_adapter reads), which cannot pre-retrieve
            self.config.check_activation_checkpointing()
        self._prefetched = None  # stale (another batch shape): route from this layer's own hidden states
        pending = self._start_routing(x, logits)
        if pending.copied is None and self.store.reads_ahead:  # the routing inputs are on the host already (a CPU)
            # and the store reads in the background (NVMe): choose the rows now, so that their reads run during the
            # FFN. An in-memory store gathers in finish(), where the kernel then finds the rows still in cache.
            return PendingRouting(logits, chosen=self._choose(pending, x.device, x.dtype))
        return pending

    def _start_routing(self, x: torch.Tensor, logits: torch.Tensor) -> PendingRouting:
        """Start the routing inputs' copies to the host. They only choose rows (the adapter's output and gradients
        use ``x`` and ``logits`` themselves), so they travel like rows do: in the row dtype, expert ids in the
        narrowest integer type."""
        config = self.config
        travel_dtype = config.row_torch_dtype(x.dtype)
        probe_logits, probe_ids = logits.detach().topk(config.n_probe, dim=1)
        probe_ids = probe_ids.to(narrowest_index_dtype(config.num_experts))
        # one stream, so the event after the last copy covers all three
        hidden, _ = self.transfer.to_host_async(self.store.routing_hidden(x.detach().to(travel_dtype)), "hidden")
        probe_ids, copied = self.transfer.to_host_async(probe_ids, "probe_ids")
        gates = None
        if config.gated:
            gates, copied = self.transfer.to_host_async(probe_logits.to(travel_dtype), "probe_gates")
        return PendingRouting(logits, hidden, probe_ids, gates, copied)

    def _route(self, pending: PendingRouting) -> Routing:
        """Route on the host once the routing inputs are there."""
        if pending.copied is not None:
            pending.copied.synchronize()
        config = self.config
        probe_ids = pending.probe_ids.long()
        scores = self.store.score_probed(pending.hidden, probe_ids, config.expert_size)  # in the travel dtype
        gates = None if pending.probe_gates is None else pending.probe_gates.float()
        return select_from_scores(scores, probe_ids, gates, expert_size=config.expert_size, top_k=config.top_k)

    def _choose(self, pending: PendingRouting, device: torch.device, dtype: torch.dtype) -> ChosenRows:
        """Route, and start the chosen rows' fetch to ``device``, in the row dtype for compute dtype ``dtype``."""
        routing = self._route(pending)
        rows = self.transfer.fetch(routing.row_ids, dtype=self.config.row_torch_dtype(dtype), device=device)
        return ChosenRows(routing, rows)

    def pre_retrieve_for(self, target: SparseKeyExpertAdapter) -> None:
        """Make this adapter pre-retrieve ``target``'s rows (``prefetch_target``). A plain reference, not a submodule:
        assigned as a module attribute, the target would be registered again under this adapter, its router named
        ``prefetch_target.router`` and saved once more in every state dict (the chain nests: L layers, ~L^2/2
        copies)."""
        object.__setattr__(self, "prefetch_target", target)
        target.rows_pre_retrieved = True

    def start_prefetch(self, hidden: torch.Tensor) -> None:
        """Pre-retrieval, first half: this adapter's router on an earlier layer's ``hidden`` states, and the routing
        inputs on their way to the host (SPEC.md, method step 6; exactness traded for overlap)."""
        x = hidden.reshape(-1, self.dim).detach()
        with torch.no_grad():
            self._prefetch_routing = self._start_routing(x, self.router(x))

    def finish_prefetch(self, device: torch.device, dtype: torch.dtype) -> None:
        """Pre-retrieval, second half: choose the rows and start their copy, which overlaps the layers in between;
        this adapter's own forward waits for it where it uses the rows."""
        pending, self._prefetch_routing = self._prefetch_routing, None
        if pending is None:
            return
        chosen = self._choose(pending, device, dtype)
        # scored on an earlier layer's hidden states: not this adapter's activations
        self._prefetched = ChosenRows(replace(chosen.routing, scores=None), chosen.rows)

    def finish(self, hidden: torch.Tensor, pending: PendingRouting) -> torch.Tensor:
        """Route (or take the pre-retrieved rows), fetch the rows, compute the adapter over each token's own rows."""
        config = self.config
        x = hidden.reshape(-1, self.dim)
        if self.serving is not None:
            return self.serving.output(x, pending.logits).view_as(hidden)
        prefetched, self._prefetched = self._prefetched, None
        if pending.chosen is not None:  # chosen by begin()
            chosen = pending.chosen
        elif prefetched is not None and pending.hidden is None:  # pre-retrieved
            chosen = prefetched
        else:
            chosen = self._choose(pending, x.device, x.dtype)
        routing, in_flight = chosen.routing, chosen.rows
        if self.row_selection is not None:
            self.row_selection.observe(routing, training=torch.is_grad_enabled())
        if self.prefetch_target is not None:
            self.prefetch_target.finish_prefetch(x.device, x.dtype)
        union_pos = self.transfer.indices_to_device(routing.union_pos, x.device)  # (T, K) positions in the union
        row_experts = (
            self.transfer.indices_to_device(routing.row_ids // config.expert_size, x.device) if config.gated else None
        )
        rows = in_flight.wait()
        rows.requires_grad_(torch.is_grad_enabled())  # so backward runs; the gradient goes to the store
        if rows.requires_grad:
            _check_rows_are_stepped(self)
        sink = RowGradSink(self.transfer, routing.row_ids)
        self.traffic.forward_calls += 1
        logits = pending.logits
        if computes_over_top_k(x):
            compute = x.float().contiguous()
            weight = self.router.weight.float()
            gate = None
            if config.gated:
                gate = TopKGateFunction.apply(compute, weight, logits.float(), row_experts[union_pos])
            # routing scored this x against the fp32 master keys; the kernel's are the fetched keys: the same where
            # rows travel in fp32 and come from the store, not from a device cache
            exact = config.row_torch_dtype(x.dtype) == torch.float32 and self.transfer.cache is None
            known_scores = routing.scores if exact else None
            out = TopKAdapterFunction.apply(compute, gate, rows, union_pos, sink, known_scores)
            return out.to(x.dtype).view_as(hidden)
        mask = torch.zeros(x.shape[0], rows.shape[0], dtype=torch.bool, device=x.device).scatter_(1, union_pos, True)
        gate = logits.index_select(1, row_experts) if config.gated else None
        return MaskedAdapterFunction.apply(x, gate, rows, mask, sink).view_as(hidden)

    # ------------------------------------------------------------------ the row gradients' life cycle
    def collect_row_grads(self) -> None:
        """Bring every row gradient of this optimizer step into the store (flushing the device cache)."""
        self.transfer.flush()

    def drop_row_grads(self) -> None:
        """Forget this step's row gradients, in the store and in the device cache."""
        self.store.drop_grads()
        self.transfer.drop_grads()
        if self.row_selection is not None:
            self.row_selection.reset()

    def rows_to_update(self, row_ids: torch.Tensor) -> torch.Tensor | None:
        """Positions in ``row_ids`` (the rows holding a gradient) of those the optimizer step updates; ``None``: all
        (``config.update_rows`` 0)."""
        return None if self.row_selection is None else self.row_selection.choose(row_ids)

    def rows_updated(self, row_ids: torch.Tensor) -> None:
        """The optimizer updated rows ``row_ids`` of the store (those this rank owns; maybe none): count them, and
        drop the device cache's copies of the rows updated on any rank. Every rank calls it for every adapter at every
        step (a sharded store's collectives pair up; caching is the same on every rank)."""
        self.traffic.rows_updated += row_ids.numel()
        if self.transfer.cache_bytes:
            self.rows_changed(self.store.row_ids_updated_anywhere(row_ids))

    def rows_changed(self, row_ids: torch.Tensor | None = None) -> None:
        """The master rows ``row_ids`` (all if ``None``) were written: device copies of them are stale now."""
        self.transfer.invalidate(row_ids)
        if self.serving is not None:
            self.serving.place()
